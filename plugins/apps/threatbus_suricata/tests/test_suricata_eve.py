"""Following the EVE log across rotation and truncation, and reading alerts.

Suricata cannot be installed here: the lines are written by the test in
EVE JSON format as Suricata's user guide documents it (one JSON object per
line, ``event_type``, flow fields, an ``alert`` object with
``signature_id``, ``signature``, ``metadata``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from threatbus.testing import indicator
from threatbus_suricata.eve import LogFollower, event_time, matches, sighting_context
from threatbus_suricata.mapping import Settings
from threatbus_suricata.store import DetectionStore


def alert_line(sid: int, **fields: object) -> str:
    event = {
        "timestamp": "2026-11-24T10:11:12.345678+0100",
        "flow_id": 1234567890,
        "in_iface": "eth0",
        "event_type": "alert",
        "src_ip": "10.0.0.5",
        "src_port": 51234,
        "dest_ip": "6.6.6.6",
        "dest_port": 443,
        "proto": "TCP",
        "alert": {"action": "allowed", "gid": 1, "signature_id": sid, "rev": 1, "signature": "sig", "severity": 3},
    }
    event.update(fields)
    return json.dumps(event) + "\n"


def append(path: Path, text: str) -> None:
    with open(path, "a") as out:
        out.write(text)


@contextmanager
def following(tmp_path: Path, from_start: bool = False) -> Iterator[tuple[Path, LogFollower]]:
    """An empty eve.json and a follower of it (closed afterwards)."""
    eve = tmp_path / "eve.json"
    eve.touch()
    follower = LogFollower(str(eve), from_start=from_start)
    try:
        yield eve, follower
    finally:
        follower.close()


def test_follows_appended_lines_from_the_end(tmp_path: Path) -> None:
    eve = tmp_path / "eve.json"
    eve.write_text('{"old": 1}\n')
    follower = LogFollower(str(eve))
    assert follower.poll() == []  # what was there before is not replayed
    append(eve, '{"a": 1}\n{"b":')
    assert follower.poll() == [b'{"a": 1}']
    append(eve, " 2}\n")
    assert follower.poll() == [b'{"b": 2}']
    assert follower.poll() == []
    follower.close()


def test_survives_rotation_by_rename(tmp_path: Path) -> None:
    with following(tmp_path) as (eve, follower):
        follower.poll()
        append(eve, '{"n": 1}\n')
        os.rename(eve, tmp_path / "eve.json.1")
        append(tmp_path / "eve.json.1", '{"n": 2}\n')  # written before Suricata reopened its log
        assert follower.poll() == [b'{"n": 1}', b'{"n": 2}']
        assert follower.poll() == []  # the new file does not exist yet
        append(eve, '{"n": 3}\n')
        assert follower.poll() == [b'{"n": 3}']
        assert follower.rotations == 1


def test_survives_truncation(tmp_path: Path) -> None:
    with following(tmp_path) as (eve, follower):
        follower.poll()
        append(eve, '{"n": 1}\n{"n": 2}\n')
        assert len(follower.poll()) == 2
        eve.write_text("")  # copytruncate
        assert follower.poll() == []
        append(eve, '{"n": 3}\n')
        assert follower.poll() == [b'{"n": 3}']
        assert follower.truncations == 1


def test_waits_for_a_missing_file_and_reads_it_from_the_start(tmp_path: Path) -> None:
    eve = tmp_path / "eve.json"
    follower = LogFollower(str(eve))
    assert follower.poll() == []
    # The file did not exist when following began: everything in it is new.
    eve.write_text('{"first": 1}\n')
    assert follower.poll() == [b'{"first": 1}']
    follower.close()


def test_reopening_the_same_file_replays_nothing(tmp_path: Path) -> None:
    with following(tmp_path, from_start=True) as (eve, follower):
        append(eve, '{"n": 1}\n')
        assert follower.poll() == [b'{"n": 1}']
        follower.close()  # as after a read error
        append(eve, '{"n": 2}\n')
        assert follower.poll() == [b'{"n": 2}']


def test_bad_and_blank_lines_are_passed_on_or_skipped(tmp_path: Path) -> None:
    with following(tmp_path, from_start=True) as (eve, follower):
        append(eve, "\n  \nnot json\n")
        assert follower.poll() == [b"not json"]  # the plugin counts and logs it


def test_alerts_map_to_indicators_by_sid_metadata_and_dataset_values(tmp_path: Path) -> None:
    store = DetectionStore(tmp_path / "threatbus.rules", Settings(mode="datasets"), 1000, 100_000)
    rule_ind = indicator("http://evil.com/x", "url:value")
    ip_ind = indicator("6.6.6.6")
    domain_ind = indicator("evil.com", "domain-name:value")
    md5_ind = indicator("d41d8cd98f00b204e9800998ecf8427e", "file:hashes.MD5")
    for ind in (rule_ind, ip_ind, domain_ind, md5_ind):
        store.apply(ind)
    rule_sid = store.entry(rule_ind.id).sid  # type: ignore[union-attr]

    def found(line: str) -> list[tuple[str, str]] | None:
        result = matches(json.loads(line), store)
        return None if result is None else [(m.indicator_id, m.value) for m in result]

    assert found(alert_line(rule_sid)) == [(rule_ind.id, "http://evil.com/x")]
    assert found(alert_line(1000, dest_ip="6.6.6.6")) == [(ip_ind.id, "6.6.6.6")]
    assert found(alert_line(1001, src_ip="6.6.6.6", dest_ip="10.0.0.1")) == [(ip_ind.id, "6.6.6.6")]
    dns = {"query": [{"rrname": "EVIL.com", "rrtype": "A"}]}
    assert found(alert_line(1002, dns=dns)) == [(domain_ind.id, "evil.com")]
    assert found(alert_line(1002, dns={"rrname": "evil.com"})) == [(domain_ind.id, "evil.com")]
    files = [{"filename": "/x.exe", "md5": "D41D8CD98F00B204E9800998ECF8427E"}]
    assert found(alert_line(1003, files=files)) == [(md5_ind.id, "d41d8cd98f00b204e9800998ecf8427e")]
    metadata_line = alert_line(4242, alert={"signature_id": 4242, "metadata": {"threatbus_indicator": [ip_ind.id]}})
    assert found(metadata_line) == [(ip_ind.id, "6.6.6.6")]
    assert found(alert_line(99)) is None  # not a Threat Bus rule
    assert found(alert_line(50_000)) == []  # in our range, but no indicator holds that sid


def test_sighting_context_and_time() -> None:
    event = json.loads(alert_line(1, app_proto="tls"))
    context = sighting_context(event)
    assert context == {
        "timestamp": "2026-11-24T10:11:12.345678+0100",
        "flow_id": 1234567890,
        "in_iface": "eth0",
        "src_ip": "10.0.0.5",
        "src_port": 51234,
        "dest_ip": "6.6.6.6",
        "dest_port": 443,
        "proto": "TCP",
        "app_proto": "tls",
        "action": "allowed",
        "gid": 1,
        "signature_id": 1,
        "rev": 1,
        "signature": "sig",
        "severity": 3,
    }
    seen = event_time(event)
    assert seen is not None and (seen.hour, seen.minute, seen.microsecond) == (9, 11, 345678)
    assert event_time({"timestamp": "garbage"}) is None
