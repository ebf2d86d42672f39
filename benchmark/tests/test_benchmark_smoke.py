"""Smoke test of the benchmark: the quick mode runs end to end and writes sane results.

It checks that the harness works and its numbers are plausible, not that the
targets are met (that is what ``make bench`` reports, on a quiet machine).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import orjson
import pytest

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # `benchmark` is a directory of the repository, not an installed package
    sys.path.insert(0, str(REPO))

from benchmark.nodes import Sample  # noqa: E402
from benchmark.scenarios import memory_summary  # noqa: E402
from benchmark.stats import RunRecord, latency_summary, merge  # noqa: E402

pytestmark = pytest.mark.e2e


def run_quick(out: Path, *options: str) -> tuple[int, dict, str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, "-m", "benchmark.run", "--quick", "--out", str(out), *options],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=110,
    )
    results = sorted(out.glob("bench-*/results.json"))
    assert results, f"no results.json written\nstdout:\n{done.stdout}\nstderr:\n{done.stderr[-4000:]}"
    return done.returncode, orjson.loads(results[-1].read_bytes()), done.stdout + done.stderr


def test_quick_inmem_run_writes_plausible_results(tmp_path: Path) -> None:
    code, result, output = run_quick(tmp_path, "--only", "inmem,fanout", "--fanout-backbones", "inmem")
    assert code == 0, output[-4000:]
    assert result["errors"] == {} and result["skipped"] == {}
    assert result["meta"]["mode"] == "quick" and result["meta"]["cpus"] >= 1

    inmem = result["scenarios"]["inmem"]
    saturation = inmem["saturation"]
    assert saturation["sent"] == 3000
    assert saturation["lost"] == 0 and saturation["duplicates"] == 0
    assert 100 < saturation["msgs_per_s"] < 1_000_000
    assert 0 < saturation["p50_ms"] <= saturation["p99_ms"] < 5_000
    assert saturation["cpu_us_per_msg"]["bench-inmem"] > 0 and "publishing app" in saturation["cpu_us_per_msg"]

    assert [row["offered_rate"] for row in inmem["latency"]] == [200, 1000, 5000]
    for row in inmem["latency"]:
        assert row["lost"] == 0, row
        assert row["delivered"] == row["sent"] == int(row["offered_rate"])  # one second each in quick mode
        assert 0 < row["p50_ms"] <= row["p99_ms"] <= row["max_ms"] < 5_000
        assert 0.5 * row["offered_rate"] < row["achieved_send_rate"] < 1.5 * row["offered_rate"]

    memory = result["scenarios"]["memory"]["inmem"]["bench-inmem"]
    assert memory["messages"] == 3000
    assert 10_000 < memory["rss_end_kb"] < 2_000_000  # a Python process: tens of MiB
    assert len(memory["samples"]) >= 3
    log = memory["intel_log"]  # read from the node's /metrics; quick mode does not fill it
    assert log["filled"] is False and log["fill_messages"] == 0
    assert log["at_end"]["entries"] - log["at_start"]["entries"] >= 3000  # the saturation run (and late warm-up ones)
    assert log["at_end"]["bytes"] > log["at_start"]["bytes"] and log["at_end"]["evicted"] == 0

    fanout = result["scenarios"]["fanout"]["inmem"]
    assert [row["subscribers"] for row in fanout] == [1, 10]
    ten = fanout[1]["saturation"]
    assert ten["expected_deliveries"] == ten["delivered"] == 10 * ten["sent"]

    names = [t["name"] for t in result["targets"]]
    assert len(names) == 7 and result["targets"][0]["measured"] == saturation["msgs_per_s"]
    assert result["targets"][1]["met"] is None  # rabbitmq not run: not measured, not failed
    assert result["targets"][3]["met"] is None  # nor the policy scenario
    assert all(row["met"] is None for row in result["targets"][4:])  # nor stream transport and snapshots

    png = Path(result["meta"]["node_logs"]) / "results.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "latest.json").read_bytes() == (png.parent / "results.json").read_bytes()


def test_quick_expiry_run_measures_the_schedule(tmp_path: Path) -> None:
    code, result, output = run_quick(tmp_path, "--only", "expiry")
    assert code == 0, output[-4000:]
    assert result["errors"] == {}
    schedule, lateness = result["scenarios"]["expiry"]["schedule"], result["scenarios"]["expiry"]["lateness"]
    assert schedule["indicators"] == schedule["fired"] == schedule["removals_delivered"] == 10_000
    # the JSON text plus a few hundred bytes of bookkeeping
    assert schedule["of_which_indicator_json_bytes"] < schedule["memory_bytes_per_scheduled_indicator"] < 2_000
    assert schedule["removals_per_s"] > 1_000
    assert lateness["removals_received"] == lateness["indicators"] and lateness["early"] == 0
    assert 0 <= lateness["late_p50_ms"] <= lateness["late_max_ms"] < 1_000
    assert "expiry" in output


def test_unknown_scenario_is_a_usage_error(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "benchmark.run", "--only", "nonsense", "--out", str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert "unknown scenario(s): nonsense" in done.stderr


def test_records_drop_duplicates_and_merge_across_receivers() -> None:
    first, second = RunRecord(), RunRecord()
    first.add(1, sent_ns=1_000_000, recv_ns=2_000_000)
    first.add(1, sent_ns=1_000_000, recv_ns=2_500_000)  # the same delivery again
    second.add(2, sent_ns=500_000, recv_ns=4_500_000)
    merged = merge([first.export(), second.export()])
    assert merged["received"] == 2 and merged["duplicates"] == 1
    assert merged["first_sent_ns"] == 500_000 and merged["last_recv_ns"] == 4_500_000
    summary = latency_summary(merged["latencies_ns"])
    assert summary["max_ms"] == 4.0 and 1.0 <= summary["p50_ms"] <= 4.0
    assert latency_summary(merge([])["latencies_ns"])["p99_ms"] is None


def test_memory_summary_tells_flat_from_growing() -> None:
    count = 100_000
    flat = [Sample(i, i * 1000, {"n": 40_000 + (500 if i > 5 else 0)}) for i in range(101)]
    growing = [Sample(i, i * 1000, {"n": 40_000 + i * 100}) for i in range(101)]  # 10 MB per 100k messages
    assert memory_summary(flat, "n", 0, count)["flat"] is True
    leak = memory_summary(growing, "n", 0, count)
    assert leak["flat"] is False
    assert leak["slope_second_half_kb_per_10k_msgs"] == pytest.approx(1000, rel=0.01)
    assert leak["messages"] == count


def test_policy_scenario_measures_every_filter_in_microseconds() -> None:
    from benchmark.policy import FILTERS, policy_scenario

    result = policy_scenario(quick=True)
    assert set(result["filters"]) == set(FILTERS)
    assert result["filters"]["empty"]["held_back_of_mix"] == "0/10"
    assert result["filters"]["tlp_boundary"]["held_back_of_mix"] == "3/10"  # RED (1.0 and 2.0), AMBER+STRICT
    for data in result["filters"].values():
        assert 0 < data["us_per_evaluation_best"] <= data["us_per_evaluation_median"] < 1_000


def test_validation_figures_are_plausible() -> None:
    from benchmark.validation import validation_scenario

    result = validation_scenario(300)
    for kind in ("point_pattern", "compound_pattern_cached", "compound_pattern_unseen"):
        row = result[kind]
        assert 0 < row["ours_us"] < row["foreign_validated_us"] < 1_000_000, (kind, row)
    # The parser runs for unseen compound patterns only: far dearer than a cached verdict.
    assert result["compound_pattern_unseen"]["validation_us"] > result["compound_pattern_cached"]["validation_us"]


def test_quick_streams_run_replays_every_snapshot_indicator(tmp_path: Path) -> None:
    from testbus import rabbitmq_reachable

    code, result, output = run_quick(tmp_path, "--only", "streams")
    assert code == 0, output[-4000:]
    assert result["errors"] == {}
    snapshot = result["scenarios"]["streams"]["snapshot"]
    backbones = ["inmem", "rabbitmq"] if rabbitmq_reachable() else ["inmem"]
    for backbone in backbones:
        replay = snapshot[backbone]
        assert replay["indicators"] == replay["marker_count"] == snapshot["count"], backbone
        assert replay["indicators_per_s"] > 0
    if rabbitmq_reachable():
        ceiling = result["scenarios"]["streams"]["stream_ceiling"]
        assert ceiling["published_msgs_per_s"] > 0 and ceiling["consumed_msgs_per_s"] > 0
    names = [row["name"] for row in result["targets"]]
    assert any("snapshot of" in name for name in names)


def test_bulk_run_reports_every_sensor_in_the_issue_shape(tmp_path: Path) -> None:
    code, result, output = run_quick(tmp_path, "--only", "bulk", "--bulk-indicators", "2000")
    assert code == 0, output[-4000:]
    assert result["errors"] == {} and result["skipped"] == {}
    bulk = result["bulk"]
    assert set(bulk) == {"indicators", "suricata_datasets", "suricata_rules", "zeek", "snapshot"}
    assert bulk["indicators"] == 2000
    for target in ("suricata_datasets", "suricata_rules", "zeek", "snapshot"):
        figures = bulk[target]
        assert set(figures) == {"seconds_until_held", "peak_rss_mib", "cpu_us_per_indicator"}, target
        assert 0 < figures["seconds_until_held"] < 60, (target, figures)
        assert set(figures["peak_rss_mib"]) == {"node", "standin"}
        assert all(10 < mib < 2048 for mib in figures["peak_rss_mib"].values()), (target, figures)
        assert figures["cpu_us_per_indicator"]["node"] > 0, (target, figures)
        details = result["scenarios"]["bulk"][target]
        assert details["held"] == 2000 and details["held_all"], (target, details)
    for target in ("suricata_datasets", "suricata_rules", "zeek"):
        assert bulk[target]["cpu_us_per_indicator"]["publisher"] > 0
        assert result["scenarios"]["bulk"][target]["publish_failures"] == []
    assert "bulk   zeek" in output


def test_bulk_indicators_are_distinct_valid_and_mixed(tmp_path: Path) -> None:
    from benchmark.bulk import MIX, mix_counts, write_indicators
    from threatbus.data import from_payload
    from threatbus.stix import validate

    files = write_indicators(tmp_path, 250, chunk=100)
    assert [len(f.read_bytes().splitlines()) for f in files] == [100, 100, 50]
    objects = [orjson.loads(line) for f in files for line in f.read_bytes().splitlines()]
    for obj in objects:
        validate(from_payload(obj))
    assert len({o["pattern"] for o in objects}) == len({o["id"] for o in objects}) == 250
    kinds = mix_counts(250)
    assert sum(kinds.values()) == 250
    assert mix_counts(1000) == {"ip": 400, "domain": 300, "url": 200, "md5": 50, "sha256": 50}
    assert len(MIX) == 20
    assert sum("ipv4-addr" in o["pattern"] for o in objects) == kinds["ip"]
    assert sum("SHA-256" in o["pattern"] for o in objects) == kinds["sha256"]


def test_quick_fanout_over_five_rabbitmq_nodes(tmp_path: Path) -> None:
    from testbus import require_rabbitmq

    require_rabbitmq()
    code, result, output = run_quick(tmp_path, "--only", "fanout", "--fanout-backbones", "rabbitmq")
    assert code == 0, output[-4000:]
    nodes = result["scenarios"]["fanout_nodes"]
    assert nodes["nodes"] == nodes["subscribers"] == 5
    saturation, latency = nodes["saturation"], nodes["latency"]
    assert saturation["expected_deliveries"] == saturation["delivered"] == 5 * saturation["sent"]
    assert saturation["lost"] == 0 and saturation["deliveries_per_s"] == pytest.approx(
        5 * saturation["msgs_per_s"], rel=0.01
    )
    assert 0 < latency["p50_ms"] <= latency["p99_ms"] < 5_000
    assert "fanout 5 rabbitmq nodes" in output
