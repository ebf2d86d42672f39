"""Fixtures of the MISP plugin tests: the stand-in MISP and a bus with the zmq and misp apps."""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from testbus import running_bus
from threatbus_misp import MispApp

from threatbus.bus import Bus
from threatbus.testing import free_port
from threatbus_zmq import ZmqApp

_spec = importlib.util.spec_from_file_location("threatbus_misp_fake", Path(__file__).with_name("fake_misp.py"))
assert _spec is not None and _spec.loader is not None
fake_module = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = fake_module  # dataclasses look their module up there
_spec.loader.exec_module(fake_module)


@pytest.fixture
def fake() -> Any:
    """The stand-in's module: ``fake.attribute(...)``, ``fake.API_KEY`` ..."""
    return fake_module


@pytest.fixture
def misp() -> Iterator[Any]:
    """A running stand-in MISP (REST API and ZeroMQ publisher)."""
    stand_in = fake_module.FakeMisp()
    stand_in.start()
    yield stand_in
    stand_in.close()


@pytest.fixture
def bus_with_misp() -> Any:
    """``with bus_with_misp(stand_in, app=None, **misp_keys) as (bus, zmq_config)``: an in-process bus
    with the zmq app and the misp app (plugin objects registered with pluggy)."""

    @contextmanager
    def start(stand_in: Any, app: Any = None, **extra: Any) -> Iterator[tuple[Bus, dict[str, Any]]]:
        zmq = zmq_app_config()
        config = {"apps": {"zmq": zmq, "misp": misp_config(stand_in, **extra)}}
        with running_bus(apps={"zmq": ZmqApp(), "misp": app or MispApp()}, plugin_config=config) as bus:
            yield bus, zmq

    return start


def zmq_app_config() -> dict[str, Any]:
    return {"host": "127.0.0.1", "manage": free_port(), "pub": free_port(), "sub": free_port()}


def misp_config(stand_in: Any, **extra: Any) -> dict[str, Any]:
    """The misp app's section for the stand-in."""
    return {
        "api": {"host": stand_in.url, "ssl": False, "key": fake_module.API_KEY},
        "zmq": {"host": "127.0.0.1", "port": stand_in.zmq_port},
        **extra,
    }


class ZmqAppClient:
    """An app subscribed to the bus over the zmq plugin's protocol, as the ecosystem's apps do."""

    def __init__(self, zmq_config: dict[str, Any], topic: str = "stix2/indicator", snapshot: float = 0) -> None:
        from threatbus_zmq.client import ManageClient, Receiver, Sender, is_success

        host = zmq_config["host"]
        self.manage = ManageClient(host, zmq_config["manage"])
        reply = self.manage.subscribe(topic, snapshot)
        assert is_success(reply), reply
        self.receiver = Receiver(host, reply["pub_port"], reply["topic"])
        self.sender = Sender(host, zmq_config["sub"])

    def recv(self, timeout: float = 10.0) -> tuple[str, Any]:
        got = self.receiver.recv(timeout)
        assert got is not None, f"nothing arrived within {timeout}s"
        return got

    def assert_nothing(self, within: float = 0.5) -> None:
        got = self.receiver.recv(within)
        assert got is None, f"unexpected {got}"

    def send(self, message: Any) -> None:
        self.sender.send(message)

    def close(self) -> None:
        self.sender.close(linger=1)
        self.receiver.close()
        self.manage.close()


@pytest.fixture
def zmq_apps() -> Iterator[Any]:
    """Makes ZmqAppClients on demand: ``zmq_apps(zmq_config, topic, snapshot)``; closes them after."""
    made: list[ZmqAppClient] = []

    def make(zmq_config: dict[str, Any], topic: str = "stix2/indicator", snapshot: float = 0) -> ZmqAppClient:
        client = ZmqAppClient(zmq_config, topic, snapshot)
        made.append(client)
        return client

    yield make
    for client in made:
        client.close()
