"""Interop with a node of the original Threat Bus 2022.5.16 on the same exchange.

The original runs from its own venv (``.venv-original`` at the repo root,
created here on first use with pip from PyPI and then reused). It gets its
intel from a ZeroMQ client (its zmq app); our node runs in-process with the
backbone's defaults. Intel must flow both ways.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pika
import pytest
import testbus
import yaml
import zmq
from testbus import RABBITMQ_HOST, RABBITMQ_PORT, running_bus

from threatbus.testing import Subscriber, free_port, indicator, sighting, terminate, wait_until
from threatbus_rabbitmq import RabbitMQBackbone

pytestmark = [pytest.mark.rabbitmq, pytest.mark.e2e]


@pytest.fixture(scope="session")
def original_threatbus() -> Path:
    """The ``threatbus`` command of the original release (its venv is created once and cached)."""
    return testbus.original_threatbus()


@pytest.fixture
def original_node(original_threatbus: Path, broker: Any, tmp_path: Path) -> Iterator[dict[str, Any]]:
    """An original node with its zmq app, on the test's exchange; yields its ports and queue."""
    ports = {"manage": free_port(), "pub": free_port(), "sub": free_port()}
    suffix = broker.queue("original")
    config = {
        "logging": {"console": True, "console_verbosity": "DEBUG", "file": False},
        "plugins": {
            "apps": {"zmq": {"host": "127.0.0.1", **ports}},
            "backbones": {
                "rabbitmq": {
                    "host": RABBITMQ_HOST,
                    "port": RABBITMQ_PORT,
                    "username": "guest",
                    "password": "guest",
                    "vhost": "/",
                    "exchange_name": broker.exchange,
                    "queue": {
                        "name_suffix": suffix,
                        "name_join_symbol": ".",
                        "durable": True,
                        "auto_delete": False,
                        "lazy": True,
                        "exclusive": False,
                        "max_items": 0,
                    },
                }
            },
        },
    }
    path = tmp_path / "original.yaml"
    path.write_text(yaml.safe_dump(config))
    log_path = tmp_path / "original.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("THREATBUS_", "PYTHON"))}
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [str(original_threatbus), "-c", str(path)], stdout=log, stderr=subprocess.STDOUT, env=env, cwd=tmp_path
        )
    try:
        queue = f"threatbus.{suffix}"
        wait_until(lambda: _consumers(queue) == 1, 30, interval=0.1, what="the original node to consume its queue")
        yield {**ports, "queue": queue, "log": log_path}
    finally:
        terminate(process, 20)


def _consumers(queue: str) -> int:
    connection = pika.BlockingConnection(pika.ConnectionParameters(RABBITMQ_HOST, RABBITMQ_PORT))
    try:
        return connection.channel().queue_declare(queue, passive=True).method.consumer_count
    except pika.exceptions.ChannelClosedByBroker:
        return 0  # not declared yet
    finally:
        if connection.is_open:
            connection.close()


class ZmqClient:
    """A client of the original's zmq app, speaking the protocol of WIRE.md."""

    def __init__(self, ports: dict[str, Any]) -> None:
        self.context = zmq.Context()
        manage = self.context.socket(zmq.REQ)
        manage.setsockopt(zmq.LINGER, 0)
        manage.setsockopt(zmq.RCVTIMEO, 10_000)
        manage.connect(f"tcp://127.0.0.1:{ports['manage']}")
        manage.send_json({"action": "subscribe", "topic": "stix2", "snapshot": 0})
        reply = manage.recv_json()
        manage.close()
        assert reply["status"] == "success", reply
        self.p2p_topic = reply["topic"]
        self.sub = self.context.socket(zmq.SUB)
        self.sub.setsockopt(zmq.LINGER, 0)
        self.sub.connect(f"tcp://127.0.0.1:{reply['pub_port']}")
        self.sub.setsockopt(zmq.SUBSCRIBE, self.p2p_topic.encode())
        self.pub = self.context.socket(zmq.PUB)
        self.pub.setsockopt(zmq.LINGER, 0)
        self.pub.connect(f"tcp://127.0.0.1:{reply['sub_port']}")

    def send(self, topic: str, message: Any) -> None:
        self.pub.send(f"{topic} ".encode() + message.encode())

    def receive(self, timeout: float = 10.0) -> dict[str, Any]:
        if not self.sub.poll(int(timeout * 1000)):
            raise AssertionError(f"the original node sent nothing within {timeout}s")
        frame = self.sub.recv().decode()
        _topic, _, body = frame.partition(" ")
        return json.loads(body)

    def close(self) -> None:
        self.context.destroy(linger=0)


def test_our_node_and_an_original_node_share_intel_both_ways(broker, original_node):
    # Our node with the defaults, only the exchange is the test's own.
    backbone = RabbitMQBackbone()
    config = {
        "backbones": {"rabbitmq": {"host": RABBITMQ_HOST, "port": RABBITMQ_PORT, "exchange_name": broker.exchange}}
    }
    node_name = f"ours-{broker.id}"
    broker.node_queue(node_name)
    client = ZmqClient(original_node)
    try:
        with running_bus(backbones={"rabbitmq": backbone}, plugin_config=config, node_name=node_name) as bus:
            wait_until(lambda: bus.health()["connected"], 20, what="our node to connect")
            ours = Subscriber(bus)

            # original -> ours: a ZeroMQ publisher reaches the original's SUB socket only once
            # connected, so send until it arrives; our dedup makes the repeats harmless.
            theirs = indicator("10.30.0.1")
            deadline = time.monotonic() + 20
            got = None
            while got is None and time.monotonic() < deadline:
                client.send("stix2/indicator", theirs)
                try:
                    got = ours.queue.get(timeout=0.3)
                except Exception:
                    continue
            assert got is not None, f"nothing from the original node\n{original_node['log'].read_text()[-3000:]}"
            assert got.id == theirs.id and got.pattern == theirs.pattern

            # ours -> original: an indicator and a sighting published on our node.
            mine = indicator("10.30.0.2")
            seen = sighting(of=theirs, source="ours")
            bus.publish_queue.put(mine)
            bus.publish_queue.put(seen)
            # The original also echoes `theirs` (its own app's intel) to the client: skip those.
            received: dict[str, Any] = {}
            while not {mine.id, seen.id} <= received.keys():
                message = client.receive(15)
                received[message["id"]] = message
            assert received[mine.id]["pattern"] == mine.pattern
            assert received[seen.id]["sighting_of_ref"] == theirs.id
            assert received[seen.id]["x_threatbus_source"] == "ours"
            assert backbone.consumer.rejected == 0
    finally:
        client.close()


def test_what_an_original_node_published_is_in_our_new_nodes_snapshot(broker, original_node):
    """Mixed cluster: the log is bound to the shared exchange, so a node that joins later serves the original's intel."""
    import queue as queue_module
    from datetime import timedelta

    from threatbus.data import SnapshotEnvelope
    from threatbus.snapshots import SnapshotEnd

    config = {
        "backbones": {"rabbitmq": {"host": RABBITMQ_HOST, "port": RABBITMQ_PORT, "exchange_name": broker.exchange}}
    }
    # A first node of ours declares the log; then the original's app publishes while only the original listens.
    with running_bus(
        backbones={"rabbitmq": RabbitMQBackbone()}, plugin_config=config, node_name=f"first-{broker.id}"
    ) as bus:
        broker.node_queue(f"first-{broker.id}")
        wait_until(lambda: bus.health()["intel_log"] == "ready", 60, what="the log bound")
    client = ZmqClient(original_node)
    theirs = [indicator(f"10.31.0.{n}") for n in range(3)]
    try:
        # The original echoes its app's intel back to its client once it is on the exchange (and so in the log).
        pending = {m.id for m in theirs}
        deadline = time.monotonic() + 20
        while pending and time.monotonic() < deadline:
            for message in theirs:
                if message.id in pending:
                    client.send("stix2/indicator", message)
            try:
                pending.discard(client.receive(0.5)["id"])
            except AssertionError:
                continue
        assert not pending, f"the original did not carry its intel\n{original_node['log'].read_text()[-3000:]}"
    finally:
        client.close()
    node_name = f"late-{broker.id}"
    broker.node_queue(node_name)
    with running_bus(backbones={"rabbitmq": RabbitMQBackbone()}, plugin_config=config, node_name=node_name) as bus:
        wait_until(lambda: bus.health()["intel_log"] == "ready", 20, what="the log readable")
        sink: queue_module.Queue[Any] = queue_module.Queue()
        bus.subscribe("stix2/indicator", sink, snapshot=timedelta(days=1), snapshot_end=True)
        got = []
        while True:
            item = sink.get(timeout=30)
            if isinstance(item, SnapshotEnd):
                break
            if isinstance(item, SnapshotEnvelope):
                got.append(item.stix.id)
        # The original resends until echoed: the fold gives each id once all the same.
        assert sorted(got) == sorted(m.id for m in theirs)
        assert item.count == len(theirs)
