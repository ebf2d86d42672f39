"""STIX 2.1 content checks and helpers shared by the plugins.

Checking a STIX pattern with stix2-patterns' ANTLR parser costs ~200 µs, too
much for every message on a busy bus. The single-comparison patterns that
make up nearly all shared intel are recognised by a strict regular
expression instead; every other pattern goes through stix2-patterns once and
the verdict is cached.
"""

from __future__ import annotations

import contextlib
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


# The layout of a STIX timestamp (used with fullmatch); whether the date exists is checked by parsing it.
_TIMESTAMP = re.compile(
    r"\d{4}-(?:0[1-9]|1[0-2])-(?:0[1-9]|[12]\d|3[01])T(?:[01]\d|2[0-3]):[0-5]\d:(?:[0-5]\d|60)(?:\.\d+)?Z", re.ASCII
)

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

# A quoted value with \\ and \' escapes, as an unrolled loop (no alternation per character).
_QUOTED = r"'[^'\\]*(?:\\['\\][^'\\]*)*'"
_POINT_PATTERN = re.compile(
    r"^\[\s*(?P<type>[a-z][a-z0-9-]*):(?P<prop>[a-z_]+(?:\.(?:'[A-Za-z0-9-]+'|[A-Za-z0-9_-]+))?)"
    rf"\s*=\s*(?P<quoted>{_QUOTED})\s*\]$"
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
    object_type = match["type"]
    prop = _normalise_property(match["prop"])
    value = _unescape(match["quoted"][1:-1])
    if f"{object_type}:{prop}" in _SIMPLE_PATHS:
        return PointIndicator(object_type, prop, value)
    if object_type == "file" and prop.startswith("hashes."):
        length = HASH_LENGTHS.get(prop[len("hashes.") :])
        if length is not None and len(value) == length and _HEX.match(value):
            return PointIndicator(object_type, prop, value)
    return None


def _valid_point_regex() -> re.Pattern[str]:
    """The point patterns ``_simple_match`` accepts, as one regex: validity without a ``PointIndicator``.

    The same language (tests compare them), except that a trailing newline
    (after the pattern, or ending a hash value) sends the pattern to the
    parser. Hash names are matched without (ASCII) case, quoted or not, as
    ``_normalise_property`` reads them.
    """
    paths = "|".join(re.escape(path) for path in sorted(_SIMPLE_PATHS))
    names_of_length: dict[int, list[str]] = {}
    for name, length in HASH_LENGTHS.items():
        names_of_length.setdefault(length, []).append(name)
    for alias, name in _HASH_ALIASES.items():
        names_of_length[HASH_LENGTHS[name]].append(alias)
    hashes = "|".join(
        rf"file:hashes\.(?ai:(?P<q{length}>'?)(?:{'|'.join(map(re.escape, names))})(?P=q{length}))"
        rf"\s*=\s*'[0-9a-fA-F]{{{length}}}'"
        for length, names in names_of_length.items()
    )
    return re.compile(rf"\[\s*(?:(?:{paths})\s*=\s*{_QUOTED}|{hashes})\s*\]")


_VALID_POINT = _valid_point_regex()


def pattern_errors(pattern: str) -> tuple[str, ...]:
    """Why a STIX 2.1 pattern is invalid; empty when it is valid."""
    # Point patterns are nearly all intel and nearly all unique: one regex
    # answers them without filling a cache; only the parser's verdicts are kept.
    if _VALID_POINT.fullmatch(pattern) is not None:
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


def _stix_time(payload: dict[str, Any], key: str, value: Any) -> datetime:
    """``value`` (of ``payload[key]``) as an aware datetime; ``InvalidIntel`` unless it is a STIX timestamp of a real date."""
    if isinstance(value, str) and _TIMESTAMP.fullmatch(value):
        try:
            return datetime.fromisoformat(value)  # C, from Python 3.11 with 'Z' and any fraction
        except ValueError:
            with contextlib.suppress(ValueError):
                return parse_timestamp(value)  # Python 3.10, leap seconds
    raise InvalidIntel(f"{payload['type']} {payload['id']}: '{key}' is not a STIX timestamp: {value!r}")


def _check_timestamps(payload: dict[str, Any], keys: tuple[str, ...]) -> list[datetime | None]:
    """The timestamps of ``keys`` (None where absent), each checked; ``InvalidIntel`` for the first bad one."""
    times: list[datetime | None] = []
    text = parsed = None
    for key in keys:
        value = payload.get(key)
        if value is None:
            times.append(None)
            continue
        if value != text:  # created, modified and valid_from are mostly one value: parse it once
            parsed = _stix_time(payload, key, value)
            text = value
        times.append(parsed)
    return times


def _check_spec_version(payload: dict[str, Any]) -> None:
    version = payload.get("spec_version")
    if version is not None and version != "2.1":
        raise InvalidIntel(f"{payload['type']} {payload['id']}: spec_version must be 2.1, got {version!r}")


_INDICATOR_TIMES = ("created", "modified", "valid_from", "valid_until")


def _checked_indicator(payload: dict[str, Any]) -> datetime | None:
    """``check_indicator`` on a payload; returns its ``valid_until``, parsed."""
    _check_spec_version(payload)
    _, _, valid_from, until = _check_timestamps(payload, _INDICATOR_TIMES)
    # The spec (and the original) require valid_until to be later than valid_from.
    if until is not None and valid_from is not None and until <= valid_from:
        raise InvalidIntel(
            f"indicator {payload['id']}: 'valid_until' {payload['valid_until']} is not later than "
            f"'valid_from' {payload['valid_from']}"
        )
    if payload["pattern_type"] == "stix":
        errors = pattern_errors(payload["pattern"])
        if errors:
            raise InvalidIntel(f"indicator {payload['id']}: invalid pattern {payload['pattern']!r}: {errors[0]}")
    return until


def check_indicator(indicator: Indicator) -> None:
    _checked_indicator(indicator.payload)


def check_sighting(sighting: Sighting) -> None:
    _check_spec_version(sighting.payload)
    _check_timestamps(sighting.payload, ("created", "modified", "first_seen", "last_seen"))
    embedded = sighting.indicator
    if embedded is not None:
        check_indicator(embedded)


def _refuse_expired(payload: dict[str, Any], until: datetime, now: datetime | None) -> None:
    if until <= (now or datetime.now(timezone.utc)) and not is_removal(payload):
        raise ExpiredIntel(
            f"indicator {payload['id']}: expired at 'valid_until' {payload['valid_until']}, before it entered the bus"
        )


def check_not_expired(indicator: Indicator, now: datetime | None = None) -> None:
    """Raise ``ExpiredIntel`` for an indicator (not a removal) whose ``valid_until`` passed.

    Removals pass: dropping what is already gone does no harm, and a node
    whose subscribers still hold the indicator needs to hear of it.
    """
    payload = indicator.payload
    until = payload.get("valid_until")
    if until is not None:
        _refuse_expired(payload, _stix_time(payload, "valid_until", until), now)


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
        payload = message.payload
        until = _checked_indicator(payload)  # each timestamp parsed once, for the checks and the expiry
        if until is not None:
            _refuse_expired(payload, until, now)
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
