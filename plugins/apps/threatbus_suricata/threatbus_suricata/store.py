"""The detections the plugin holds, persisted in the rules file it writes.

The rules file is the single source of truth: every detection is one
comment line ``# threatbus-entry {json}`` (indicator id, modified time, sid,
how it is detected, the indicator itself), followed by its rule for
rule-based detections. On start the state is rebuilt from that file, so a
restart of the plugin neither loses detections nor changes their sids.
Dataset and hash list files are derived from the same state and rewritten
with it. Every file is written atomically: a temporary file in the same
directory, fsync, then ``os.replace``.

A million detections may be held, so the texts of the entries (the
indicator and its rule, ~600 bytes each) are not kept in memory: an entry
holds where its text is, in the rules file last written (kept open) or, if
it changed since, in a spool file (an unlinked temporary file next to the
rules file). Both are read through the page cache, not the process's
memory; a write copies the texts from there into the new rules file.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import itertools
import logging
import os
import tempfile
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, Any

import orjson

from threatbus.data import DecodeError, Indicator, from_payload
from threatbus.lifecycle import is_active, is_older, is_removal
from threatbus_suricata.mapping import (
    DATASET,
    RESERVED_SIDS,
    RULE,
    STATIC_SID_OFFSETS,
    Detection,
    Settings,
    Unsupported,
    classify,
    dataset_path,
    hashlist_path,
    stable_sid,
    static_rules,
)

logger = logging.getLogger(__name__)

ENTRY_PREFIX = "# threatbus-entry "
SETTINGS_PREFIX = "# threatbus-settings "
HEADER = (
    "# Written by Threat Bus (threatbus-suricata). Do not edit: the file is rewritten on every change.\n"
    "# Each '# threatbus-entry' line records one indicator; rules follow their entry.\n"
)
_ENTRY_PREFIX = ENTRY_PREFIX.encode()
# Bytes copied per read when a write moves entry texts into the new rules file.
COPY_CHUNK = 1 << 20
# Entries read per hold of the lock when a snapshot reads every held indicator.
READ_BATCH = 1000


class ForeignFile(Exception):
    """The rules file exists but is not the plugin's own."""


@dataclass(slots=True, eq=False)
class Entry:
    """What the store keeps in memory of one held indicator (a million may be held).

    The indicator itself and its rule live in the entry's text, on disk
    (``offset``, ``length``; in the spool while ``spooled``).
    """

    indicator_id: str
    modified: str
    set_name: str  # the dataset or hash algorithm of its value; "" for a rule of its own
    value: str  # what sightings report (the IP, domain, URL or hash)
    sid: int | None = None
    rev: int = 1  # the rule's rev: bumped when a new version replaces the detection under the same sid
    rule: int = 0  # hash of a rule's Detection: tells a changed rule apart without keeping it
    expires: bool = False  # the indicator has a valid_until
    span: int = 0  # where its text is, packed in one int (an int object costs 32 bytes): see ``place``

    def place(self, spooled: bool, offset: int, length: int) -> None:
        self.span = offset << 33 | length << 1 | spooled

    @property
    def spooled(self) -> bool:
        return bool(self.span & 1)

    @property
    def offset(self) -> int:
        return self.span >> 33

    @property
    def length(self) -> int:
        return (self.span >> 1) & 0xFFFFFFFF


@dataclass(frozen=True)
class HeldIndicator:
    """One held indicator as readers see it: its detection's sid and value, and the indicator."""

    indicator_id: str
    modified: str
    sid: int | None
    rev: int
    value: str
    payload: dict[str, Any] | None


@dataclass
class Match:
    """An indicator an alert matched, with the value that matched."""

    indicator_id: str
    value: str
    payload: dict[str, Any] | None


@dataclass
class Changes:
    """What a flush has to do."""

    write: bool = False  # files differ from disk
    reload: bool = False  # rule lines changed: Suricata must reload its rules
    dataset_ops: list[tuple[str, Detection]] = field(default_factory=list)  # (command, detection)


def _still_active(payload: dict[str, Any], now: datetime) -> bool:
    try:
        return is_active(payload, now)
    except ValueError:  # an unreadable valid_until (held from before validation): keep it
        return True


def _detection_record(detection: Detection) -> dict[str, Any]:
    """The ``detection`` of an entry line: kind and value, and the other fields that are set."""
    record: dict[str, Any] = {"kind": detection.kind, "value": detection.value}
    if detection.what:
        record["what"] = detection.what
    if detection.header:
        record["header"] = detection.header
    if detection.options:
        record["options"] = detection.options
    if detection.given_rule:
        record["given_rule"] = detection.given_rule
    if detection.sid is not None:
        record["sid"] = detection.sid
    if detection.set_name:
        record["set_name"] = detection.set_name
    if detection.set_type:
        record["set_type"] = detection.set_type
    if detection.datavalue:
        record["datavalue"] = detection.datavalue
    return record


def _ids(holders: str | list[str] | None) -> list[str]:
    if holders is None:
        return []
    return [holders] if isinstance(holders, str) else list(holders)


def _indicator_of(text: bytes) -> dict[str, Any] | None:
    """The indicator embedded in an entry's text."""
    end = text.find(b"\n")
    record = orjson.loads(text[len(_ENTRY_PREFIX) : end if end >= 0 else None])
    indicator = record.get("indicator") if isinstance(record, dict) else None
    return indicator if isinstance(indicator, dict) else None


def write_atomically(path: Path, text: str | Iterable[str]) -> None:
    """Replace ``path`` with ``text`` (or its parts) so readers see the old or the new file, never a mix."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            if isinstance(text, str):
                out.write(text)
            else:  # a million entries: no copy of the whole file in memory
                out.writelines(text)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(tmp, 0o644)  # Suricata often runs as another user
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


class DetectionStore:
    """All detections, indexed for applying indicators and for mapping alerts back.

    Thread-safe: the detection worker applies indicators and flushes, the EVE
    worker looks up alerts, the snapshot hook reads payloads.
    """

    def __init__(
        self, rules_file: Path, settings: Settings, sid_min: int, sid_max: int, dataset_command_limit: int = 1000
    ) -> None:
        self.rules_file = rules_file
        self.base = str(rules_file.with_suffix("")) if rules_file.suffix else str(rules_file)
        self.directory = str(rules_file.parent)
        self.settings = settings
        self.sid_min = sid_min
        self.sid_max = sid_max
        self._lock = threading.RLock()
        self.entries: dict[str, Entry] = {}
        self.by_sid: dict[int, str] = {}
        # set (or hash algorithm) -> value -> the id of the indicator detected by it, or the ids when several share it
        self.by_value: dict[str, dict[str, str | list[str]]] = {}
        self._changes = Changes()
        self._dirty_lists: set[str] = set()  # dataset names and hash algorithms to rewrite
        self.dataset_command_limit = dataset_command_limit
        self._written: IO[bytes] | None = None  # the rules file last written or loaded, open for reading
        self._spool: IO[bytes] | None = None  # texts of entries that changed since
        self._spool_size = 0
        self._spool_unflushed = False
        self._modified: dict[str, str] = {}  # one string per distinct modified time (a bulk load shares few)

    def close(self) -> None:
        with self._lock:
            for source in (self._written, self._spool):
                if source is not None:
                    source.close()
            self._written = self._spool = None

    # ---- entry texts ---------------------------------------------------

    def _spool_text(self, entry: Entry, text: bytes) -> None:
        if self._spool is None:
            Path(self.directory).mkdir(parents=True, exist_ok=True)
            self._spool = tempfile.TemporaryFile(dir=self.directory, prefix=".threatbus-spool.")
            self._spool_size = 0
        self._spool.write(text)
        entry.place(True, self._spool_size, len(text))
        self._spool_size += len(text)
        self._spool_unflushed = True

    def _source(self, spooled: bool) -> int:
        """The file descriptor texts are read from (the lock is held)."""
        source = self._spool if spooled else self._written
        if source is None:
            raise OSError("the file holding the entry texts is closed")
        if spooled and self._spool_unflushed:
            source.flush()
            self._spool_unflushed = False
        return source.fileno()

    def _text(self, entry: Entry) -> bytes:
        """The entry's lines in the rules file (the lock is held)."""
        return os.pread(self._source(entry.spooled), entry.length, entry.offset)

    def _payload(self, entry: Entry) -> dict[str, Any] | None:
        try:
            return _indicator_of(self._text(entry))
        except (OSError, orjson.JSONDecodeError) as err:
            logger.error("cannot read the entry of %s: %s", entry.indicator_id, err)
            return None

    def _held(self, entry: Entry) -> HeldIndicator:
        return HeldIndicator(
            entry.indicator_id, entry.modified, entry.sid, entry.rev, entry.value, self._payload(entry)
        )

    # ---- applying indicators ------------------------------------------

    def apply(self, indicator: Indicator) -> str:
        """Add, update or remove the detection of ``indicator``.

        Returns what happened: added, updated, removed, unchanged, stale or
        unknown (removal of an indicator we do not hold). Raises ``Unsupported``.
        """
        modified = indicator.modified or ""
        if is_removal(indicator.payload):  # REMOVE, revoked, or expiry
            with self._lock:
                old = self.entries.get(indicator.id)
                if old is None:
                    return "unknown"
                if is_older(modified, old.modified):
                    return "stale"  # the removal of a version a newer one replaced
                self._remove(old)
                return "removed"
        detection = classify(indicator, self.settings)
        # The JSON it came in (no second encoding) unless that spans lines (the entry is one line).
        raw = indicator.encode()
        if b"\n" in raw or b"\r" in raw:
            raw = orjson.dumps(indicator.payload)
        with self._lock:
            old = self.entries.get(indicator.id)
            if old is not None:
                if is_older(modified, old.modified):
                    return "stale"
                if self._same_detection(old, detection):
                    if modified != old.modified or self._payload(old) != indicator.payload:
                        old.modified = self._shared_modified(modified)
                        old.expires = b'"valid_until"' in raw
                        self._spool_text(old, self._render(old, detection, raw))
                        self._changes.write = True
                    return "unchanged"
            entry = self._new_entry(indicator.id, modified, detection, raw)
            keep = old.sid if old is not None and old.set_name == "" and detection.sid is None else None
            if keep is not None and old is not None:
                entry.rev = old.rev + 1  # the same sid with another rule: Suricata sees a new revision
            self._add(entry, detection, raw, keep_sid=keep, replacing=old)
            return "updated" if old is not None else "added"

    def _shared_modified(self, modified: str) -> str:
        shared = self._modified.setdefault(modified, modified)
        if len(self._modified) > 4096:  # feeds with a time per indicator: stop collecting
            self._modified.clear()
        return shared

    def _new_entry(self, indicator_id: str, modified: str, detection: Detection, raw: bytes | None) -> Entry:
        rule = detection.kind == RULE
        return Entry(
            indicator_id,
            self._shared_modified(modified),
            "" if rule else detection.set_name,
            detection.value,
            rule=hash(detection) if rule else 0,
            expires=raw is not None and b'"valid_until"' in raw,
        )

    @staticmethod
    def _same_detection(entry: Entry, detection: Detection) -> bool:
        if detection.kind == RULE:
            return entry.set_name == "" and entry.rule == hash(detection)
        return entry.set_name == detection.set_name and entry.value == detection.value

    def _add(
        self,
        entry: Entry,
        detection: Detection,
        raw: bytes | None,
        keep_sid: int | None = None,
        replacing: Entry | None = None,
    ) -> None:
        """Hold ``entry``; its text is rendered from ``raw`` (the indicator's JSON) or already on disk (None)."""
        if detection.kind == RULE:
            entry.sid = self._allocate_sid(entry.indicator_id, detection, keep_sid)
        if replacing is not None:
            self._remove(replacing)
        if raw is None and detection.kind == RULE and entry.sid != keep_sid:  # its rule on disk has another sid
            raw = orjson.dumps(self._payload(entry))
        if raw is not None:
            self._spool_text(entry, self._render(entry, detection, raw))
        self.entries[entry.indicator_id] = entry
        self._changes.write = True
        if detection.kind == RULE:
            assert entry.sid is not None
            self.by_sid[entry.sid] = entry.indicator_id
            self._changes.reload = True
            return
        values = self.by_value.get(detection.set_name)
        if values is None:
            values = self.by_value[detection.set_name] = {}
        holders = values.get(detection.value)
        if holders is not None:  # shared with other indicators: nothing changes for Suricata
            if isinstance(holders, str):
                values[detection.value] = [holders, entry.indicator_id]
            else:
                holders.append(entry.indicator_id)
        else:
            values[detection.value] = entry.indicator_id
            self._dirty_lists.add(detection.set_name)
            if detection.kind == DATASET:
                self._dataset_op("dataset-add", detection)
            else:  # hash lists are read by Suricata on a rule reload only
                self._changes.reload = True

    def _remove(self, entry: Entry) -> None:
        del self.entries[entry.indicator_id]
        self._changes.write = True
        if entry.set_name == "":
            if self.by_sid.get(entry.sid) == entry.indicator_id:  # type: ignore[arg-type]
                del self.by_sid[entry.sid]  # type: ignore[arg-type]
            self._changes.reload = True
            return
        values = self.by_value.get(entry.set_name, {})
        holders = values.get(entry.value)
        if isinstance(holders, list):
            if entry.indicator_id in holders:
                holders.remove(entry.indicator_id)
            if len(holders) == 1:
                values[entry.value] = holders[0]
            return
        if holders == entry.indicator_id:
            del values[entry.value]
            if not values:
                del self.by_value[entry.set_name]
            self._dirty_lists.add(entry.set_name)
            if entry.set_name in (self.settings.ip_set, self.settings.domain_set):
                self._dataset_op("dataset-remove", self._dataset_detection(entry))
            else:
                self._changes.reload = True

    def _dataset_detection(self, entry: Entry) -> Detection:
        """The detection of a dataset entry, from its set and value."""
        set_type = "ip" if entry.set_name == self.settings.ip_set else "string"
        datavalue = self._datavalue(entry.set_name, entry.value)
        return Detection(DATASET, entry.value, set_name=entry.set_name, set_type=set_type, datavalue=datavalue)

    def _datavalue(self, set_name: str, value: str) -> str:
        """A value as its data file (and Suricata's unix socket) spells it: strings in base64."""
        if set_name == self.settings.domain_set and self.settings.mode == "datasets":
            return base64.b64encode(value.encode()).decode()
        return value

    def _dataset_op(self, command: str, detection: Detection) -> None:
        changes = self._changes
        if changes.reload:
            return  # a reload makes Suricata read the dataset files: no command needed
        changes.dataset_ops.append((command, detection))
        if len(changes.dataset_ops) > self.dataset_command_limit:
            # One reload is cheaper than thousands of commands (and a bulk load would queue millions).
            changes.dataset_ops.clear()
            changes.reload = True

    def _allocate_sid(self, indicator_id: str, detection: Detection, keep_sid: int | None) -> int:
        if detection.sid is not None:  # a rule given with its own sid
            owner = self.by_sid.get(detection.sid)
            if owner is not None and owner != indicator_id:
                raise Unsupported(f"sid {detection.sid} is already used by {owner}")
            if self.sid_min <= detection.sid < self.sid_min + RESERVED_SIDS:
                raise Unsupported(f"sid {detection.sid} is reserved for the plugin's own rules")
            return detection.sid
        low, high = self.sid_min + RESERVED_SIDS, self.sid_max
        if keep_sid is not None and low <= keep_sid <= high and self.by_sid.get(keep_sid, indicator_id) == indicator_id:
            return keep_sid
        sid = stable_sid(indicator_id, low, high)
        # Collisions are rare in a wide range; probe to the next free sid.
        for _ in range(high - low + 1):
            owner = self.by_sid.get(sid)
            if owner is None or owner == indicator_id:
                return sid
            sid = low if sid == high else sid + 1
        raise Unsupported(f"no free sid left in {low}-{high}")

    def _render(self, entry: Entry, detection: Detection, raw: bytes) -> bytes:
        """The entry's lines in the rules file: the entry line and, for a rule, the rule."""
        record: dict[str, Any] = {
            "id": entry.indicator_id,
            "modified": entry.modified,
            "sid": entry.sid,
            "detection": _detection_record(detection),
            "indicator": orjson.Fragment(raw),
        }
        if entry.rev > 1:
            record["rev"] = entry.rev
        text = _ENTRY_PREFIX + orjson.dumps(record) + b"\n"
        if detection.kind == RULE:
            assert entry.sid is not None
            rule = detection.render(entry.indicator_id, entry.sid, self.settings.action, entry.rev)
            text += rule.encode() + b"\n"
        return text

    # ---- flushing -----------------------------------------------------

    def take_changes(self) -> Changes:
        """The changes since the last call; the caller writes and reloads."""
        with self._lock:
            changes, self._changes = self._changes, Changes()
            return changes

    def requeue(self, changes: Changes) -> None:
        """Give back the work of a flush that could not write the files."""
        with self._lock:
            self._changes.write |= changes.write
            self._changes.reload |= changes.reload
            self._changes.dataset_ops[:0] = changes.dataset_ops

    def _head(self) -> bytes:
        """The rules file up to the entries: header, settings, the static rules."""
        counts = {name: len(self.by_value.get(name, ())) for name in STATIC_SID_OFFSETS}
        rules = static_rules(self.settings, self.sid_min, self.base, counts)
        return (HEADER + SETTINGS_PREFIX + self._fingerprint() + "\n" + "".join(r + "\n" for r in rules)).encode()

    def _data_files(self, lists: set[str]) -> dict[str, list[str]]:
        """The lines of the data files of ``lists``, by path."""
        if self.settings.mode == "datasets":  # their files must exist before Suricata loads the rules
            lists = lists | {self.settings.ip_set, self.settings.domain_set}
        files = {name: [self._datavalue(name, v) + "\n" for v in self.by_value.get(name, ())] for name in lists}
        return {self._data_path(name): lines for name, lines in files.items()}

    def _data_path(self, name: str) -> str:
        if name in ("md5", "sha1", "sha256"):
            return hashlist_path(self.base, name)
        return dataset_path(self.directory, name)

    def _fingerprint(self) -> str:
        """What decides the mapping; entries written under the same fingerprint are reused as they are."""
        settings = {**vars(self.settings), "sid_min": self.sid_min, "sid_max": self.sid_max, "base": self.base}
        return orjson.dumps(settings, option=orjson.OPT_SORT_KEYS).decode()

    def _runs(self, entries: Iterable[Entry]) -> Iterator[bytes]:
        """The texts of ``entries`` in order (the lock is held), read in runs of adjacent texts."""
        first: Entry | None = None
        run_end = 0
        for entry in entries:
            if first is not None and (
                entry.spooled != first.spooled or entry.offset != run_end or run_end - first.offset > COPY_CHUNK
            ):
                yield self._read(first, run_end)
                first = None
            if first is None:
                first = entry
            run_end = entry.offset + entry.length
        if first is not None:
            yield self._read(first, run_end)

    def _read(self, first: Entry, end: int) -> bytes:
        size = end - first.offset
        data = os.pread(self._source(first.spooled), size, first.offset)
        if len(data) != size:
            raise OSError(f"entry texts cut short: {len(data)} of {size} bytes read")
        return data

    def write(self) -> None:
        """Write the data files, then the rules file that refers to them (with the texts of every entry)."""
        with self._lock:
            lists = self._dirty_lists
            self._dirty_lists = set()
            data_files = self._data_files(lists)
            head = self._head()
            entries = list(self.entries.values())
        try:
            for path, lines in data_files.items():
                write_atomically(Path(path), lines)
            self._write_rules(head, entries)
        except OSError:
            with self._lock:  # write every list again next time
                self._dirty_lists |= set(self.by_value)
            raise

    def _write_rules(self, head: bytes, entries: list[Entry]) -> None:
        """The rules file from ``head`` and the entries' texts; it becomes where their texts are read from.

        Only the detection worker changes entries, and it is the thread that
        writes: the entries do not change meanwhile; readers take the lock.
        """
        path = self.rules_file
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        out = os.fdopen(fd, "w+b")
        try:
            out.write(head)
            offsets = []
            position = len(head)
            for entry in entries:
                offsets.append(position)
                position += entry.length
            with self._lock:
                for text in self._runs(entries):
                    out.write(text)
            out.flush()
            os.fsync(out.fileno())
            os.chmod(tmp, 0o644)  # Suricata often runs as another user
            os.replace(tmp, path)
        except BaseException:
            out.close()
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        with self._lock:
            for entry, offset in zip(entries, offsets, strict=True):
                entry.place(False, offset, entry.length)
            if self._written is not None:
                self._written.close()
            self._written = out
            if self._spool is not None:  # every live text is in the rules file now
                self._spool.seek(0)
                self._spool.truncate()
                self._spool_size = 0
                self._spool_unflushed = False

    # ---- loading ------------------------------------------------------

    def load(self) -> int:
        """Rebuild the state from the rules file; returns the number of entries read.

        Entries that cannot be read are logged and skipped. Entries whose
        indicator maps differently under the current config (another mode,
        another sid range) are re-mapped, and the next flush rewrites them.
        """
        # Read line by line, with a digest to compare it with what the state renders: a file of a
        # million entries is hundreds of MB, and neither it nor its lines are held whole.
        try:
            source = open(self.rules_file, "rb")  # kept open: the entries' texts are read from it
        except FileNotFoundError:
            logger.info("rules file %s does not exist yet; starting without detections", self.rules_file)
            self._changes.write = self._changes.reload = True
            return 0
        digest = hashlib.sha256()
        loaded = 0
        head = [source.readline() for _ in range(5)]
        if not head[0].startswith(HEADER.splitlines()[0].encode()) and (b"".join(head) + source.read()).strip():
            source.close()
            raise ForeignFile(
                f"{self.rules_file} exists but was not written by Threat Bus; refusing to overwrite it "
                "(configure another rules_file, or remove the file)"
            )
        with self._lock:
            if self._written is not None:
                self._written.close()
            self._written = source
        # Written under the same config: the entries' mapping and texts can be reused unchanged.
        same = (SETTINGS_PREFIX + self._fingerprint() + "\n").encode() in head
        pending: tuple[int, int, bytes] | None = None  # an entry line, until the line after it is read
        offset = 0
        for number, raw in enumerate(itertools.chain(head, source), 1):
            digest.update(raw)
            if pending is not None:
                loaded += self._load_line(*pending, raw, same)
                pending = None
            if raw.startswith(_ENTRY_PREFIX):
                pending = (number, offset, raw)
            offset += len(raw)
        if pending is not None:
            loaded += self._load_line(*pending, b"", same)
        with self._lock:
            self._dirty_lists |= set(self.by_value)
            self._changes.dataset_ops.clear()  # Suricata loads the sets from their files
            rendered = hashlib.sha256(self._head())
            for text in self._runs(list(self.entries.values())):
                rendered.update(text)
            data_files = [self._data_path(name) for name in self._all_lists()]
            if rendered.digest() != digest.digest() or not all(os.path.exists(path) for path in data_files):
                self._changes.write = self._changes.reload = True
            else:
                self._changes = Changes()
        return loaded

    def _all_lists(self) -> set[str]:
        lists = set(self.by_value)
        if self.settings.mode == "datasets":
            lists |= {self.settings.ip_set, self.settings.domain_set}
        return lists

    def _load_line(self, number: int, offset: int, line: bytes, next_line: bytes, same_settings: bool) -> int:
        """Load the entry of ``line`` at ``offset`` (``next_line`` may be its rule); 1 if loaded, 0 if skipped."""
        try:
            record = orjson.loads(line[len(_ENTRY_PREFIX) :])
            self._load_entry(record, offset, line, next_line, same_settings)
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError, DecodeError) as err:
            logger.warning("%s:%d: skipping unreadable entry: %s", self.rules_file, number, err)
            return 0
        return 1

    def _load_entry(self, record: dict[str, Any], offset: int, line: bytes, next_line: bytes, same: bool) -> None:
        payload = record.get("indicator")
        fields = dict(record["detection"])
        fields["options"] = tuple(fields.get("options", ()))
        detection = Detection(**fields)
        length = 0
        if same and line.endswith(b"\n"):
            if detection.kind != RULE:
                length = len(line)
            elif next_line.endswith(b"\n") and not next_line.startswith(b"#"):
                length = len(line) + len(next_line)
        raw: bytes | None = None
        if not length:  # re-mapped under the current config, rendered anew
            if not isinstance(payload, dict):
                raise ValueError("the entry does not hold its indicator")
            indicator = from_payload(payload)
            if not isinstance(indicator, Indicator) or indicator.id != record["id"]:
                raise ValueError("embedded indicator does not match the entry")
            try:
                detection = classify(indicator, self.settings)
            except Unsupported as err:
                logger.warning("dropping detection of %s: %s", record["id"], err)
                return
            raw = orjson.dumps(payload)
        entry = self._new_entry(str(record["id"]), str(record["modified"]), detection, raw)
        if length:
            entry.place(False, offset, length)
            entry.expires = b'"valid_until"' in line
        rev = record.get("rev", 1)
        entry.rev = rev if isinstance(rev, int) and rev > 0 else 1
        sid = record.get("sid")
        with self._lock:
            duplicate = self.entries.get(entry.indicator_id)
            if duplicate is not None:
                self._remove(duplicate)
            self._add(entry, detection, raw, keep_sid=sid if isinstance(sid, int) else None)

    # ---- reading ------------------------------------------------------

    def __len__(self) -> int:
        return len(self.entries)

    def indicator_of_sid(self, sid: int) -> HeldIndicator | None:
        with self._lock:
            indicator_id = self.by_sid.get(sid)
            entry = self.entries.get(indicator_id) if indicator_id else None
            return self._held(entry) if entry is not None else None

    def entry(self, indicator_id: str) -> HeldIndicator | None:
        with self._lock:
            entry = self.entries.get(indicator_id)
            return self._held(entry) if entry is not None else None

    def holders(self, set_name: str, value: str) -> list[Match]:
        with self._lock:
            return [
                Match(i, value, self._payload(self.entries[i]))
                for i in _ids(self.by_value.get(set_name, {}).get(value))
                if i in self.entries
            ]

    def payloads(self, now: datetime | None = None) -> Iterator[tuple[str, dict[str, Any]]]:
        """(modified, indicator) of every held indicator active at ``now`` (not yet expired), decoded one at a time."""
        now = now or datetime.now(timezone.utc)
        with self._lock:
            held = list(self.entries.values())
        for start in range(0, len(held), READ_BATCH):
            with self._lock:  # a write may move the texts between batches
                batch = [
                    (entry.modified, entry.expires, self._payload(entry))
                    for entry in held[start : start + READ_BATCH]
                    if self.entries.get(entry.indicator_id) is entry
                ]
            for modified, expires, payload in batch:
                if payload is not None and (not expires or _still_active(payload, now)):
                    yield modified, payload

    def expiring(self) -> list[dict[str, Any]]:
        """The held indicators that have a ``valid_until`` (to schedule their expiry)."""
        with self._lock:
            payloads = [self._payload(e) for e in self.entries.values() if e.expires]
        return [p for p in payloads if p is not None and "valid_until" in p]

    def drop_expired(self, now: datetime | None = None) -> int:
        """Remove the detections whose ``valid_until`` passed (e.g. while the node was down)."""
        now = now or datetime.now(timezone.utc)
        with self._lock:
            gone = []
            for entry in self.entries.values():
                if entry.expires:
                    payload = self._payload(entry)
                    if payload is not None and not _still_active(payload, now):
                        gone.append(entry)
            for entry in gone:
                self._remove(entry)
            return len(gone)

    def static_sid(self, name: str) -> int:
        return self.sid_min + STATIC_SID_OFFSETS[name]
