"""Fixtures of the RabbitMQ backbone tests: unique broker names, raw AMQP access, rabbitmqctl.

Every test uses exchange and queue names with a fresh uuid and deletes them
afterwards, so tests of other engineers on the same broker are not disturbed.
Only tests marked ``broker_disruptive`` restart the broker or close connections.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pika
import pytest
from testbus import RABBITMQ_HOST, RABBITMQ_PORT, rabbitmq_reachable, require_rabbitmq, running_bus

from threatbus.bus import Bus
from threatbus.node import Node
from threatbus.testing import ThreatBusProcess, wait_until
from threatbus_rabbitmq import RabbitMQBackbone
from threatbus_rabbitmq.settings import default_queue_suffix

TESTS_DIR = Path(__file__).parent
LAUNCHER = TESTS_DIR / "rabbitmq_node.py"
BROKER_DEADLINE = 60.0


def pytest_configure(config: pytest.Config) -> None:
    # pika logs every frame at DEBUG; the tests' logs should show the backbone's own lines.
    logging.getLogger("pika").setLevel(logging.WARNING)
    config.addinivalue_line(
        "markers",
        "broker_disruptive: restarts the shared RabbitMQ or closes connections (affects every user of the broker)",
    )


class Broker:
    """Raw access to the test broker for one test, with cleanup of what the test named."""

    def __init__(self) -> None:
        self.id = uuid.uuid4().hex[:12]
        self.exchange = f"tb-test-{self.id}"
        self.queues: list[str] = [f"{self.exchange}.log"]  # the intel log (stream) of the exchange
        self.exchanges: list[str] = [self.exchange, f"{self.exchange}.durable"]

    def queue(self, label: str) -> str:
        """A unique queue name suffix; the full queue name is ``threatbus.<suffix>``."""
        suffix = f"{label}-{self.id}"
        self.queues += [f"threatbus.{suffix}", f"threatbus.{suffix}.dlq"]  # the node's queue and its DLQ
        return suffix

    def node_queue(self, node_name: str, config_path: Path | str | None = None) -> str:
        """The default queue name of a node (unique per node, stable across restarts)."""
        node = Node.create(node_name, str(Path(config_path).resolve()) if config_path else None)
        name = f"threatbus.{default_queue_suffix(node)}"
        self.queues += [name, f"{name}.dlq"]
        return name

    def config(self, suffix: str | None = None, **overrides: Any) -> dict[str, Any]:
        """The backbone section for a node of this test (fast reconnects)."""
        section: dict[str, Any] = {
            "host": RABBITMQ_HOST,
            "port": RABBITMQ_PORT,
            "username": "guest",
            "password": "guest",
            "exchange_name": self.exchange,
            "reconnect": {"initial": 0.2, "max": 1.0},
            "heartbeat": 10,
            "queue": {},
        }
        if suffix is not None:
            section["queue"]["name_suffix"] = suffix
        for key, value in overrides.items():
            if isinstance(value, dict) and isinstance(section.get(key), dict):
                section[key] = {**section[key], **value}
            else:
                section[key] = value
        return section

    def plugin_config(self, suffix: str | None = None, **overrides: Any) -> dict[str, Any]:
        return {"backbones": {"rabbitmq": self.config(suffix, **overrides)}}

    # ---- raw AMQP ------------------------------------------------------

    @contextmanager
    def node(
        self, label: str, apps: dict[str, object] | None = None, *, suffix: str | None = None, **overrides: Any
    ) -> Iterator[tuple[Bus, RabbitMQBackbone]]:
        """An in-process node on this broker whose queue and name depend only on ``label``.

        The same label is the same node restarted; ``suffix`` names the queue
        instead, ``overrides`` change the backbone's config.
        """
        backbone = RabbitMQBackbone()
        config = self.plugin_config(suffix or self.queue(label), **overrides)
        with running_bus(
            apps=apps, backbones={"rabbitmq": backbone}, plugin_config=config, node_name=f"{label}-{self.id}"
        ) as bus:
            yield bus, backbone

    def connect(self) -> pika.BlockingConnection:
        return pika.BlockingConnection(pika.ConnectionParameters(RABBITMQ_HOST, RABBITMQ_PORT, heartbeat=30))

    def publish_raw(
        self, bodies: list[bytes], exchange: str | None = None, properties: pika.BasicProperties | None = None
    ) -> None:
        connection = self.connect()
        try:
            channel = connection.channel()
            channel.confirm_delivery()
            for body in bodies:
                channel.basic_publish(exchange or self.exchange, "", body, properties)
        finally:
            connection.close()

    def message_count(self, queue: str) -> int:
        connection = self.connect()
        try:
            return connection.channel().queue_declare(queue, passive=True).method.message_count
        finally:
            connection.close()

    def cleanup(self) -> None:
        """Delete the test's queues and exchanges (waiting a while if a restart test has the broker down)."""
        try:
            wait_until(rabbitmq_reachable, 30, interval=0.2, what="RabbitMQ for cleanup")
        except AssertionError:
            return
        connection = self.connect()
        try:
            for kind, name in [("queue", q) for q in self.queues] + [("exchange", x) for x in self.exchanges]:
                channel = connection.channel()
                try:
                    if kind == "queue":
                        channel.queue_delete(name)
                    else:
                        channel.exchange_delete(name)
                except pika.exceptions.ChannelClosedByBroker:
                    continue  # already gone
        finally:
            if connection.is_open:
                connection.close()


@pytest.fixture
def broker() -> Iterator[Broker]:
    require_rabbitmq()
    handle = Broker()
    yield handle
    handle.cleanup()


# ---- rabbitmqctl -------------------------------------------------------


class BrokerControl:
    """``rabbitmqctl`` for the disruptive tests."""

    @staticmethod
    def run(*args: str, timeout: float = 60.0) -> str:
        result = subprocess.run(["rabbitmqctl", *args], capture_output=True, text=True, timeout=timeout)
        if result.returncode != 0:
            raise AssertionError(f"rabbitmqctl {' '.join(args)} failed ({result.returncode}): {result.stderr}")
        return result.stdout

    def connections_matching(self, text: str, roles: tuple[str, ...] = ()) -> list[str]:
        """Pids of broker connections whose client-given name contains ``text`` (and one of ``roles``)."""
        # Tab-separated: <rabbit@host.1.2.3>  [{"product", ...},{"connection_name","..."}]
        out = self.run("list_connections", "pid", "client_properties", "--silent")
        pids = []
        for line in out.splitlines():
            pid, _, properties = line.partition("\t")
            for match in re.finditer(r'\{"connection_name","([^"]*)"\}', properties):
                name = match.group(1)
                if text in name and (not roles or any(f" {role} " in name for role in roles)):
                    pids.append(pid.strip())
        return pids

    def close_connections(self, text: str, roles: tuple[str, ...] = ()) -> int:
        """Close (as a network failure would) the broker connections named with ``text``; only ours."""
        pids = self.connections_matching(text, roles)
        for pid in pids:
            self.run("close_connection", pid, "threatbus test: connection killed")
        return len(pids)

    def wait_for_broker(self, deadline: float = BROKER_DEADLINE) -> None:
        self.run("await_startup", "--timeout", str(int(deadline)), timeout=deadline + 10)
        wait_until(rabbitmq_reachable, deadline, interval=0.2, what="RabbitMQ to accept connections")

    def restart_app(self, while_down: Callable[[], None] | None = None) -> None:
        """``stop_app``, run ``while_down``, then ``start_app`` (always) and wait until the broker is up."""
        self.run("stop_app")
        try:
            if while_down is not None:
                while_down()
        finally:
            self.run("start_app", timeout=120)
            self.wait_for_broker()

    @staticmethod
    def available() -> bool:
        try:
            subprocess.run(["rabbitmqctl", "status"], capture_output=True, timeout=30, check=True)
        except (OSError, subprocess.SubprocessError):
            return False
        return True


@pytest.fixture
def ctl(broker: Broker) -> Iterator[BrokerControl]:
    """rabbitmqctl; held by one disruptive test at a time on this machine, across concurrent test runs."""
    control = BrokerControl()
    if not control.available():
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail("rabbitmqctl is needed for the broker restart tests")
        pytest.skip("rabbitmqctl not available (needs the local RabbitMQ and the rights to manage it)")
    with open(Path(tempfile.gettempdir()) / "threatbus-rabbitmq-disruptive.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        control.wait_for_broker()  # a concurrent run may just have restarted it
        yield control


# ---- node processes ----------------------------------------------------


class NodeProcess(ThreatBusProcess):
    """A real node process: ``rabbitmq_node.py`` runs the bus as ``threatbus`` does, plus a file app.

    The app publishes every JSON line appended to ``inbox`` and writes every
    message it receives (subscribed to ``stix2``) as a line to ``outbox``. It
    subscribes only while the file ``subscribe_trigger`` exists (``app_back()``
    creates it, ``app_away()`` removes it before a restart).
    """

    def __init__(
        self,
        workdir: Path,
        name: str,
        backbone: dict[str, Any],
        extra_env: dict[str, str] | None = None,
        snapshot_days: float = 0,
        knows_delivered: bool = True,
    ):
        self.name = name
        self.inbox = Path(workdir) / f"{name}.inbox.jsonl"
        self.outbox = Path(workdir) / f"{name}.outbox.jsonl"
        self.subscribe_trigger = Path(workdir) / f"{name}.subscribe"
        self.inbox.touch()
        self.subscribe_trigger.touch()
        config = {
            "logging": {"console": True, "console_verbosity": "DEBUG", "file": False},
            "node": {"name": name},
            "plugins": {"backbones": {"rabbitmq": backbone}, "apps": {}},
            "testapp": {
                "inbox": str(self.inbox),
                "outbox": str(self.outbox),
                "subscribe_when": str(self.subscribe_trigger),
                "snapshot_days": snapshot_days,
                "knows_delivered": knows_delivered,
            },
        }
        super().__init__(config, workdir, name=name, extra_env=extra_env)

    def start(self, ready_line: str = "consumer: consuming queue", timeout: float = 30.0) -> NodeProcess:
        offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **self.extra_env}
        self._log_file = open(self.log_path, "ab")
        self.process = subprocess.Popen(
            [sys.executable, str(LAUNCHER), str(self.config_path)],
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            env=env,
        )

        def ready() -> bool:
            if self.process is not None and self.process.poll() is not None:
                raise AssertionError(f"{self.name} exited with {self.process.returncode}:\n{self.log()}")
            return ready_line in self.log()[offset:]

        try:
            wait_until(ready, timeout, interval=0.05, what=f"{self.name}: {ready_line!r}")
        except AssertionError as err:
            raise AssertionError(f"{err}\n--- log ---\n{self.log()[-5000:]}") from None
        return self

    def app_away(self) -> None:
        """From the next start on, the app subscribes only when ``app_back()`` is called."""
        self.subscribe_trigger.unlink(missing_ok=True)

    def app_back(self) -> None:
        self.subscribe_trigger.touch()

    def publish(self, messages: list[Any]) -> None:
        with self.inbox.open("ab") as inbox:
            inbox.write(b"".join(m.encode() + b"\n" for m in messages))

    def received(self) -> list[dict[str, Any]]:
        if not self.outbox.exists():
            return []
        data = self.outbox.read_bytes()
        complete = data[: data.rfind(b"\n") + 1]  # the app may be writing the last line right now
        return [json.loads(line) for line in complete.splitlines() if line.strip()]

    def wait_received(self, ids: set[str], timeout: float = 30.0) -> list[dict[str, Any]]:
        """Wait until the app received every id in ``ids``; return all it received."""

        def arrived() -> list[dict[str, Any]] | None:
            got = self.received()
            return got if ids <= {m.get("id") for m in got} else None

        try:
            return wait_until(arrived, timeout, interval=0.05, what=f"{len(ids)} messages at {self.name}")
        except AssertionError:
            got = {m.get("id") for m in self.received()}
            raise AssertionError(
                f"{self.name} got {len(ids & got)} of {len(ids)} messages\n--- log tail ---\n{self.log()[-5000:]}"
            ) from None


@pytest.fixture
def spawn_node(tmp_path: Path) -> Iterator[Callable[..., NodeProcess]]:
    """``spawn_node(name, backbone_section, extra_env=None, snapshot_days=0, knows_delivered=True)``: a node process.

    Not started. ``knows_delivered=False``: its app cannot tell which messages in doubt it already delivered.
    """
    made: list[NodeProcess] = []

    def spawn(
        name: str,
        backbone: dict[str, Any],
        extra_env: dict[str, str] | None = None,
        snapshot_days: float = 0,
        knows_delivered: bool = True,
    ) -> NodeProcess:
        node = NodeProcess(tmp_path, name, backbone, extra_env, snapshot_days, knows_delivered)
        made.append(node)
        return node

    yield spawn
    for node in made:
        node.kill()


# ---- TLS ---------------------------------------------------------------


def make_certificate(directory: Path, name: str) -> tuple[Path, Path]:
    """A self-signed certificate for ``localhost`` / 127.0.0.1 (it is its own CA) and its key."""
    cert, key = directory / f"{name}.pem", directory / f"{name}.key"
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
            "-keyout", str(key), "-out", str(cert), "-subj", "/CN=localhost",
            "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )  # fmt: skip
    return cert, key


@pytest.fixture
def tls_files(tmp_path: Path) -> tuple[Path, Path, Path]:
    """(ca_file, cert_file, key_file): a self-signed server certificate that is its own CA."""
    if shutil.which("openssl") is None:
        pytest.fail("the TLS tests need the openssl command (apt-get install openssl)")
    cert, key = make_certificate(tmp_path, "server")
    return cert, cert, key
