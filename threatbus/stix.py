"""STIX 2.1 content checks and helpers shared by the plugins.

Checking a STIX pattern with stix2-patterns' ANTLR parser costs ~200 µs, too
much for every message on a busy bus. The single-comparison patterns that
make up nearly all shared intel are recognised by a strict regular
expression instead; every other pattern goes through stix2-patterns once and
the verdict is cached.
"""

from __future__ import annotations

import functools
import re
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from stix2patterns.v21.pattern import Pattern
from stix2patterns.validator import run_validator

from threatbus.data import Indicator, Message, Sighting, SnapshotEnvelope
from threatbus.errors import DecodeError
from threatbus.lifecycle import is_removal, parse_timestamp


class InvalidIntel(DecodeError):
    """A message is well-formed JSON but its STIX content is invalid."""


class ExpiredIntel(InvalidIntel):
    """An indicator whose ``valid_until`` passed before it entered the bus.

    Valid STIX, but no sensor should look for it any more: entry points count
    it apart from invalid input (``metrics.EXPIRED_ON_ENTRY``) and drop it.
    """


_TIMESTAMP = re.compile(r"^\d{4}-(0[1-9]|1[0-2])-(0[1-9]|[12]\d|3[01])T([01]\d|2[0-3]):[0-5]\d:([0-5]\d|60)(\.\d+)?Z$")

# Hash algorithms and their hex lengths, as the STIX 2.1 hashes vocabulary names them.
HASH_LENGTHS = {"MD5": 32, "SHA-1": 40, "SHA-256": 64, "SHA-512": 128, "SHA3-256": 64, "SHA3-512": 128}
_HASH_ALIASES = {"SHA1": "SHA-1", "SHA256": "SHA-256", "SHA512": "SHA-512"}

# Object paths whose single equality comparison needs no grammar check beyond the regex.
_SIMPLE_PATHS = frozenset(
    {
        "ipv4-addr:value",
        "ipv6-addr:value",
        "domain-name:value",
        "url:value",
        "email-addr:value",
        "mac-addr:value",
        "autonomous-system:number",
        "file:name",
        "user-account:user_id",
        "windows-registry-key:key",
        "process:name",
    }
)

_POINT_PATTERN = re.compile(
    r"^\[\s*(?P<type>[a-z][a-z0-9-]*):(?P<prop>[a-z_]+(?:\.(?:'[A-Za-z0-9-]+'|[A-Za-z0-9_-]+))?)"
    r"\s*=\s*'(?P<value>(?:[^'\\]|\\['\\])*)'\s*\]$"
)
_HEX = re.compile(r"^[0-9a-fA-F]+$")
_OCTET = r"(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
_DOTTED_IPV4 = re.compile(rf"{_OCTET}(?:\.{_OCTET}){{3}}")


@dataclass(frozen=True)
class PointIndicator:
    """An indicator that matches one value: ``[type:property = 'value']``.

    ``property`` is normalised: ``hashes.'SHA-256'`` becomes ``hashes.SHA-256``.
    """

    object_type: str
    property: str
    value: str

    @property
    def path(self) -> str:
        return f"{self.object_type}:{self.property}"


def _normalise_property(prop: str) -> str:
    if not prop.startswith("hashes."):
        return prop
    name = prop[len("hashes.") :].strip("'").upper()
    return "hashes." + _HASH_ALIASES.get(name, name)


def _unescape(value: str) -> str:
    return value.replace("\\'", "'").replace("\\\\", "\\")


def _simple_match(pattern: str) -> PointIndicator | None:
    match = _POINT_PATTERN.match(pattern)
    if match is None:
        return None
    prop = _normalise_property(match["prop"])
    point = PointIndicator(match["type"], prop, _unescape(match["value"]))
    if point.path in _SIMPLE_PATHS:
        return point
    if point.object_type == "file" and prop.startswith("hashes."):
        length = HASH_LENGTHS.get(prop[len("hashes.") :])
        if length is not None and len(point.value) == length and _HEX.match(point.value):
            return point
    return None


def pattern_errors(pattern: str) -> tuple[str, ...]:
    """Why a STIX 2.1 pattern is invalid; empty when it is valid."""
    # Point patterns are nearly all intel and nearly all unique: the regex
    # answers them without filling a cache; only the parser's verdicts are kept.
    if _simple_match(pattern) is not None:
        return ()
    return _parser_errors(pattern)


@functools.lru_cache(maxsize=16384)
def _parser_errors(pattern: str) -> tuple[str, ...]:
    try:
        return tuple(run_validator(pattern, stix_version="2.1"))
    except Exception as err:  # the ANTLR-based validator raises on some inputs
        return (f"FAIL: {err}",)


def dotted_ipv4(value: str) -> bool:
    """Whether ``value`` is one IPv4 address in canonical dotted form (what ``ipaddress`` would print).

    Apps map most indicators of a feed from such values; this test costs a
    fraction of ``ipaddress.ip_network``.
    """
    return _DOTTED_IPV4.fullmatch(value) is not None


def point_indicator(pattern: str) -> PointIndicator | None:
    """The single value a pattern matches, or None for any other pattern."""
    point = _simple_match(pattern)
    if point is not None or pattern_errors(pattern):
        return point
    return _parsed_point_indicator(pattern)


@functools.lru_cache(maxsize=16384)
def _parsed_point_indicator(pattern: str) -> PointIndicator | None:
    inspected = Pattern(pattern).inspect()
    if inspected.observation_ops or inspected.qualifiers or len(inspected.comparisons) != 1:
        return None
    ((object_type, comparisons),) = inspected.comparisons.items()
    if len(comparisons) != 1:
        return None
    ((path, operator, literal),) = comparisons
    if operator != "=" or not (literal.startswith("'") and literal.endswith("'")):
        return None
    prop = _normalise_property(".".join(f"'{p}'" if "-" in p else str(p) for p in path))
    return PointIndicator(object_type, prop, _unescape(literal[1:-1]))


def _check_timestamps(payload: dict[str, Any], *keys: str) -> None:
    checked = set()  # created, modified and valid_from are mostly one value: check it once
    for key in keys:
        value = payload.get(key)
        if value is None:
            continue
        if not isinstance(value, str) or (value not in checked and not _TIMESTAMP.match(value)):
            raise InvalidIntel(f"{payload['type']} {payload['id']}: '{key}' is not a STIX timestamp: {value!r}")
        checked.add(value)


def _check_spec_version(payload: dict[str, Any]) -> None:
    version = payload.get("spec_version")
    if version is not None and version != "2.1":
        raise InvalidIntel(f"{payload['type']} {payload['id']}: spec_version must be 2.1, got {version!r}")


def _check_validity_window(payload: dict[str, Any]) -> None:
    until = payload.get("valid_until")
    if until is None:
        return
    valid_from = payload.get("valid_from")
    # The spec (and the original) require valid_until to be later than valid_from.
    if isinstance(valid_from, str) and parse_timestamp(until) <= parse_timestamp(valid_from):
        raise InvalidIntel(
            f"indicator {payload['id']}: 'valid_until' {until} is not later than 'valid_from' {valid_from}"
        )


def check_indicator(indicator: Indicator) -> None:
    payload = indicator.payload
    _check_spec_version(payload)
    _check_timestamps(payload, "created", "modified", "valid_from", "valid_until")
    _check_validity_window(payload)
    if indicator.pattern_type == "stix":
        errors = pattern_errors(indicator.pattern)
        if errors:
            raise InvalidIntel(f"indicator {indicator.id}: invalid pattern {indicator.pattern!r}: {errors[0]}")


def check_sighting(sighting: Sighting) -> None:
    _check_spec_version(sighting.payload)
    _check_timestamps(sighting.payload, "created", "modified", "first_seen", "last_seen")
    embedded = sighting.indicator
    if embedded is not None:
        check_indicator(embedded)


def check_not_expired(indicator: Indicator, now: datetime | None = None) -> None:
    """Raise ``ExpiredIntel`` for an indicator (not a removal) whose ``valid_until`` passed.

    Removals pass: dropping what is already gone does no harm, and a node
    whose subscribers still hold the indicator needs to hear of it.
    """
    until = indicator.payload.get("valid_until")
    if until is None or is_removal(indicator.payload):
        return
    now = now or datetime.now(timezone.utc)
    if parse_timestamp(until) <= now:
        raise ExpiredIntel(f"indicator {indicator.id}: expired at 'valid_until' {until}, before it entered the bus")


def validate(message: Message, now: datetime | None = None) -> None:
    """Check the STIX content of a message that enters the bus from an app.

    Raises ``InvalidIntel``, or its subclass ``ExpiredIntel`` for an
    indicator (also in a snapshot envelope) already past its
    ``valid_until``: this runs once per message, where it enters the bus, so
    no hop checks the time again. Structure was already checked by
    ``data.decode``.
    """
    if isinstance(message, SnapshotEnvelope):
        message = message.stix
    if isinstance(message, Indicator):
        check_indicator(message)
        check_not_expired(message, now)
    elif isinstance(message, Sighting):
        check_sighting(message)


def timestamp(when: datetime | None = None) -> str:
    """A STIX timestamp (UTC, millisecond precision) for ``when`` or now."""
    when = (when or datetime.now(timezone.utc)).astimezone(timezone.utc)
    return when.strftime("%Y-%m-%dT%H:%M:%S.") + f"{when.microsecond // 1000:03d}Z"


def new_indicator(pattern: str, pattern_type: str = "stix", **properties: Any) -> Indicator:
    """A fresh STIX 2.1 indicator; ``properties`` may override any field."""
    now = timestamp()
    payload = {
        "type": "indicator",
        "spec_version": "2.1",
        "id": f"indicator--{uuid.uuid4()}",
        "created": now,
        "modified": now,
        "pattern": pattern,
        "pattern_type": pattern_type,
        "pattern_version": "2.1",
        "valid_from": now,
    }
    payload.update(properties)
    return Indicator(payload)


def new_sighting(
    sighting_of_ref: str,
    *,
    source: str,
    match_type: str = "LIVE",
    value: str | None = None,
    indicator: Indicator | None = None,
    context: dict[str, Any] | None = None,
    seen: datetime | None = None,
) -> Sighting:
    """A STIX 2.1 sighting of an indicator with the x_threatbus_* properties."""
    now = timestamp()
    payload: dict[str, Any] = {
        "type": "sighting",
        "spec_version": "2.1",
        "id": f"sighting--{uuid.uuid4()}",
        "created": now,
        "modified": now,
        "sighting_of_ref": sighting_of_ref,
        "last_seen": timestamp(seen) if seen else now,
        "count": 1,
        "x_threatbus_source": source,
        "x_threatbus_match_type": match_type,
    }
    if value is not None:
        payload["x_threatbus_indicator_value"] = value
    if indicator is not None:
        payload["x_threatbus_indicator"] = indicator.payload
    if context:
        payload["x_threatbus_sighting_context"] = context
    return Sighting(payload)
