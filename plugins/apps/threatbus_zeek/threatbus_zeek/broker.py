"""Broker's JSON data model ("JSON API v1") as Zeek's WebSocket API speaks it.

Every value is a JSON object ``{"@data-type": <type>, "data": <value>}``;
containers nest such objects. A Zeek event is a vector
``[count 1 (format), count 1 (type: event), [string name, vector args, (vector metadata)]]``;
Zeek 8 adds the metadata vector, older versions send two elements. Messages
on the socket are the client's handshake (a JSON array of topic prefixes),
the server's ``ack``, ``data-message`` objects and ``error`` objects.

Reference: Broker's documentation, "Web Socket" / "JSON API v1", and Zeek's
"Interacting with Zeek using WebSockets".

Encoding builds plain dicts (``count(1)``, ``string("x")`` ...). Decoding
(``to_python``) turns Broker data into Python values and raises
``BrokerDecodeError`` for anything that does not follow the model.
"""

from __future__ import annotations

import ipaddress
import math
import re
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

import orjson

from threatbus.errors import DecodeError

EVENT_FORMAT = 1
EVENT_TYPE = 1
WEBSOCKET_PATH = "/v1/messages/json"

_PORT = re.compile(r"^(\d{1,5})/(tcp|udp|icmp|\?)$")
_TIMESPAN = re.compile(r"^(-?\d+)(ns|ms|s|min|h|d)$")
_TIMESTAMP = re.compile(r"^(\d{4})-(\d{2})-(\d{2})T(\d{2}):(\d{2}):(\d{2})(?:\.(\d{1,9}))?(Z|[+-]\d{2}:?\d{2})?$")
_NANOSECONDS = {"ns": 1, "ms": 10**6, "s": 10**9, "min": 60 * 10**9, "h": 3600 * 10**9, "d": 86400 * 10**9}


class BrokerDecodeError(DecodeError):
    """Data from the WebSocket does not follow Broker's JSON data model."""


class EnumValue(str):
    """A Zeek enum value, carried by its full name (``Intel::ADDR``)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return f"EnumValue({str(self)!r})"


class Port(str):
    """A Zeek port, ``<number>/<protocol>`` (``443/tcp``)."""

    __slots__ = ()

    @property
    def number(self) -> int:
        return int(self.split("/", 1)[0])

    @property
    def protocol(self) -> str:
        return self.split("/", 1)[1]


# ---- encoding ------------------------------------------------------------


def _value(data_type: str, data: Any) -> dict[str, Any]:
    return {"@data-type": data_type, "data": data}


def none() -> dict[str, Any]:
    return _value("none", {})


def boolean(value: bool) -> dict[str, Any]:
    return _value("boolean", bool(value))


def count(value: int) -> dict[str, Any]:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"a Broker count is an unsigned integer, got {value!r}")
    return _value("count", value)


def integer(value: int) -> dict[str, Any]:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"a Broker integer is an integer, got {value!r}")
    return _value("integer", value)


def real(value: float) -> dict[str, Any]:
    return _value("real", float(value))


def string(value: str) -> dict[str, Any]:
    return _value("string", str(value))


def enum(name: str) -> dict[str, Any]:
    return _value("enum-value", str(name))


def address(value: str | ipaddress.IPv4Address | ipaddress.IPv6Address) -> dict[str, Any]:
    return _value("address", str(ipaddress.ip_address(value)))


def subnet(value: str | ipaddress.IPv4Network | ipaddress.IPv6Network) -> dict[str, Any]:
    return _value("subnet", str(ipaddress.ip_network(value, strict=False)))


def port(number: int, protocol: str = "tcp") -> dict[str, Any]:
    return _value("port", f"{number}/{protocol}")


def timestamp(when: datetime) -> dict[str, Any]:
    """A Broker timestamp: ISO 8601 in UTC, millisecond precision (as Broker documents it)."""
    when = when.astimezone(timezone.utc) if when.tzinfo else when
    return _value("timestamp", when.strftime("%Y-%m-%dT%H:%M:%S.") + f"{when.microsecond // 1000:03d}")


def timespan(span: timedelta) -> dict[str, Any]:
    nanoseconds = (span.days * 86_400 + span.seconds) * 1_000_000_000 + span.microseconds * 1_000
    return _value("timespan", f"{nanoseconds}ns")


def vector(items: list[dict[str, Any]]) -> dict[str, Any]:
    return _value("vector", list(items))


def set_of(items: list[dict[str, Any]]) -> dict[str, Any]:
    return _value("set", list(items))


def table(pairs: list[tuple[dict[str, Any], dict[str, Any]]]) -> dict[str, Any]:
    return _value("table", [{"key": key, "value": value} for key, value in pairs])


def event(name: str, args: list[dict[str, Any]]) -> dict[str, Any]:
    """A Zeek event as Broker data (without metadata, which every Zeek version accepts)."""
    return vector([count(EVENT_FORMAT), count(EVENT_TYPE), vector([string(name), vector(args)])])


def data_message(topic: str, data: dict[str, Any]) -> dict[str, Any]:
    return {"type": "data-message", "topic": topic, "@data-type": data["@data-type"], "data": data["data"]}


def handshake(topics: list[str]) -> bytes:
    """The client's first message: the topic prefixes it subscribes to."""
    return orjson.dumps(list(topics))


def encode(message: dict[str, Any]) -> str:
    """A message as the JSON text sent in one WebSocket text frame."""
    return orjson.dumps(message).decode()


# ---- decoding ------------------------------------------------------------


def _fail(what: str, data: Any) -> BrokerDecodeError:
    text = orjson.dumps(data, default=str).decode() if not isinstance(data, str) else repr(data)
    return BrokerDecodeError(f"{what}: {text[:160]}")


def _int(data: Any, what: str) -> int:
    if isinstance(data, bool) or not isinstance(data, int):
        raise _fail(f"{what} must be a JSON integer", data)
    return data


def _str(data: Any, what: str) -> str:
    if not isinstance(data, str):
        raise _fail(f"{what} must be a JSON string", data)
    return data


def _list(data: Any, what: str) -> list[Any]:
    if not isinstance(data, list):
        raise _fail(f"{what} must be a JSON array", data)
    return data


def _parse_timestamp(text: str) -> datetime:
    match = _TIMESTAMP.match(text)
    if match is None:
        raise _fail("timestamp must be ISO 8601 (YYYY-MM-DDThh:mm:ss.sss)", text)
    year, month, day, hour, minute, second, fraction, zone = match.groups()
    microseconds = int((fraction or "0").ljust(6, "0")[:6])
    try:
        when = datetime(int(year), int(month), int(day), int(hour), int(minute), int(second), microseconds)
    except ValueError:
        raise _fail("timestamp out of range", text) from None
    if zone and zone != "Z":
        sign = 1 if zone[0] == "+" else -1
        digits = zone[1:].replace(":", "")
        offset = timedelta(hours=int(digits[:2]), minutes=int(digits[2:]))
        return (when - sign * offset).replace(tzinfo=timezone.utc)
    # Broker timestamps count from the UNIX epoch; the text carries no zone: it is UTC.
    return when.replace(tzinfo=timezone.utc)


def _hashable(value: Any) -> Any:
    if isinstance(value, list):
        return tuple(_hashable(item) for item in value)
    if isinstance(value, dict):
        return tuple(sorted((k, _hashable(v)) for k, v in value.items()))
    return value


def to_python(value: Any) -> Any:
    """A Broker data object as a Python value.

    none -> None, boolean -> bool, count/integer -> int, real -> float,
    string -> str, enum-value -> EnumValue, address -> ip_address,
    subnet -> ip_network, port -> Port, timestamp -> aware datetime (UTC),
    timespan -> timedelta, vector and set -> list, table -> dict (container
    keys become tuples).
    """
    if not isinstance(value, dict) or "@data-type" not in value or "data" not in value:
        raise _fail("expected an object with '@data-type' and 'data'", value)
    kind, data = value["@data-type"], value["data"]
    if kind == "none":
        return None
    if kind == "boolean":
        if not isinstance(data, bool):
            raise _fail("boolean must be true or false", data)
        return data
    if kind == "count":
        number = _int(data, "count")
        if number < 0 or number >= 2**64:
            raise _fail("count must be an unsigned 64-bit integer", data)
        return number
    if kind == "integer":
        number = _int(data, "integer")
        if not -(2**63) <= number < 2**63:
            raise _fail("integer must fit in 64 bits", data)
        return number
    if kind == "real":
        if isinstance(data, bool) or not isinstance(data, (int, float)) or not math.isfinite(data):
            raise _fail("real must be a finite JSON number", data)
        return float(data)
    if kind == "string":
        return _str(data, "string")
    if kind == "enum-value":
        return EnumValue(_str(data, "enum-value"))
    if kind == "address":
        try:
            return ipaddress.ip_address(_str(data, "address"))
        except ValueError:
            raise _fail("invalid address", data) from None
    if kind == "subnet":
        try:
            return ipaddress.ip_network(_str(data, "subnet"), strict=False)
        except ValueError:
            raise _fail("invalid subnet", data) from None
    if kind == "port":
        match = _PORT.match(_str(data, "port"))
        if match is None or int(match[1]) > 65535:
            raise _fail("port must be <number>/<tcp|udp|icmp|?>", data)
        return Port(data)
    if kind == "timestamp":
        return _parse_timestamp(_str(data, "timestamp"))
    if kind == "timespan":
        match = _TIMESPAN.match(_str(data, "timespan"))
        if match is None:
            raise _fail("timespan must be <integer><ns|ms|s|min|h|d>", data)
        return timedelta(microseconds=int(match[1]) * _NANOSECONDS[match[2]] / 1000)
    if kind in ("vector", "set"):
        return [to_python(item) for item in _list(data, kind)]
    if kind == "table":
        result = {}
        for entry in _list(data, "table"):
            if not isinstance(entry, dict) or "key" not in entry or "value" not in entry:
                raise _fail("table entries must be objects with 'key' and 'value'", entry)
            result[_hashable(to_python(entry["key"]))] = to_python(entry["value"])
        return result
    raise _fail("unknown @data-type", kind)


@dataclass(frozen=True)
class ZeekEvent:
    """A Zeek event received over the WebSocket."""

    topic: str
    name: str
    args: list[Any]
    metadata: list[Any] = field(default_factory=list)


@dataclass(frozen=True)
class Ack:
    """The server's answer to the handshake."""

    endpoint: str
    version: str


@dataclass(frozen=True)
class ErrorMessage:
    """The server discarded something the client sent."""

    code: str
    context: str


@dataclass(frozen=True)
class OtherData:
    """A data message that is not a Zeek event."""

    topic: str
    value: Any


def parse_event(topic: str, value: dict[str, Any]) -> ZeekEvent | None:
    """The Zeek event in ``value``, or None when it is other data."""
    if value.get("@data-type") != "vector" or not isinstance(value.get("data"), list):
        return None
    parts = value["data"]
    if len(parts) != 3:
        return None
    fmt, kind = to_python(parts[0]), to_python(parts[1])
    if fmt != EVENT_FORMAT or kind != EVENT_TYPE:
        return None
    body = parts[2]
    if not isinstance(body, dict) or body.get("@data-type") != "vector":
        raise _fail("event body must be a vector", body)
    elements = _list(body["data"], "event body")
    if len(elements) not in (2, 3):
        raise _fail("event body must be [name, args] or [name, args, metadata]", elements)
    name = to_python(elements[0])
    if not isinstance(name, str) or not name:
        raise _fail("event name must be a non-empty string", elements[0])
    if not isinstance(elements[1], dict) or elements[1].get("@data-type") != "vector":
        raise _fail("event arguments must be a vector", elements[1])
    args = to_python(elements[1])
    metadata = to_python(elements[2]) if len(elements) == 3 else []
    if not isinstance(metadata, list):
        raise _fail("event metadata must be a vector", elements[2])
    return ZeekEvent(topic, name, args, metadata)


def decode_message(raw: str | bytes) -> Ack | ErrorMessage | ZeekEvent | OtherData:
    """One message the server sent. Raises ``BrokerDecodeError``."""
    try:
        message = orjson.loads(raw)
    except orjson.JSONDecodeError as err:
        raise BrokerDecodeError(f"not valid JSON: {err}") from None
    if not isinstance(message, dict):
        raise _fail("expected a JSON object", message)
    kind = message.get("type")
    if kind == "ack":
        return Ack(_str(message.get("endpoint"), "ack endpoint"), _str(message.get("version"), "ack version"))
    if kind == "error":
        return ErrorMessage(str(message.get("code", "")), str(message.get("context", "")))
    if kind == "data-message":
        topic = _str(message.get("topic"), "topic")
        value = {"@data-type": message.get("@data-type"), "data": message.get("data")}
        parsed = parse_event(topic, value)
        return parsed if parsed is not None else OtherData(topic, to_python(value))
    raise _fail("unknown message type", kind)
