"""The messages Threat Bus carries and their JSON codec.

A message is a thin wrapper around its JSON object (``payload``): routing
looks only at the class, so no STIX library work happens per hop. The JSON
is exactly what the original Threat Bus puts on the wire (see WIRE.md):
STIX 2.1 indicators and sightings, snapshot requests and envelopes.

``decode`` checks structure only (cheap, done at every hop); the expensive
checks of STIX content (patterns, timestamps) live in ``threatbus.stix`` and
run once, where intel enters the bus.
"""

from __future__ import annotations

import uuid
from datetime import timedelta
from enum import IntEnum
from typing import Any, ClassVar

import orjson

from threatbus.errors import DecodeError

TOPIC_INDICATOR = "stix2/indicator"
TOPIC_SIGHTING = "stix2/sighting"
TOPIC_SNAPSHOT_REQUEST = "threatbus/snapshotrequest"
TOPIC_SNAPSHOT_ENVELOPE = "threatbus/snapshotenvelope"

# Longest raw message we try to parse; larger ones are rejected unread.
MAX_MESSAGE_BYTES = 16 * 1024 * 1024


class SnapshotType(IntEnum):
    INDICATOR = 1
    SIGHTING = 2

    @property
    def topic(self) -> str:
        return TOPIC_INDICATOR if self is SnapshotType.INDICATOR else TOPIC_SIGHTING

    @classmethod
    def for_topic(cls, topic: str) -> list[SnapshotType]:
        """The snapshot types a subscription to ``topic`` (a prefix) covers."""
        return [kind for kind in cls if kind.topic.startswith(topic)]


class Message:
    """Base of all messages: the JSON object plus its cached encoding."""

    __slots__ = ("_raw", "payload")
    type_name: ClassVar[str]
    topic: ClassVar[str]

    def __init__(self, payload: dict[str, Any], raw: bytes | None = None) -> None:
        self.payload = payload
        self._raw = raw

    def encode(self) -> bytes:
        """The message as UTF-8 JSON, as it travels on every wire."""
        if self._raw is None:
            self._raw = orjson.dumps(self.payload)
        return self._raw

    @property
    def dedup_key(self) -> tuple[str, ...]:
        """Identifies a message across redeliveries (see backbones)."""
        return (self.type_name, self.encode().decode())

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and other.payload == self.payload  # type: ignore[attr-defined]

    def __hash__(self) -> int:
        return hash(self.dedup_key)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.payload!r})"


def _required(key: str) -> Any:
    """A read-only property for a key of the payload that ``from_payload`` checked is there."""
    return property(lambda message: message.payload[key], doc=f"The payload's {key!r}.")


class StixObject(Message):
    """A STIX 2.1 object carried by the bus."""

    __slots__ = ()
    id: str = _required("id")

    @property
    def modified(self) -> str | None:
        return self.payload.get("modified") or self.payload.get("created")

    @property
    def dedup_key(self) -> tuple[str, ...]:
        # id and modified, written out: computed for every object of a snapshot answer.
        payload = self.payload
        return (
            self.type_name,
            payload["id"],
            payload.get("modified") or payload.get("created") or "",
            payload.get("x_threatbus_update", ""),
        )


class Indicator(StixObject):
    """A STIX 2.1 indicator: something to look for."""

    __slots__ = ()
    type_name = "indicator"
    topic = TOPIC_INDICATOR

    pattern: str = _required("pattern")
    pattern_type: str = _required("pattern_type")

    @property
    def is_removal(self) -> bool:
        """True when the producer asks consumers to drop this indicator."""
        return self.payload.get("x_threatbus_update") == "REMOVE"


class Sighting(StixObject):
    """A STIX 2.1 sighting: a match of an indicator."""

    __slots__ = ()
    type_name = "sighting"
    topic = TOPIC_SIGHTING

    sighting_of_ref: str = _required("sighting_of_ref")

    @property
    def indicator(self) -> Indicator | None:
        """The matched indicator, if the producer embedded it."""
        embedded = self.payload.get("x_threatbus_indicator")
        return Indicator(embedded) if isinstance(embedded, dict) else None


class _SnapshotMessage(Message):
    """What requests and their answers share: the snapshot's type and id."""

    __slots__ = ()
    snapshot_id: str = _required("snapshot_id")

    @property
    def snapshot_type(self) -> SnapshotType:
        return SnapshotType(self.payload["snapshot_type"])


class SnapshotRequest(_SnapshotMessage):
    """Asks every app for the intel of the last ``snapshot`` period."""

    __slots__ = ()
    type_name = "snapshotrequest"
    topic = TOPIC_SNAPSHOT_REQUEST

    @classmethod
    def create(
        cls, snapshot_type: SnapshotType, snapshot: timedelta, snapshot_id: str | None = None
    ) -> SnapshotRequest:
        return cls(
            {
                "type": cls.type_name,
                "snapshot_type": int(snapshot_type),
                "snapshot_id": snapshot_id or uuid.uuid4().hex,
                "snapshot": snapshot.total_seconds(),
            }
        )

    @property
    def snapshot(self) -> timedelta:
        return timedelta(seconds=self.payload["snapshot"])

    @property
    def dedup_key(self) -> tuple[str, ...]:
        return (self.type_name, self.snapshot_id, str(self.payload["snapshot_type"]))


class SnapshotEnvelope(_SnapshotMessage):
    """One answer to a snapshot request; routed only to the requester.

    An envelope of ``wrap_all`` (the log's answer) starts without its
    payload and body message: they are made when first asked for (see
    ``__getattr__``). A large snapshot waits in the requester's buffer as
    such envelopes, one object each for the garbage collector instead of
    three; waiting that long, all of them reached the oldest generation and
    kept full collections running through the answer.
    """

    # _stix: the wrapped object (``wrap``: its encoding is reused); the rest: what ``wrap_all`` keeps of it.
    __slots__ = ("_body", "_kind", "_request", "_stix", "_text")
    type_name = "snapshotenvelope"
    topic = TOPIC_SNAPSHOT_ENVELOPE

    @classmethod
    def wrap(cls, request: SnapshotRequest, stix: StixObject) -> SnapshotEnvelope:
        envelope = cls(
            {
                "type": cls.type_name,
                # An int 1 or 2 (created so, or checked by decode): no enum round trip.
                "snapshot_type": request.payload["snapshot_type"],
                "snapshot_id": request.snapshot_id,
                "body": stix.payload,
            }
        )
        envelope._stix = stix
        return envelope

    @staticmethod
    def wrap_all(request: SnapshotRequest, stix: list[StixObject]) -> list[SnapshotEnvelope]:
        """``wrap`` for many answers to one request (the log's answer: thousands at once).

        Their payloads are made only when asked for; a requester that sends
        the body on as it came (``body_text``) never asks.
        """
        new = object.__new__
        envelopes: list[SnapshotEnvelope] = []
        for body in stix:
            envelope = new(SnapshotEnvelope)
            envelope._raw = None
            envelope._request = request
            envelope._body = body.payload
            envelope._kind = type(body)
            envelope._text = body.encode()
            envelopes.append(envelope)
        return envelopes

    @property
    def stix(self) -> StixObject:
        """The indicator or sighting this envelope carries."""
        wrapped = getattr(self, "_stix", None)
        if wrapped is not None:
            return wrapped
        body = self.payload["body"]
        return Indicator(body) if body.get("type") == "indicator" else Sighting(body)

    @property
    def dedup_key(self) -> tuple[str, ...]:
        return (self.type_name, self.snapshot_id, *self.stix.dedup_key)

    def body_text(self) -> tuple[type[StixObject], bytes]:
        """The class of the carried object and its JSON text, for apps that send the body on (never encoded again)."""
        try:
            return self._kind, self._text  # made by wrap_all
        except AttributeError:
            stix = self.stix
            return type(stix), stix.encode()

    def __getattr__(self, name: str) -> Any:
        # Called only for slots not set: an envelope of wrap_all makes its payload and body message here.
        try:
            if name == "payload":
                request = self._request.payload
                payload = {
                    "type": self.type_name,
                    "snapshot_type": request["snapshot_type"],
                    "snapshot_id": request["snapshot_id"],
                    "body": self._body,
                }
                self.payload = payload
                return payload
            if name == "_stix":
                stix = self._kind(self._body, self._text)
                self._stix = stix
                return stix
        except AttributeError:
            pass  # not made by wrap_all
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")


MESSAGE_TYPES: dict[str, type[Message]] = {
    cls.type_name: cls for cls in (Indicator, Sighting, SnapshotRequest, SnapshotEnvelope)
}
TOPICS: dict[str, type[Message]] = {cls.topic: cls for cls in MESSAGE_TYPES.values()}


def _require_str(payload: dict[str, Any], key: str, prefix: str = "") -> None:
    value = payload.get(key)
    if not isinstance(value, str) or not value:
        raise DecodeError(f"{payload.get('type')}: '{key}' must be a non-empty string")
    if prefix and not value.startswith(prefix):
        raise DecodeError(f"{payload.get('type')}: '{key}' must start with '{prefix}', got {value[:80]!r}")


def _require_snapshot_type(payload: dict[str, Any]) -> None:
    value = payload.get("snapshot_type")
    if type(value) is not int or value not in (1, 2):
        raise DecodeError(f"{payload.get('type')}: 'snapshot_type' must be 1 or 2, got {value!r}")


def _check_indicator(payload: dict[str, Any]) -> None:
    get = payload.get
    ident, pattern, pattern_type = get("id"), get("pattern"), get("pattern_type")
    # One test for the usual case (nearly every message); the calls below name what is wrong.
    if not (
        type(ident) is str
        and ident.startswith("indicator--")
        and type(pattern) is str
        and pattern
        and type(pattern_type) is str
        and pattern_type
    ):
        _require_str(payload, "id", "indicator--")
        _require_str(payload, "pattern")
        _require_str(payload, "pattern_type")
    update = get("x_threatbus_update")
    if update is not None and update not in ("EDIT", "REMOVE"):
        raise DecodeError(f"indicator: 'x_threatbus_update' must be EDIT or REMOVE, got {update!r}")


def _check_sighting(payload: dict[str, Any]) -> None:
    _require_str(payload, "id", "sighting--")
    _require_str(payload, "sighting_of_ref")
    embedded = payload.get("x_threatbus_indicator")
    if embedded is not None:
        if not isinstance(embedded, dict) or embedded.get("type") != "indicator":
            raise DecodeError("sighting: 'x_threatbus_indicator' must be an indicator object")
        _check_indicator(embedded)


def _check_snapshot_request(payload: dict[str, Any]) -> None:
    _require_snapshot_type(payload)
    _require_str(payload, "snapshot_id")
    seconds = payload.get("snapshot")
    if type(seconds) not in (int, float) or not 0 <= seconds < 1e10:
        raise DecodeError(f"snapshotrequest: 'snapshot' must be a number of seconds >= 0, got {seconds!r}")


def _check_snapshot_envelope(payload: dict[str, Any]) -> None:
    _require_snapshot_type(payload)
    _require_str(payload, "snapshot_id")
    body = payload.get("body")
    expected = SnapshotType(payload["snapshot_type"])
    wanted = "indicator" if expected is SnapshotType.INDICATOR else "sighting"
    if not isinstance(body, dict) or body.get("type") != wanted:
        raise DecodeError(f"snapshotenvelope: 'body' must be a {wanted} object for snapshot_type {int(expected)}")
    _CHECKS[wanted](body)


_CHECKS = {
    "indicator": _check_indicator,
    "sighting": _check_sighting,
    "snapshotrequest": _check_snapshot_request,
    "snapshotenvelope": _check_snapshot_envelope,
}
# Each type's check and class, found with one lookup per message.
_KINDS = {kind: (check, MESSAGE_TYPES[kind]) for kind, check in _CHECKS.items()}


def from_payload(payload: Any, raw: bytes | None = None) -> Message:
    """Wrap a parsed JSON object into its message class, checking its structure."""
    if not isinstance(payload, dict):
        raise DecodeError(f"expected a JSON object, got {type(payload).__name__}")
    kind = payload.get("type")
    known = _KINDS.get(kind) if isinstance(kind, str) else None
    if known is None:
        raise DecodeError(f"unknown message type {kind!r}; expected one of {', '.join(MESSAGE_TYPES)}")
    check, cls = known
    check(payload)
    return cls(payload, raw)


def decode(raw: bytes | bytearray | memoryview | str) -> Message:
    """Parse one message from its JSON text. Raises ``DecodeError``."""
    if type(raw) is not bytes:  # nearly always bytes: one test
        raw = raw.encode("utf-8", "surrogatepass") if isinstance(raw, str) else bytes(raw)
    if len(raw) > MAX_MESSAGE_BYTES:
        raise DecodeError(f"message of {len(raw)} bytes exceeds the limit of {MAX_MESSAGE_BYTES}")
    return from_payload(json_object(raw), raw)


def json_object(raw: bytes | str) -> dict[str, Any]:
    """Parse JSON text that must be an object (messages, and the JSON other tools send). Raises ``DecodeError``."""
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError as err:
        raise DecodeError(f"not valid JSON: {err}") from None
    if not isinstance(value, dict):
        raise DecodeError(f"expected a JSON object, got {type(value).__name__}")
    return value


def encode(message: Message) -> bytes:
    """The JSON text of ``message``."""
    return message.encode()


def describe(raw: bytes | str, limit: int = 120) -> str:
    """A short, printable excerpt of raw input for log lines."""
    text = raw.decode("utf-8", "replace") if isinstance(raw, (bytes, bytearray)) else str(raw)
    return repr(text[:limit]) + ("…" if len(text) > limit else "")
