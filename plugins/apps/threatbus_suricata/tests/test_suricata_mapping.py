"""Indicators to Suricata detections. Every generated rule is checked with
suricataparser, a Suricata rule parser from PyPI independent of this plugin."""

from __future__ import annotations

import base64

import pytest
from suricataparser import parse_rule

from threatbus.stix import new_indicator
from threatbus.testing import indicator
from threatbus_suricata.mapping import (
    DATASET,
    HASHLIST,
    RULE,
    Settings,
    Unsupported,
    classify,
    content,
    stable_sid,
    static_rules,
)

RULES = Settings(mode="rules")
DATASETS = Settings(mode="datasets")


def parsed(rule: str) -> tuple[object, dict[str, list[object]]]:
    """Parse with suricataparser; options by name (a name may repeat)."""
    result = parse_rule(rule)
    assert result is not None, f"suricataparser rejects {rule!r}"
    assert result.raw == rule.strip()
    options: dict[str, list[object]] = {}
    for option in result.options:
        options.setdefault(option.name, []).append(option.value)
    return result, options


def check_generated(rule: str, indicator_id: str, sid: int, header: str) -> dict[str, list[object]]:
    result, options = parsed(rule)
    assert result.action == "alert"
    assert result.header == header
    assert options["msg"] == [f'"Threat Bus {rule.split("Threat Bus ")[1].split(indicator_id)[0]}{indicator_id}"']
    assert indicator_id in str(options["msg"][0])
    assert options["sid"] == [str(sid)]
    assert options["rev"] == ["1"]
    (metadata,) = options["metadata"]
    assert metadata.data == [f"threatbus_indicator {indicator_id}"]  # type: ignore[attr-defined]
    return options


@pytest.mark.parametrize(
    ("value", "path", "target"),
    [
        ("6.6.6.6", "ipv4-addr:value", "[6.6.6.6]"),
        ("10.1.0.0/16", "ipv4-addr:value", "[10.1.0.0/16]"),
        ("2001:DB8::1", "ipv6-addr:value", "[2001:db8::1]"),
        ("2001:db8::/32", "ipv6-addr:value", "[2001:db8::/32]"),
    ],
)
def test_ip_rules_parse_and_match_both_directions(value: str, path: str, target: str) -> None:
    ind = indicator(value, path)
    detection = classify(ind, RULES)
    assert detection.kind == RULE
    rule = detection.render(ind.id, 3900000123, "alert")
    check_generated(rule, ind.id, 3900000123, f"ip any any <> {target} any")


def test_domain_rule_matches_the_exact_dns_query() -> None:
    ind = indicator("Evil.Example.COM.", "domain-name:value")
    detection = classify(ind, RULES)
    assert detection.value == "evil.example.com"
    options = check_generated(detection.render(ind.id, 7, "alert"), ind.id, 7, "dns any any -> any any")
    assert options["dns.query"] == [None]
    assert options["content"] == ['"evil.example.com"']
    assert {"nocase", "startswith", "endswith"} <= options.keys()


def test_url_rule_escapes_what_a_content_string_cannot_hold() -> None:
    url = 'http://Evil.com:8080/a;b"c|d\\e?x=ü'
    ind = indicator(url.replace("\\", "\\\\"), "url:value")
    detection = classify(ind, RULES)
    rule = detection.render(ind.id, 99, "drop")
    result, options = parsed(rule)
    assert result.action == "drop"
    assert options["http.host"] == [None] and options["http.uri"] == [None]
    assert options["content"] == ['"evil.com"', '"/a|3B|b|22|c|7C|d|5C|e?x=|C3 BC|"']
    assert options["sid"] == ["99"]


def test_url_without_path_matches_the_host_only() -> None:
    ind = indicator("https://evil.com/", "url:value")
    _, options = parsed(classify(ind, RULES).render(ind.id, 5, "alert"))
    assert "http.uri" not in options
    assert options["content"] == ['"evil.com"']


def test_content_keeps_printable_ascii_and_hex_encodes_the_rest() -> None:
    assert content("a b:c") == '"a b:c"'
    assert content('";\\|\n') == '"|22 3B 5C 7C 0A|"'


@pytest.mark.parametrize(
    ("prop", "digest", "algorithm"),
    [
        ("MD5", "D41D8CD98F00B204E9800998ECF8427E", "md5"),
        ("'SHA-1'", "da39a3ee5e6b4b0d3255bfef95601890afd80709", "sha1"),
        ("'SHA-256'", "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855", "sha256"),
    ],
)
def test_file_hashes_go_to_hash_lists(prop: str, digest: str, algorithm: str) -> None:
    detection = classify(indicator(digest, f"file:hashes.{prop}"), RULES)
    assert (detection.kind, detection.set_name, detection.datavalue) == (HASHLIST, algorithm, digest.lower())


def test_datasets_mode_maps_ips_and_domains_to_dataset_entries() -> None:
    ip = classify(indicator("2001:db8:0:0::7", "ipv6-addr:value"), DATASETS)
    assert (ip.kind, ip.set_name, ip.set_type, ip.datavalue) == (DATASET, "threatbus-ip", "ip", "2001:db8::7")
    domain = classify(indicator("evil.com", "domain-name:value"), DATASETS)
    assert (domain.kind, domain.set_name, domain.set_type) == (DATASET, "threatbus-domain", "string")
    assert base64.b64decode(domain.datavalue) == b"evil.com"
    # No dataset holds networks or URLs: those stay rules.
    assert classify(indicator("10.0.0.0/8"), DATASETS).kind == RULE
    assert classify(indicator("http://evil.com/x", "url:value"), DATASETS).kind == RULE


def test_static_rules_parse(tmp_path: object) -> None:
    rules = static_rules(DATASETS, 1000, "/var/lib/suricata/rules/threatbus", {"md5": 1, "sha1": 0, "sha256": 2})
    assert len(rules) == 5  # ip.dst, ip.src, domain, md5 and sha256 lists (the empty sha1 list has none)
    sids = []
    for rule in rules:
        result, options = parsed(rule)
        assert result.action == "alert"
        sids.extend(options["sid"])
    assert sids == ["1000", "1001", "1002", "1003", "1005"]
    _, options = parsed(rules[0])
    assert options["dataset"] == ["isset,threatbus-ip, type ip, load /var/lib/suricata/rules/threatbus-ip.lst"]
    _, options = parsed(rules[3])
    assert options["filemd5"] == ["/var/lib/suricata/rules/threatbus-md5.list"]
    assert static_rules(RULES, 1000, "/x/threatbus", {}) == []


def test_suricata_rules_are_used_as_given() -> None:
    rule = 'alert tcp any any -> any 4444 (msg:"meterpreter"; flow:established; sid:2100123; rev:3;)'
    ind = new_indicator(rule, pattern_type="suricata")
    detection = classify(ind, RULES)
    assert detection.sid == 2100123
    assert detection.render(ind.id, 1, "drop") == rule
    parsed(rule)


@pytest.mark.parametrize(
    ("pattern", "reason"),
    [
        ('alert ip any any -> any any (msg:"x"; rev:1;)', "exactly one sid"),
        ('alert ip any any -> any any (msg:"x"; sid:1;)\nalert ip any any -> any any (sid:2;)', "single line"),
        ("not a rule at all", "not a Suricata rule"),
    ],
)
def test_unusable_suricata_rules_are_refused(pattern: str, reason: str) -> None:
    with pytest.raises(Unsupported, match=reason):
        classify(new_indicator(pattern, pattern_type="suricata"), RULES)


@pytest.mark.parametrize(
    ("ind", "reason"),
    [
        (indicator("a@b.c", "email-addr:value"), "no Suricata mapping"),
        (indicator("ab" * 64, "file:hashes.'SHA-512'"), "not supported by Suricata"),
        (new_indicator("[ipv4-addr:value = '1.2.3.4' OR ipv4-addr:value = '5.6.7.8']"), "single-value"),
        (indicator("not a domain!", "domain-name:value"), "not a domain name"),
        (indicator("1.2.3.4", "ipv6-addr:value"), "not an ipv6-addr"),
        (indicator("/relative/only", "url:value"), "absolute URL"),
        (new_indicator("rule text", pattern_type="sigma"), "pattern_type"),
    ],
)
def test_unmappable_indicators_say_why(ind: object, reason: str) -> None:
    with pytest.raises(Unsupported, match=reason):
        classify(ind, RULES)  # type: ignore[arg-type]


def test_sids_are_stable_and_in_range() -> None:
    sids = {stable_sid(f"indicator--{n}", 100, 199) for n in range(1000)}
    assert min(sids) >= 100 and max(sids) <= 199
    assert len(sids) > 90  # spread over the range
    assert stable_sid("indicator--x", 100, 10**9) == stable_sid("indicator--x", 100, 10**9)
