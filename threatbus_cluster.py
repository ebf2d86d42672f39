"""A local cluster: N ``threatbus`` nodes on one machine against one RabbitMQ.

For trying out a multi-node setup and for tests:

    threatbus cluster up --nodes 3 [--dir DIR] [--base-port P] [--exchange NAME]
    threatbus cluster status [--dir DIR]
    threatbus cluster stop node-2 [--dir DIR]   # one node, e.g. to simulate a failure
    threatbus cluster start node-2 [--dir DIR]  # start it again from its config
    threatbus cluster down [--dir DIR]

``up`` writes one config per node into DIR (``<node>.yaml``, with its own
node name, ZeroMQ ports, HTTP port and RabbitMQ queue), starts each node as
a background ``threatbus -c <node>.yaml`` process with its pid in
``<node>.pid`` and its output in ``<node>.log``, and waits until every
node's ``/health`` answers 200 (backbone connected). Node ``i`` (from 1)
uses the ports ``base + 10*(i-1)`` + 0 (zmq manage), 1 (zmq pub), 2 (zmq sub)
and 3 (HTTP metrics/health); the default base 13370 gives node 1 the
default ZeroMQ ports. ``down`` stops every node with SIGTERM and kills
those still running after a deadline. ``cluster.json`` in DIR describes the
cluster for the other commands.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from threatbus.errors import ThreatBusError

logger = logging.getLogger(__name__)

MANIFEST = "cluster.json"
DEFAULT_DIR = "threatbus-cluster"
DEFAULT_BASE_PORT = 13370
PORTS_PER_NODE = 10
DEFAULT_START_TIMEOUT = 30.0
DEFAULT_STOP_TIMEOUT = 15.0
HOST = "127.0.0.1"
_POLL = 0.1


class ClusterError(ThreatBusError):
    """The local cluster cannot be created, started or stopped as asked."""


@dataclass(frozen=True)
class NodeSpec:
    """One node of a local cluster and the ports it owns."""

    name: str
    manage: int
    pub: int
    sub: int
    http: int

    @property
    def ports(self) -> dict[str, int]:
        return {"manage": self.manage, "pub": self.pub, "sub": self.sub, "http": self.http}


@dataclass(frozen=True)
class BrokerSpec:
    host: str = "127.0.0.1"
    port: int = 5672
    username: str = "guest"
    password: str = "guest"
    vhost: str = "/"
    exchange: str = "threatbus"


@dataclass(frozen=True)
class ClusterSpec:
    nodes: tuple[NodeSpec, ...]
    broker: BrokerSpec = field(default_factory=BrokerSpec)
    backbone: str = "rabbitmq"  # or "inmem": independent nodes, for trying the tool without a broker
    app: str | None = "zmq"
    log_level: str = "INFO"

    def node(self, name: str) -> NodeSpec:
        for node in self.nodes:
            if node.name == name:
                return node
        raise ClusterError(f"no node '{name}' in this cluster (nodes: {', '.join(n.name for n in self.nodes)})")

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ClusterSpec:
        return cls(
            nodes=tuple(NodeSpec(**node) for node in data["nodes"]),
            broker=BrokerSpec(**data["broker"]),
            backbone=data["backbone"],
            app=data["app"],
            log_level=data["log_level"],
        )


def plan(
    count: int,
    base_port: int = DEFAULT_BASE_PORT,
    prefix: str = "node",
    broker: BrokerSpec | None = None,
    backbone: str = "rabbitmq",
    app: str | None = "zmq",
    log_level: str = "INFO",
) -> ClusterSpec:
    """The nodes of a cluster of ``count`` nodes and their ports."""
    if count < 1:
        raise ClusterError(f"--nodes must be at least 1, got {count}")
    last = base_port + PORTS_PER_NODE * (count - 1) + 3
    if base_port < 1 or last > 65535:
        raise ClusterError(f"ports {base_port}-{last} do not fit 1-65535: choose another --base-port")
    nodes = []
    for index in range(count):
        first = base_port + PORTS_PER_NODE * index
        nodes.append(NodeSpec(f"{prefix}-{index + 1}", manage=first, pub=first + 1, sub=first + 2, http=first + 3))
    return ClusterSpec(tuple(nodes), broker or BrokerSpec(), backbone, app, log_level)


def node_config(spec: ClusterSpec, node: NodeSpec) -> dict[str, Any]:
    """The config file contents of one node."""
    if spec.backbone == "rabbitmq":
        broker = spec.broker
        backbone: dict[str, Any] = {
            "rabbitmq": {
                "host": broker.host,
                "port": broker.port,
                "username": broker.username,
                "password": broker.password,
                "vhost": broker.vhost,
                "exchange_name": broker.exchange,
                # One queue per node: nodes sharing a queue would split the messages between them.
                "queue": {"name_suffix": node.name},
            }
        }
    else:
        backbone = {spec.backbone: {}}
    apps: dict[str, Any] = {}
    if spec.app == "zmq":
        apps["zmq"] = {"host": HOST, "manage": node.manage, "pub": node.pub, "sub": node.sub}
    return {
        "node": {"name": node.name},
        "logging": {"console": True, "console_verbosity": spec.log_level, "file": False},
        "http": {"host": HOST, "port": node.http},
        "plugins": {"backbones": backbone, "apps": apps},
    }


@dataclass
class NodeStatus:
    name: str
    pid: int | None
    running: bool
    healthy: bool
    detail: str
    http: int


class Cluster:
    """The nodes described by ``DIR/cluster.json``: start, stop, status."""

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(directory).resolve()
        # Our own children, so that their exit is reaped (no zombies when used in-process).
        self._children: dict[int, subprocess.Popen[bytes]] = {}

    # ---- files ---------------------------------------------------------

    def config_path(self, name: str) -> Path:
        return self.directory / f"{name}.yaml"

    def pid_path(self, name: str) -> Path:
        return self.directory / f"{name}.pid"

    def log_path(self, name: str) -> Path:
        return self.directory / f"{name}.log"

    def load(self) -> ClusterSpec:
        path = self.directory / MANIFEST
        try:
            return ClusterSpec.from_json(json.loads(path.read_text()))
        except FileNotFoundError:
            raise ClusterError(
                f"no cluster in {self.directory} ({MANIFEST} not found): run `threatbus cluster up`"
            ) from None
        except (ValueError, KeyError, TypeError) as err:
            raise ClusterError(f"{path} is not a cluster description: {err}") from None

    def write(self, spec: ClusterSpec) -> None:
        """Write the manifest and one config per node (readable by the owner only: it holds the broker password)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        for node in spec.nodes:
            _write_private(self.config_path(node.name), yaml.safe_dump(node_config(spec, node), sort_keys=False))
        _write_private(self.directory / MANIFEST, json.dumps(spec.to_json(), indent=2) + "\n")

    # ---- processes -----------------------------------------------------

    def pid(self, name: str) -> int | None:
        """The pid of node ``name`` if it is running, else None (stale pid files are ignored)."""
        try:
            pid = int(self.pid_path(name).read_text().strip())
        except (FileNotFoundError, ValueError):
            return None
        return pid if self._alive(pid, self.config_path(name)) else None

    def _alive(self, pid: int, config: Path) -> bool:
        child = self._children.get(pid)
        if child is not None and child.poll() is not None:
            del self._children[pid]
            return False
        return _process_running(pid, config)

    def up(self, spec: ClusterSpec, timeout: float = DEFAULT_START_TIMEOUT) -> list[NodeStatus]:
        """Write the configs and start every node; wait until all are healthy."""
        if (self.directory / MANIFEST).exists():
            running = [name for name in self._names(self.load()) if self.pid(name) is not None]
            if running:
                raise ClusterError(
                    f"nodes {', '.join(running)} of the cluster in {self.directory} are still running: "
                    f"stop them first (threatbus cluster down --dir {self.directory})"
                )
        _check_ports_free(spec.nodes)
        self.write(spec)
        return self.start(timeout=timeout)

    def start(self, names: Sequence[str] | None = None, timeout: float = DEFAULT_START_TIMEOUT) -> list[NodeStatus]:
        """Start the given nodes (None: all) that are not running; wait until they are healthy.

        If one does not become healthy in time, the nodes started by this call
        are stopped again and ``ClusterError`` says why.
        """
        spec = self.load()
        nodes = [spec.node(name) for name in names] if names is not None else list(spec.nodes)
        started = []
        try:
            for node in nodes:
                if self.pid(node.name) is not None:
                    logger.info("%s is already running", node.name)
                    continue
                self._spawn(node)
                started.append(node)
            self._wait_healthy(started, timeout)
        except BaseException:
            if started:
                self.stop([node.name for node in started])
            raise
        return self.status([node.name for node in nodes])

    def _spawn(self, node: NodeSpec) -> None:
        config = self.config_path(node.name)
        if not config.is_file():
            raise ClusterError(f"{config} is missing: run `threatbus cluster up` again")
        _check_ports_free([node])
        with open(self.log_path(node.name), "ab") as log:
            log.write(f"---- threatbus cluster: starting {node.name} at {time.strftime('%F %T%z')}\n".encode())
            log.flush()
            process = subprocess.Popen(
                [sys.executable, "-m", "threatbus", "-c", str(config)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.directory,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
                # Its own session: a Ctrl-C in the terminal that ran `cluster up` does not reach it.
                start_new_session=True,
            )
        self._children[process.pid] = process
        _write_private(self.pid_path(node.name), f"{process.pid}\n")
        logger.info("started %s (pid %d), log %s", node.name, process.pid, self.log_path(node.name))

    def _wait_healthy(self, nodes: Iterable[NodeSpec], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for node in nodes:
            while True:
                if self.pid(node.name) is None:
                    raise ClusterError(f"{node.name} exited during start-up:\n{self._log_tail(node.name)}")
                healthy, detail = health(node.http)
                if healthy:
                    break
                if time.monotonic() > deadline:
                    raise ClusterError(
                        f"{node.name} is not healthy after {timeout:.0f}s ({detail}):\n{self._log_tail(node.name)}"
                    )
                time.sleep(_POLL)

    def stop(self, names: Sequence[str] | None = None, timeout: float = DEFAULT_STOP_TIMEOUT) -> dict[str, str]:
        """SIGTERM the given nodes (None: all), SIGKILL those still running after ``timeout``.

        Returns what happened to each node: ``stopped``, ``killed`` or ``not running``.
        """
        spec = self.load()
        wanted = [spec.node(name).name for name in names] if names is not None else self._names(spec)
        outcome: dict[str, str] = {}
        pids: dict[str, int] = {}
        for name in wanted:
            pid = self.pid(name)
            if pid is None:
                outcome[name] = "not running"
                self.pid_path(name).unlink(missing_ok=True)
                continue
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
            pids[name] = pid
        deadline = time.monotonic() + timeout
        while pids and time.monotonic() < deadline:
            for name in [n for n in pids if not self._alive(pids[n], self.config_path(n))]:
                outcome[name] = "stopped"
                del pids[name]
            if pids:
                time.sleep(_POLL)
        for name, pid in pids.items():
            logger.warning("%s (pid %d) did not stop within %.0fs after SIGTERM: killing it", name, pid, timeout)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            kill_deadline = time.monotonic() + 5
            while self._alive(pid, self.config_path(name)) and time.monotonic() < kill_deadline:
                time.sleep(_POLL)
            outcome[name] = "killed"
        for name in outcome:
            self.pid_path(name).unlink(missing_ok=True)
        return {name: outcome[name] for name in wanted}

    def status(self, names: Sequence[str] | None = None) -> list[NodeStatus]:
        spec = self.load()
        nodes = [spec.node(name) for name in names] if names is not None else list(spec.nodes)
        result = []
        for node in nodes:
            pid = self.pid(node.name)
            if pid is None:
                result.append(NodeStatus(node.name, None, False, False, "not running", node.http))
                continue
            healthy, detail = health(node.http)
            result.append(NodeStatus(node.name, pid, True, healthy, detail, node.http))
        return result

    def _names(self, spec: ClusterSpec) -> list[str]:
        return [node.name for node in spec.nodes]

    def _log_tail(self, name: str, lines: int = 20) -> str:
        try:
            text = self.log_path(name).read_text(errors="replace")
        except FileNotFoundError:
            return "(no log)"
        return "\n".join(f"  | {line}" for line in text.splitlines()[-lines:])


def health(port: int, timeout: float = 2.0) -> tuple[bool, str]:
    """(healthy, one-line description) from a node's ``/health`` endpoint."""
    try:
        with urllib.request.urlopen(f"http://{HOST}:{port}/health", timeout=timeout) as response:
            report = json.loads(response.read())
    except urllib.error.HTTPError as err:
        try:
            report = json.loads(err.read())
        except ValueError:
            return False, f"health answered {err.code}"
    except (OSError, ValueError) as err:
        return False, f"health endpoint not reachable: {getattr(err, 'reason', err)}"
    backbone = report.get("backbone", {})
    detail = ", ".join(f"{key}={value}" for key, value in sorted(backbone.items()) if not isinstance(value, dict))
    return report.get("status") == "ok", detail or report.get("status", "")


def _process_running(pid: int, config: Path) -> bool:
    """Whether ``pid`` is a live (non-zombie) process running with ``config`` on its command line."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by someone else: the command line check below decides
    proc = Path(f"/proc/{pid}")
    if not proc.exists():
        return True  # no procfs: trust the pid file
    try:
        state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
        cmdline = (proc / "cmdline").read_bytes().split(b"\0")
    except (OSError, IndexError):
        return False  # gone meanwhile
    # A zombie is dead; a pid reused by another program is not our node.
    return state != "Z" and os.fsencode(str(config)) in cmdline


def _check_ports_free(nodes: Iterable[NodeSpec]) -> None:
    taken = []
    for node in nodes:
        for purpose, port in node.ports.items():
            with socket.socket() as sock:
                # As the node's own listeners do: a port in TIME_WAIT after a stop is free.
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    sock.bind((HOST, port))
                except OSError:
                    taken.append(f"{port} ({node.name} {purpose})")
    if taken:
        raise ClusterError(f"ports in use on {HOST}: {', '.join(taken)}; choose another --base-port")


def _write_private(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as file:
        file.write(text)


# ---- command line ------------------------------------------------------


def add_parser(commands: Any) -> None:
    """Add ``threatbus cluster ...`` to the subcommands of the ``threatbus`` parser."""
    parser = commands.add_parser(
        "cluster",
        help="run a local cluster of nodes against one RabbitMQ (up, status, start, stop, down)",
        description=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    actions = parser.add_subparsers(dest="cluster_command", metavar="ACTION", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--dir", default=DEFAULT_DIR, help=f"cluster directory (default: ./{DEFAULT_DIR})")
    timeout = argparse.ArgumentParser(add_help=False)
    timeout.add_argument(
        "--timeout",
        type=float,
        default=None,
        help=f"seconds to wait (default: {DEFAULT_START_TIMEOUT:.0f} for start, {DEFAULT_STOP_TIMEOUT:.0f} for stop)",
    )

    up = actions.add_parser("up", parents=[common, timeout], help="write the configs and start all nodes")
    up.add_argument("--nodes", type=int, default=3, help="number of nodes (default: 3)")
    up.add_argument("--base-port", type=int, default=DEFAULT_BASE_PORT, help="first port (default: %(default)s)")
    up.add_argument("--prefix", default="node", help="node names are PREFIX-1, PREFIX-2, ... (default: node)")
    up.add_argument("--rabbitmq-host", default="127.0.0.1")
    up.add_argument("--rabbitmq-port", type=int, default=5672)
    up.add_argument("--rabbitmq-user", default="guest")
    up.add_argument(
        "--rabbitmq-password",
        default=os.environ.get("THREATBUS_CLUSTER_RABBITMQ_PASSWORD", "guest"),
        help="default: $THREATBUS_CLUSTER_RABBITMQ_PASSWORD or guest",
    )
    up.add_argument("--vhost", default="/")
    up.add_argument("--exchange", default="threatbus", help="RabbitMQ exchange (default: threatbus)")
    up.add_argument(
        "--backbone",
        choices=("rabbitmq", "inmem"),
        default="rabbitmq",
        help="inmem gives independent nodes, to try the tool without a broker (default: rabbitmq)",
    )
    up.add_argument("--app", choices=("zmq", "none"), default="zmq", help="app plugin on each node (default: zmq)")
    up.add_argument("--log-level", choices=("DEBUG", "INFO", "WARNING", "ERROR"), default="INFO")

    names = argparse.ArgumentParser(add_help=False)
    names.add_argument("names", nargs="*", metavar="NODE", help="node names (default: all)")
    actions.add_parser("start", parents=[common, timeout, names], help="start stopped nodes from their configs")
    actions.add_parser("stop", parents=[common, timeout, names], help="stop nodes (SIGTERM, SIGKILL after --timeout)")
    actions.add_parser("status", parents=[common, names], help="show each node's process and health")
    actions.add_parser("down", parents=[common, timeout], help="stop all nodes")


def command(args: argparse.Namespace) -> int:
    """Run ``threatbus cluster <action>``; returns the exit status."""
    cluster = Cluster(args.dir)
    action = args.cluster_command
    if action in ("up", "start"):
        wait = args.timeout if args.timeout is not None else DEFAULT_START_TIMEOUT
        if action == "up":
            broker = BrokerSpec(
                args.rabbitmq_host,
                args.rabbitmq_port,
                args.rabbitmq_user,
                args.rabbitmq_password,
                args.vhost,
                args.exchange,
            )
            spec = plan(
                args.nodes,
                args.base_port,
                args.prefix,
                broker,
                args.backbone,
                None if args.app == "none" else args.app,
                args.log_level,
            )
            statuses = cluster.up(spec, wait)
        else:
            statuses = cluster.start(args.names or None, wait)
        _print_status(cluster, statuses)
        return 0
    if action == "status":
        statuses = cluster.status(args.names or None)
        _print_status(cluster, statuses)
        return 0 if all(s.healthy for s in statuses) else 1
    wait = args.timeout if args.timeout is not None else DEFAULT_STOP_TIMEOUT
    outcome = cluster.stop(args.names or None if action == "stop" else None, wait)
    for name, what in outcome.items():
        print(f"{name}: {what}")
    return 1 if "killed" in outcome.values() else 0


def _print_status(cluster: Cluster, statuses: Sequence[NodeStatus]) -> None:
    spec = cluster.load()
    print(f"cluster in {cluster.directory} (backbone {spec.backbone}, exchange {spec.broker.exchange})")
    print(f"{'NODE':<16} {'PID':>7}  {'STATE':<10} {'ZMQ MANAGE/PUB/SUB':<20} {'HTTP':<28} DETAIL")
    for status in statuses:
        node = spec.node(status.name)
        state = "healthy" if status.healthy else "running" if status.running else "stopped"
        zmq = f"{node.manage}/{node.pub}/{node.sub}" if spec.app == "zmq" else "-"
        print(
            f"{status.name:<16} {status.pid or '-':>7}  {state:<10} {zmq:<20} "
            f"{f'http://{HOST}:{node.http}':<28} {status.detail}"
        )
    print(f"logs: {cluster.directory}/<node>.log; stop all: threatbus cluster down --dir {cluster.directory}")
