"""STIX 2.1 <-> Zeek Intel mapping, one row per type."""

from __future__ import annotations

from datetime import datetime, timezone

import pytest
from zeekclient import brokertypes

from threatbus import stix
from threatbus.stix import new_indicator
from threatbus.testing import assert_live_sighting
from threatbus_zeek import broker
from threatbus_zeek.mapping import InvalidMatch, Unsupported, sighting_from_match, to_zeek_intel, zeek_url

MD5 = "d41d8cd98f00b204e9800998ecf8427e"
SHA1 = "da39a3ee5e6b4b0d3255bfef95601890afd80709"
SHA256 = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"

MAPPING = [
    # (STIX pattern, Zeek indicator, Zeek Intel::Type)
    ("[ipv4-addr:value = '6.6.6.6']", "6.6.6.6", "ADDR"),
    ("[ipv4-addr:value = '6.6.6.0/24']", "6.6.6.0/24", "SUBNET"),
    ("[ipv4-addr:value = '6.6.6.6/32']", "6.6.6.6", "ADDR"),
    ("[ipv6-addr:value = '2001:db8::1']", "2001:db8::1", "ADDR"),
    ("[ipv6-addr:value = '2001:db8::/32']", "2001:db8::/32", "SUBNET"),
    ("[domain-name:value = 'evil.example.com']", "evil.example.com", "DOMAIN"),
    ("[url:value = 'http://evil.example.com/a/b?c=d']", "evil.example.com/a/b?c=d", "URL"),
    ("[url:value = 'https://evil.example.com']", "evil.example.com/", "URL"),
    ("[url:value = 'evil.example.com/x#frag']", "evil.example.com/x", "URL"),
    ("[email-addr:value = 'phish@example.com']", "phish@example.com", "EMAIL"),
    (f"[file:hashes.MD5 = '{MD5.upper()}']", MD5, "FILE_HASH"),
    (f"[file:hashes.'SHA-1' = '{SHA1}']", SHA1, "FILE_HASH"),
    (f"[file:hashes.'SHA-256' = '{SHA256}']", SHA256, "FILE_HASH"),
    ("[file:name = 'invoice.pdf.exe']", "invoice.pdf.exe", "FILE_NAME"),
    (f"[x509-certificate:hashes.'SHA-1' = '{SHA1}']", SHA1, "CERT_HASH"),
    ("[user-account:user_id = 'admin']", "admin", "USER_NAME"),
    ("[user-account:account_login = 'root']", "root", "USER_NAME"),
]


@pytest.mark.parametrize(("pattern", "value", "intel_type"), MAPPING, ids=[m[0] for m in MAPPING])
def test_point_indicators_map_to_zeek_intel(pattern, value, intel_type):
    indicator = new_indicator(pattern, name="Bad thing")
    stix.validate(indicator)
    intel = to_zeek_intel(indicator)
    assert (intel.indicator, intel.intel_type, intel.source, intel.remove) == (value, intel_type, indicator.id, False)
    assert intel.desc == "Bad thing"
    event = brokertypes.ZeekEvent.from_broker(intel.event("ThreatBus"))
    assert event.name == "ThreatBus::add_intel"
    assert [type(arg) for arg in event.args] == [
        brokertypes.String,
        brokertypes.Enum,
        brokertypes.String,
        brokertypes.String,
    ]
    assert [arg.to_py() for arg in event.args] == [value, f"Intel::{intel_type}", indicator.id, "Bad thing"]


UNSUPPORTED = [
    ("[ipv4-addr:value = '6.6.6.6' AND domain-name:value = 'x.org']", "single equality"),
    ("[ipv4-addr:value = '6.6.6.6'] FOLLOWEDBY [ipv4-addr:value = '7.7.7.7']", "single equality"),
    ("[domain-name:value LIKE '%.evil.org']", "single equality"),
    ("[ipv4-addr:value = '6.6.6.6'] WITHIN 5 SECONDS", "single equality"),
    ("[mac-addr:value = 'aa:bb:cc:dd:ee:ff']", "no type for mac-addr:value"),
    ("[autonomous-system:number = 666]", "single equality"),
    (f"[file:hashes.'SHA-512' = '{'a' * 128}']", "no type for file:hashes.SHA-512"),
    ("[process:name = 'evil.exe']", "no type for process:name"),
    ("[ipv4-addr:value = '2001:db8::1']", "not an ipv4-addr"),
    ("[ipv4-addr:value = 'localhost']", "not a valid ipv4-addr"),
    ("[domain-name:value = 'evil org']", "white space"),
]


@pytest.mark.parametrize(("pattern", "reason"), UNSUPPORTED, ids=[u[0] for u in UNSUPPORTED])
def test_patterns_zeek_cannot_express_are_unsupported(pattern, reason):
    with pytest.raises(Unsupported, match=reason):
        to_zeek_intel(new_indicator(pattern))


def test_other_pattern_languages_are_unsupported():
    with pytest.raises(Unsupported, match="pattern type 'sigma'"):
        to_zeek_intel(new_indicator("title: x", pattern_type="sigma"))


@pytest.mark.parametrize("update", [{"x_threatbus_update": "REMOVE"}, {"revoked": True}])
def test_removal_and_revocation_remove_the_item(update):
    indicator = new_indicator("[domain-name:value = 'evil.example.com']", **update)
    intel = to_zeek_intel(indicator)
    assert intel.remove
    event = brokertypes.ZeekEvent.from_broker(intel.event("Custom::Ns"))
    assert event.name == "Custom::Ns::remove_intel"
    assert [arg.to_py() for arg in event.args] == ["evil.example.com", "Intel::DOMAIN", indicator.id]


def test_edit_adds_again():
    indicator = new_indicator("[domain-name:value = 'evil.example.com']", x_threatbus_update="EDIT")
    assert not to_zeek_intel(indicator).remove


def test_long_descriptions_are_shortened():
    indicator = new_indicator("[domain-name:value = 'x.org']", description="word " * 200)
    assert len(to_zeek_intel(indicator).desc) == 256


@pytest.mark.parametrize(
    ("url", "expected"),
    [("http://a.org", "a.org/"), ("HTTPS://a.org:8080/p", "a.org:8080/p"), ("a.org/p?q", "a.org/p?q")],
)
def test_urls_look_like_zeeks(url, expected):
    assert zeek_url(url) == expected


def _match(*args):
    return broker.ZeekEvent("threatbus/zeek/sighting", "ThreatBus::intel_match", list(args))


INDICATOR_ID = "indicator--8f4b2e43-3a3c-4b0c-9c5e-5d6a1f6f2a10"


def test_intel_match_becomes_a_sighting():
    context = {
        "uid": "CHhAvVGS1DHFjwGM9",
        "orig_h": "10.0.0.1",
        "orig_p": "52000/tcp",
        "resp_h": "6.6.6.6",
        "resp_p": "443/tcp",
        "where": "Conn::IN_RESP",
        "node": "zeek-manager",
        "seen": "6.6.6.6",
    }
    seen = datetime(2026, 11, 24, 12, 0, 1, 500000, tzinfo=timezone.utc)
    sighting = sighting_from_match(
        _match(seen.timestamp(), INDICATOR_ID, "6.6.6.6", broker.EnumValue("Intel::ADDR"), context)
    )
    stix.validate(sighting)
    payload = assert_live_sighting(sighting, INDICATOR_ID, "Zeek", "6.6.6.6")
    assert payload["last_seen"] == "2026-11-24T12:00:01.500Z"
    assert payload["x_threatbus_sighting_context"] == {
        "indicator_type": "ADDR",
        "uid": "CHhAvVGS1DHFjwGM9",
        "where": "Conn::IN_RESP",
        "node": "zeek-manager",
        "seen": "6.6.6.6",
        "endpoints": {"orig_h": "10.0.0.1", "orig_p": "52000/tcp", "resp_h": "6.6.6.6", "resp_p": "443/tcp"},
    }


def test_match_before_the_first_packet_uses_the_current_time():
    sighting = sighting_from_match(_match(0.0, INDICATOR_ID, "a.org", broker.EnumValue("Intel::DOMAIN"), {}))
    assert sighting.payload["last_seen"].startswith(str(datetime.now(timezone.utc).year))


@pytest.mark.parametrize(
    "args",
    [
        (1.0, INDICATOR_ID, "a.org", broker.EnumValue("Intel::DOMAIN")),
        (1.0, "some-feed", "a.org", broker.EnumValue("Intel::DOMAIN"), {}),
        (1.0, INDICATOR_ID, "", broker.EnumValue("Intel::DOMAIN"), {}),
        (1.0, INDICATOR_ID, "a.org", "Intel::DOMAIN", {}),
        (1.0, INDICATOR_ID, "a.org", broker.EnumValue("Conn::IN_RESP"), {}),
        (1.0, INDICATOR_ID, "a.org", broker.EnumValue("Intel::DOMAIN"), [1]),
        (1.0, INDICATOR_ID, "a.org", broker.EnumValue("Intel::DOMAIN"), {"uid": 3}),
        ("now", INDICATOR_ID, "a.org", broker.EnumValue("Intel::DOMAIN"), {}),
        (1e300, INDICATOR_ID, "a.org", broker.EnumValue("Intel::DOMAIN"), {}),
    ],
)
def test_malformed_matches_are_rejected(args):
    with pytest.raises(InvalidMatch):
        sighting_from_match(_match(*args))
