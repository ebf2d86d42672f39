"""Broker restarts and killed connections mid-stream: all delivered, none twice.

These tests disturb every user of the shared broker (``stop_app`` closes all
connections), so they are marked ``broker_disruptive``, kept to two, and
always bring the broker back before they end.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from threatbus.bus import Bus
from threatbus.testing import Subscriber, ThreadedCollector, indicator, wait_until
from threatbus_rabbitmq import RabbitMQBackbone

pytestmark = [pytest.mark.rabbitmq, pytest.mark.broker_disruptive]

N = 3000


@contextmanager
def node(broker: Any, label: str) -> Iterator[tuple[Bus, RabbitMQBackbone, ThreadedCollector]]:
    """``broker.node`` that waits until connected and collects what its subscriber receives."""
    with broker.node(label) as (bus, backbone):
        wait_until(lambda: bus.health()["connected"], 20, what=f"{label} to connect")
        collector = ThreadedCollector(Subscriber(bus).queue)
        collector.start()
        try:
            yield bus, backbone, collector
        finally:
            collector.close()


class PacedProducer(threading.Thread):
    """Puts ``messages`` into a node's publish queue at a steady rate, as an app would."""

    def __init__(self, bus: Bus, messages: list[Any], per_second: float) -> None:
        super().__init__(name="paced-producer")
        self.bus, self.messages, self.interval = bus, messages, 1.0 / per_second
        self.sent = 0

    def run(self) -> None:
        start = time.monotonic()
        for i, message in enumerate(self.messages):
            delay = start + i * self.interval - time.monotonic()
            if delay > 0:
                time.sleep(delay)  # load shaping, not synchronisation
            self.bus.publish_queue.put(message)
            self.sent += 1


def assert_all_once(collector: ThreadedCollector, ids: set[str], who: str, timeout: float = 60) -> None:
    wait_until(lambda: len(collector.items) >= len(ids), timeout, what=f"{len(ids)} messages at {who}")
    got = [m.id for m in collector.items]
    assert len(got) == len(set(got)), f"{who} got {len(got) - len(set(got))} duplicate(s)"
    assert set(got) == ids, f"{who} misses {len(ids - set(got))}"


def test_killed_connections_lose_nothing_and_repeat_nothing(broker, ctl):
    intel = [indicator(f"10.20.{i // 250}.{i % 250}") for i in range(N)]
    ids = {m.id for m in intel}
    with node(broker, "kill-a") as (bus_a, backbone_a, at_a), node(broker, "kill-b") as (bus_b, backbone_b, at_b):
        producer = PacedProducer(bus_a, intel, per_second=1000)
        producer.start()
        for threshold in (N // 4, N // 2):
            wait_until(lambda t=threshold: len(at_b.items) >= t, 30, what=f"{threshold} messages before the kill")
            # Only this test's connections: both nodes' publisher and consumer.
            assert ctl.close_connections(broker.id, roles=("publisher", "consumer")) == 4
        producer.join(30)
        assert_all_once(at_a, ids, "node a")
        assert_all_once(at_b, ids, "node b")
        # The kills really happened and were recovered from (the last kill may land after the last message).
        wait_until(
            lambda: backbone_a.publisher.connects >= 3 and backbone_b.consumer.connects >= 3,
            20,
            what="two reconnects of each killed connection",
        )
        wait_until(lambda: bus_a.health()["connected"] and bus_b.health()["connected"], 20, what="both to reconnect")
        assert bus_a.health()["outbox"] == 0 and bus_a.health()["unconfirmed"] == 0


def test_broker_restart_mid_stream_holds_then_delivers_everything_once(broker, ctl):
    before = [indicator(f"10.21.{i // 250}.{i % 250}") for i in range(1500)]
    during = [indicator(f"10.22.{i // 250}.{i % 250}") for i in range(500)]
    after = [indicator(f"10.23.{i // 250}.{i % 250}") for i in range(500)]
    ids = {m.id for m in before + during + after}
    with node(broker, "restart-a") as (bus_a, backbone_a, at_a), node(broker, "restart-b") as (_, _, at_b):
        producer = PacedProducer(bus_a, before, per_second=1000)
        producer.start()
        wait_until(lambda: len(at_b.items) >= 300, 30, what="messages flowing before the restart")

        def while_down() -> None:
            # Apps keep publishing during the outage: the node holds their messages.
            wait_until(lambda: not bus_a.health()["connected"], 20, what="node a to notice the outage")
            for message in during:
                bus_a.publish_queue.put(message)
            wait_until(lambda: bus_a.health()["outbox"] >= len(during), 20, what="messages held during the outage")

        ctl.restart_app(while_down)
        producer.join(30)
        for message in after:
            bus_a.publish_queue.put(message)
        assert_all_once(at_a, ids, "node a", timeout=90)
        assert_all_once(at_b, ids, "node b", timeout=90)
        assert backbone_a.publisher.connects >= 2
        assert bus_a.health()["outbox"] == 0
