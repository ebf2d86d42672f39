"""``queue.type: quorum`` against the real broker: declaration, delivery, a node restart, a second node."""

from __future__ import annotations

import logging
from contextlib import ExitStack
from typing import Any

import pika
import pytest

from threatbus.bus import Bus
from threatbus.testing import Subscriber, assert_nothing_more, collect, indicator, wait_until

pytestmark = pytest.mark.rabbitmq

QUORUM = {"queue": {"type": "quorum"}}


def consuming(*buses: Bus) -> None:
    wait_until(lambda: all(bus.health()["consuming"] for bus in buses), 20, what="backbones to consume")


def redeclare_refused(broker: Any, queue: str, arguments: dict[str, Any]) -> str:
    """Re-declare ``queue`` with ``arguments``; the broker's refusal (406) tells what the queue really is."""
    connection = broker.connect()
    try:
        with pytest.raises(pika.exceptions.ChannelClosedByBroker) as refused:
            connection.channel().queue_declare(queue, durable=True, arguments=arguments)
        assert refused.value.reply_code == 406
        return refused.value.reply_text
    finally:
        if connection.is_open:
            connection.close()


def test_a_quorum_queue_delivers_and_keeps_messages_across_a_node_restart(broker):
    with broker.node("sender", wait_for_subscribers=0) as (sender, _):  # no app: consumes at once
        with broker.node("qq", **QUORUM) as (bus, backbone):
            app = Subscriber(bus)
            consuming(sender, bus)
            queue = backbone.settings.queue_name
            # It really is a quorum queue with single active consumer: declaring it otherwise is refused.
            assert "x-queue-type" in redeclare_refused(
                broker, queue, {"x-queue-type": "classic", "x-single-active-consumer": True}
            )
            assert "x-single-active-consumer" in redeclare_refused(broker, queue, {"x-queue-type": "quorum"})
            first = [indicator(f"10.50.0.{i}") for i in range(20)]
            for message in first:
                sender.publish_queue.put(message)
            assert [m.id for m in collect(app.queue, 20)] == [m.id for m in first]

        meanwhile = [indicator(f"10.50.1.{i}") for i in range(20)]
        for message in meanwhile:
            sender.publish_queue.put(message)
        wait_until(lambda: broker.message_count(queue) == 20, 20, what="the backlog in the quorum queue")

        with broker.node("qq", **QUORUM) as (bus, backbone):
            app = Subscriber(bus)
            assert [m.id for m in collect(app.queue, 20)] == [m.id for m in meanwhile]
            assert_nothing_more(app.queue)
            assert backbone.consumer.backlog_at_connect == 20


def test_a_second_node_on_the_same_quorum_queue_stands_by_then_takes_over(broker, caplog):
    suffix = broker.queue("sharedqq")
    with ExitStack() as first_node:
        bus_one, first = first_node.enter_context(broker.node("one", suffix=suffix, **QUORUM))
        at_one = Subscriber(bus_one)
        consuming(bus_one)
        with broker.node("two", suffix=suffix, **QUORUM) as (bus_two, second):
            at_two = Subscriber(bus_two)
            consuming(bus_two)  # accepted by the broker, but not the active consumer
            intel = [indicator(f"10.51.0.{i}") for i in range(20)]
            for message in intel:
                bus_two.publish_queue.put(message)
            assert {m.id for m in collect(at_one.queue, 20)} == {m.id for m in intel}
            assert_nothing_more(at_two.queue, within=0.5)
            assert second.consumer.consumed == 0 and first.consumer.consumed == 20
            errors = [
                r.getMessage()
                for r in caplog.records
                if r.name.startswith("threatbus_rabbitmq") and r.levelno == logging.ERROR
            ]
            assert any("already has 1 consumer(s)" in m and "stands by" in m for m in errors), errors

            first_node.close()  # the active node goes: the one standing by takes over
            later = [indicator(f"10.51.1.{i}") for i in range(10)]
            for message in later:
                bus_two.publish_queue.put(message)
            assert [m.id for m in collect(at_two.queue, 10)] == [m.id for m in later]
            assert_nothing_more(at_two.queue)


def test_switching_an_existing_classic_queue_to_quorum_is_explained(broker, caplog):
    suffix = broker.queue("switch")
    with broker.node("switch", suffix=suffix, wait_for_subscribers=0) as (bus, _):
        consuming(bus)
    caplog.clear()
    with broker.node("switch", suffix=suffix, **QUORUM) as (bus, _):
        wait_until(
            lambda: any("PRECONDITION_FAILED" in r.getMessage() for r in caplog.records if r.levelno == logging.ERROR),
            15,
            what="the 406 of the queue declaration",
        )
        explained = next(r.getMessage() for r in caplog.records if "channel closed by the broker" in r.getMessage())
        assert "x-queue-type" in explained and "queue.type" in explained
        assert not bus.health()["consuming"]
