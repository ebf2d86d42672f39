"""Following Suricata's EVE JSON log and turning Threat Bus alerts into sightings."""

from __future__ import annotations

import ipaddress
import logging
import os
from datetime import datetime, timezone
from typing import Any

from threatbus_suricata.mapping import RESERVED_SIDS, STATIC_SID_OFFSETS
from threatbus_suricata.store import DetectionStore, Match

logger = logging.getLogger(__name__)

READ_CHUNK = 1024 * 1024
MAX_LINE_BYTES = 16 * 1024 * 1024


class LogFollower:
    """Reads complete lines appended to a file, across rotation and truncation.

    Rotation (the path now names another file): the rest of the old file is
    read, then the new one from its start. Truncation (the file shrank below
    the read position): reading restarts at the beginning. A missing file is
    waited for and then read from its start. A file that exists when
    following begins is read from its end unless ``from_start``.
    """

    def __init__(self, path: str, from_start: bool = False) -> None:
        self.path = path
        self.from_start = from_start
        self._file: Any = None
        self._inode: tuple[int, int] | None = None
        self._position = 0
        self._partial = b""
        self.rotations = 0
        self.truncations = 0

    def _open(self, at_end: bool) -> bool:
        try:
            handle = open(self.path, "rb")  # kept open across polls
        except FileNotFoundError:
            return False
        stat = os.fstat(handle.fileno())
        inode = (stat.st_dev, stat.st_ino)
        self._file = handle
        if inode == self._inode and stat.st_size >= self._position:
            # The same file again (after a read error): go on where we were, replay nothing.
            handle.seek(self._position)
            at_end = True
        else:
            self._position = handle.seek(0, os.SEEK_END) if at_end else 0
            self._partial = b""
        self._inode = inode
        logger.info("following %s from %s", self.path, "its end" if at_end else "its start")
        return True

    def begin(self) -> None:
        """Open the file now, so that lines written from here on are read (called before polling)."""
        if self._file is None and not self._open(at_end=not self.from_start):
            self.from_start = True

    def poll(self) -> list[bytes]:
        """The complete lines written since the last call (maybe none)."""
        if self._file is None and not self._open(at_end=not self.from_start):
            self.from_start = True  # a file that appears later holds only new events
            return []
        self.from_start = True  # files after a rotation are read in full
        lines = self._read()
        if lines:
            return lines
        try:
            stat = os.stat(self.path)
        except FileNotFoundError:
            return []  # rotated away, the new file is not there yet: keep the old one
        if (stat.st_dev, stat.st_ino) != self._inode:
            lines = self._read()  # whatever was written to the old file before the switch
            if self._partial:
                logger.warning(
                    "%s rotated with an incomplete last line; dropping %d bytes", self.path, len(self._partial)
                )
            self._file.close()
            self._file = None
            self.rotations += 1
            logger.info("%s was rotated; following the new file", self.path)
            if self._open(at_end=False):
                lines += self._read()
            return lines
        if stat.st_size < self._position:
            self.truncations += 1
            logger.info("%s was truncated; reading it from the start", self.path)
            self._position = self._file.seek(0)
            self._partial = b""
            return self._read()
        return []

    def _read(self) -> list[bytes]:
        lines: list[bytes] = []
        while True:
            chunk = self._file.read(READ_CHUNK)
            if not chunk:
                return lines
            self._position += len(chunk)
            data = self._partial + chunk
            parts = data.split(b"\n")
            self._partial = parts.pop()
            if len(self._partial) > MAX_LINE_BYTES:
                logger.warning("%s: dropping a line longer than %d bytes", self.path, MAX_LINE_BYTES)
                self._partial = b""
            lines.extend(part for part in parts if part.strip())

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def event_time(event: dict[str, Any]) -> datetime | None:
    """The time of an EVE event (``2024-05-01T10:00:00.123456+0000``), None if unreadable."""
    value = event.get("timestamp")
    if not isinstance(value, str):
        return None
    for layout in ("%Y-%m-%dT%H:%M:%S.%f%z", "%Y-%m-%dT%H:%M:%S%z"):
        try:
            return datetime.strptime(value, layout).astimezone(timezone.utc)
        except ValueError:
            continue
    return None


CONTEXT_FIELDS = (
    "timestamp",
    "flow_id",
    "in_iface",
    "src_ip",
    "src_port",
    "dest_ip",
    "dest_port",
    "proto",
    "app_proto",
)
ALERT_FIELDS = ("action", "gid", "signature_id", "rev", "signature", "category", "severity")


def sighting_context(event: dict[str, Any]) -> dict[str, Any]:
    """The flow and alert facts a sighting carries in ``x_threatbus_sighting_context``."""
    context = {key: event[key] for key in CONTEXT_FIELDS if key in event}
    alert = event.get("alert") or {}
    context.update({key: alert[key] for key in ALERT_FIELDS if key in alert})
    return context


def _domains(event: dict[str, Any]) -> list[str]:
    """The DNS names of an alert event, across the EVE layouts of Suricata 6 to 8."""
    dns = event.get("dns")
    names: list[str] = []
    if isinstance(dns, dict):
        candidates = [dns]
        for key in ("query", "queries"):
            if isinstance(dns.get(key), list):
                candidates.extend(item for item in dns[key] if isinstance(item, dict))
        for item in candidates:
            name = item.get("rrname")
            if isinstance(name, str):
                names.append(name.rstrip(".").lower())
    return names


def _file_hashes(event: dict[str, Any], algorithm: str) -> list[str]:
    found = []
    files = event.get("files")
    candidates = [item for item in files if isinstance(item, dict)] if isinstance(files, list) else []
    if isinstance(event.get("fileinfo"), dict):
        candidates.append(event["fileinfo"])
    for item in candidates:
        value = item.get(algorithm)
        if isinstance(value, str):
            found.append(value.lower())
    return found


def _address(value: Any) -> str | None:
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        return None


def matches(event: dict[str, Any], store: DetectionStore) -> list[Match] | None:
    """The indicators an alert event matched.

    None when the alert does not come from a Threat Bus rule (most alerts);
    an empty list when it does but no held indicator explains it (e.g. it
    was removed meanwhile).
    """
    alert = event.get("alert")
    if not isinstance(alert, dict):
        return None
    sid = alert.get("signature_id")
    if type(sid) is not int:
        return None
    entry = store.indicator_of_sid(sid)
    if entry is not None:
        return [Match(entry.indicator_id, entry.value, entry.payload)]
    metadata = alert.get("metadata")
    if isinstance(metadata, dict) and isinstance(metadata.get("threatbus_indicator"), list):
        found = [store.entry(i) for i in metadata["threatbus_indicator"] if isinstance(i, str)]
        return [Match(e.indicator_id, e.value, e.payload) for e in found if e is not None]
    offset = sid - store.sid_min
    if not 0 <= offset < RESERVED_SIDS:
        return None if not store.sid_min <= sid <= store.sid_max else []
    settings = store.settings
    result: list[Match] = []
    if offset in (STATIC_SID_OFFSETS["ip-dst"], STATIC_SID_OFFSETS["ip-src"]):
        key = "dest_ip" if offset == STATIC_SID_OFFSETS["ip-dst"] else "src_ip"
        address = _address(event.get(key))
        if address is not None:
            result = store.holders(settings.ip_set, address)
    elif offset == STATIC_SID_OFFSETS["domain"]:
        for name in _domains(event):
            result.extend(store.holders(settings.domain_set, name))
    else:
        for algorithm in ("md5", "sha1", "sha256"):
            if offset == STATIC_SID_OFFSETS[algorithm]:
                for digest in _file_hashes(event, algorithm):
                    result.extend(store.holders(algorithm, digest))
    return result
