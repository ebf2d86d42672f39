"""Fixtures for the zmq plugin tests: a bus in-process or as a real process, and fake apps.

``bus`` runs each test against an in-process bus (our plugin object
registered with ``running_bus``) and against a real ``threatbus`` process.
The protocol tests also run against a node of the original Threat Bus
2022.5.16 (``testbus.original_threatbus`` (tests/testbus.py) installs it into a venv of
its own on first use); THREATBUS_ZMQ_ORIGINAL may name another ``threatbus``
executable of that release.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
import zmq
from testbus import original_threatbus, running_bus

from threatbus.bus import Bus
from threatbus.data import Message
from threatbus.testing import ThreatBusProcess, free_port, terminate, wait_until
from threatbus_zmq import ZmqApp
from threatbus_zmq.client import ManageClient, Receiver, Sender, is_success

TARGETS = ["inprocess", "process", "original"]


@dataclass
class Target:
    """A running bus with the zmq plugin, however it was started."""

    kind: str
    host: str
    manage: int
    pub: int
    sub: int
    context: zmq.Context
    app: ZmqApp | None = None
    bus: Bus | None = None
    process: Any = None
    apps: list[FakeApp] = field(default_factory=list)

    @property
    def ours(self) -> bool:
        return self.kind != "original"

    def metric(self, name: str, **labels: str) -> float:
        assert self.bus is not None, "metrics are read in-process only"
        return self.bus.metrics.value(name, **labels)

    def log(self) -> str:
        return self.process.log() if self.process is not None else ""

    def manage_client(self, timeout: float = 5.0) -> ManageClient:
        return ManageClient(self.host, self.manage, timeout, self.context)

    def sender(self) -> Sender:
        sender = Sender(self.host, self.sub, context=self.context)
        sender.wait_ready()
        return sender

    def fake_app(self, topic: str | list[str] = "stix2", snapshot: float = 0, rcvhwm: int = 0) -> FakeApp:
        app = FakeApp(self, topic, snapshot, rcvhwm)
        self.apps.append(app)
        return app


class FakeApp:
    """An app as the ecosystem writes them: manage REQ, SUB on pub, PUB on sub."""

    def __init__(self, target: Target, topic: str | list[str], snapshot: float, rcvhwm: int) -> None:
        self.target = target
        self.manage = target.manage_client()
        reply = self.manage.subscribe(topic, snapshot)
        assert is_success(reply), reply
        self.p2p_topic: str = reply["topic"]
        monitor: list[zmq.Socket] = []
        watch = (
            None if target.ours else lambda sock: monitor.append(sock.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED))
        )
        self.receiver = Receiver(
            target.host, reply["pub_port"], self.p2p_topic, target.context, rcvhwm=rcvhwm, before_connect=watch
        )
        self._sender: Sender | None = None
        if monitor:
            _wait_connected(self.receiver.socket, monitor[0])

    def recv(self, timeout: float = 10.0) -> tuple[str, Message]:
        got = self.receiver.recv(timeout)
        assert got is not None, f"nothing arrived within {timeout}s"
        return got

    def recv_many(self, count: int, timeout: float = 20.0) -> list[tuple[str, Message]]:
        return [self.recv(timeout) for _ in range(count)]

    def assert_nothing(self, within: float = 0.5) -> None:
        got = self.receiver.recv(within)
        assert got is None, f"unexpected {got}"

    def send(self, message: Message) -> None:
        if self._sender is None:
            self._sender = self.target.sender()
        self._sender.send(message)

    def close(self) -> None:
        if self._sender is not None:
            self._sender.close(linger=1)
        self.receiver.close()
        self.manage.close()


def _wait_connected(socket: zmq.Socket, monitor: zmq.Socket, timeout: float = 5.0) -> None:
    """For the original bus only: it cannot tell when a subscription takes effect
    (ours holds messages until then), so wait for the ZeroMQ handshake."""
    from zmq.utils.monitor import recv_monitor_message

    try:
        assert monitor.poll(int(timeout * 1000)), "no handshake with the original's pub socket"
        recv_monitor_message(monitor)
    finally:
        socket.disable_monitor()
        monitor.close(linger=0)


def zmq_config(manage: int, pub: int, sub: int, **extra: Any) -> dict[str, Any]:
    return {"host": "127.0.0.1", "manage": manage, "pub": pub, "sub": sub, **extra}


@contextmanager
def start_target(kind: str, tmp_path: Path, **extra: Any) -> Iterator[Target]:
    tmp_path.mkdir(parents=True, exist_ok=True)
    manage, pub, sub = free_port(), free_port(), free_port()
    context = zmq.Context()
    target = Target(kind, "127.0.0.1", manage, pub, sub, context)
    try:
        if kind == "inprocess":
            app = ZmqApp()
            config = {"apps": {"zmq": zmq_config(manage, pub, sub, **extra)}}
            with running_bus(apps={"zmq": app}, plugin_config=config) as bus:
                target.app, target.bus = app, bus
                yield target
                _close_apps(target)
        elif kind == "process":
            config = {
                "logging": {"console": True, "console_verbosity": "DEBUG", "file": False},
                "plugins": {"backbones": {"inmem": {}}, "apps": {"zmq": zmq_config(manage, pub, sub, **extra)}},
            }
            process = ThreatBusProcess(config, tmp_path, name=f"zmq-{manage}")
            target.process = process
            process.start()
            try:
                yield target
                _close_apps(target)
            finally:
                code = process.stop()
                assert code == 0, f"threatbus exited with {code}:\n{process.log()}"
        else:
            with _original(tmp_path, manage, pub, sub) as process:
                target.process = process
                yield target
                _close_apps(target)
    finally:
        _close_apps(target)
        context.destroy(linger=0)


def _close_apps(target: Target) -> None:
    while target.apps:
        target.apps.pop().close()


class _OriginalProcess:
    def __init__(self, log_path: Path) -> None:
        self.log_path = log_path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@contextmanager
def _original(tmp_path: Path, manage: int, pub: int, sub: int) -> Iterator[_OriginalProcess]:
    original = os.environ.get("THREATBUS_ZMQ_ORIGINAL") or str(original_threatbus())
    config = tmp_path / "original.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "logging": {"console": True, "console_verbosity": "DEBUG", "file": False},
                "plugins": {"backbones": {"inmem": {}}, "apps": {"zmq": zmq_config(manage, pub, sub)}},
            }
        )
    )
    log_path = tmp_path / "original.log"
    with ExitStack() as stack:
        log = stack.enter_context(open(log_path, "wb"))
        proc = subprocess.Popen([original, "-c", str(config)], stdout=log, stderr=subprocess.STDOUT)
        handle = _OriginalProcess(log_path)
        try:
            wait_until(lambda: "ZeroMQ app plugin started" in handle.log(), 30, what="the original to start")
            yield handle
        finally:
            terminate(proc, 10)


@pytest.fixture(params=TARGETS)
def bus(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Target]:
    with start_target(request.param, tmp_path / request.param) as target:
        yield target


@pytest.fixture(params=["inprocess", "process"])
def our_bus(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Target]:
    with start_target(request.param, tmp_path / request.param) as target:
        yield target


@pytest.fixture
def inprocess_bus(tmp_path: Path) -> Iterator[Target]:
    with start_target("inprocess", tmp_path) as target:
        yield target


@pytest.fixture
def configured_bus(tmp_path: Path, request: pytest.FixtureRequest) -> Any:
    """``configured_bus(kind, **zmq_config)``: a context manager for a bus with extra plugin config."""

    def start(kind: str, **extra: Any) -> Any:
        return start_target(kind, tmp_path / kind, **extra)

    return start
