"""Intel at sensor scale: how long until a sensor holds a large intel set, and what it costs.

Distinct indicators (IPv4 addresses, domains, URLs, MD5 and SHA-256 file
hashes) are written as JSON lines in chunks and published with
``threatbus-zmq publish`` (one process per chunk, one after the other) into
one node (inmem backbone, the zmq app and one sensor app). The sensor app
talks to its stand-in, a process of its own (``benchmark.standins``):

- ``suricata_datasets``: the suricata app in datasets mode;
- ``suricata_rules``: the suricata app in rules mode;
- ``zeek``: the zeek app;
- ``snapshot``: a new node starts with the suricata app holding the whole
  set (its rules file from ``suricata_datasets``) and the zeek app with a
  snapshot period; a fresh Zeek stand-in comes up, the zeek app connects and
  asks for the snapshot, the suricata app answers it.

Per target: seconds from the first publish (for ``snapshot``: from the Zeek
stand-in's handshake) until the stand-in holds every indicator; the peak RSS
(``VmHWM``) of node and stand-in; CPU µs per indicator of node, stand-in and
publisher processes over the same span (for ``snapshot``: from before the
Zeek stand-in starts, so that the CPU of a snapshot over before the handshake
is seen counts too).
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import orjson

from benchmark import standins
from benchmark.nodes import CpuMeter
from benchmark.procs import Child
from threatbus.testing import ThreatBusProcess, free_port

logger = logging.getLogger("benchmark.bulk")

# Of every 20 indicators: 8 IPv4 addresses, 6 domains, 4 URLs, 1 MD5, 1 SHA-256 (feeds are mostly
# addresses and domains; URLs and file hashes make up the rest).
MIX = ("ip",) * 8 + ("domain",) * 6 + ("url",) * 4 + ("md5", "sha256")
CHUNK = 100_000  # indicators per publish process (it reads and validates its whole file first)
TARGETS = ("suricata_datasets", "suricata_rules", "zeek", "snapshot")
POLL = 0.25


@dataclass(frozen=True)
class BulkProfile:
    indicators: int
    timeout: float  # seconds a target may take to hold everything


BULK_PROFILES = {"quick": BulkProfile(20_000, 300.0), "full": BulkProfile(1_000_000, 900.0)}


def pattern(kind: str, i: int) -> str:
    """The STIX pattern of the ``i``-th indicator of ``kind``; distinct for distinct ``i``."""
    if kind == "ip":
        value = 0x0B000000 + i  # 11.0.0.0 onwards: a million fit in 11.0.0.0/8
        return f"[ipv4-addr:value = '{value >> 24}.{(value >> 16) & 255}.{(value >> 8) & 255}.{value & 255}']"
    if kind == "domain":
        return f"[domain-name:value = 'h{i:x}.bulk{i % 97}.example.com']"
    if kind == "url":
        return f"[url:value = 'http://u{i:x}.bulk{i % 89}.example.net/dl/{i}.bin']"
    digest = hashlib.md5 if kind == "md5" else hashlib.sha256
    algorithm = "MD5" if kind == "md5" else "SHA-256"
    return f"[file:hashes.'{algorithm}' = '{digest(str(i).encode()).hexdigest()}']"


def write_indicators(directory: Path, count: int, chunk: int = CHUNK) -> list[Path]:
    """``count`` distinct indicators as JSON lines, in files of ``chunk`` indicators."""
    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.000Z")
    files = []
    for start in range(0, count, chunk):
        path = directory / f"indicators-{start // chunk:03d}.jsonl"
        lines = []
        for i in range(start, min(start + chunk, count)):
            indicator = {
                "type": "indicator",
                "spec_version": "2.1",
                "id": f"indicator--{uuid.uuid4()}",
                "created": now,
                "modified": now,
                "valid_from": now,
                "pattern_type": "stix",
                "pattern": pattern(MIX[i % len(MIX)], i),
            }
            lines.append(orjson.dumps(indicator))
        path.write_bytes(b"\n".join(lines) + b"\n")
        files.append(path)
    return files


def mix_counts(count: int) -> dict[str, int]:
    counts = dict.fromkeys(MIX, 0)
    for i in range(count):
        counts[MIX[i % len(MIX)]] += 1
    return counts


def peak_rss_mib(pid: int) -> float | None:
    """The peak resident set size of ``pid`` so far (``VmHWM``), in MiB."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return round(int(line.split()[1]) / 1024, 1)
    except (OSError, ValueError):
        return None
    return None


class Publisher:
    """Runs ``threatbus-zmq publish`` on each file in turn, in a thread of the orchestrator."""

    def __init__(self, files: list[Path], sub_port: int) -> None:
        self.files = files
        self.sub_port = sub_port
        self.cpu_s = 0.0
        self.finished: float | None = None
        self.failures: list[str] = []

    def run(self) -> None:
        command = Path(sys.executable).with_name("threatbus-zmq")
        for path in self.files:
            process = subprocess.Popen(
                [str(command), "publish", "--sub", str(self.sub_port), "--no-progress", "--timeout", "60", str(path)],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
            )
            assert process.stderr is not None
            err = process.stderr.read()
            _, status, usage = os.wait4(process.pid, 0)
            process.returncode = os.waitstatus_to_exitcode(status)
            self.cpu_s += usage.ru_utime + usage.ru_stime
            if process.returncode != 0:
                self.failures.append(f"{path.name}: exit {process.returncode}: {err.decode(errors='replace')[-300:]}")
        self.finished = time.monotonic()


def _node_config(zmq_ports: tuple[int, int, int], apps: dict[str, Any], name: str) -> dict[str, Any]:
    manage, pub, sub = zmq_ports
    return {
        "logging": {"console": True, "console_verbosity": "INFO", "file": False},
        "node": {"name": name},
        "plugins": {
            "backbones": {"inmem": {}},
            "apps": {"zmq": {"host": "127.0.0.1", "manage": manage, "pub": pub, "sub": sub}, **apps},
        },
    }


def _wait_held(standin: Child, expected: int, timeout: float, since: float) -> tuple[float | None, int]:
    """Poll the stand-in until it holds ``expected``; (seconds since ``since`` or None, held)."""
    deadline = since + timeout
    held = 0
    while time.monotonic() < deadline:
        held = standin.request("held", timeout=120)["held"]
        if held >= expected:
            return round(time.monotonic() - since, 2), held
        time.sleep(POLL)
    return None, held


def _figures(
    seconds: float | None, count: int, node_pid: int, standin_pid: int, cpu: dict[str, float]
) -> dict[str, Any]:
    """The issue's shape: seconds_until_held, peak_rss_mib, cpu_us_per_indicator."""
    return {
        "seconds_until_held": seconds,
        "peak_rss_mib": {"node": peak_rss_mib(node_pid), "standin": peak_rss_mib(standin_pid)},
        "cpu_us_per_indicator": {name: round(s * 1e6 / count, 1) for name, s in cpu.items()},
    }


class BulkRun:
    """The four targets of the bulk scenario, in one working directory."""

    def __init__(self, workdir: Path, profile: BulkProfile) -> None:
        self.workdir = workdir
        self.profile = profile
        self.count = profile.indicators
        # Unix socket paths are limited to 107 bytes: the sockets live in a short directory.
        self.socket_dir = Path(tempfile.mkdtemp(prefix="tbbulk-"))
        self.files: list[Path] = []
        self.details: dict[str, Any] = {}
        self.result: dict[str, Any] = {"indicators": self.count}  # filled target by target

    def run(self) -> dict[str, Any]:
        started = time.monotonic()
        self.files = write_indicators(self.workdir / "intel", self.count)
        self.details["generate_seconds"] = round(time.monotonic() - started, 1)
        self.details["mix"] = mix_counts(self.count)
        result = self.result
        try:
            result["suricata_datasets"] = self.suricata("datasets")
            result["suricata_rules"] = self.suricata("rules")
            result["zeek"] = self.zeek()
            result["snapshot"] = self.snapshot()
        finally:
            shutil.rmtree(self.socket_dir, ignore_errors=True)
            shutil.rmtree(self.workdir / "intel", ignore_errors=True)
        return result

    # ---- one target ----------------------------------------------------------

    def _publish_and_wait(
        self, label: str, node: ThreatBusProcess, standin: Child, sub_port: int
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        assert node.process is not None
        meter = CpuMeter({"node": node.process.pid, "standin": standin.process.pid})
        publisher = Publisher(self.files, sub_port)
        meter.start()
        t0 = time.monotonic()
        thread = threading.Thread(target=publisher.run, name="bulk-publisher")
        thread.start()
        seconds, held = _wait_held(standin, self.count, self.profile.timeout, t0)
        thread.join(self.profile.timeout)
        cpu = meter.stop()
        cpu["publisher"] = round(publisher.cpu_s, 3)
        figures = _figures(seconds, self.count, node.process.pid, standin.process.pid, cpu)
        details = {
            "held": held,
            "held_all": seconds is not None,
            "published_seconds": round(publisher.finished - t0, 2) if publisher.finished else None,
            "publish_failures": publisher.failures,
            "cpu_s": cpu,
        }
        logger.info("bulk %s: %s, %s", label, figures, details)
        return figures, details

    def _stop(self, name: str, node: ThreatBusProcess, standin: Child | None) -> None:
        try:
            code = node.stop(timeout=300)  # the suricata app writes its files once more on the way out
            if code != 0:
                self.details.setdefault("node_exit_codes", {})[name] = code
        except AssertionError as err:
            self.details.setdefault("node_exit_codes", {})[name] = str(err).splitlines()[0]
        finally:
            node.kill()
            if standin is not None:
                standin.stop()
        problems = [
            line.strip()[:300]
            for line in node.log().splitlines()
            if " WARNING " in line or " ERROR " in line or "Traceback" in line
        ]
        if problems:
            self.details.setdefault("node_log_problems", {})[name] = problems[:10]

    def suricata(self, mode: str) -> dict[str, Any]:
        name = f"suricata_{mode}"
        directory = self._directory(name)
        socket_path = str(self.socket_dir / f"{mode}.socket")
        rules_file = directory / "threatbus.rules"
        standin = Child(f"suricata-standin-{mode}", standins.suricata, socket_path, str(rules_file))
        apps = {"suricata": {"mode": mode, "rules_file": str(rules_file), "socket": socket_path, "eve": ""}}

        def rules_file_size() -> dict[str, Any]:
            return {"rules_file_mib": round(rules_file.stat().st_size / 2**20, 1) if rules_file.exists() else None}

        return self._publish_through(name, directory, standin, apps, more_details=rules_file_size)

    def zeek(self) -> dict[str, Any]:
        name = "zeek"
        port = free_port()
        standin = Child("zeek-standin", standins.zeek, port)
        apps = {"zeek": {"host": "127.0.0.1", "port": port}}
        return self._publish_through(name, self._directory(name), standin, apps, connected_line="connected to Zeek")

    def _directory(self, name: str) -> Path:
        directory = self.workdir / name
        directory.mkdir(parents=True, exist_ok=True)
        return directory

    def _publish_through(
        self,
        name: str,
        directory: Path,
        standin: Child,
        apps: dict[str, Any],
        connected_line: str | None = None,
        more_details: Callable[[], dict[str, Any]] | None = None,
    ) -> dict[str, Any]:
        """A node running ``apps`` beside ``standin``: publish the set, wait until the stand-in holds it.

        ``connected_line``: the node's log line to wait for before publishing;
        ``more_details`` adds to the run's details before the node stops.
        """
        node = None
        try:
            standin.expect("ready", 30)
            ports = (free_port(), free_port(), free_port())
            node = ThreatBusProcess(_node_config(ports, apps, name), directory, name=name)
            node.start(timeout=60)
            if connected_line is not None:
                node.wait_for_log(connected_line, timeout=60)
            figures, details = self._publish_and_wait(name, node, standin, ports[2])
            if more_details is not None:
                details.update(more_details())
            self.details[name] = details
            return figures
        finally:
            if node is not None:
                self._stop(name, node, standin)
            else:
                standin.stop()

    def snapshot(self) -> dict[str, Any]:
        """A new node whose suricata app holds the set; a Zeek that connects afterwards gets all of it."""
        name = "snapshot"
        directory = self._directory(name)
        source = self.workdir / "suricata_datasets"
        for path in source.glob("threatbus*"):
            shutil.copy(path, directory / path.name)
        for path in source.glob("*.lst"):
            shutil.copy(path, directory / path.name)
        socket_path = str(self.socket_dir / "snapshot.socket")
        rules_file = directory / "threatbus.rules"
        suricata = Child("suricata-standin-snapshot", standins.suricata, socket_path, str(rules_file))
        zeek: Child | None = None
        node = None
        try:
            suricata.expect("ready", 30)
            port = free_port()
            ports = (free_port(), free_port(), free_port())
            apps = {
                "suricata": {"mode": "datasets", "rules_file": str(rules_file), "socket": socket_path, "eve": ""},
                "zeek": {"host": "127.0.0.1", "port": port, "snapshot": 1},
            }
            node = ThreatBusProcess(_node_config(ports, apps, name), directory, name=name)
            started = time.monotonic()
            node.start(timeout=self.profile.timeout)
            self.details["snapshot_node_start_seconds"] = round(time.monotonic() - started, 1)
            assert node.process is not None
            # Metered from before the sensor connects: a small snapshot may be over before the poll below
            # sees the handshake (2,000 indicators in less than the 10 ms a CPU reading can tell).
            node_meter = CpuMeter({"node": node.process.pid})
            node_meter.start()
            # The sensor connects only now, when the suricata app holds the set: a new sensor on a running bus.
            zeek = Child("zeek-standin-snapshot", standins.zeek, port)
            zeek.expect("ready", 30)
            standin_meter = CpuMeter({"standin": zeek.process.pid})
            standin_meter.start()
            connected = None
            deadline = time.monotonic() + 120  # the zeek app retries with a backoff of up to 30 s
            while connected is None and time.monotonic() < deadline:
                connected = zeek.request("held", timeout=60)["connected_at"]
                time.sleep(0.05)
            if connected is None:
                raise RuntimeError("the zeek app did not connect to the stand-in within 120 s")
            seconds, held = _wait_held(zeek, self.count, self.profile.timeout, connected)
            cpu = {**node_meter.stop(), **standin_meter.stop()}
            figures = _figures(seconds, self.count, node.process.pid, zeek.process.pid, cpu)
            self.details[name] = {"held": held, "held_all": seconds is not None, "cpu_s": cpu}
            logger.info("bulk snapshot: %s, %s", figures, self.details[name])
            return figures
        finally:
            if zeek is not None:
                zeek.stop()
            if node is not None:
                self._stop(name, node, suricata)
            else:
                suricata.stop()
