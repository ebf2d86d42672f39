"""The detection store: applying indicators, the rules file it writes, and rebuilding from it."""

from __future__ import annotations

import base64
import os
import stat
from datetime import datetime, timedelta, timezone
from pathlib import Path

import orjson
from suricataparser import parse_file

from threatbus.data import Indicator
from threatbus.lifecycle import as_removal
from threatbus.stix import new_indicator, timestamp
from threatbus.testing import indicator
from threatbus_suricata.mapping import RESERVED_SIDS, Settings
from threatbus_suricata.store import DetectionStore

SID_MIN, SID_MAX = 5_000_000, 5_999_999


def store_at(path: Path, mode: str = "rules", sid_min: int = SID_MIN, sid_max: int = SID_MAX) -> DetectionStore:
    store = DetectionStore(path / "threatbus.rules", Settings(mode=mode), sid_min, sid_max)
    store.load()
    return store


def rules_by_sid(path: Path) -> dict[int, object]:
    return {int(next(o.value for o in r.options if o.name == "sid")): r for r in parse_file(path / "threatbus.rules")}


def removal(ind: object) -> object:
    return new_indicator(ind.pattern, id=ind.id, x_threatbus_update="REMOVE")  # type: ignore[attr-defined]


def test_rules_are_written_atomically_and_parse(tmp_path: Path) -> None:
    store = store_at(tmp_path)
    indicators = [indicator(f"10.0.0.{n}") for n in range(20)] + [indicator("evil.com", "domain-name:value")]
    for ind in indicators:
        assert store.apply(ind) == "added"
    changes = store.take_changes()
    assert changes.write and changes.reload and not changes.dataset_ops
    store.write()
    rules = rules_by_sid(tmp_path)
    assert len(rules) == 21
    assert all(SID_MIN + RESERVED_SIDS <= sid <= SID_MAX for sid in rules)
    for ind in indicators:
        entry = store.entry(ind.id)
        assert entry is not None and ind.id in rules[entry.sid].raw  # type: ignore[attr-defined]
    # Only the rules file is there: no temporary files left behind, readable by Suricata's user.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["threatbus.rules"]
    assert stat.S_IMODE(os.stat(tmp_path / "threatbus.rules").st_mode) == 0o644


def test_restart_rebuilds_the_state_with_the_same_sids(tmp_path: Path) -> None:
    store = store_at(tmp_path)
    indicators = [indicator(f"192.0.2.{n}") for n in range(10)]
    indicators.append(
        new_indicator('alert tcp any any -> any 1 (msg:"given"; sid:77; rev:1;)', pattern_type="suricata")
    )
    indicators.append(indicator("d41d8cd98f00b204e9800998ecf8427e", "file:hashes.MD5"))
    for ind in indicators:
        store.apply(ind)
    store.write()
    before = {ind.id: store.entry(ind.id).sid for ind in indicators}  # type: ignore[union-attr]
    text = (tmp_path / "threatbus.rules").read_text()

    again = store_at(tmp_path)
    assert len(again) == 12
    assert {ind.id: again.entry(ind.id).sid for ind in indicators} == before  # type: ignore[union-attr]
    assert again.entry(indicators[0].id).payload == indicators[0].payload  # type: ignore[union-attr]
    assert again.indicator_of_sid(77).indicator_id == indicators[10].id  # type: ignore[union-attr]
    assert [m.indicator_id for m in again.holders("md5", "d41d8cd98f00b204e9800998ecf8427e")] == [indicators[11].id]
    # Nothing changed, so nothing to write or reload after the restart.
    changes = again.take_changes()
    assert not changes.write and not changes.reload
    again.write()
    assert (tmp_path / "threatbus.rules").read_text() == text


def test_removal_and_updates(tmp_path: Path) -> None:
    store = store_at(tmp_path)
    ind = indicator("198.51.100.1")
    store.apply(ind)
    sid = store.entry(ind.id).sid  # type: ignore[union-attr]
    store.take_changes()
    # Republishing the same indicator changes nothing.
    assert store.apply(ind) == "unchanged"
    assert not store.take_changes().reload
    # An edit keeps the sid; an older version is ignored.
    edited = new_indicator("[ipv4-addr:value = '198.51.100.2']", id=ind.id, modified="2099-01-01T00:00:00.000Z")
    assert store.apply(edited) == "updated"
    assert store.entry(ind.id).sid == sid  # type: ignore[union-attr]
    assert store.apply(ind) == "stale"
    assert store.entry(ind.id).value == "198.51.100.2"  # type: ignore[union-attr]
    # A removal of the replaced version is stale too (threatbus.lifecycle); of the held one, it removes.
    assert store.apply(removal(ind)) == "stale"
    assert store.apply(Indicator(as_removal(edited.payload))) == "removed"
    assert store.apply(Indicator(as_removal(edited.payload))) == "unknown"
    assert store.take_changes().reload
    store.write()
    assert rules_by_sid(tmp_path) == {}


def test_a_new_version_replaces_the_rule_with_its_rev_bumped_and_revocation_removes(tmp_path: Path) -> None:
    store = store_at(tmp_path)
    ind = new_indicator("[ipv4-addr:value = '198.51.100.1']", modified="2026-01-01T00:00:00Z")
    store.apply(ind)
    sid = store.entry(ind.id).sid  # type: ignore[union-attr]
    edited = new_indicator("[ipv4-addr:value = '198.51.100.9']", id=ind.id, modified="2026-01-02T00:00:00Z")
    assert store.apply(edited) == "updated"
    store.write()
    rule = rules_by_sid(tmp_path)[sid].raw  # type: ignore[attr-defined]
    assert "198.51.100.9" in rule and "198.51.100.1" not in rule and "rev:2;" in rule
    reread = store_at(tmp_path)
    reread.load()
    assert reread.entry(ind.id).rev == 2  # type: ignore[union-attr]
    revoked = new_indicator(edited.pattern, id=ind.id, modified="2026-01-03T00:00:00Z", revoked=True)
    assert store.apply(revoked) == "removed"
    store.write()
    assert rules_by_sid(tmp_path) == {}


def test_expired_detections_are_dropped_and_left_out_of_snapshots(tmp_path: Path) -> None:
    store = store_at(tmp_path)
    now = datetime.now(timezone.utc)
    expired = indicator("198.51.100.1", valid_from=timestamp(now - timedelta(days=2)))
    expired.payload["valid_until"] = timestamp(now - timedelta(days=1))
    lasting = indicator("198.51.100.2", valid_until=timestamp(now + timedelta(days=1)))
    store.apply(expired)
    store.apply(lasting)
    assert [p["id"] for _, p in store.payloads()] == [lasting.id]
    assert [p["id"] for p in store.expiring()] == [expired.id, lasting.id]
    assert store.drop_expired() == 1
    assert store.entry(expired.id) is None and store.entry(lasting.id) is not None


def test_sid_collisions_probe_to_a_free_sid(tmp_path: Path) -> None:
    store = store_at(tmp_path, sid_min=100, sid_max=100 + RESERVED_SIDS + 4)  # room for 5 rules
    indicators = [indicator(f"203.0.113.{n}") for n in range(5)]
    for ind in indicators:
        store.apply(ind)
    sids = {store.entry(ind.id).sid for ind in indicators}  # type: ignore[union-attr]
    assert sids == set(range(100 + RESERVED_SIDS, 100 + RESERVED_SIDS + 5))
    extra = indicator("203.0.113.99")
    try:
        store.apply(extra)
    except ValueError as err:
        assert "no free sid" in str(err)
    else:
        raise AssertionError("a full sid range must refuse the indicator")


def test_given_rule_sid_conflicts_are_refused(tmp_path: Path) -> None:
    store = store_at(tmp_path)
    first = new_indicator('alert ip any any -> any any (msg:"a"; sid:42;)', pattern_type="suricata")
    second = new_indicator('alert ip any any -> any any (msg:"b"; sid:42;)', pattern_type="suricata")
    store.apply(first)
    try:
        store.apply(second)
    except ValueError as err:
        assert first.id in str(err)
    else:
        raise AssertionError("two indicators must not share a sid")


def test_datasets_share_entries_between_indicators(tmp_path: Path) -> None:
    store = store_at(tmp_path, mode="datasets")
    store.take_changes()
    a, b = indicator("6.6.6.6"), indicator("6.6.6.6")
    store.apply(a)
    store.apply(b)
    ops = store.take_changes().dataset_ops
    assert [(op, d.datavalue) for op, d in ops] == [("dataset-add", "6.6.6.6")]
    store.apply(removal(a))
    assert store.take_changes().dataset_ops == []  # b still needs it
    assert [m.indicator_id for m in store.holders("threatbus-ip", "6.6.6.6")] == [b.id]
    store.apply(removal(b))
    assert [op for op, _ in store.take_changes().dataset_ops] == ["dataset-remove"]


def test_dataset_files_are_written_with_serialized_values(tmp_path: Path) -> None:
    store = store_at(tmp_path, mode="datasets")
    store.apply(indicator("6.6.6.6"))
    store.apply(indicator("Evil.com", "domain-name:value"))
    store.apply(indicator("e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855", "file:hashes.'SHA-256'"))
    store.write()
    assert (tmp_path / "threatbus-ip.lst").read_text() == "6.6.6.6\n"
    assert base64.b64decode((tmp_path / "threatbus-domain.lst").read_text()) == b"evil.com"
    assert (tmp_path / "threatbus-sha256.list").read_text().startswith("e3b0c442")
    rules = parse_file(tmp_path / "threatbus.rules")
    assert len(rules) == 4  # ip.dst, ip.src, domain, sha256 list; no rule per indicator
    assert all(str(tmp_path) in r.raw for r in rules)


def test_a_mode_change_remaps_the_held_indicators(tmp_path: Path) -> None:
    store = store_at(tmp_path, mode="rules")
    store.apply(indicator("6.6.6.6"))
    store.write()
    assert len(rules_by_sid(tmp_path)) == 1
    switched = store_at(tmp_path, mode="datasets")
    assert switched.holders("threatbus-ip", "6.6.6.6")
    changes = switched.take_changes()
    assert changes.write and changes.reload
    switched.write()
    assert (tmp_path / "threatbus-ip.lst").read_text() == "6.6.6.6\n"
    assert len(rules_by_sid(tmp_path)) == 3


def test_unreadable_entries_are_skipped(tmp_path: Path) -> None:
    store = store_at(tmp_path)
    good = indicator("6.6.6.6")
    store.apply(good)
    store.write()
    path = tmp_path / "threatbus.rules"
    path.write_text(path.read_text() + '# threatbus-entry {not json\n# threatbus-entry {"id": 1}\n')
    again = store_at(tmp_path)
    assert len(again) == 1 and again.entry(good.id) is not None


def test_an_indicator_sent_as_pretty_json_stays_one_entry_line(tmp_path: Path) -> None:
    ind = indicator("evil.example.com", "domain-name:value")
    pretty = Indicator(ind.payload, raw=orjson.dumps(ind.payload, option=orjson.OPT_INDENT_2))
    store = DetectionStore(tmp_path / "threatbus.rules", Settings(mode="datasets"), 3_900_000_000, 3_999_999_999)
    store.load()
    store.apply(pretty)
    store.write()
    again = DetectionStore(tmp_path / "threatbus.rules", Settings(mode="datasets"), 3_900_000_000, 3_999_999_999)
    assert again.load() == 1
    assert again.entry(ind.id).payload == ind.payload  # type: ignore[union-attr]
