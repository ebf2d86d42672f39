"""Mapping between STIX 2.1 and Zeek's Intel framework, both ways.

Threat Bus -> Zeek: a point indicator (one equality comparison) becomes one
Zeek intel item; the indicator id is the item's ``meta$source``, so a
removal deletes exactly what this indicator added. Patterns Zeek cannot
express raise ``Unsupported``.

Zeek -> Threat Bus: an ``intel_match`` event (sent by the shipped Zeek
script for every ``Intel::match`` of an item whose source is an indicator
id) becomes a STIX 2.1 sighting of that indicator.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from threatbus.data import Indicator, Sighting
from threatbus.errors import DecodeError
from threatbus.stix import dotted_ipv4, new_sighting, point_indicator
from threatbus_zeek import broker

SIGHTING_SOURCE = "Zeek"

# STIX object path -> Zeek Intel::Type (addresses are decided per value: ADDR or SUBNET).
INTEL_TYPES: dict[str, str] = {
    "ipv4-addr:value": "ADDR",
    "ipv6-addr:value": "ADDR",
    "domain-name:value": "DOMAIN",
    "url:value": "URL",
    "email-addr:value": "EMAIL",
    "file:hashes.MD5": "FILE_HASH",
    "file:hashes.SHA-1": "FILE_HASH",
    "file:hashes.SHA-256": "FILE_HASH",
    "file:name": "FILE_NAME",
    "x509-certificate:hashes.SHA-1": "CERT_HASH",
    "user-account:user_id": "USER_NAME",
    "user-account:account_login": "USER_NAME",
}

_HASH_LENGTHS = {"MD5": 32, "SHA-1": 40, "SHA-256": 64}
_HEX = re.compile(r"^[0-9a-fA-F]+$")
_URL_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_INDICATOR_ID = re.compile(r"^indicator--[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")
_MAX_DESC = 256


class Unsupported(ValueError):
    """The indicator has no Zeek intel equivalent; the message says why."""


class InvalidMatch(DecodeError):
    """An intel_match event from Zeek does not have the expected form."""


@dataclass(frozen=True, slots=True)  # slots: one per held indicator, a million may be
class ZeekIntel:
    """One Zeek intel item derived from an indicator."""

    indicator: str
    intel_type: str  # Intel::Type without the module, e.g. "ADDR"
    source: str  # the STIX indicator id
    desc: str = ""
    remove: bool = False

    @property
    def enum_name(self) -> str:
        return f"Intel::{self.intel_type}"

    def event(self, namespace: str) -> dict[str, Any]:
        """The Broker-encoded Zeek event that adds or removes this item."""
        common = [broker.string(self.indicator), broker.enum(self.enum_name), broker.string(self.source)]
        if self.remove:
            return broker.event(f"{namespace}::remove_intel", common)
        return broker.event(f"{namespace}::add_intel", [*common, broker.string(self.desc)])


def add_batch_event(items: list[ZeekIntel], namespace: str) -> dict[str, Any]:
    """One ``add_intels`` event inserting all of ``items`` (additions only).

    Its argument is a vector of ``ThreatBus::IntelItem`` records; Broker
    carries a record as the vector of its fields.
    """
    records = [
        broker.vector(
            [
                broker.string(item.indicator),
                broker.enum(item.enum_name),
                broker.string(item.source),
                broker.string(item.desc),
            ]
        )
        for item in items
    ]
    return broker.event(f"{namespace}::add_intels", [broker.vector(records)])


def _address(value: str, family: str) -> tuple[str, str]:
    if family == "ipv4-addr" and dotted_ipv4(value):  # the common case, without ipaddress (slow)
        return value, "ADDR"
    try:
        network = ipaddress.ip_network(value, strict=False)
    except ValueError:
        raise Unsupported(f"{value!r} is not a valid {family} address or CIDR") from None
    expected = 4 if family == "ipv4-addr" else 6
    if network.version != expected:
        raise Unsupported(f"{value!r} is not an {family} value")
    if "/" not in value or network.prefixlen == network.max_prefixlen:
        return str(network.network_address), "ADDR"
    return str(network), "SUBNET"


def zeek_url(value: str) -> str:
    """A URL as Zeek's HTTP analyser reports it: no scheme, no fragment, a path."""
    url = _URL_SCHEME.sub("", value.strip(), count=1).split("#", 1)[0]
    if "/" not in url:
        url += "/"
    return url


def _value_for(path: str, intel_type: str, value: str) -> tuple[str, str]:
    value = value.strip()
    if not value:
        raise Unsupported("empty value")
    if path in ("ipv4-addr:value", "ipv6-addr:value"):
        return _address(value, path.split(":", 1)[0])
    if intel_type == "URL":
        return zeek_url(value), intel_type
    if intel_type in ("FILE_HASH", "CERT_HASH"):
        algorithm = path.rsplit(".", 1)[1]
        if len(value) != _HASH_LENGTHS[algorithm] or not _HEX.match(value):
            raise Unsupported(f"{value!r} is not a {algorithm} hash")
        return value.lower(), intel_type
    if intel_type in ("DOMAIN", "EMAIL") and any(c.isspace() for c in value):
        raise Unsupported(f"{value!r} contains white space")
    return value, intel_type


def _description(indicator: Indicator) -> str:
    for key in ("name", "description"):
        text = indicator.payload.get(key)
        if isinstance(text, str) and text.strip():
            text = " ".join(text.split())
            return text if len(text) <= _MAX_DESC else text[: _MAX_DESC - 1] + "…"
    return ""


def is_removal(indicator: Indicator) -> bool:
    """True when Zeek should drop the indicator: x_threatbus_update REMOVE, or revoked."""
    return indicator.is_removal or indicator.payload.get("revoked") is True


def to_zeek_intel(indicator: Indicator) -> ZeekIntel:
    """The Zeek intel item for ``indicator``; raises ``Unsupported`` when Zeek cannot express it."""
    if indicator.pattern_type != "stix":
        raise Unsupported(f"pattern type {indicator.pattern_type!r} (only 'stix' is supported)")
    point = point_indicator(indicator.pattern)
    if point is None:
        raise Unsupported("pattern is not a single equality comparison")
    intel_type = INTEL_TYPES.get(point.path)
    if intel_type is None:
        raise Unsupported(f"Zeek's Intel framework has no type for {point.path}")
    value, intel_type = _value_for(point.path, intel_type, point.value)
    return ZeekIntel(value, intel_type, indicator.id, _description(indicator), is_removal(indicator))


# ---- Zeek -> Threat Bus ------------------------------------------------------


def _match_time(value: Any) -> datetime:
    if isinstance(value, datetime):
        return value
    if isinstance(value, float):
        if value <= 0:  # network_time() before the first packet
            return datetime.now(timezone.utc)
        try:
            return datetime.fromtimestamp(value, timezone.utc)
        except (OverflowError, OSError, ValueError):
            raise InvalidMatch(f"intel_match: time {value!r} is out of range") from None
    raise InvalidMatch(f"intel_match: 'ts' must be a real or timestamp, got {type(value).__name__}")


def _context(zeek_context: dict[Any, Any], intel_type: str) -> dict[str, Any]:
    context: dict[str, Any] = {"indicator_type": intel_type}
    endpoints = {}
    for key, value in zeek_context.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise InvalidMatch("intel_match: context must be a table[string] of string")
        if key in ("orig_h", "orig_p", "resp_h", "resp_p"):
            endpoints[key] = value
        else:
            context[key] = value
    if endpoints:
        context["endpoints"] = endpoints
    return context


def sighting_from_match(event: broker.ZeekEvent) -> Sighting:
    """The sighting for one ``intel_match(ts, source, indicator, indicator_type, context)`` event."""
    if len(event.args) != 5:
        raise InvalidMatch(f"intel_match: expected 5 arguments, got {len(event.args)}")
    ts, source, value, intel_type, zeek_context = event.args
    if not isinstance(source, str) or not _INDICATOR_ID.match(source):
        raise InvalidMatch(f"intel_match: source must be a STIX indicator id, got {source!r}")
    if not isinstance(value, str) or not value:
        raise InvalidMatch(f"intel_match: indicator must be a non-empty string, got {value!r}")
    if not isinstance(intel_type, broker.EnumValue) or not intel_type.startswith("Intel::"):
        raise InvalidMatch(f"intel_match: indicator_type must be an Intel::Type enum, got {intel_type!r}")
    if not isinstance(zeek_context, dict):
        raise InvalidMatch("intel_match: context must be a table")
    type_name = intel_type[len("Intel::") :]
    return new_sighting(
        source,
        source=SIGHTING_SOURCE,
        match_type="LIVE",
        value=value,
        context=_context(zeek_context, type_name),
        seen=_match_time(ts),
    )
