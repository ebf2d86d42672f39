"""Run the Threat Bus benchmarks and write the results as JSON and a PNG chart.

    .venv/bin/python -m benchmark.run --out benchmark/results           # full, a few minutes
    .venv/bin/python -m benchmark.run --quick --out benchmark/results   # seconds, for smoke tests

Exit status: 0 when every selected scenario ran (targets missed or not),
1 when a scenario failed, 2 for bad usage.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import replace
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

import orjson
import yaml

if not __package__:  # run as a script (python benchmark/run.py): make the package importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmark.bulk import BULK_PROFILES, BulkRun
from benchmark.expiry import expiry_scenario
from benchmark.nodes import Broker, broker_missing, loadavg, machine_busy, plugin_missing, stop_nodes
from benchmark.policy import policy_scenario
from benchmark.scenarios import (
    PROFILES,
    Profile,
    bus_scenario,
    ceiling_scenario,
    fanout_scenario,
    nodes_fanout_scenario,
    start_inmem,
    start_rabbitmq_pair,
    wait_for_broker,
)
from benchmark.stats import ratio
from benchmark.streams import snapshot_scenario, stream_ceiling
from benchmark.validation import validation_scenario

logger = logging.getLogger("benchmark")

REPO = Path(__file__).resolve().parent.parent
SCENARIOS = (
    "inmem",
    "ceiling",
    "rabbitmq",
    "fanout",
    "policy",
    "expiry",
    "validation",
    "streams",
    "rabbitmq_stream",
    "bulk",
)

TARGET_INMEM_MSGS_PER_S = 10_000
TARGET_CEILING_RATIO = 0.5
TARGET_P99_MS = 10.0
TARGET_P99_RATE = 1000
FANOUT_NODES = 5  # rabbitmq nodes of the multi-node fan-out
TARGET_FILTER_US = 5.0  # a typical policy filter, per evaluation: small beside a delivery's cost
TARGET_SNAPSHOT_PER_S = 50_000
TARGET_STREAM_OVER_INMEM = 0.5
SNAPSHOT_COUNT = {"quick": 5_000, "full": 100_000}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmark.run", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default=str(REPO / "benchmark" / "results"), help="results directory")
    parser.add_argument("--quick", action="store_true", help="small counts: seconds instead of minutes")
    parser.add_argument(
        "--only",
        default=",".join(SCENARIOS),
        help=f"comma-separated scenarios to run, of {', '.join(SCENARIOS)} (memory is measured within "
        "inmem and rabbitmq; fanout runs on each backbone selected or available)",
    )
    parser.add_argument("--fanout-backbones", default="inmem,rabbitmq", help="backbones to run the fan-out on")
    parser.add_argument("--profile", action="store_true", help="record py-spy stacks of the nodes in saturation runs")
    parser.add_argument(
        "--bulk-indicators",
        type=int,
        default=None,
        metavar="N",
        help="indicators of the bulk scenario (default: 20,000 with --quick, else 1,000,000)",
    )
    parser.add_argument("--note", default="", help="free text stored in the results, e.g. the load on the machine")
    broker = parser.add_argument_group("RabbitMQ (ceiling and rabbitmq scenarios)")
    broker.add_argument("--rabbitmq-host", default=os.environ.get("THREATBUS_TEST_RABBITMQ_HOST", "127.0.0.1"))
    broker.add_argument(
        "--rabbitmq-port", type=int, default=int(os.environ.get("THREATBUS_TEST_RABBITMQ_PORT", "5672"))
    )
    broker.add_argument("--rabbitmq-user", default="guest")
    broker.add_argument("--rabbitmq-password", default="guest")
    broker.add_argument("--rabbitmq-vhost", default="/")
    broker.add_argument(
        "--rabbitmq-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra key of the nodes' plugins.backbones.rabbitmq section, value in YAML, e.g. "
        "exchange_durable=true or prefetch=500 (repeatable; the ceiling is not changed)",
    )
    queue = parser.add_argument_group(
        "queue settings of the bus under test (WIRE.md defaults); the ceiling uses them too"
    )
    queue.add_argument("--queue-durable", action=argparse.BooleanOptionalAction, default=True)
    queue.add_argument("--queue-lazy", action=argparse.BooleanOptionalAction, default=True)
    queue.add_argument("--queue-max-items", type=int, default=0)
    ceiling = parser.add_argument_group("raw pika ceiling: set these as the rabbitmq backbone publishes and consumes")
    ceiling.add_argument("--ceiling-confirms", action=argparse.BooleanOptionalAction, default=True)
    ceiling.add_argument("--ceiling-persistent", action=argparse.BooleanOptionalAction, default=None,
                         help="delivery_mode 2 messages (default: as --queue-durable, like the backbone)")  # fmt: skip
    ceiling.add_argument("--ceiling-confirm-window", type=int, default=1000, help="unconfirmed messages in flight")
    ceiling.add_argument("--ceiling-prefetch", type=int, default=200, help="consumer prefetch count")
    ceiling.add_argument("--ceiling-ack-every", type=int, default=50, help="ack (multiple) every N messages")
    args = parser.parse_args(argv)
    args.rabbitmq_extra = {}
    for item in args.rabbitmq_option:
        key, sep, value = item.partition("=")
        if not sep or not key:
            parser.error(f"--rabbitmq-option expects KEY=VALUE, got {item!r}")
        args.rabbitmq_extra[key] = yaml.safe_load(value)
    unknown = set(args.only.split(",")) - set(SCENARIOS)
    if unknown:
        parser.error(f"unknown scenario(s): {', '.join(sorted(unknown))}; choose from {', '.join(SCENARIOS)}")
    return args


def versions() -> dict[str, str | None]:
    found: dict[str, str | None] = {}
    for dist in ("threatbus", "threatbus-inmem", "threatbus-zmq", "threatbus-rabbitmq", "pyzmq", "pika", "orjson"):
        try:
            found[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            found[dist] = None
    return found


def command_output(*command: str) -> str | None:
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=15, cwd=REPO)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() or None if done.returncode == 0 else None


def meta(args: argparse.Namespace, profile: Profile) -> dict[str, Any]:
    return {
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "mode": profile.name,
        "profile": profile.__dict__,
        "host": platform.node(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": versions(),
        "rabbitmq_version": command_output("rabbitmqctl", "version"),
        "git_commit": command_output("git", "rev-parse", "--short", "HEAD"),
        "loadavg_before": loadavg(),
        "note": args.note,
        "rabbitmq_backbone_options": args.rabbitmq_extra,
    }


def _target(name: str, op: str, target: float, measured: float | None, **figures: Any) -> dict[str, Any]:
    """One row of ``targets``: ``measured`` against ``op`` (">=" or "<") ``target``, with more ``figures``."""
    met = None if measured is None else (measured >= target if op == ">=" else measured < target)
    return {"name": name, "target": f"{op} {target}", "measured": measured, **figures, "met": met}


def targets(scenarios: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets against the figures of this run."""
    rows: list[dict[str, Any]] = []
    inmem = scenarios.get("inmem", {}).get("saturation", {}).get("msgs_per_s")
    rows.append(
        _target(
            "inmem, one node: msgs/s at saturation",
            ">=",
            TARGET_INMEM_MSGS_PER_S,
            inmem,
            ratio_to_target=ratio(inmem, TARGET_INMEM_MSGS_PER_S),
        )
    )
    bus = scenarios.get("rabbitmq", {}).get("saturation", {}).get("msgs_per_s")
    ceiling = scenarios.get("ceiling", {})
    runs = [ceiling.get(key, {}).get("saturation", {}).get("msgs_per_s") for key in ("matched", "matched_after")]
    runs = [r for r in runs if r]
    matched = round(sum(runs) / len(runs), 1) if runs else None
    unconfirmed = ceiling.get("no_confirms", {}).get("saturation", {}).get("msgs_per_s")
    rows.append(
        _target(
            "rabbitmq, two nodes: msgs/s over raw pika ceiling (same settings)",
            ">=",
            TARGET_CEILING_RATIO,
            ratio(bus, matched),
            bus_msgs_per_s=bus,
            ceiling_msgs_per_s=matched,
            ceiling_runs_msgs_per_s=runs,
            ratio_to_no_confirms_ceiling=ratio(bus, unconfirmed),
        )
    )
    p99 = next(
        (
            row.get("p99_ms")
            for row in scenarios.get("rabbitmq", {}).get("latency", [])
            if row.get("offered_rate") == TARGET_P99_RATE
        ),
        None,
    )
    rows.append(
        _target(
            f"rabbitmq, two nodes: p99 latency app to app at {TARGET_P99_RATE} msg/s (ms)",
            "<",
            TARGET_P99_MS,
            p99,
            ratio_to_target=ratio(p99, TARGET_P99_MS),
        )
    )
    typical = scenarios.get("policy", {})
    filter_us = typical.get("filters", {}).get(typical.get("typical"), {}).get("us_per_evaluation_median")
    rows.append(
        _target(
            "policy filter: µs per evaluation (typical filter, mixed intel)",
            "<",
            TARGET_FILTER_US,
            filter_us,
            ratio_to_target=ratio(filter_us, TARGET_FILTER_US),
        )
    )
    stream_bus = scenarios.get("rabbitmq_stream", {}).get("saturation", {}).get("msgs_per_s")
    rows.append(
        _target(
            "rabbitmq, two nodes, transport stream: msgs/s over the inmem node's (same run)",
            ">=",
            TARGET_STREAM_OVER_INMEM,
            ratio(stream_bus, inmem),
            bus_msgs_per_s=stream_bus,
            inmem_msgs_per_s=inmem,
        )
    )
    streams = scenarios.get("streams", {}).get("snapshot", {})
    for backbone in ("inmem", "rabbitmq"):
        replay = streams.get(backbone, {}).get("indicators_per_s")
        rows.append(
            _target(
                f"{backbone}: snapshot of {streams.get('count')} indicators replayed to a new subscriber "
                "(indicators/s)",
                ">=",
                TARGET_SNAPSHOT_PER_S,
                replay,
                ratio_to_target=ratio(replay, TARGET_SNAPSHOT_PER_S),
            )
        )
    return rows


def log_problems(nodes: list[Any], limit: int = 20) -> list[str]:
    """WARNING and ERROR lines of the nodes' logs (a clean run has none)."""
    found = []
    for node in nodes:
        for line in node.process.log().splitlines():
            if " WARNING " in line or " ERROR " in line or "Traceback" in line:
                found.append(line.strip()[:300])
    return found[:limit]


def summarise_profiles(saturation: dict[str, Any]) -> None:
    """Write a summary next to each py-spy profile (GIL time per message; the node's CPU for comparison)."""
    from benchmark.profile_summary import summarise

    for path in saturation.get("profiles", []):
        profile = Path(path)
        node = profile.stem.split("-", 2)[-1]  # profile-<label>-<node name>
        cpu = saturation.get("cpu_us_per_msg", {}).get(node)
        text = summarise(profile, saturation.get("delivered"), 250, 30)
        header = (
            f"node CPU (all threads, libzmq I/O threads and system time included): {cpu} µs per message\n"
            "GIL time below exceeds CPU time when the machine is oversubscribed (preempted holding the GIL)\n"
        )
        profile.with_suffix(".summary.txt").write_text(header + text + "\n")


class Runner:
    """Runs the selected scenarios, recording each one's result, skip reason or error."""

    def __init__(self, args: argparse.Namespace, profile: Profile, workdir: Path) -> None:
        self.args = args
        self.profile = profile
        self.workdir = workdir
        self.selected = set(args.only.split(","))
        self.scenarios: dict[str, Any] = {}
        self.skipped: dict[str, str] = {}
        self.errors: dict[str, str] = {}
        self.bulk: dict[str, Any] | None = None  # results.json's top-level "bulk" object
        self.broker_settings = {
            "host": args.rabbitmq_host,
            "port": args.rabbitmq_port,
            "username": args.rabbitmq_user,
            "password": args.rabbitmq_password,
            "vhost": args.rabbitmq_vhost,
        }
        self.queue = {
            "durable": args.queue_durable,
            "lazy": args.queue_lazy,
            "auto_delete": False,
            "exclusive": False,
            "max_items": args.queue_max_items,
        }
        self.profile_dir = workdir / "profiles" if args.profile else None

    def attempt(self, name: str, action: Callable[[], Any], *needs: str | None) -> Any:
        reasons = [n for n in needs if n]
        if reasons:
            self.skipped[name] = "; ".join(reasons)
            logger.warning("skipping %s: %s", name, self.skipped[name])
            return None
        logger.info("running %s", name)
        started = time.monotonic()
        try:
            result = action()
        except Exception as err:
            self.errors[name] = f"{type(err).__name__}: {err}"
            logger.error("%s failed: %s\n%s", name, err, traceback.format_exc())
            return None
        logger.info("%s done in %.1fs", name, time.monotonic() - started)
        self.scenarios[name] = result
        return result

    def run(self) -> None:
        zmq_missing = plugin_missing("apps", "zmq")
        rabbit_missing = plugin_missing("backbones", "rabbitmq")
        broker_down = broker_missing(self.broker_settings)
        fanout_on = set(self.args.fanout_backbones.split(",")) if "fanout" in self.selected else set()
        if "validation" in self.selected:
            self.attempt("validation", lambda: validation_scenario(self.profile.validation_count))
        if {"inmem"} & self.selected or "inmem" in fanout_on:
            self.attempt("inmem", self.inmem, zmq_missing)
        if "ceiling" in self.selected:
            self.attempt("ceiling", self.ceiling, broker_down)
        if {"rabbitmq"} & self.selected or "rabbitmq" in fanout_on:
            self.attempt("rabbitmq", self.rabbitmq, zmq_missing, rabbit_missing, broker_down)
        if "rabbitmq" in fanout_on:
            self.attempt("fanout_nodes", self.fanout_nodes, zmq_missing, rabbit_missing, broker_down)
        if "policy" in self.selected:
            self.attempt("policy", lambda: policy_scenario(self.profile.name == "quick"))
        if "streams" in self.selected:
            self.attempt("streams", self.streams, zmq_missing)
        if "rabbitmq_stream" in self.selected:
            self.attempt("rabbitmq_stream", self.rabbitmq_stream, zmq_missing, rabbit_missing, broker_down)
        if "bulk" in self.selected:
            apps = [plugin_missing("apps", name) for name in ("zmq", "suricata", "zeek")]
            self.attempt("bulk", self.run_bulk, *apps)
        if {"ceiling", "rabbitmq"} <= self.selected and "ceiling" in self.scenarios and "rabbitmq" in self.scenarios:
            # The ceiling once more after the bus, so that drifting load on the machine shows up.
            again = self.attempt("ceiling-after", lambda: self.ceiling(again=True))
            if again:
                self.scenarios["ceiling"]["matched_after"] = self.scenarios.pop("ceiling-after")["matched"]
        if "expiry" in self.selected:
            self.attempt("expiry", lambda: expiry_scenario(self.profile.name))
        memory = {k: v.pop("memory") for k, v in self.scenarios.items() if isinstance(v, dict) and "memory" in v}
        if memory:
            self.scenarios["memory"] = memory
        fanout = {k: v.pop("fanout") for k, v in self.scenarios.items() if isinstance(v, dict) and "fanout" in v}
        if fanout:
            self.scenarios["fanout"] = fanout
        for name in ("inmem", "rabbitmq"):
            # Ran only for the fan-out: do not report figures nobody asked for.
            if name not in self.selected and name in self.scenarios:
                kept = self.scenarios.pop(name)
                self.scenarios.get("memory", {}).pop(name, None)
                del kept

    def run_bulk(self) -> dict[str, Any]:
        profile = BULK_PROFILES[self.profile.name]
        if self.args.bulk_indicators:
            profile = replace(profile, indicators=self.args.bulk_indicators)
        run = BulkRun(self.workdir / "bulk", profile)
        self.bulk = run.result  # what finished is reported even if a later target fails
        run.run()
        return run.details

    def _with_nodes(self, name: str, nodes: list[Any]) -> dict[str, Any]:
        try:
            result = bus_scenario(name, nodes, self.profile, self.profile_dir)
            if "fanout" in self.selected and name in self.args.fanout_backbones.split(","):
                try:
                    result["fanout"] = fanout_scenario(name, nodes, self.profile)
                except Exception as err:
                    self.errors[f"fanout-{name}"] = f"{type(err).__name__}: {err}"
                    logger.error("fan-out on %s failed: %s\n%s", name, err, traceback.format_exc())
        finally:
            result_codes = stop_nodes(nodes)
        bad = {n: c for n, c in result_codes.items() if c != 0}
        if bad:
            raise RuntimeError(f"nodes did not stop cleanly: {bad} (logs in {self.workdir})")
        problems = log_problems(nodes)
        if problems:
            # E.g. a broker restart by someone else's test: the figures of this run are disturbed.
            result["node_log_problems"] = problems
            logger.warning("%s: the nodes logged %d warning(s)/error(s), first: %s", name, len(problems), problems[0])
        if self.profile_dir is not None:
            summarise_profiles(result.get("saturation", {}))
        return result

    def inmem(self) -> dict[str, Any]:
        return self._with_nodes("inmem", start_inmem(self.workdir))

    def rabbitmq(self) -> dict[str, Any]:
        result: dict[str, Any] = {}
        first: dict[str, Any] = {}
        for attempt in (1, 2):
            broker = Broker(self.broker_settings)
            try:
                nodes = start_rabbitmq_pair(self.workdir / f"rabbitmq-{attempt}", broker, self.queue,
                                            self.args.rabbitmq_extra)  # fmt: skip
                result = self._with_nodes("rabbitmq", nodes)
            finally:
                failed = broker.cleanup()
                if failed:
                    logger.warning("could not delete RabbitMQ objects: %s", ", ".join(failed))
            lost = [line for line in result.get("node_log_problems", []) if "connection" in line and "lost" in line]
            if attempt == 2 or not lost:
                break
            # Someone restarted the broker or closed our connections: the figures are not the bus's.
            logger.warning("rabbitmq: broker connections were lost during the run (%s); running it again", lost[0])
            wait_for_broker(self.broker_settings)
            first = result
            result = {}
        if attempt == 2:
            result["disturbed_first_attempt"] = first.get("node_log_problems", [])[:5]
        return result

    def rabbitmq_stream(self) -> dict[str, Any]:
        """Two nodes app to app with ``transport: stream``: what the inmem node's figure is compared with."""
        broker = Broker(self.broker_settings)
        try:
            extra = {**self.args.rabbitmq_extra, "transport": "stream"}
            nodes = start_rabbitmq_pair(self.workdir / "rabbitmq-stream", broker, self.queue, extra)
            return self._with_nodes("rabbitmq_stream", nodes)
        finally:
            failed = broker.cleanup()
            if failed:
                logger.warning("could not delete RabbitMQ objects: %s", ", ".join(failed))

    def fanout_nodes(self) -> dict[str, Any]:
        """Fan-out across FANOUT_NODES rabbitmq nodes, a receiving app on each."""
        broker = Broker(self.broker_settings)
        try:
            nodes = start_rabbitmq_pair(self.workdir / "fanout-nodes", broker, self.queue, self.args.rabbitmq_extra,
                                        count=FANOUT_NODES)  # fmt: skip
            try:
                result = nodes_fanout_scenario(nodes, self.profile)
            finally:
                codes = stop_nodes(nodes)
            problems = log_problems(nodes)
            if problems:
                result["node_log_problems"] = problems
            bad = {n: c for n, c in codes.items() if c != 0}
            if bad:
                raise RuntimeError(f"nodes did not stop cleanly: {bad} (logs in {self.workdir})")
            return result
        finally:
            failed = broker.cleanup()
            if failed:
                logger.warning("could not delete RabbitMQ objects: %s", ", ".join(failed))

    def streams(self) -> dict[str, Any]:
        """The intel log: rstream's own ceiling beside pika's, and snapshot replay from each backbone's log."""
        count = SNAPSHOT_COUNT[self.profile.name]
        broker = (
            None
            if broker_missing(self.broker_settings) or plugin_missing("backbones", "rabbitmq")
            else (self.broker_settings)
        )
        result: dict[str, Any] = {}
        if broker is not None:
            result["stream_ceiling"] = stream_ceiling(broker, self.profile.ceiling_count)
        result["snapshot"] = snapshot_scenario(self.workdir / "snapshot", broker, count)
        return result

    def ceiling(self, again: bool = False) -> dict[str, Any]:
        args = self.args
        matched = {
            "confirms": args.ceiling_confirms,
            "persistent": args.queue_durable if args.ceiling_persistent is None else args.ceiling_persistent,
            "confirm_window": args.ceiling_confirm_window,
            "prefetch": args.ceiling_prefetch,
            "ack_every": args.ceiling_ack_every,
            "latency_rate": TARGET_P99_RATE,
        }
        variants = {
            "matched": matched,
            "no_confirms": {**matched, "confirms": False, "latency_rate": None},
            # For reference: the broker work of two nodes (a queue each), still without the nodes.
            "two_queues": {**matched, "queues": 2, "latency_rate": None},
        }
        if again:
            variants = {"matched": {**matched, "latency_rate": None}}
        broker = Broker(self.broker_settings)
        try:
            return ceiling_scenario(broker, self.queue, self.profile, variants)
        finally:
            failed = broker.cleanup()
            if failed:
                logger.warning("could not delete RabbitMQ objects: %s", ", ".join(failed))


def _fanout_figures(row: dict[str, Any]) -> str:
    sat, lat = row["saturation"], row["latency"]
    return (
        f"{sat['msgs_per_s']} msg/s = {sat['deliveries_per_s']} deliveries/s, lost {sat['lost']}; "
        f"at {lat['offered_rate']}/s p99 {lat['p99_ms']} ms"
    )


def summary(result: dict[str, Any]) -> str:
    lines = [f"Threat Bus benchmark ({result['meta']['mode']}), {result['meta']['started']}"]
    scenarios = result["scenarios"]
    for name in ("inmem", "rabbitmq", "rabbitmq_stream"):
        data = scenarios.get(name)
        if not data:
            continue
        sat = data["saturation"]
        lines.append(f"  {name:<9} saturation {sat['msgs_per_s']} msg/s, lost {sat['lost']}")
        lines.append(f"  {'':<9} CPU µs per message: {sat.get('cpu_us_per_msg')}")
        for row in data["latency"]:
            lines.append(
                f"  {'':<9} {row['offered_rate']:>5}/s (sent {row['achieved_send_rate']}/s): "
                f"p50 {row['p50_ms']} ms, p99 {row['p99_ms']} ms, lost {row['lost']}"
            )
    for variant, data in scenarios.get("ceiling", {}).items():  # matched, no_confirms, two_queues, matched_after
        if variant == "queue":
            continue
        lines.append(
            f"  ceiling {variant:<11} {data['saturation']['msgs_per_s']} msg/s, "
            f"CPU µs per message: {data['saturation'].get('cpu_us_per_msg')}"
        )
    stream_ceiling = scenarios.get("streams", {}).get("stream_ceiling")
    if stream_ceiling:
        lines.append(
            f"  ceiling rstream     {stream_ceiling['published_msgs_per_s']} msg/s published (confirmed batches of "
            f"{stream_ceiling['batch']}), {stream_ceiling['consumed_msgs_per_s']} msg/s consumed"
        )
    for backbone, replay in scenarios.get("streams", {}).get("snapshot", {}).items():
        if isinstance(replay, dict):
            lines.append(
                f"  snapshot {backbone:<8} {replay['indicators']} indicators in {replay['seconds']} s = "
                f"{replay['indicators_per_s']}/s (first after {replay['first_after_s']} s)"
            )
    for backbone, rows in scenarios.get("fanout", {}).items():
        for row in rows:
            lines.append(f"  fanout {backbone:<8} {row['subscribers']:>3} subs: {_fanout_figures(row)}")
    nodes = scenarios.get("fanout_nodes")
    if nodes:
        lines.append(f"  fanout {nodes['nodes']} rabbitmq nodes, an app on each: {_fanout_figures(nodes)}")
    for name, data in scenarios.get("policy", {}).get("filters", {}).items():
        lines.append(
            f"  policy  {name:<17} {data['us_per_evaluation_median']} µs CPU per evaluation "
            f"(best {data['us_per_evaluation_best']}, passing messages {data['us_per_passing_evaluation_median']}), "
            f"holds back {data['held_back_of_mix']}"
        )
    for backbone, nodes in scenarios.get("memory", {}).items():
        for node, data in nodes.items():
            lines.append(
                f"  memory {backbone:<8} {node}: {data.get('rss_start_kb')} -> {data.get('rss_end_kb')} KiB over "
                f"{data.get('messages')} msgs (flat: {data.get('flat')})"
            )
            log = data.get("intel_log")
            if log:
                held = log.get("at_end") or {}
                state = (
                    f"full before the run (filled with {log['fill_messages']} msgs in {log['fill_seconds']} s, "
                    f"RSS {log['rss_before_fill_kb']} -> {log['rss_after_fill_kb']} KiB)"
                    if log.get("filled")
                    else "NOT full before the run: RSS grows with it, flat says nothing about leaks"
                )
                lines.append(
                    f"  {'':<16}intel log {state}; at the end {held.get('entries')} entries, "
                    f"{held.get('bytes', 0) / 2**20:.1f} MiB of JSON"
                )
    expiry = scenarios.get("expiry")
    if expiry:
        sched, late = expiry["schedule"], expiry["lateness"]
        lines.append(
            f"  expiry   {sched['indicators']} indicators over {sched['valid_until_spread_s']:.0f}s: "
            f"{sched['memory_bytes_per_scheduled_indicator']} B each ({sched['of_which_indicator_json_bytes']} B JSON), "
            f"+{sched['schedule_overhead_us_per_indicator']} µs routing each, {sched['removals_per_s']} removals/s"
        )
        lines.append(
            f"  {'':<9}{late['indicators']} expiring over {late['valid_until_spread_s']:.0f}s: late p50 "
            f"{late['late_p50_ms']} ms, p99 {late['late_p99_ms']} ms, max {late['late_max_ms']} ms, "
            f"received {late['removals_received']}, early {late['early']}"
        )
    for kind, row in scenarios.get("validation", {}).items():
        if isinstance(row, dict):
            lines.append(
                f"  validation {kind:<24} µs per message: ours {row['ours_us']}, foreign (validated) "
                f"{row['foreign_validated_us']} (+{row['validation_us']})"
            )
    bulk = result.get("bulk", {})
    for target in ("suricata_datasets", "suricata_rules", "zeek", "snapshot"):
        if target in bulk:
            data = bulk[target]
            lines.append(
                f"  bulk   {target:<17} {bulk['indicators']} indicators held after {data['seconds_until_held']} s; "
                f"peak RSS MiB {data['peak_rss_mib']}; CPU µs per indicator {data['cpu_us_per_indicator']}"
            )
    for row in result["targets"]:
        verdict = {True: "MET", False: "MISSED", None: "not measured"}[row["met"]]
        lines.append(f"  target {row['name']}: {row['measured']} ({row['target']}) {verdict}")
    for name in ("inmem", "rabbitmq"):
        problems = scenarios.get(name, {}).get("node_log_problems")
        if problems:
            lines.append(
                f"  WARNING {name}: nodes logged {len(problems)} warning(s)/error(s), figures disturbed? {problems[0]}"
            )
    for name, reason in result["skipped"].items():
        lines.append(f"  SKIPPED {name}: {reason}")
    for name, error in result["errors"].items():
        lines.append(f"  FAILED {name}: {error}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    logging.getLogger("pika").setLevel(logging.WARNING)
    profile = PROFILES["quick" if args.quick else "full"]
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    out = Path(args.out)
    workdir = out / f"bench-{stamp}"
    workdir.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {"meta": meta(args, profile)}
    busy_before = machine_busy()
    runner = Runner(args, profile, workdir)
    runner.run()
    busy_after = machine_busy()
    result["meta"].update(
        {
            "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "loadavg_after": loadavg(),
            "machine_cpu_busy_fraction": round(
                (busy_after[0] - busy_before[0]) / max(busy_after[1] - busy_before[1], 1), 3
            ),
            "node_logs": str(workdir),
        }
    )
    result["scenarios"] = runner.scenarios
    if runner.bulk is not None:
        result["bulk"] = runner.bulk
    result["skipped"] = runner.skipped
    result["errors"] = runner.errors
    result["targets"] = targets(runner.scenarios)
    json_path = workdir / "results.json"
    json_path.write_bytes(orjson.dumps(result, option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY))
    png_path = workdir / "results.png"
    try:
        from benchmark.chart import draw

        draw(result, png_path)
    except Exception as err:
        runner.errors["chart"] = f"{type(err).__name__}: {err}"
        logger.error("chart failed: %s\n%s", err, traceback.format_exc())
    for latest, source in ((out / "latest.json", json_path), (out / "latest.png", png_path)):
        if source.exists():
            latest.write_bytes(source.read_bytes())
    print(summary(result))
    print(f"results: {json_path}\nchart:   {png_path}")
    return 1 if runner.errors else 0


if __name__ == "__main__":
    sys.exit(main())
