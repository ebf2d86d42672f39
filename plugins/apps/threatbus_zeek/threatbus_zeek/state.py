"""The intel the zeek app has given Zeek, by indicator: what to remove, replace and resend.

Zeek's Intel framework keys an item by its value and type, and this app
tags each item with the indicator id (``meta$source``). To replace a
version whose pattern changed, or to remove an indicator whatever its last
version said, the app must remember the item it sent for each indicator:
that is this state. Versions follow ``threatbus.lifecycle`` (an older
version than the one held is ignored; a removal takes the held item out).

Optionally kept in a file (``state_file``), so that a restarted node knows
what Zeek holds: what expired meanwhile is removed on the next connect,
the rest expires on time.
"""

from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import orjson

from threatbus.data import DecodeError, Indicator, from_payload
from threatbus.lifecycle import is_active, is_older, is_removal
from threatbus_zeek.mapping import Unsupported, ZeekIntel, to_zeek_intel

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class Held:
    version: str  # modified (or created) of the version held
    item: ZeekIntel
    payload_json: str | None  # the indicator, only where it is kept for the file (a str: orjson's bytes keep KiBs)

    @property
    def payload(self) -> dict[str, Any]:
        return orjson.loads(self.payload_json) if self.payload_json is not None else {}


class ZeekIntelState:
    """The item held for each indicator. Used by the link worker only (one thread).

    A million may be held: each keeps its Zeek item and version, and the
    indicator itself (as its JSON) only with ``keep_payloads``, which the
    file (``save``, ``load``, ``drop_expired``) needs.
    """

    def __init__(self, keep_payloads: bool = True) -> None:
        self.held: dict[str, Held] = {}
        self.dirty = False
        self.keep_payloads = keep_payloads
        self._versions: dict[str, str] = {}  # one string per distinct version (a bulk load shares few)

    def __len__(self) -> int:
        return len(self.held)

    def __contains__(self, indicator_id: object) -> bool:
        return indicator_id in self.held

    def apply(self, indicator: Indicator) -> list[ZeekIntel]:
        """Take one version in; returns the Zeek items to remove and add, in that order.

        Raises ``Unsupported`` for a new indicator Zeek cannot express (a
        new version Zeek cannot express removes the held item).
        """
        payload = indicator.payload
        version = indicator.modified or ""
        held = self.held.get(indicator.id)
        if held is not None and is_older(version, held.version):
            return []  # stale
        if is_removal(payload):
            if held is None:
                # Not given to Zeek by this app as far as it knows (a restart without
                # state_file, another app): drop what the removal names; harmless if absent.
                try:
                    return [_removal(to_zeek_intel(indicator))]
                except Unsupported:
                    return []
            del self.held[indicator.id]
            self.dirty = True
            return [_removal(held.item)]
        try:
            item = to_zeek_intel(indicator)
        except Unsupported:
            if held is None:
                raise
            del self.held[indicator.id]
            self.dirty = True
            return [_removal(held.item)]
        self.held[indicator.id] = Held(
            self._shared(version), item, _one_line(indicator) if self.keep_payloads else None
        )
        self.dirty = True
        if held is None or _same_item(held.item, item):
            return [item]  # an insert of the same item updates its description in Zeek
        return [_removal(held.item), item]

    def _shared(self, version: str) -> str:
        shared = self._versions.setdefault(version, version)
        if len(self._versions) > 4096:  # a version per indicator: stop collecting
            self._versions.clear()
        return shared

    def items(self) -> list[ZeekIntel]:
        """Every held item (to bring a reconnected Zeek up to date)."""
        return [held.item for held in self.held.values()]

    def payloads(self) -> list[dict[str, Any]]:
        return [held.payload for held in self.held.values() if held.payload_json is not None]

    def drop_expired(self, now: datetime | None = None) -> list[ZeekIntel]:
        """Remove what expired (e.g. while the node was down); returns the items Zeek must drop."""
        now = now or datetime.now(timezone.utc)
        gone = []
        for indicator_id, held in list(self.held.items()):
            if held.payload_json is None:
                continue  # not kept: its expiry is the bus's
            try:
                active = is_active(held.payload, now)
            except ValueError:
                active = True
            if not active:
                del self.held[indicator_id]
                gone.append(_removal(held.item))
        self.dirty |= bool(gone)
        return gone

    # ---- the file --------------------------------------------------------

    def save(self, path: Path) -> None:
        """Write the held indicators, one JSON line each, atomically."""
        text = "".join(
            held.payload_json + "\n" for held in self.held.values() if held.payload_json is not None
        ).encode()
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as out:
                out.write(text)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        self.dirty = False

    def load(self, path: Path) -> int:
        """Read what a previous run held; returns how many. Unreadable lines are logged and skipped."""
        try:
            lines = path.read_bytes().splitlines()
        except FileNotFoundError:
            return 0
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                indicator = from_payload(orjson.loads(line))
                if not isinstance(indicator, Indicator):
                    raise DecodeError(f"a {indicator.type_name}, not an indicator")
                self.apply(indicator)
            except (orjson.JSONDecodeError, DecodeError, Unsupported, ValueError) as err:
                logger.warning("%s:%d: skipping unreadable indicator: %s", path, number, err)
        self.dirty = False
        return len(self.held)


def _one_line(indicator: Indicator) -> str:
    """The indicator's JSON as it came (no second encoding), unless that spans lines (the file has one per line)."""
    raw = indicator.encode()
    return (orjson.dumps(indicator.payload) if b"\n" in raw or b"\r" in raw else raw).decode()


def _removal(item: ZeekIntel) -> ZeekIntel:
    return ZeekIntel(item.indicator, item.intel_type, item.source, item.desc, remove=True)


def _same_item(a: ZeekIntel, b: ZeekIntel) -> bool:
    return (a.indicator, a.intel_type, a.source) == (b.indicator, b.intel_type, b.source)
