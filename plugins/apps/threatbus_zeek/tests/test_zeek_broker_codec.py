"""Broker's JSON data model: our codec against zeek-client's independent implementation."""

from __future__ import annotations

import ipaddress
import json
from datetime import datetime, timedelta, timezone

import pytest
from zeekclient import brokertypes

from threatbus_zeek import broker

ENCODED = [
    (broker.none(), brokertypes.NoneType, None),
    (broker.boolean(True), brokertypes.Boolean, True),
    (broker.count(42), brokertypes.Count, 42),
    (broker.integer(-7), brokertypes.Integer, -7),
    (broker.real(-7.5), brokertypes.Real, -7.5),
    (broker.string("Hello World!"), brokertypes.String, "Hello World!"),
    (broker.enum("Intel::ADDR"), brokertypes.Enum, "Intel::ADDR"),
    (broker.address("2001:db8::"), brokertypes.Address, ipaddress.ip_address("2001:db8::")),
    (broker.subnet("10.0.0.0/8"), brokertypes.Subnet, ipaddress.ip_network("10.0.0.0/8")),
    (broker.timespan(timedelta(milliseconds=1500)), brokertypes.Timespan, timedelta(milliseconds=1500)),
    (
        broker.timestamp(datetime(2022, 4, 10, 7, 0, tzinfo=timezone.utc)),
        brokertypes.Timestamp,
        datetime(2022, 4, 10, 7, 0),
    ),
]


@pytest.mark.parametrize(("value", "kind", "python"), ENCODED, ids=[e[0]["@data-type"] for e in ENCODED])
def test_values_parse_with_zeek_client(value, kind, python):
    parsed = brokertypes.from_broker(json.loads(json.dumps(value)))
    assert isinstance(parsed, kind)
    assert parsed.to_py() == python
    if value["@data-type"] != "timespan":  # Broker writes nanoseconds ("1500000000ns"), zeek-client "1500ms"
        assert parsed.to_broker() == value


def test_port_parses_with_zeek_client():
    parsed = brokertypes.from_broker(broker.port(443, "tcp"))
    assert isinstance(parsed, brokertypes.Port)
    assert (parsed.number, parsed.proto) == (443, brokertypes.Port.Proto.TCP)


def test_containers_parse_with_zeek_client():
    value = broker.vector(
        [
            broker.count(1),
            broker.set_of([broker.string("a"), broker.string("b")]),
            broker.table([(broker.string("uid"), broker.string("C1"))]),
        ]
    )
    parsed = brokertypes.from_broker(value)
    assert isinstance(parsed, brokertypes.Vector)
    assert parsed.to_py()[0] == 1
    assert parsed.to_py()[1] == {"a", "b"}
    assert parsed.to_py()[2] == {"uid": "C1"}


def test_event_has_the_documented_layout():
    """[count 1, count 1, [string name, vector args]] per Broker's 'Encoding of Zeek Events'."""
    value = broker.event("event_1", [broker.integer(42), broker.string("test")])
    assert value["data"][:2] == [{"@data-type": "count", "data": 1}, {"@data-type": "count", "data": 1}]
    event = brokertypes.ZeekEvent.from_broker(value)
    assert event.name == "event_1"
    assert [arg.to_py() for arg in event.args] == [42, "test"]
    message = broker.data_message("/foo/bar", value)
    parsed = brokertypes.DataMessage.unserialize(broker.encode(message))
    assert parsed.topic == "/foo/bar"
    assert parsed.to_broker() == message


def test_handshake_is_a_json_array_of_topics():
    assert json.loads(broker.handshake(["threatbus/zeek/sighting"])) == ["threatbus/zeek/sighting"]
    assert brokertypes.HandshakeMessage.unserialize(broker.handshake(["a", "b"])).topics == ["a", "b"]


def _zeek_message(name: str, *args: brokertypes.Type, metadata: bool) -> str:
    body = brokertypes.ZeekEvent(name, *args).to_broker()
    if metadata:
        body["data"][2]["data"].append({"@data-type": "vector", "data": []})
    return json.dumps({"type": "data-message", "topic": "t", **body})


@pytest.mark.parametrize("metadata", [False, True], ids=["zeek5-7", "zeek8-metadata"])
def test_decodes_events_made_by_zeek_client(metadata):
    raw = _zeek_message(
        "ThreatBus::intel_match",
        brokertypes.Real(1700000000.5),
        brokertypes.String("indicator--x"),
        brokertypes.Enum("Intel::ADDR"),
        brokertypes.Address("10.0.0.1"),
        brokertypes.Port(80, brokertypes.Port.Proto.TCP),
        brokertypes.Table({brokertypes.String("uid"): brokertypes.String("C1")}),
        brokertypes.Set({brokertypes.Count(1)}),
        brokertypes.Timespan("5s"),
        brokertypes.NoneType(),
        metadata=metadata,
    )
    event = broker.decode_message(raw)
    assert isinstance(event, broker.ZeekEvent)
    assert event.name == "ThreatBus::intel_match"
    assert event.topic == "t"
    assert event.args == [
        1700000000.5,
        "indicator--x",
        "Intel::ADDR",
        ipaddress.ip_address("10.0.0.1"),
        "80/tcp",
        {"uid": "C1"},
        [1],
        timedelta(seconds=5),
        None,
    ]
    assert isinstance(event.args[2], broker.EnumValue)
    assert isinstance(event.args[4], broker.Port) and event.args[4].number == 80


def test_decodes_timestamps_as_utc():
    value = brokertypes.Timestamp(datetime(2022, 4, 10, 7, 0, 0, 123000)).to_broker()
    assert broker.to_python(value) == datetime(2022, 4, 10, 7, 0, 0, 123000, tzinfo=timezone.utc)
    nanos = {"@data-type": "timestamp", "data": "2022-04-10T07:00:00.123456789"}
    assert broker.to_python(nanos) == datetime(2022, 4, 10, 7, 0, 0, 123456, tzinfo=timezone.utc)


def test_decodes_ack_and_error():
    ack = broker.decode_message('{"type": "ack", "endpoint": "925c9110", "version": "2.2.0-22"}')
    assert ack == broker.Ack("925c9110", "2.2.0-22")
    error = broker.decode_message(
        '{"type": "error", "code": "deserialization_failed", "context": "input #1 contained malformed JSON"}'
    )
    assert error == broker.ErrorMessage("deserialization_failed", "input #1 contained malformed JSON")


def test_other_data_is_not_an_event():
    message = broker.decode_message('{"type": "data-message", "topic": "/foo/bar", "@data-type": "count", "data": 1}')
    assert message == broker.OtherData("/foo/bar", 1)


BAD = [
    "not json",
    "[]",
    '{"type": "surprise"}',
    '{"type": "data-message", "topic": 1, "@data-type": "count", "data": 1}',
    '{"type": "data-message", "topic": "t", "@data-type": "count", "data": -1}',
    '{"type": "data-message", "topic": "t", "@data-type": "count", "data": "1"}',
    '{"type": "data-message", "topic": "t", "@data-type": "count", "data": true}',
    '{"type": "data-message", "topic": "t", "@data-type": "integer", "data": 1.5}',
    '{"type": "data-message", "topic": "t", "@data-type": "real", "data": "x"}',
    '{"type": "data-message", "topic": "t", "@data-type": "address", "data": "300.1.1.1"}',
    '{"type": "data-message", "topic": "t", "@data-type": "subnet", "data": "10.0.0.0/33"}',
    '{"type": "data-message", "topic": "t", "@data-type": "port", "data": "99999/tcp"}',
    '{"type": "data-message", "topic": "t", "@data-type": "timestamp", "data": "yesterday"}',
    '{"type": "data-message", "topic": "t", "@data-type": "timespan", "data": "1.5s"}',
    '{"type": "data-message", "topic": "t", "@data-type": "mystery", "data": 1}',
    '{"type": "data-message", "topic": "t", "@data-type": "vector", "data": {"a": 1}}',
    '{"type": "data-message", "topic": "t", "@data-type": "table", "data": [{"key": {"@data-type": "none", "data": {}}}]}',
    '{"type": "data-message", "topic": "t", "@data-type": "vector", "data": [{"@data-type": "count", "data": 1},'
    ' {"@data-type": "count", "data": 1}, {"@data-type": "vector", "data": [{"@data-type": "count", "data": 3},'
    ' {"@data-type": "vector", "data": []}]}]}',
    '{"type": "data-message", "topic": "t", "@data-type": "vector", "data": [{"@data-type": "count", "data": 1},'
    ' {"@data-type": "count", "data": 1}, {"@data-type": "vector", "data": [{"@data-type": "string", "data": "e"},'
    ' {"@data-type": "count", "data": 3}]}]}',
]


@pytest.mark.parametrize("raw", BAD)
def test_rejects_what_does_not_follow_the_model(raw):
    with pytest.raises(broker.BrokerDecodeError):
        broker.decode_message(raw)


def test_encoders_refuse_values_of_the_wrong_type():
    with pytest.raises(ValueError):
        broker.count(-1)
    with pytest.raises(ValueError):
        broker.integer(True)
    with pytest.raises(ValueError):
        broker.address("not-an-address")
