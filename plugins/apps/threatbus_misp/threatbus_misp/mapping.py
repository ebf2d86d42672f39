"""MISP attributes as STIX 2.1 indicators.

Single-value types get point patterns from the table ``POINT_TYPES`` (below
and in README.md): that is the form the apps on the bus match (Zeek's Intel
framework, Suricata, VAST). misp-stix, MISP's own converter, would turn an
``ip-dst`` into a ``network-traffic`` pattern that none of them understands.
``ip-src|port`` and ``ip-dst|port`` are written here too (misp-stix makes
the port a string). Every other type (composites such as ``filename|md5`` or ``domain|ip``,
``AS``, ``mutex``, ``regkey`` ...) goes through misp-stix; what it cannot
express as a STIX pattern is ``Unmappable``.
"""

from __future__ import annotations

import ipaddress
import logging
import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from threatbus.data import Indicator
from threatbus.stix import HASH_LENGTHS, pattern_errors, timestamp

logger = logging.getLogger(__name__)


class InvalidAttribute(ValueError):
    """A MISP attribute in a message lacks what every attribute has (uuid, type, value)."""


class Unmappable(ValueError):
    """The attribute has no STIX pattern (its type, or this value)."""


# MISP type -> STIX object path of a point pattern.
POINT_TYPES: dict[str, str] = {
    "ip-src": "ipv4-addr:value",  # ipv6-addr:value for IPv6 values, see _ip_path
    "ip-dst": "ipv4-addr:value",
    "domain": "domain-name:value",
    "hostname": "domain-name:value",
    "url": "url:value",
    "email": "email-addr:value",
    "email-src": "email-addr:value",
    "email-dst": "email-addr:value",
    "filename": "file:name",
    "mac-address": "mac-addr:value",
    "md5": "file:hashes.MD5",
    "sha1": "file:hashes.'SHA-1'",
    "sha256": "file:hashes.'SHA-256'",
    "sha512": "file:hashes.'SHA-512'",
    "sha3-256": "file:hashes.'SHA3-256'",
    "sha3-512": "file:hashes.'SHA3-512'",
}
_HASH_TYPES = {
    "md5": "MD5",
    "sha1": "SHA-1",
    "sha256": "SHA-256",
    "sha512": "SHA-512",
    "sha3-256": "SHA3-256",
    "sha3-512": "SHA3-512",
}
_HEX = re.compile(r"^[0-9a-fA-F]+$")

# TLP tags (MISP's tlp taxonomy) -> marking definitions, least to most restrictive (INTEL.md).
TLP_MARKINGS: dict[str, tuple[int, str]] = {
    "tlp:clear": (0, "marking-definition--94868c89-83c2-464b-929b-a1a8aa3c8487"),
    "tlp:white": (0, "marking-definition--613f2e26-407d-48c7-9eca-b8e91df99dc9"),
    "tlp:green": (1, "marking-definition--34098fce-860f-48ae-8e50-ebd3cc5e41da"),
    "tlp:amber": (2, "marking-definition--f88d31f6-486f-44da-b317-01333bde0b82"),
    "tlp:amber+strict": (3, "marking-definition--939a9414-2ddd-4d32-a0cd-375ea402b003"),
    "tlp:red": (4, "marking-definition--5e57c739-391a-4eb3-b6be-7d15ca92d5ed"),
}
SOURCE_NAME = "misp"  # external_references[].source_name of the indicators this plugin makes


def _truthy(value: Any) -> bool:
    # MISP writes to_ids as true/false, 1/0 or "1"/"0" depending on version and endpoint.
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true")
    return bool(value)


def _names(tags: Any) -> list[str]:
    if not isinstance(tags, list):
        return []
    return [str(tag["name"]) for tag in tags if isinstance(tag, Mapping) and tag.get("name")]


def _orgs(event: Mapping[str, Any]) -> list[str]:
    """The ways a filter may name the event's creator organisation: id, name or uuid."""
    orgc = event.get("Orgc") if isinstance(event.get("Orgc"), Mapping) else {}
    found = [event.get("orgc_id"), orgc.get("id"), orgc.get("name"), orgc.get("uuid")]
    return [str(value) for value in found if value not in (None, "")]


def _when(value: Any) -> datetime:
    try:
        return datetime.fromtimestamp(int(value), timezone.utc)
    except (TypeError, ValueError, OverflowError, OSError):
        raise InvalidAttribute(f"timestamp must be epoch seconds, got {value!r}") from None


@dataclass(frozen=True)
class MispAttribute:
    """What the plugin uses of a MISP attribute and its event."""

    uuid: str
    type: str
    value: str
    to_ids: bool
    timestamp: datetime
    category: str = ""
    comment: str = ""
    tags: tuple[str, ...] = ()
    orgs: tuple[str, ...] = ()

    @classmethod
    def from_json(cls, attribute: Any, event: Any = None) -> MispAttribute:
        """From an ``Attribute`` object as MISP's feeds and restSearch write it; ``InvalidAttribute`` if unusable."""
        if not isinstance(attribute, Mapping):
            raise InvalidAttribute("'Attribute' must be a JSON object")
        if event is None:
            event = attribute.get("Event")
        event = event if isinstance(event, Mapping) else {}
        for key in ("uuid", "type", "value"):
            if not isinstance(attribute.get(key), str) or not attribute[key]:
                raise InvalidAttribute(f"attribute lacks a string '{key}'")
        try:
            attribute_uuid = str(uuid.UUID(attribute["uuid"]))
        except ValueError:
            raise InvalidAttribute(f"attribute uuid {attribute['uuid'][:60]!r} is not a UUID") from None
        stamp = attribute.get("timestamp")
        return cls(
            uuid=attribute_uuid,
            type=attribute["type"],
            value=attribute["value"],
            to_ids=_truthy(attribute.get("to_ids")),
            timestamp=_when(stamp) if stamp is not None else datetime.now(timezone.utc),
            category=str(attribute.get("category") or ""),
            comment=str(attribute.get("comment") or ""),
            tags=tuple(dict.fromkeys(_names(attribute.get("Tag")) + _names(event.get("Tag")))),
            orgs=tuple(_orgs(event)),
        )

    @property
    def indicator_id(self) -> str:
        return f"indicator--{self.uuid}"


def _literal(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _ip_path(value: str) -> str:
    try:
        network = ipaddress.ip_network(value, strict=False)
    except ValueError:
        raise Unmappable(f"{value[:80]!r} is not an IP address or network") from None
    return "ipv6-addr:value" if network.version == 6 else "ipv4-addr:value"


def point_pattern(attribute_type: str, value: str) -> str | None:
    """The pattern of a type in ``POINT_TYPES``; None for other types. ``Unmappable`` for bad values."""
    path = POINT_TYPES.get(attribute_type)
    if path is None:
        return None
    value = value.strip()
    if not value:
        raise Unmappable("empty value")
    if attribute_type in ("ip-src", "ip-dst"):
        path = _ip_path(value)
    elif attribute_type in _HASH_TYPES:
        if len(value) != HASH_LENGTHS[_HASH_TYPES[attribute_type]] or not _HEX.match(value):
            raise Unmappable(f"{value[:80]!r} is not a {attribute_type} hash")
        value = value.lower()
    elif attribute_type == "mac-address":
        value = value.lower()
    return f"[{path} = {_literal(value)}]"


def ip_port_pattern(attribute_type: str, value: str) -> str | None:
    """``ip-src|port`` / ``ip-dst|port`` as a network-traffic pattern with an integer port; None for other types.

    misp-stix writes the port as a string literal, which never equals the
    integer ``dst_port`` of observed traffic.
    """
    if attribute_type not in ("ip-src|port", "ip-dst|port"):
        return None
    address, separator, port = value.strip().rpartition("|")
    if not separator or not port.isdigit() or not 0 <= int(port) < 65536:
        raise Unmappable(f"{value[:80]!r} is not <ip>|<port>")
    side = "src" if attribute_type == "ip-src|port" else "dst"
    object_type = _ip_path(address).split(":")[0]
    return (
        f"[network-traffic:{side}_ref.type = '{object_type}' AND network-traffic:{side}_ref.value = "
        f"{_literal(address)} AND network-traffic:{side}_port = {int(port)}]"
    )


def misp_stix_pattern(attribute: MispAttribute) -> str:
    """The STIX pattern misp-stix makes of ``attribute``; ``Unmappable`` when there is none."""
    from misp_stix_converter import MISPtoSTIX21Parser  # heavy import, needed for uncommon types only

    parser = MISPtoSTIX21Parser()
    parser.parse_misp_attribute(
        {
            "uuid": attribute.uuid,
            "type": attribute.type,
            "value": attribute.value,
            "category": attribute.category or "Other",
            "to_ids": True,  # misp-stix makes observables, not indicators, of the others
            "timestamp": str(int(attribute.timestamp.timestamp())),
        }
    )
    for stix_object in parser.stix_objects:
        if stix_object.get("type") == "indicator" and stix_object.get("pattern_type") == "stix":
            return str(stix_object["pattern"])
    raise Unmappable(f"misp-stix has no STIX pattern for MISP type {attribute.type!r}")


def pattern_for(attribute: MispAttribute) -> str:
    """The STIX pattern of an attribute. Raises ``Unmappable``."""
    pattern = point_pattern(attribute.type, attribute.value) or ip_port_pattern(attribute.type, attribute.value)
    if pattern is None:
        try:
            pattern = misp_stix_pattern(attribute)
        except Unmappable:
            raise
        except Exception as err:  # the converter fails on values MISP itself would refuse
            raise Unmappable(f"misp-stix cannot convert {attribute.type!r}: {err}") from None
    errors = pattern_errors(pattern)
    if errors:
        raise Unmappable(f"pattern {pattern[:120]!r} is invalid: {errors[0]}")
    return pattern


def tlp_marking(tags: tuple[str, ...]) -> str | None:
    """The marking of the most restrictive TLP tag, if any."""
    found = [TLP_MARKINGS[tag.strip().lower()] for tag in tags if tag.strip().lower() in TLP_MARKINGS]
    return max(found)[1] if found else None


def to_indicator(attribute: MispAttribute, update: str | None = None, host: str | None = None) -> Indicator:
    """The STIX 2.1 indicator ``indicator--<attribute uuid>`` for ``attribute``.

    ``update`` is ``"EDIT"`` or ``"REMOVE"`` (``x_threatbus_update``). A removal
    is a new version: its ``modified`` is now, so consumers that order by
    ``modified`` see it after the attribute's last change. Raises ``Unmappable``.
    """
    pattern = pattern_for(attribute)
    when = timestamp(attribute.timestamp)
    modified = when
    if update == "REMOVE":
        modified = max(when, timestamp())
    reference: dict[str, str] = {"source_name": SOURCE_NAME, "external_id": attribute.uuid}
    if host:
        reference["url"] = f"{host.rstrip('/')}/attributes/view/{attribute.uuid}"
    payload: dict[str, Any] = {
        "type": "indicator",
        "spec_version": "2.1",
        "id": attribute.indicator_id,
        "created": when,
        "modified": modified,
        "pattern": pattern,
        "pattern_type": "stix",
        "pattern_version": "2.1",
        "valid_from": when,
        "labels": [f"misp:type={attribute.type}"],
        "external_references": [reference],
        # MISP's "for detection" flag; policy filters with detection_only look at it (threatbus.policy).
        "x_misp_to_ids": attribute.to_ids,
    }
    if attribute.comment:
        payload["description"] = attribute.comment
    marking = tlp_marking(attribute.tags)
    if marking:
        payload["object_marking_refs"] = [marking]
    if update is not None:
        payload["x_threatbus_update"] = update
    return Indicator(payload)


def is_misp_indicator(payload: Mapping[str, Any]) -> bool:
    """True for indicators this plugin made (they name MISP in ``external_references``)."""
    references = payload.get("external_references")
    return isinstance(references, list) and any(
        isinstance(ref, Mapping) and ref.get("source_name") == SOURCE_NAME for ref in references
    )
