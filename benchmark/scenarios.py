"""The measured scenarios: each starts what it needs, measures, and cleans up after itself."""

from __future__ import annotations

import logging
import shutil
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from benchmark import pika_clients, zmq_clients
from benchmark.nodes import (
    Broker,
    BusNode,
    CpuMeter,
    ResourceSampler,
    Sample,
    broker_missing,
    broker_pid,
    rabbitmq_backbone,
    read_rss_kb,
    start_node,
    stop_nodes,
    unique_name,
)
from benchmark.procs import Child, ChildError, shared_counter, stop_all
from benchmark.stats import latency_summary, merge, rate

logger = logging.getLogger(__name__)

# Deliveries stop counting as "still coming" after this long without progress.
IDLE_TIMEOUT = 5.0
STARTUP_TIMEOUT = 60.0


@dataclass(frozen=True)
class Profile:
    """How much to measure: ``quick`` (seconds, for the smoke test) or ``full``."""

    name: str
    saturation_count: int
    rates: tuple[int, ...]
    latency_seconds: float
    ceiling_count: int
    fanout_subscribers: tuple[int, ...]
    fanout_count: int
    fanout_rate: int
    fanout_seconds: float
    window: int = 500
    validation_count: int = 20_000
    # Fill the nodes' in-memory intel logs to their cap before the memory figure (see fill_intel_logs).
    fill_intel_log: bool = False


PROFILES = {
    "quick": Profile("quick", 3_000, (200, 1000, 5000), 1.0, 3_000, (1, 10), 1_000, 200, 1.0, validation_count=2_000),
    "full": Profile(
        "full", 200_000, (200, 1000, 5000), 8.0, 100_000, (1, 10, 50, 100), 10_000, 200, 5.0, fill_intel_log=True
    ),
}


def wait_for_count(read: Any, target: int, limit: float) -> int:
    """Poll ``read()`` until it reaches ``target``, stalls for IDLE_TIMEOUT, or ``limit`` passes."""
    start = last_change = time.monotonic()
    last = read()
    while last < target:
        time.sleep(0.02)
        now = read()
        moment = time.monotonic()
        if now != last:
            last, last_change = now, moment
        elif moment - last_change > IDLE_TIMEOUT or moment - start > limit:
            break
    return last


def run_figures(
    published: dict[str, Any], merged: dict[str, Any], copies: int, offered: float | None
) -> dict[str, Any]:
    """The figures of one run, from the publisher's report and the receivers' records."""
    sent = published["sent"]
    delivered = merged["received"]
    end_ns = merged["last_recv_ns"]
    figures = {
        "offered_rate": offered,
        "sent": sent,
        "achieved_send_rate": rate(sent, published["start_ns"], published["end_ns"]),
        "subscriptions": copies,
        "expected_deliveries": sent * copies,
        "delivered": delivered,
        "lost": sent * copies - delivered,
        "duplicates": merged["duplicates"],
        # End to end: from the first send to the last delivery.
        "msgs_per_s": rate(round(delivered / copies), published["start_ns"], end_ns),
        "deliveries_per_s": rate(delivered, published["start_ns"], end_ns),
        "duration_s": round((end_ns - published["start_ns"]) / 1e9, 3) if delivered else None,
        # At a fixed rate: the bus fell behind the publisher (delivering under 98 % of the send rate,
        # or a backlog of over 0.25 s at the end), so latency is queueing, not transit.
        "saturated": bool(offered)
        and (
            delivered < sent * copies
            or end_ns - published["end_ns"] > 0.25e9
            or (rate(delivered, published["start_ns"], end_ns) or 0)
            < 0.98 * copies * (rate(sent, published["start_ns"], published["end_ns"]) or 0)
        ),
        **latency_summary(merged["latencies_ns"]),
    }
    for key in ("acked", "nacked", "window_waits"):
        if key in published:
            figures[key] = published[key]
    return figures


def with_cpu(figures: dict[str, Any], cpu: dict[str, float]) -> dict[str, Any]:
    """Add CPU seconds per process and microseconds per message (a message delivered to N
    subscriptions or queues counts once: fan-out costs show as more µs per message)."""
    messages = max(figures["delivered"] / max(figures["subscriptions"], 1), 1)
    figures["cpu_s"] = cpu
    figures["cpu_us_per_msg"] = {name: round(seconds * 1e6 / messages, 1) for name, seconds in cpu.items()}
    return figures


class Profiler:
    """py-spy attached to the nodes during a run (``--profile``), raw collapsed stacks per node.

    Only samples of the thread holding the GIL are kept (``--gil``): at 250 Hz each
    sample stands for 4 ms of Python work, which ``benchmark.profile_summary``
    turns into microseconds per message.
    """

    RATE = 250

    def __init__(self, out: Path | None, nodes: list[BusNode], label: str) -> None:
        self.processes: list[subprocess.Popen[bytes]] = []
        self.files: list[str] = []
        if out is None:
            return
        out.mkdir(parents=True, exist_ok=True)
        py_spy = Path(sys.executable).with_name("py-spy")
        command = str(py_spy) if py_spy.exists() else shutil.which("py-spy")
        if command is None:
            raise RuntimeError("--profile needs py-spy: pip install -r benchmark/requirements.txt")
        for node in nodes:
            path = out / f"profile-{label}-{node.name}.txt"
            self.files.append(str(path))
            self.processes.append(
                subprocess.Popen(
                    [command, "record", "--pid", str(node.pid), "--rate", str(self.RATE), "--format", "raw",
                     "--threads", "--gil", "--nonblocking", "--output", str(path)],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )  # fmt: skip
        time.sleep(1.0)  # py-spy needs a moment to attach; no synchronisation depends on it

    def finish(self) -> list[str]:
        for process in self.processes:
            process.send_signal(2)  # SIGINT: py-spy writes its output and exits
        for process in self.processes:
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        return self.files


class ZmqBench:
    """One publishing app and receiving apps (``subscriptions`` spread over ``processes``)."""

    def __init__(
        self,
        publish_node: BusNode,
        receive_node: BusNode,
        subscriptions: int,
        processes: int,
        watch: dict[str, int] | None = None,
        receive_nodes: list[BusNode] | None = None,
    ) -> None:
        """``receive_nodes``: one receiving process on each of these nodes instead of all on ``receive_node``."""
        if receive_nodes:
            processes = len(receive_nodes)
        processes = max(1, min(processes, subscriptions))
        self.watch = dict(watch or {})
        shares = [subscriptions // processes + (1 if i < subscriptions % processes else 0) for i in range(processes)]
        targets = receive_nodes or [receive_node] * processes
        self.subscriptions = subscriptions
        self.counters = [shared_counter() for _ in shares]
        self.children: list[Child] = []
        try:
            self.receivers = [
                self._child(
                    f"zmq-receiver-{i}",
                    zmq_clients.receiver_main,
                    node.manage_endpoint,
                    node.host,
                    share,
                    counter,
                )
                for i, (share, counter, node) in enumerate(zip(shares, self.counters, targets, strict=True))
            ]
            self.publisher = self._child(
                "zmq-publisher", zmq_clients.publisher_main, publish_node.sub_endpoint, self.counters
            )
            for receiver in self.receivers:
                receiver.expect("subscribed", STARTUP_TIMEOUT)
            self.publisher.expect("ready", STARTUP_TIMEOUT)
        except BaseException:
            self.close()
            raise
        self.watch["publishing app"] = self.publisher.process.pid
        for i, receiver in enumerate(self.receivers):
            self.watch[f"receiving app {i + 1}"] = receiver.process.pid

    def _child(self, name: str, target: Any, *args: Any) -> Child:
        child = Child(name, target, *args)
        self.children.append(child)
        return child

    def delivered(self) -> int:
        return sum(c.value for c in self.counters)

    def warmup(self, timeout: float = 30.0) -> None:
        """Send marked messages until every subscription got one (ZeroMQ connects lazily)."""
        self.publisher.send("warmup")
        for receiver in self.receivers:
            receiver.expect("warm", timeout)

    def run(self, count: int, rate_per_s: float | None, window: int) -> dict[str, Any]:
        run_id = uuid.uuid4().hex[:12]
        base = self.delivered()
        expected = count * self.subscriptions
        budget = 60 + (count / rate_per_s if rate_per_s else count / 500)
        meter = CpuMeter(self.watch)
        meter.start()
        published = self.publisher.request(
            "run",
            budget,
            args={"run": run_id, "count": count, "rate": rate_per_s, "window": window, "copies": self.subscriptions},
        )
        wait_for_count(lambda: self.delivered() - base, expected, budget)
        cpu = meter.stop()
        records = [r.request("collect", 60, run=run_id) for r in self.receivers]
        return with_cpu(run_figures(published, merge(records), self.subscriptions, rate_per_s), cpu)

    def close(self) -> None:
        stop_all(self.children)


MAX_MEMORY_POINTS = 200


def thin(points: list[Any], limit: int) -> list[Any]:
    if len(points) <= limit:
        return points
    step = len(points) / (limit - 1)
    return [points[int(i * step)] for i in range(limit - 1)] + [points[-1]]


def memory_summary(samples: list[Sample], node: str, start: int, count: int) -> dict[str, Any]:
    """RSS of ``node`` against messages passed during a run of ``count`` messages."""
    points = [(s.messages - start, s.rss_kb.get(node)) for s in samples if s.rss_kb.get(node) is not None]
    points = [(m, r) for m, r in points if m >= 0]
    if len(points) < 3:
        return {"samples": points, "error": "too few samples"}
    messages = np.array([m for m, _ in points], dtype=float)
    rss = np.array([r for _, r in points], dtype=float)
    second_half = messages >= count / 2
    slope = None
    if second_half.sum() >= 3 and np.ptp(messages[second_half]) > 0:
        slope = float(np.polyfit(messages[second_half], rss[second_half], 1)[0])

    def rss_near(wanted: float) -> int:
        return int(rss[int(np.argmin(np.abs(messages - wanted)))])

    at_half, at_end = rss_near(count / 2), int(rss[-1])
    return {
        "messages": int(messages.max()),
        "rss_start_kb": int(rss[0]),
        "rss_at_25pct_kb": rss_near(count / 4),
        "rss_at_50pct_kb": at_half,
        "rss_after_100k_kb": rss_near(100_000) if messages.max() >= 100_000 else None,
        "rss_end_kb": at_end,
        "rss_max_kb": int(rss.max()),
        "growth_second_half_kb": at_end - at_half,
        "slope_second_half_kb_per_10k_msgs": round(slope * 10_000, 1) if slope is not None else None,
        # Flat: the second half of the messages added less than 4 MiB. Bounded caches (the rabbitmq
        # dedup window, the STIX pattern caches) fill during the first 100k messages by design; the
        # in-memory intel log (up to ~85 MiB) is filled before the run (fill_intel_logs).
        "flat": (at_end - at_half) < 4096,
        # At most MAX_MEMORY_POINTS samples (evenly thinned, the last kept) keep the JSON small.
        "samples": [[int(m), int(r)] for m, r in thin(points, MAX_MEMORY_POINTS)],
    }


# Messages per publishing run while an intel log fills, and at most in all (a log whose cap
# is larger than that is reported as not full: its memory figure is then not at steady state).
FILL_CHUNK = 50_000
FILL_LIMIT = 2_000_000


def fill_intel_logs(bench: ZmqBench, nodes: list[BusNode], profile: Profile) -> dict[str, dict[str, Any]]:
    """Publish until the in-memory intel log of each node that keeps one is full (it starts to evict).

    A log grows until its cap (64 MiB of JSON by default, some 85 MiB of RSS),
    so RSS measured while it fills says nothing about leaks; once it is full,
    every message appended lets an older one go and RSS must stay flat.
    Returns per node what filling cost; in quick mode nothing is filled.
    """
    logs = {n.name: n for n in nodes if n.intel_log() is not None}
    figures: dict[str, dict[str, Any]] = {name: {"rss_before_fill_kb": read_rss_kb(n.pid)} for name, n in logs.items()}
    sent, started = 0, time.monotonic()
    if profile.fill_intel_log:
        while sent < FILL_LIMIT and any((n.intel_log() or {}).get("evicted", 0) == 0 for n in logs.values()):
            bench.run(FILL_CHUNK, None, profile.window)
            sent += FILL_CHUNK
    for name, node in logs.items():
        log = node.intel_log() or {}
        figures[name].update(
            filled=log.get("evicted", 0) > 0,
            fill_messages=sent,
            fill_seconds=round(time.monotonic() - started, 1),
            rss_after_fill_kb=read_rss_kb(node.pid),
            at_start=log,
        )
    return figures


def bus_scenario(
    label: str,
    nodes: list[BusNode],
    profile: Profile,
    profile_dir: Path | None,
) -> dict[str, Any]:
    """Saturation (with RSS sampled: the memory figures) and latency at fixed rates, app to app."""
    publish_node, receive_node = nodes[0], nodes[-1]
    bench = ZmqBench(publish_node, receive_node, subscriptions=1, processes=1, watch=watched(nodes))
    result: dict[str, Any] = {"nodes": [n.name for n in nodes]}
    sampler = ResourceSampler({n.name: n.pid for n in nodes}, bench.delivered)
    try:
        bench.warmup()
        logs = fill_intel_logs(bench, nodes, profile)
        start = bench.delivered()
        sampler.start()
        profiler = Profiler(profile_dir, nodes, label)
        try:
            saturation = bench.run(profile.saturation_count, None, profile.window)
        finally:
            profiles = profiler.finish()
        sampler.sample()
        sampler.close()
        if profiles:
            saturation["profiles"] = profiles
        result["saturation"] = saturation
        result["memory"] = {
            n.name: memory_summary(sampler.samples, n.name, start, profile.saturation_count) for n in nodes
        }
        for name, log in logs.items():
            node = next(n for n in nodes if n.name == name)
            result["memory"][name]["intel_log"] = {**log, "at_end": node.intel_log()}
        result["latency"] = [
            bench.run(int(r * profile.latency_seconds), r, max(profile.window, 2 * r)) for r in profile.rates
        ]
    finally:
        if sampler.is_alive():
            sampler.close()
        bench.close()
    return result


def watched(nodes: list[BusNode]) -> dict[str, int]:
    """The processes whose CPU time each run records: the nodes and, if found, the broker."""
    pids = {n.name: n.pid for n in nodes}
    broker = broker_pid()
    if broker is not None and any("rabbitmq" in n.name for n in nodes):
        pids["rabbitmq broker"] = broker
    return pids


def start_inmem(workdir: Path) -> list[BusNode]:
    # /metrics: the benchmark reads how full the node's intel log is (fill_intel_logs).
    return [start_node(workdir, "bench-inmem", {"inmem": {}}, http=True)]


def start_rabbitmq_pair(
    workdir: Path, broker: Broker, queue: dict[str, Any], extra: dict[str, Any] | None = None, count: int = 2
) -> list[BusNode]:
    """Two nodes (or ``count``) on one fresh exchange, each with its own queue."""
    exchange = unique_name("exchange")
    # The backbone holds a fresh node's queue until an app subscribes (wait_for_subscribers, 15 s);
    # node 1 has no subscriber, so without this it would start consuming in the middle of a run.
    extra = {"wait_for_subscribers": 0, **(extra or {})}
    nodes = []
    suffixes = [f"bench-{uuid.uuid4().hex[:12]}-{i}" for i in range(1, count + 1)]
    # The backbone publishes through a durable bridge exchange `<exchange>.durable` bound to the main one.
    # ... and keep every message in the intel log, the stream `<exchange>.log`; each node has a dead-letter queue.
    broker.forget_later(
        queues=[f"threatbus.{s}{end}" for s in suffixes for end in ("", ".dlq")] + [f"{exchange}.log"],
        exchanges=[exchange, f"{exchange}.durable"],
    )
    try:
        for i, suffix in enumerate(suffixes, 1):
            nodes.append(
                start_node(
                    workdir, f"bench-rabbitmq-{i}", rabbitmq_backbone(broker.broker, exchange, suffix, queue, extra)
                )
            )
    except BaseException:
        stop_nodes(nodes)
        raise
    return nodes


def ceiling_scenario(
    broker: Broker, queue: dict[str, Any], profile: Profile, variants: dict[str, dict[str, Any]]
) -> dict[str, Any]:
    """Raw pika: one publishing process, one consuming process per queue (``queues``, default 1).

    A variant whose connection the broker closed (another test restarting it) is tried once more.
    """
    result: dict[str, Any] = {"queue": queue}
    for name, variant in variants.items():
        try:
            result[name] = _ceiling_variant(broker, queue, profile, variant)
        except ChildError as err:
            logger.warning("ceiling %s failed (%s); waiting for the broker and trying once more", name, err)
            wait_for_broker(broker.broker)
            broker.cleanup()
            result[name] = _ceiling_variant(broker, queue, profile, variant)
            result[name]["retried_after"] = str(err)
    return result


def wait_for_broker(settings: dict[str, Any], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while broker_missing(settings) and time.monotonic() < deadline:
        time.sleep(1)
    time.sleep(2)  # a restarted broker accepts connections a moment before it serves them


def _ceiling_variant(
    broker: Broker, queue: dict[str, Any], profile: Profile, variant: dict[str, Any]
) -> dict[str, Any]:
    exchange = unique_name("ceiling-exchange")
    queues = [unique_name("ceiling-queue") for _ in range(variant.get("queues", 1))]
    for queue_name in queues:
        broker.declare_fanout_queue(exchange, queue_name, queue)
    counters = [shared_counter() for _ in queues]
    children: list[Child] = []
    try:
        consumers = []
        for i, (queue_name, counter) in enumerate(zip(queues, counters, strict=True)):
            consumer = Child(
                f"pika-consumer-{i + 1}",
                pika_clients.consumer_main,
                broker.broker,
                queue_name,
                variant["prefetch"],
                variant["ack_every"],
                counter,
            )
            children.append(consumer)
            consumers.append(consumer)
        for consumer in consumers:
            consumer.expect("subscribed", STARTUP_TIMEOUT)
        publisher = Child("pika-publisher", pika_clients.publisher_main, broker.broker, exchange)
        children.append(publisher)
        publisher.expect("ready", STARTUP_TIMEOUT)
        publisher.send("warmup")
        for consumer in consumers:
            consumer.expect("warm", 30)
        watch = {"pika publisher": publisher.process.pid}
        watch.update({f"pika consumer {i + 1}": c.process.pid for i, c in enumerate(consumers)})
        broker_process = broker_pid()
        if broker_process is not None:
            watch["rabbitmq broker"] = broker_process
        runs = {"saturation": (profile.ceiling_count, None)}
        if variant.get("latency_rate"):
            runs["latency"] = (int(variant["latency_rate"] * profile.latency_seconds), variant["latency_rate"])
        figures: dict[str, Any] = {"settings": variant}
        for run_name, (count, rate_per_s) in runs.items():
            run_id = uuid.uuid4().hex[:12]
            base = sum(c.value for c in counters)
            budget = 60 + count / 500
            meter = CpuMeter(watch)
            meter.start()
            published = publisher.request(
                "run",
                budget,
                args={
                    "run": run_id,
                    "count": count,
                    "rate": rate_per_s,
                    "confirms": variant["confirms"],
                    "window": variant["confirm_window"],
                    "persistent": variant["persistent"],
                },
            )
            wait_for_count(lambda b=base, cs=counters: sum(c.value for c in cs) - b, count * len(queues), budget)
            cpu = meter.stop()
            records = [consumer.request("collect", 60, run=run_id) for consumer in consumers]
            figures[run_name] = with_cpu(run_figures(published, merge(records), len(queues), rate_per_s), cpu)
        return figures
    finally:
        stop_all(children)


def fanout_scenario(label: str, nodes: list[BusNode], profile: Profile) -> list[dict[str, Any]]:
    """One publisher, N subscriptions on the last node: saturation and latency at a fixed rate."""
    rows = []
    for subscriptions in profile.fanout_subscribers:
        bench = ZmqBench(
            nodes[0], nodes[-1], subscriptions, processes=1 if subscriptions == 1 else 2, watch=watched(nodes)
        )
        saturation, latency = _fanout_runs(bench, profile)
        rows.append({"subscribers": subscriptions, "saturation": saturation, "latency": latency})
        logger.info("%s fan-out %d: %s msg/s", label, subscriptions, saturation["msgs_per_s"])
    return rows


def _fanout_runs(bench: ZmqBench, profile: Profile) -> tuple[dict[str, Any], dict[str, Any]]:
    """Saturation (as fast as it goes) and latency (at ``fanout_rate``) of a fan-out; closes ``bench``."""
    try:
        bench.warmup(timeout=60)
        saturation = bench.run(profile.fanout_count, None, profile.window)
        latency = bench.run(int(profile.fanout_rate * profile.fanout_seconds), profile.fanout_rate, profile.window)
    finally:
        bench.close()
    return saturation, latency


def nodes_fanout_scenario(nodes: list[BusNode], profile: Profile) -> dict[str, Any]:
    """One publishing app on the first node, one receiving app on every node (the first included).

    Every message crosses the broker once per node queue: deliveries/s and
    latency show what a backbone of ``len(nodes)`` nodes costs.
    """
    bench = ZmqBench(nodes[0], nodes[-1], len(nodes), processes=len(nodes), watch=watched(nodes), receive_nodes=nodes)
    saturation, latency = _fanout_runs(bench, profile)
    logger.info("fan-out over %d nodes: %s msg/s", len(nodes), saturation["msgs_per_s"])
    return {"nodes": len(nodes), "subscribers": len(nodes), "saturation": saturation, "latency": latency}
