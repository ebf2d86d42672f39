"""After a start, the consumer holds the queue's backlog until an app subscribes (``wait_for_subscribers``)."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from threatbus.bus import Bus
from threatbus.testing import Subscriber, assert_nothing_more, collect, indicator, wait_until
from threatbus_rabbitmq import RabbitMQBackbone

pytestmark = pytest.mark.rabbitmq


@contextmanager
def declared(broker: Any, label: str) -> Iterator[str]:
    """Start and stop the node ``label`` once, so that its queue exists; yields the queue name."""
    with broker.node(label, wait_for_subscribers=0) as (bus, _):
        wait_until(lambda: bus.health()["consuming"], 20, what=f"node {label!r} to consume")
    yield f"threatbus.{label}-{broker.id}"


def ours(caplog: Any) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name.startswith("threatbus_rabbitmq")]


def holding(bus: Bus, messages: int) -> None:
    def held() -> bool:
        # "connected" needs the publisher too, which connects on its own thread: wait for it as well.
        health = bus.health()
        return health["connected"] and health["waiting_for_subscribers"] and health["held_messages"] == messages

    wait_until(held, 20, what=f"the node to connect and its consumer to hold {messages} message(s)")


def assert_still_holding(bus: Bus, backbone: RabbitMQBackbone, seconds: float) -> None:
    """For ``seconds``, nothing is consumed (an app that reconnects slowly finds the backlog still there)."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        health = bus.health()
        assert health["connected"] and health["waiting_for_subscribers"] and not health["consuming"]
        assert backbone.consumer.consumed == 0
        time.sleep(0.1)  # sampling a condition over a window, not synchronisation


def test_what_came_while_a_node_was_down_reaches_an_app_subscribing_seconds_after_its_restart(broker, caplog):
    with broker.node("sender") as (sender, _):
        with broker.node("late") as (late, _):
            Subscriber(late)
            wait_until(lambda: late.health()["consuming"], 20, what="node 'late' to consume")
        meanwhile = [indicator(f"10.40.0.{i}") for i in range(30)]
        for message in meanwhile:
            sender.publish_queue.put(message)
        queue = f"threatbus.late-{broker.id}"
        wait_until(lambda: broker.message_count(queue) == 30, 20, what="the backlog in the stopped node's queue")

        caplog.clear()
        with broker.node("late") as (late, backbone):  # restarted; its app has not subscribed again yet
            holding(late, 30)
            hold = late.health()["hold_seconds_left"]
            assert 10 < hold <= 15, hold  # the default bound
            assert_still_holding(late, backbone, 2.0)
            assert broker.message_count(queue) == 30
            # Messages published during the hold are kept in the queue as well.
            during = indicator("10.40.1.1")
            sender.publish_queue.put(during)
            wait_until(lambda: broker.message_count(queue) == 31, 20, what="a message published during the hold")

            app = Subscriber(late)  # the app is back
            got = collect(app.queue, 31, timeout=20)
            assert [m.id for m in got] == [m.id for m in [*meanwhile, during]]
            assert_nothing_more(app.queue)
            assert late.health()["consuming"] and not late.health()["waiting_for_subscribers"]
            assert late.health()["hold_seconds_left"] is None and late.health()["held_messages"] == 0
    logged = ours(caplog)
    assert any(
        "holding 30 waiting message(s) in queue" in m and "until an app subscribes" in m and "at most 15s" in m
        for m in logged
    ), logged
    assert any("an app subscribed after" in m and "consuming now" in m for m in logged)


def test_without_any_subscriber_consumption_starts_after_the_bound(broker, caplog):
    backlog = [indicator(f"10.41.0.{i}") for i in range(5)]
    with declared(broker, "lonely") as queue:
        broker.publish_raw([m.encode() for m in backlog])
    wait_until(lambda: broker.message_count(queue) == 5, 10, what="the backlog")

    caplog.clear()
    started = time.monotonic()
    with broker.node("lonely", wait_for_subscribers=1.5) as (bus, backbone):
        # The core subscribes to threatbus/* for snapshots at once: that is no app and does not end the hold.
        holding(bus, 5)
        wait_until(lambda: backbone.consumer.consumed == 5, 20, what="consumption after the bound")
        elapsed = time.monotonic() - started
        assert 1.4 <= elapsed < 10, elapsed
        assert bus.health()["consuming"]
        wait_until(lambda: broker.message_count(queue) == 0, 10, what="the queue to be drained")
    warnings = [
        r for r in caplog.records if r.name.startswith("threatbus_rabbitmq") and "no app subscribed" in r.getMessage()
    ]
    assert len(warnings) == 1 and warnings[0].levelno == logging.WARNING
    assert "within 2s" in warnings[0].getMessage() and "5 message(s) at connect" in warnings[0].getMessage()


def test_stop_during_the_hold_is_prompt_and_keeps_the_backlog(broker):
    with declared(broker, "stopper") as queue:
        broker.publish_raw([indicator(f"10.42.0.{i}").encode() for i in range(3)])
    wait_until(lambda: broker.message_count(queue) == 3, 10, what="the backlog")

    with broker.node("stopper", wait_for_subscribers=60) as (bus, backbone):
        holding(bus, 3)
        started = time.monotonic()
    assert time.monotonic() - started < 2.0, "stopping while holding must not wait for the bound"
    assert backbone.consumer.consumed == 0 and not backbone.consumer.is_alive()
    assert broker.message_count(queue) == 3  # nothing consumed, nothing lost


def test_a_reconnect_consumes_at_once_without_holding_again(broker, caplog):
    with broker.node("again", wait_for_subscribers=30) as (bus, backbone):
        holding(bus, 0)
        app = Subscriber(bus)
        wait_until(lambda: bus.health()["consuming"], 20, what="consuming")
        bus.unsubscribe("stix2", app.queue)
        consumer = backbone.consumer
        # A dropped connection (closed from the consumer's own thread, as a failure would).
        assert consumer.call_threadsafe(consumer.close)
        wait_until(lambda: consumer.connects == 2 and consumer.connected, 20, what="the consumer to reconnect")
        assert bus.health()["consuming"] and not bus.health()["waiting_for_subscribers"]
        broker.publish_raw([indicator("10.43.0.1").encode()])
        wait_until(lambda: consumer.consumed == 1, 10, what="consumption without a subscriber")
    assert sum("holding" in m and "waiting message(s)" in m for m in ours(caplog)) == 1
