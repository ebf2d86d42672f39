"""MISP attributes to STIX patterns and indicators, notifications, filter entries."""

from __future__ import annotations

from datetime import datetime, timezone

import pytest
from threatbus_misp.feed import InvalidNotification, Notification, parse_notification
from threatbus_misp.mapping import (
    MispAttribute,
    Unmappable,
    is_misp_indicator,
    pattern_for,
    to_indicator,
)
from threatbus_misp.plugin import MispApp, sighting_report
from threatbus_misp.settings import FilterEntry, MispSettings, validators

from threatbus.config import validate as validate_config
from threatbus.stix import new_sighting, point_indicator, validate
from threatbus.testing import indicator, settings_from

UUID = "5b3c7a6e-2f1d-4c8e-9a0b-1c2d3e4f5a6b"
MD5 = "d41d8cd98f00b204e9800998ecf8427e"
SHA256 = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"


def attr(type: str, value: str, **extra) -> MispAttribute:
    return MispAttribute.from_json({"uuid": UUID, "type": type, "value": value, "timestamp": "1764000000", **extra})


@pytest.mark.parametrize(
    ("misp_type", "value", "pattern"),
    [
        ("ip-src", "6.6.6.6", "[ipv4-addr:value = '6.6.6.6']"),
        ("ip-dst", "10.0.0.0/8", "[ipv4-addr:value = '10.0.0.0/8']"),
        ("ip-dst", "2001:db8::1", "[ipv6-addr:value = '2001:db8::1']"),
        ("ip-src", "2001:db8::/32", "[ipv6-addr:value = '2001:db8::/32']"),
        ("domain", "evil.example", "[domain-name:value = 'evil.example']"),
        ("hostname", "a.evil.example", "[domain-name:value = 'a.evil.example']"),
        ("url", "http://evil.example/it's", "[url:value = 'http://evil.example/it\\'s']"),
        ("email-src", "a@evil.example", "[email-addr:value = 'a@evil.example']"),
        ("filename", "C:\\evil.exe", "[file:name = 'C:\\\\evil.exe']"),
        ("md5", MD5.upper(), f"[file:hashes.MD5 = '{MD5}']"),
        ("sha256", SHA256, f"[file:hashes.'SHA-256' = '{SHA256}']"),
        ("mac-address", "AA:BB:CC:DD:EE:FF", "[mac-addr:value = 'aa:bb:cc:dd:ee:ff']"),
    ],
)
def test_point_types_become_point_patterns(misp_type, value, pattern):
    assert pattern_for(attr(misp_type, value)) == pattern
    assert point_indicator(pattern) is not None  # what Zeek and Suricata match


@pytest.mark.parametrize(
    ("misp_type", "value", "pattern"),
    [
        ("filename|md5", f"evil.exe|{MD5}", f"[file:name = 'evil.exe' AND file:hashes.MD5 = '{MD5}']"),
        (
            "domain|ip",
            "evil.example|6.6.6.6",
            "[domain-name:value = 'evil.example' AND domain-name:resolves_to_refs[*].value = '6.6.6.6']",
        ),
        ("mutex", "Global\\evil", "[mutex:name = 'Global\\\\evil']"),
        (
            "ip-dst|port",
            "6.6.6.6|443",
            "[network-traffic:dst_ref.type = 'ipv4-addr' AND network-traffic:dst_ref.value = '6.6.6.6'"
            " AND network-traffic:dst_port = 443]",
        ),
        (
            "ip-src|port",
            "2001:db8::1|8080",
            "[network-traffic:src_ref.type = 'ipv6-addr' AND network-traffic:src_ref.value = '2001:db8::1'"
            " AND network-traffic:src_port = 8080]",
        ),
    ],
)
def test_composite_and_other_types(misp_type, value, pattern):
    assert pattern_for(attr(misp_type, value)) == pattern


@pytest.mark.parametrize(
    ("misp_type", "value"),
    [
        ("text", "hello"),
        ("md5", "zz"),
        ("ip-dst", "not an ip"),
        ("sha256", MD5),
        ("yara", "rule x { condition: true }"),
        ("ip-dst|port", "6.6.6.6|http"),
        ("ip-dst|port", "6.6.6.6"),
    ],
)
def test_unmappable(misp_type, value):
    with pytest.raises(Unmappable):
        pattern_for(attr(misp_type, value))


def test_indicator_carries_id_times_marking_and_source():
    attribute = attr("ip-dst", "6.6.6.6", Tag=[{"name": "tlp:green"}, {"name": "TLP:AMBER"}], comment="c2")
    ind = to_indicator(attribute, host="https://misp.example/")
    validate(ind)
    assert ind.id == f"indicator--{UUID}"
    assert ind.payload["created"] == ind.payload["modified"] == ind.payload["valid_from"] == "2025-11-24T16:00:00.000Z"
    assert ind.payload["object_marking_refs"] == ["marking-definition--f88d31f6-486f-44da-b317-01333bde0b82"]
    assert ind.payload["description"] == "c2"
    assert ind.payload["external_references"] == [
        {"source_name": "misp", "external_id": UUID, "url": f"https://misp.example/attributes/view/{UUID}"}
    ]
    assert is_misp_indicator(ind.payload) and not is_misp_indicator(indicator().payload)
    removal = to_indicator(attribute, update="REMOVE")
    assert removal.is_removal and removal.payload["modified"] > ind.payload["modified"]


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        (b"{nope", "not valid JSON"),
        (b"[1]", "expected a JSON object"),
        (b'{"Attribute": {}}', "no 'action'"),
        (b'{"action": "add"}', "'Attribute' must be a JSON object"),
        (b'{"action": "add", "Attribute": {"uuid": "x", "type": "domain", "value": "a"}}', "not a UUID"),
        (b'{"action": "add", "Attribute": {"uuid": "' + UUID.encode() + b'", "type": "domain"}}', "'value'"),
        (
            b'{"action": "add", "Attribute": {"uuid": "' + UUID.encode() + b'", "type": "a", "value": "b", '
            b'"timestamp": "soon"}}',
            "epoch seconds",
        ),
    ],
)
def test_garbage_notifications_are_refused_with_a_reason(body, problem):
    with pytest.raises(InvalidNotification, match=problem):
        parse_notification(body)


def test_notification_fields_and_ignored_actions():
    body = (
        b'{"action": "edit", "Attribute": {"uuid": "' + UUID.encode() + b'", "type": "domain", "value": "a.example",'
        b' "to_ids": "1", "deleted": true, "Tag": [{"name": "x"}]}, "Event": {"orgc_id": "3", "Orgc": {"name": "O"},'
        b' "Tag": [{"name": "y"}]}}'
    )
    note = parse_notification(body)
    assert note is not None and note.action == "edit" and note.deleted and note.attribute.to_ids
    assert note.attribute.tags == ("x", "y") and set(note.attribute.orgs) == {"3", "O"}
    assert parse_notification(b'{"action": "publish", "Attribute": {}}') is None


@pytest.mark.parametrize(
    ("action", "to_ids", "deleted", "update"),
    [
        ("add", True, False, None),
        ("add", False, False, ""),
        ("edit", True, False, "EDIT"),
        ("edit", False, False, "REMOVE"),
        ("edit", True, True, "REMOVE"),
        ("delete", True, False, "REMOVE"),
        ("delete", False, False, "REMOVE"),
    ],
)
def test_what_a_notification_means(action, to_ids, deleted, update):
    note = Notification(action, attr("domain", "a.example", to_ids=to_ids), deleted)
    assert MispApp.update_of(note) == update


def settings_of(**section):
    """MispSettings as the plugin builds them: from its validated section (a ZeroMQ feed plus ``section``)."""
    config = settings_from({"plugins": {"apps": {"misp": {"zmq": {"host": "127.0.0.1", "port": 50000}, **section}}}})
    validate_config(config, validators())
    return MispSettings.from_config(config.get("plugins.apps.misp"))


def test_filter_entries_and_or():
    settings = settings_of(filter=[{"orgs": ["CIRCL", 7], "types": ["ip-dst", "domain"]}, {"tags": ["tlp:red"]}])
    assert settings.filters == (
        FilterEntry(orgs=frozenset({"CIRCL", "7"}), types=frozenset({"ip-dst", "domain"})),
        FilterEntry(tags=frozenset({"tlp:red"})),
    )
    assert settings.passes(["7"], "domain", [])
    assert settings.passes(["CIRCL"], "ip-dst", ["other"])
    assert not settings.passes(["CIRCL"], "url", [])
    assert settings.passes(["Other"], "url", ["tlp:red"])
    assert not settings.passes(["Other"], "domain", ["tlp:green"])
    assert settings_of().passes([], "anything", [])


def test_sighting_report_takes_uuid_source_and_time():
    ind = to_indicator(attr("domain", "a.example"))
    seen = datetime(2026, 11, 30, 6, 0, tzinfo=timezone.utc)
    report = sighting_report(new_sighting(ind.id, source="Zeek", indicator=ind, seen=seen))
    assert report is not None and (report.attribute_uuid, report.source, report.seen) == (UUID, "Zeek", seen)
    assert sighting_report(new_sighting(indicator().id, source="Zeek", indicator=indicator())) is None
    assert sighting_report(new_sighting("indicator--not-a-uuid", source="Zeek")) is None
