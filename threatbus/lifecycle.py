"""The lifecycle of an indicator: which version counts, and when it is active.

One definition for the whole bus, so snapshots, the intel log, expiry and
every app agree (INTEL.md, "STIX 2.1 indicator lifecycle"):

- ``id`` names an indicator across its versions; ``modified`` orders them.
  A version older than the one already known is stale and ignored.
- A version is a *removal* when it is ``revoked`` or carries
  ``x_threatbus_update: REMOVE``. Revocation is final: no later version
  brings the indicator back. A REMOVE is not: a newer version re-adds it.
  At equal ``modified`` a removal wins (the original's producers send the
  unchanged indicator with REMOVE added).
- A version that is not a removal is *active* until its ``valid_until``.

Works on plain JSON payloads (``Message.payload``): no STIX library on the
hot path.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from enum import Enum
from typing import Any

REMOVE = "REMOVE"


def parse_timestamp(value: str) -> datetime:
    """A STIX timestamp (``YYYY-MM-DDTHH:MM:SS[.fff…]Z``) as an aware UTC datetime.

    Written out by hand: ``fromisoformat`` takes ``Z`` and arbitrary
    fractions only from Python 3.11, ``strptime`` is ~10x slower. Raises
    ``ValueError`` on anything else.
    """
    if len(value) < 20 or value[-1] != "Z" or value[10] != "T":
        raise ValueError(f"not a STIX timestamp: {value!r}")
    fraction = value[20:-1] if value[19] == "." else ""
    if value[19] not in ".Z" or (value[19] == "." and not fraction.isdigit()):
        raise ValueError(f"not a STIX timestamp: {value!r}")
    microsecond = int((fraction + "000000")[:6]) if fraction else 0
    second = min(int(value[17:19]), 59)  # a leap second counts as the last second of its minute
    return datetime(
        int(value[0:4]),
        int(value[5:7]),
        int(value[8:10]),
        int(value[11:13]),
        int(value[14:16]),
        second,
        microsecond,
        tzinfo=timezone.utc,
    )


def epoch_of(value: str) -> float:
    """``parse_timestamp(value).timestamp()``, several times faster: for the expiry schedule's hot path.

    The common forms (``…:SS.fffZ``, ``…:SSZ``) go through C's
    ``fromisoformat`` once their layout is checked (it accepts more than
    STIX allows); the rest, leap seconds included, through ``parse_timestamp``.
    """
    if (
        len(value) >= 20
        and value[10] == "T"
        and value[-1] == "Z"
        and value[17:19] != "60"
        and (value[19] == "Z" if len(value) == 20 else value[19] == "." and value[20:-1].isdigit())
    ):
        try:
            return datetime.fromisoformat(value[:-1] + "+00:00").timestamp()
        except ValueError:
            pass
    return parse_timestamp(value).timestamp()


def version_of(payload: dict[str, Any]) -> datetime:
    """When this version was made: ``modified``, else ``created``, else the epoch."""
    stamp = payload.get("modified") or payload.get("created")
    return parse_timestamp(stamp) if isinstance(stamp, str) else datetime.min.replace(tzinfo=timezone.utc)


def is_older(version: str, than: str) -> bool:
    """True when the version stamped ``version`` (``modified``/``created`` text) is older than ``than``.

    For apps that keep the stamp of what they hold: compared as times, a
    missing stamp ("") is the oldest, and text that is not a STIX timestamp
    (held from before validation) is compared as text.
    """
    if not version or not than:
        return not version and bool(than)
    try:
        return parse_timestamp(version) < parse_timestamp(than)
    except ValueError:
        return version < than


def is_revoked(payload: dict[str, Any]) -> bool:
    return payload.get("revoked") is True


def is_removal(payload: dict[str, Any]) -> bool:
    """True when this version tells consumers to drop the indicator."""
    return payload.get("revoked") is True or payload.get("x_threatbus_update") == REMOVE


def expires_at(payload: dict[str, Any]) -> datetime | None:
    """The end of the indicator's validity (``valid_until``), if it has one."""
    until = payload.get("valid_until")
    return parse_timestamp(until) if isinstance(until, str) else None


def is_active(payload: dict[str, Any], now: datetime) -> bool:
    """True when consumers should look for this version at time ``now``."""
    if is_removal(payload):
        return False
    until = expires_at(payload)
    return until is None or until > now


def as_removal(payload: dict[str, Any]) -> dict[str, Any]:
    """The payload to deliver to apps to drop an indicator, whatever the cause.

    Apps written for the original understand only ``x_threatbus_update:
    REMOVE``, so every removal the bus delivers carries it.
    """
    if payload.get("x_threatbus_update") == REMOVE:
        return payload
    return {**payload, "x_threatbus_update": REMOVE}


class Change(Enum):
    """What applying one version did to the state."""

    ADDED = "added"  # an id not active before is active now
    REPLACED = "replaced"  # a newer version of an active indicator
    REMOVED = "removed"  # an active indicator is gone (removal, revocation)
    STALE = "stale"  # older or equal version, or after revocation: ignored
    IGNORED_REMOVAL = "ignored_removal"  # a removal of something not active: recorded, nothing to undo


@dataclass(frozen=True)
class Applied:
    change: Change
    previous: dict[str, Any] | None  # the version this one replaced or removed


@dataclass
class _Entry:
    version: datetime
    payload: dict[str, Any]


class IntelState:
    """The latest version of each indicator seen, removals included.

    Removals stay as tombstones so that an older version arriving later is
    recognised as stale; ``prune`` forgets tombstones older than the intel
    any source could still send. Not thread-safe: one owner thread.
    """

    def __init__(self) -> None:
        self._entries: dict[str, _Entry] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, indicator_id: object) -> bool:
        return indicator_id in self._entries

    def get(self, indicator_id: str) -> dict[str, Any] | None:
        entry = self._entries.get(indicator_id)
        return entry.payload if entry else None

    def apply(self, payload: dict[str, Any]) -> Applied:
        """Take one version of an indicator into the state."""
        indicator_id = payload["id"]
        version = version_of(payload)
        removal = is_removal(payload)
        entry = self._entries.get(indicator_id)
        if entry is not None:
            current = entry.payload
            if is_revoked(current):
                return Applied(Change.STALE, None)
            newer = version > entry.version or (version == entry.version and removal and not is_removal(current))
            if not newer:
                return Applied(Change.STALE, None)
            was_live = not is_removal(current)
            entry.version, entry.payload = version, payload
            if removal:
                return Applied(Change.REMOVED if was_live else Change.IGNORED_REMOVAL, current if was_live else None)
            return Applied(Change.REPLACED if was_live else Change.ADDED, current if was_live else None)
        self._entries[indicator_id] = _Entry(version, payload)
        return Applied(Change.IGNORED_REMOVAL if removal else Change.ADDED, None)

    def active(self, now: datetime) -> Iterator[dict[str, Any]]:
        """The current version of every indicator active at ``now``."""
        for entry in self._entries.values():
            if is_active(entry.payload, now):
                yield entry.payload

    def prune(self, before: datetime) -> int:
        """Forget removed or expired indicators whose version is older than ``before``."""
        gone = [
            key
            for key, entry in self._entries.items()
            if entry.version < before and not is_active(entry.payload, before)
        ]
        for key in gone:
            del self._entries[key]
        return len(gone)
