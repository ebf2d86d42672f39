"""The message model and its JSON codec (WIRE.md)."""

from datetime import timedelta

import orjson
import pytest

from threatbus import data
from threatbus.data import Indicator, Sighting, SnapshotEnvelope, SnapshotRequest, SnapshotType, decode
from threatbus.errors import DecodeError
from threatbus.testing import indicator, sighting


def test_indicator_round_trip_keeps_every_field():
    original = indicator("evil.example", "domain-name:value", x_threatbus_update="EDIT", x_custom={"a": [1, 2]})
    decoded = decode(original.encode())
    assert isinstance(decoded, Indicator)
    assert decoded == original
    assert decoded.payload["x_custom"] == {"a": [1, 2]}
    assert decoded.topic == "stix2/indicator"
    assert not decoded.is_removal


def test_removal_flag():
    assert decode(indicator(x_threatbus_update="REMOVE").encode()).is_removal


def test_sighting_round_trip_with_embedded_indicator():
    ind = indicator()
    original = sighting(ind, source="Zeek", value="6.6.6.6", context={"uid": "C1"})
    decoded = decode(original.encode())
    assert isinstance(decoded, Sighting)
    assert decoded.sighting_of_ref == ind.id
    assert decoded.indicator == ind
    assert decoded.payload["x_threatbus_source"] == "Zeek"
    assert decoded.topic == "stix2/sighting"


def test_snapshot_request_matches_wire_format():
    request = SnapshotRequest.create(SnapshotType.INDICATOR, timedelta(days=2), snapshot_id="abc")
    assert orjson.loads(request.encode()) == {
        "type": "snapshotrequest",
        "snapshot_type": 1,
        "snapshot_id": "abc",
        "snapshot": 172800.0,
    }
    decoded = decode(request.encode())
    assert isinstance(decoded, SnapshotRequest)
    assert decoded.snapshot == timedelta(days=2)
    assert decoded.snapshot_type is SnapshotType.INDICATOR


def test_snapshot_envelope_matches_wire_format():
    request = SnapshotRequest.create(SnapshotType.SIGHTING, timedelta(hours=1))
    sight = sighting()
    envelope = SnapshotEnvelope.wrap(request, sight)
    wire = orjson.loads(envelope.encode())
    assert wire == {
        "type": "snapshotenvelope",
        "snapshot_type": 2,
        "snapshot_id": request.snapshot_id,
        "body": sight.payload,
    }
    decoded = decode(envelope.encode())
    assert isinstance(decoded, SnapshotEnvelope)
    assert decoded.stix == sight


def test_decodes_what_the_original_sends():
    # Spacing and key order as Python's json.dumps writes them.
    raw = '{"type": "snapshotrequest", "snapshot_type": 2, "snapshot_id": "x1", "snapshot": 3600}'
    request = decode(raw)
    assert isinstance(request, SnapshotRequest)
    assert request.snapshot == timedelta(hours=1)


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"", "not valid JSON"),
        (b"\xff\xfe garbage", "not valid JSON"),
        (b"[1, 2]", "expected a JSON object"),
        (b'"indicator"', "expected a JSON object"),
        (b"{}", "unknown message type"),
        (b'{"type": "malware"}', "unknown message type"),
        (b'{"type": 5}', "unknown message type"),
        (b'{"type": "indicator", "id": "indicator--1", "pattern_type": "stix"}', "'pattern'"),
        (b'{"type": "indicator", "id": "sighting--1", "pattern": "[x:y = 1]", "pattern_type": "stix"}', "'id'"),
        (
            b'{"type": "indicator", "id": "indicator--1", "pattern": "p", "pattern_type": "stix", '
            b'"x_threatbus_update": "DELETE"}',
            "x_threatbus_update",
        ),
        (b'{"type": "sighting", "id": "sighting--1"}', "sighting_of_ref"),
        (
            b'{"type": "sighting", "id": "sighting--1", "sighting_of_ref": "i", "x_threatbus_indicator": 3}',
            "x_threatbus_indicator",
        ),
        (b'{"type": "snapshotrequest", "snapshot_type": 3, "snapshot_id": "a", "snapshot": 1}', "snapshot_type"),
        (b'{"type": "snapshotrequest", "snapshot_type": true, "snapshot_id": "a", "snapshot": 1}', "snapshot_type"),
        (b'{"type": "snapshotrequest", "snapshot_type": 1, "snapshot_id": "a", "snapshot": -1}', "'snapshot'"),
        (b'{"type": "snapshotrequest", "snapshot_type": 1, "snapshot_id": "", "snapshot": 1}', "snapshot_id"),
        (
            b'{"type": "snapshotenvelope", "snapshot_type": 1, "snapshot_id": "a", "body": {"type": "sighting"}}',
            "'body'",
        ),
        (
            b'{"type": "snapshotenvelope", "snapshot_type": 1, "snapshot_id": "a", "body": {"type": "indicator"}}',
            "'id'",
        ),
    ],
)
def test_rejects_malformed_messages_with_a_reason(raw, reason):
    with pytest.raises(DecodeError, match=reason):
        decode(raw)


def test_rejects_oversized_message_unread(monkeypatch):
    monkeypatch.setattr(data, "MAX_MESSAGE_BYTES", 100)
    with pytest.raises(DecodeError, match="exceeds the limit"):
        decode(b"{" + b" " * 200 + b"}")


def test_snapshot_types_covered_by_topic_prefixes():
    assert SnapshotType.for_topic("stix2/indicator") == [SnapshotType.INDICATOR]
    assert SnapshotType.for_topic("stix2/sighting") == [SnapshotType.SIGHTING]
    assert SnapshotType.for_topic("stix2") == [SnapshotType.INDICATOR, SnapshotType.SIGHTING]
    assert SnapshotType.for_topic("threatbus") == []


def test_dedup_key_identifies_redeliveries_not_updates():
    first = indicator()
    again = decode(first.encode())
    updated = Indicator({**first.payload, "modified": "2099-01-01T00:00:00.000Z"})
    removed = Indicator({**first.payload, "x_threatbus_update": "REMOVE"})
    assert first.dedup_key == again.dedup_key
    assert len({first.dedup_key, updated.dedup_key, removed.dedup_key}) == 3


def test_describe_shortens_and_survives_binary():
    text = data.describe(b"\xff" * 500, limit=10)
    assert text.endswith("…") and len(text) < 30
