"""Threat Bus nodes under test, the RabbitMQ objects of a run, and resource sampling."""

from __future__ import annotations

import os
import socket
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pika

from benchmark.pika_clients import connection_parameters
from threatbus.plugins import installed
from threatbus.testing import ThreatBusProcess, free_port

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def plugin_missing(kind: str, name: str) -> str | None:
    """Why a plugin cannot be benchmarked (not installed), or None."""
    if name in installed(kind):
        return None
    return f"plugin '{name}' is not installed in this environment (pip install -e plugins/{kind}/threatbus_{name})"


def broker_missing(broker: dict[str, Any]) -> str | None:
    try:
        with socket.create_connection((broker["host"], broker["port"]), timeout=2):
            return None
    except OSError:
        pass
    return f"RabbitMQ not reachable at {broker['host']}:{broker['port']}"


@dataclass
class BusNode:
    """A real ``threatbus`` process with the ZeroMQ app on free ports."""

    name: str
    process: ThreatBusProcess
    host: str
    manage: int
    pub: int
    sub: int
    http: int | None = None  # the node's /metrics port, if it serves one

    @property
    def pid(self) -> int:
        assert self.process.process is not None
        return self.process.process.pid

    @property
    def manage_endpoint(self) -> str:
        return f"tcp://{self.host}:{self.manage}"

    @property
    def sub_endpoint(self) -> str:
        return f"tcp://{self.host}:{self.sub}"

    def metrics(self) -> dict[str, float]:
        """The node's metrics by series (``name{labels}`` as the text format writes it); empty without ``http``."""
        if self.http is None:
            return {}
        with urllib.request.urlopen(f"http://{self.host}:{self.http}/metrics", timeout=10) as response:
            text = response.read().decode()
        series = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                series[name] = float(value)
        return series

    def intel_log(self) -> dict[str, int] | None:
        """What the node's in-memory intel log holds (entries, JSON bytes) and let go; None if it has none."""
        series = self.metrics()

        def value(name: str, label: str = "") -> int | None:
            found = [v for s, v in series.items() if s.partition("{")[0] == name and label in s]
            return int(sum(found)) if found else None

        held = value("threatbus_inmem_log_bytes")
        if held is None:
            return None
        return {
            "entries": value("threatbus_queue_depth", 'queue="inmem-log"') or 0,
            "bytes": held,
            "evicted": value("threatbus_inmem_log_evicted_total") or 0,
        }


def start_node(
    workdir: Path, name: str, backbone: dict[str, Any], host: str = "127.0.0.1", http: bool = False
) -> BusNode:
    """Start one node with the given ``plugins.backbones`` section and the zmq app (and /metrics with ``http``)."""
    Path(workdir).mkdir(parents=True, exist_ok=True)
    manage, pub, sub = free_port(), free_port(), free_port()
    config: dict[str, Any] = {
        "logging": {"console": True, "console_verbosity": "INFO", "file": False},
        "node": {"name": name},
        "plugins": {
            "backbones": backbone,
            "apps": {"zmq": {"host": host, "manage": manage, "pub": pub, "sub": sub}},
        },
    }
    http_port = free_port() if http else None
    if http_port is not None:
        config["http"] = {"host": host, "port": http_port}
    process = ThreatBusProcess(config, workdir, name=name)
    node = BusNode(name, process, host, manage, pub, sub, http_port)
    try:
        process.start(timeout=60)
    except BaseException:
        process.kill()
        raise
    return node


def stop_nodes(nodes: list[BusNode]) -> dict[str, int | str]:
    """Stop nodes with SIGTERM; exit code per node (or the error)."""
    codes: dict[str, int | str] = {}
    for node in nodes:
        try:
            codes[node.name] = node.process.stop(timeout=30)
        except AssertionError as err:
            codes[node.name] = str(err).splitlines()[0]
    return codes


def rabbitmq_backbone(
    broker: dict[str, Any], exchange: str, suffix: str, queue: dict[str, Any], extra: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The ``plugins.backbones`` section of a rabbitmq node (WIRE.md keys, plus ``extra`` keys)."""
    return {
        "rabbitmq": {
            **broker,
            "exchange_name": exchange,
            "queue": {"name_suffix": suffix, "name_join_symbol": ".", **queue},
            **(extra or {}),
        }
    }


def unique_name(what: str) -> str:
    return f"threatbus-bench-{what}-{uuid.uuid4().hex[:12]}"


class Broker:
    """Declares and deletes the RabbitMQ objects a run uses (never others)."""

    def __init__(self, broker: dict[str, Any]) -> None:
        self.broker = broker
        self.queues: list[str] = []
        self.exchanges: list[str] = []

    def _channel(self) -> tuple[Any, Any]:
        connection = pika.BlockingConnection(connection_parameters(self.broker))
        return connection, connection.channel()

    def declare_fanout_queue(self, exchange: str, queue: str, settings: dict[str, Any]) -> None:
        """A fanout exchange (pika defaults, as the original) and a queue bound to it, like a bus node's."""
        self.exchanges.append(exchange)
        self.queues.append(queue)
        arguments: dict[str, Any] = {"x-queue-mode": "lazy" if settings["lazy"] else "default"}
        if settings["max_items"]:
            arguments["x-max-length"] = settings["max_items"]
        connection, channel = self._channel()
        try:
            channel.exchange_declare(exchange, exchange_type="fanout")
            channel.queue_declare(
                queue,
                durable=settings["durable"],
                auto_delete=settings["auto_delete"],
                exclusive=False,
                arguments=arguments,
            )
            channel.queue_bind(queue, exchange, routing_key="")
        finally:
            connection.close()

    def forget_later(self, queues: list[str] = (), exchanges: list[str] = ()) -> None:  # type: ignore[assignment]
        """Objects that someone else (a bus node) declares, to delete at cleanup."""
        self.queues.extend(queues)
        self.exchanges.extend(exchanges)

    def cleanup(self, attempts: int = 10) -> list[str]:
        """Delete every queue and exchange of this run; names of those that could not be deleted.

        Retries the connection for a while: the broker may be restarting (another test's outage).
        """
        failed = []
        for attempt in range(attempts):
            try:
                connection, channel = self._channel()
                break
            except Exception:
                if attempt == attempts - 1:
                    return self.queues + self.exchanges
                time.sleep(2)
        try:
            for queue in self.queues:
                try:
                    channel.queue_delete(queue)
                except Exception:
                    failed.append(queue)
                    connection, channel = self._channel()
            for exchange in self.exchanges:
                try:
                    channel.exchange_delete(exchange)
                except Exception:
                    failed.append(exchange)
                    connection, channel = self._channel()
        finally:
            connection.close()
        self.queues, self.exchanges = [], []
        return failed


def read_rss_kb(pid: int) -> int | None:
    """Resident set size of ``pid`` from /proc/<pid>/status (VmRSS), in KiB."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None


def read_cpu_seconds(pid: int) -> float | None:
    """User plus system CPU time of ``pid`` (all its threads) so far."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS
    except (OSError, ValueError, IndexError):
        return None


def broker_pid() -> int | None:
    """The pid of a RabbitMQ server on this host (its Erlang VM), to count its CPU; None if not found."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if cmdline and cmdline[0].endswith(b"beam.smp") and b"rabbit" in cmdline and b"boot" in cmdline:
            return int(entry.name)
    return None


class CpuMeter:
    """CPU seconds that each of some processes used between ``start()`` and ``stop()``."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids
        self._before: dict[str, float | None] = {}

    def start(self) -> None:
        self._before = {name: read_cpu_seconds(pid) for name, pid in self.pids.items()}

    def stop(self) -> dict[str, float]:
        used = {}
        for name, pid in self.pids.items():
            before, after = self._before.get(name), read_cpu_seconds(pid)
            if before is not None and after is not None:
                used[name] = round(after - before, 3)
        return used


def machine_busy() -> tuple[int, int]:
    """(busy, total) jiffies of all CPUs, from /proc/stat."""
    with open("/proc/stat") as stat:
        values = [int(v) for v in stat.readline().split()[1:]]
    idle = values[3] + values[4]
    return sum(values) - idle, sum(values)


def loadavg() -> list[float]:
    with open("/proc/loadavg") as f:
        return [float(v) for v in f.read().split()[:3]]


@dataclass
class Sample:
    t: float
    messages: int
    rss_kb: dict[str, int | None] = field(default_factory=dict)


class ResourceSampler(threading.Thread):
    """Samples RSS of the nodes against the number of messages delivered, every ``interval``."""

    def __init__(self, pids: dict[str, int], delivered: Callable[[], int], interval: float = 0.02) -> None:
        super().__init__(name="rss-sampler")
        self.pids = pids
        self.delivered = delivered
        self.interval = interval
        self.samples: list[Sample] = []
        self._stop_event = threading.Event()
        self._t0 = time.monotonic()

    def run(self) -> None:
        while not self._stop_event.is_set():
            self.sample()
            self._stop_event.wait(self.interval)

    def sample(self) -> Sample:
        sample = Sample(
            round(time.monotonic() - self._t0, 3),
            self.delivered(),
            {name: read_rss_kb(pid) for name, pid in self.pids.items()},
        )
        self.samples.append(sample)
        return sample

    def close(self) -> None:
        self._stop_event.set()
        self.join(5)
