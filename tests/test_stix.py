"""STIX content checks at the entry of the bus, point indicators, builders."""

from datetime import datetime, timedelta, timezone

import pytest
import stix2

from threatbus import stix
from threatbus.data import Indicator, SnapshotEnvelope, SnapshotRequest, SnapshotType
from threatbus.lifecycle import as_removal
from threatbus.stix import ExpiredIntel, InvalidIntel, PointIndicator, pattern_errors, point_indicator, validate
from threatbus.testing import indicator, sighting

SHA256 = "a" * 64


@pytest.mark.parametrize(
    ("pattern", "expected"),
    [
        ("[ipv4-addr:value = '6.6.6.6']", PointIndicator("ipv4-addr", "value", "6.6.6.6")),
        ("[ipv6-addr:value = '::1']", PointIndicator("ipv6-addr", "value", "::1")),
        ("[domain-name:value = 'evil.example']", PointIndicator("domain-name", "value", "evil.example")),
        ("[url:value = 'http://evil.example/a?b=c']", PointIndicator("url", "value", "http://evil.example/a?b=c")),
        ("[email-addr:value = 'a@evil.example']", PointIndicator("email-addr", "value", "a@evil.example")),
        (f"[file:hashes.'SHA-256' = '{SHA256}']", PointIndicator("file", "hashes.SHA-256", SHA256)),
        (
            "[file:hashes.MD5 = 'd41d8cd98f00b204e9800998ecf8427e']",
            PointIndicator("file", "hashes.MD5", "d41d8cd98f00b204e9800998ecf8427e"),
        ),
        (
            "[file:hashes.'SHA-1' = 'da39a3ee5e6b4b0d3255bfef95601890afd80709']",
            PointIndicator("file", "hashes.SHA-1", "da39a3ee5e6b4b0d3255bfef95601890afd80709"),
        ),
        ("[domain-name:value = 'it\\'s.example']", PointIndicator("domain-name", "value", "it's.example")),
        # Not matched by the fast path, answered by stix2-patterns:
        ("[ ipv4-addr:value='1.2.3.4' ]", PointIndicator("ipv4-addr", "value", "1.2.3.4")),
        ("[x-custom:value = 'v']", PointIndicator("x-custom", "value", "v")),
        # Not a single value:
        ("[ipv4-addr:value = '1.2.3.4' OR ipv4-addr:value = '5.6.7.8']", None),
        ("[ipv4-addr:value = '1.2.3.4'] AND [domain-name:value = 'x.example']", None),
        ("[ipv4-addr:value ISSUBSET '10.0.0.0/8']", None),
        ("[ipv4-addr:value = '1.2.3.4'] WITHIN 5 SECONDS", None),
        ("[ipv4-addr:value = 'unterminated]", None),
    ],
)
def test_point_indicator(pattern, expected):
    assert point_indicator(pattern) == expected


@pytest.mark.parametrize(
    "pattern",
    [
        "[ipv4-addr:value = '6.6.6.6'",
        "ipv4-addr:value = '6.6.6.6'",
        "[file:hashes.'SHA-256' = 'abc']",
        "[ipv4-addr:value = ]",
        "",
    ],
)
def test_invalid_patterns_have_errors(pattern):
    assert pattern_errors(pattern)


def test_fast_path_agrees_with_stix2_patterns():
    from stix2patterns.validator import run_validator

    for pattern in ("[ipv4-addr:value = '6.6.6.6']", f"[file:hashes.'SHA-256' = '{SHA256}']", "[url:value = 'a\\\\b']"):
        assert stix._simple_match(pattern) is not None
        assert run_validator(pattern, stix_version="2.1") == []


def _point_patterns():
    """Point patterns around the fast regex's edges: every simple path and hash name, spellings, escapes, lengths."""
    values = ["6.6.6.6", "it\\'s", "a\\\\b", "", "'", "a\\", "x\n"]
    for path in [*sorted(stix._SIMPLE_PATHS), "x-custom:value", "ipv4-addr:name", "file:size", "File:name"]:
        for value in values:
            yield f"[{path} = '{value}']"
    names = [*stix.HASH_LENGTHS, *stix._HASH_ALIASES, "SHA-384", "sha_256", "\u017fha1"]
    for name in names:
        length = stix.HASH_LENGTHS.get(stix._HASH_ALIASES.get(name.upper(), name.upper()), 40)
        for spelled in (name, name.lower(), f"'{name}'", f"'{name.lower()}'", f"'{name}", f"{name}'"):
            for value in ("a" * length, "A" * length, "a" * (length - 1), "a" * (length + 1), "g" * length):
                yield f"[file:hashes.{spelled} = '{value}']"
    yield from (
        "[ipv4-addr:value='1.2.3.4']",
        "[  ipv4-addr:value  =  '1.2.3.4'  ]",
        "[\tipv4-addr:value\t=\t'1.2.3.4'\t]",
        "[\u00a0ipv4-addr:value = '1.2.3.4']",
        "[ipv4-addr:value = '1.2.3.4'] ",
        " [ipv4-addr:value = '1.2.3.4']",
        "[ipv4-addr:value = '1.2.3.4']]",
        "[ipv4-addr:value = '1.2.3.4' OR ipv4-addr:value = '5.6.7.8']",
        "[ipv4-addr:value = '1.2.3.4'] AND [ipv4-addr:value = '5.6.7.8']",
        "[ipv4-addr:value != '1.2.3.4']",
        '[ipv4-addr:value = "1.2.3.4"]',
    )


def test_fast_validity_regex_takes_exactly_the_point_patterns_of_simple_match():
    # pattern_errors answers from the regex alone; point_indicator reads the same patterns with _simple_match.
    patterns = list(_point_patterns())
    taken = [p for p in patterns if stix._VALID_POINT.fullmatch(p)]
    assert len(taken) > 100
    for pattern in patterns:
        assert (stix._VALID_POINT.fullmatch(pattern) is not None) == (stix._simple_match(pattern) is not None), pattern
    # A trailing newline is the one difference: the parser answers those.
    newline = "[ipv4-addr:value = '1.2.3.4']\n"
    assert stix._simple_match(newline) is not None
    assert stix._VALID_POINT.fullmatch(newline) is None
    assert pattern_errors(newline) == ()


@pytest.mark.parametrize("key", ["created", "modified", "valid_from", "valid_until"])
@pytest.mark.parametrize(
    "value",
    [
        "2026-02-30T00:00:00Z",
        "2026-11-31T00:00:00Z",
        "2099-01-01T00:00:00Z\n",
        "\u0662\u0660\u0662\u0666-01-01T00:00:00Z",
    ],
)
def test_validate_refuses_timestamps_of_dates_that_do_not_exist(key, value):
    payload = {**indicator(valid_until="2099-01-01T00:00:00Z").payload, key: value}
    with pytest.raises(InvalidIntel, match=f"'{key}' is not a STIX timestamp"):
        validate(Indicator(payload))


def test_validate_takes_leap_seconds_and_long_fractions():
    validate(indicator(created="2016-12-31T23:59:60Z", valid_from="2016-12-31T23:59:60.5Z"))
    validate(indicator(valid_from="2026-11-30T12:00:00.123456789Z", valid_until="2099-01-01T00:00:00.1Z"))


def test_validate_rejects_bad_pattern_and_timestamps():
    good = indicator()
    validate(good)
    with pytest.raises(InvalidIntel, match="invalid pattern"):
        validate(Indicator({**good.payload, "pattern": "[ipv4-addr:value = "}))
    with pytest.raises(InvalidIntel, match="valid_from"):
        validate(Indicator({**good.payload, "valid_from": "yesterday"}))
    with pytest.raises(InvalidIntel, match="created"):
        validate(Indicator({**good.payload, "created": ["not", "hashable", {}]}))
    with pytest.raises(InvalidIntel, match="modified"):
        validate(Indicator({**good.payload, "modified": "2026-13-01T00:00:00Z"}))
    with pytest.raises(InvalidIntel, match="spec_version"):
        validate(Indicator({**good.payload, "spec_version": "2.0"}))


def test_validate_skips_pattern_languages_it_does_not_know():
    validate(stix.new_indicator('alert ip any any -> any any (msg:"x"; sid:1;)', pattern_type="suricata"))


def test_validate_checks_embedded_indicator_of_sightings():
    bad = Indicator({**indicator().payload, "pattern": "[broken"})
    with pytest.raises(InvalidIntel):
        validate(sighting(bad))


def test_builders_produce_stix_that_the_stix2_library_accepts():
    ind = indicator("evil.example", "domain-name:value")
    sight = stix.new_sighting(ind.id, source="Zeek", value="evil.example", indicator=ind, context={"uid": "C1"})
    parsed_indicator = stix2.parse(ind.payload, allow_custom=True)
    parsed_sighting = stix2.parse(sight.payload, allow_custom=True)
    assert parsed_indicator.id == ind.id
    assert parsed_sighting.sighting_of_ref == ind.id
    assert parsed_sighting.x_threatbus_match_type == "LIVE"
    validate(sight)


def test_validate_rejects_a_validity_window_that_ends_before_it_starts():
    start = "2026-11-30T12:00:00.000Z"
    for until in (start, "2026-11-30T11:59:59.999Z", "2026-11-30T12:00:00Z"):
        bad = indicator(valid_from=start, valid_until=until)
        with pytest.raises(InvalidIntel, match="'valid_until' .* is not later than 'valid_from'") as err:
            validate(bad, now=datetime(2026, 11, 1, tzinfo=timezone.utc))
        assert not isinstance(err.value, ExpiredIntel)
    validate(indicator(valid_from=start, valid_until="2026-11-30T12:00:00.001Z"), now=NOW_BEFORE)


NOW_BEFORE = datetime(2026, 11, 1, tzinfo=timezone.utc)


def test_validate_refuses_indicators_already_expired_on_entry():
    ind = indicator(valid_from="2026-11-30T12:00:00Z", valid_until="2026-11-30T13:00:00Z")
    validate(ind, now=datetime(2026, 11, 30, 12, 59, 59, tzinfo=timezone.utc))
    with pytest.raises(ExpiredIntel, match="expired at 'valid_until' 2026-11-30T13:00:00Z"):
        validate(ind, now=datetime(2026, 11, 30, 13, 0, tzinfo=timezone.utc))
    # in a snapshot answer too
    request = SnapshotRequest.create(SnapshotType.INDICATOR, timedelta(days=1))
    with pytest.raises(ExpiredIntel):
        validate(SnapshotEnvelope.wrap(request, ind), now=datetime(2026, 12, 1, tzinfo=timezone.utc))
    # a removal of an expired indicator still passes: nodes may still have it
    validate(Indicator(as_removal(ind.payload)), now=datetime(2026, 12, 1, tzinfo=timezone.utc))
    # a sighting of an expired indicator is news, not stale intel
    validate(sighting(ind), now=datetime(2026, 12, 1, tzinfo=timezone.utc))


def test_validate_without_now_uses_the_clock():
    with pytest.raises(ExpiredIntel):
        validate(indicator(valid_from="2020-01-01T00:00:00Z", valid_until="2020-01-02T00:00:00Z"))


def test_dotted_ipv4_accepts_only_canonical_addresses():
    from threatbus.stix import dotted_ipv4

    assert all(dotted_ipv4(v) for v in ("0.0.0.0", "6.6.6.6", "10.0.0.255", "255.255.255.255"))
    bad = ("256.1.1.1", "01.2.3.4", "1.2.3", "1.2.3.4/32", "1.2.3.4\n", " 1.2.3.4", "::1", "1.2.3.4.5", "")
    assert not any(dotted_ipv4(v) for v in bad)
