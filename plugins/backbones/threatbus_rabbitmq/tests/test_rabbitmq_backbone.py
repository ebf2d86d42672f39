"""In-process tests of the RabbitMQ backbone against the real broker."""

from __future__ import annotations

import logging
import time
from contextlib import ExitStack
from datetime import datetime, timedelta, timezone
from typing import Any

import orjson
import pytest
from testbus import running_bus

import threatbus
from threatbus.bus import Bus
from threatbus.data import SnapshotEnvelope
from threatbus.lifecycle import REMOVE
from threatbus.metrics import BACKBONE_CONNECTED, BACKBONE_CONSUMED, BACKBONE_PUBLISHED, BACKBONE_REJECTED, DROPPED
from threatbus.stix import timestamp
from threatbus.testing import (
    Subscriber,
    assert_nothing_more,
    collect,
    free_port,
    get_within,
    indicator,
    sighting,
    wait_until,
)
from threatbus_rabbitmq import RabbitMQBackbone
from threatbus_rabbitmq.plugin import DUPLICATES

pytestmark = pytest.mark.rabbitmq


class HoldingApp:
    """An app that answers snapshot requests with the indicators it holds."""

    def __init__(self, held: list[Any]) -> None:
        self.held = held
        self.requests: list[Any] = []

    @threatbus.app
    def snapshot(self, snapshot_request: Any, result_queue: Any) -> None:
        self.requests.append(snapshot_request)
        for item in self.held:
            result_queue.put(SnapshotEnvelope.wrap(snapshot_request, item))


def ours(caplog: Any) -> list[logging.LogRecord]:
    """The log records of this plugin (pika logs the same events in its own words)."""
    return [r for r in caplog.records if r.name.startswith("threatbus_rabbitmq")]


def connected(*buses: Bus) -> None:
    """Both connections up (the consumer may still hold back until an app subscribes: wait_for_subscribers)."""
    wait_until(lambda: all(bus.health()["connected"] for bus in buses), 20, what="backbones to connect")


def consuming(*buses: Bus) -> None:
    wait_until(lambda: all(bus.health()["consuming"] for bus in buses), 20, what="backbones to consume")


def test_every_node_the_sender_included_gets_each_message_once(broker):
    with broker.node("a") as (bus_a, _), broker.node("b") as (bus_b, _):
        connected(bus_a, bus_b)
        at_a, at_b = Subscriber(bus_a), Subscriber(bus_b)
        sightings_only = Subscriber(bus_b, topic="stix2/sighting")
        intel = [indicator(f"10.3.0.{i}") for i in range(50)]
        seen = sighting(of=intel[0])
        for message in [*intel, seen]:
            bus_a.publish_queue.put(message)
        for subscriber in (at_a, at_b):
            got = collect(subscriber.queue, 51, timeout=20)
            assert sorted(m.id for m in got) == sorted(m.id for m in [*intel, seen])
            assert_nothing_more(subscriber.queue)
        # Order is kept from one publisher; prefix subscriptions get only their topic.
        assert [m.id for m in got[:50]] == [m.id for m in intel]
        assert get_within(sightings_only.queue).id == seen.id
        assert_nothing_more(sightings_only.queue)
        assert bus_a.metrics.value(BACKBONE_CONNECTED, backbone="rabbitmq") == 1

        bus_b.unsubscribe("stix2", at_b.queue)
        bus_a.publish_queue.put(indicator("10.3.1.1"))
        get_within(at_a.queue)
        assert_nothing_more(at_b.queue)
        health = bus_b.health()
        assert health["backbone"] == "rabbitmq" and health["queue"] == f"threatbus.b-{broker.id}"


def test_garbage_on_the_exchange_is_logged_rejected_and_does_not_block(broker, caplog):
    garbage = [
        b"\x00\xffnot json at all",
        b"[1, 2, 3]",
        b'{"type": "malware", "id": "malware--1"}',
        b'{"type": "indicator", "id": "indicator--1"}',
        b'{"type": "snapshotrequest", "snapshot_type": 7, "snapshot_id": "x", "snapshot": 1}',
    ]
    with broker.node("poison") as (bus, backbone):
        connected(bus)
        subscriber = Subscriber(bus)
        valid = [indicator(f"10.4.0.{i}") for i in range(6)]
        bodies = [valid[0].encode()]
        for bad, good in zip(garbage, valid[1:], strict=True):
            bodies += [bad, good.encode()]
        broker.publish_raw(bodies)
        assert [m.id for m in collect(subscriber.queue, 6)] == [m.id for m in valid]
        wait_until(lambda: backbone.consumer.rejected == 5, what="5 rejections")
        assert bus.metrics.value(BACKBONE_REJECTED, backbone="rabbitmq") == 5
        wait_until(lambda: broker.message_count(f"threatbus.poison-{broker.id}") == 0, what="an empty queue")
        assert bus.health()["connected"]
    logged = [r.getMessage() for r in ours(caplog) if "rejected invalid message" in r.getMessage()]
    assert len(logged) == 5
    assert "not valid JSON" in logged[0] and "unknown message type 'malware'" in logged[2]


def test_repeated_messages_reach_subscribers_once(broker):
    with broker.node("dedup") as (bus, _backbone):
        connected(bus)
        subscriber = Subscriber(bus)
        first, second = indicator("10.5.0.1"), indicator("10.5.0.2")
        # The same indicator again (as after a resend), and an update of it that is not a repeat.
        update = type(first)({**first.payload, "modified": "2030-01-01T00:00:00.000Z"})
        broker.publish_raw([first.encode(), first.encode(), second.encode(), first.encode(), update.encode()])
        got = collect(subscriber.queue, 3)
        assert [(m.id, m.modified) for m in got] == [
            (first.id, first.modified),
            (second.id, second.modified),
            (first.id, "2030-01-01T00:00:00.000Z"),
        ]
        assert_nothing_more(subscriber.queue)
        assert bus.metrics.value(DUPLICATES, backbone="rabbitmq") == 2


def test_a_second_node_on_the_same_queue_is_refused_loudly(broker, caplog):
    suffix = broker.queue("shared")
    config = broker.plugin_config(suffix)
    first, second = RabbitMQBackbone(), RabbitMQBackbone()
    with running_bus(backbones={"rabbitmq": first}, plugin_config=config, node_name=f"one-{broker.id}") as bus_one:
        at_one = Subscriber(bus_one)
        consuming(bus_one)
        with running_bus(backbones={"rabbitmq": second}, plugin_config=config, node_name=f"two-{broker.id}") as bus_two:
            at_two = Subscriber(bus_two)
            wait_until(
                lambda: any("ACCESS_REFUSED" in r.getMessage() for r in ours(caplog)),
                15,
                what="the second consumer to be refused",
            )
            assert any("already has 1 consumer(s)" in r.getMessage() for r in ours(caplog))
            assert not bus_two.health()["consumer_connected"]
            intel = [indicator(f"10.6.0.{i}") for i in range(20)]
            for message in intel:
                bus_two.publish_queue.put(message)
            # The first node gets everything; the second shares nothing of its queue.
            assert {m.id for m in collect(at_one.queue, 20)} == {m.id for m in intel}
            assert_nothing_more(at_two.queue, within=0.5)
            assert second.consumer.consumed == 0


def test_declarations_match_the_original_so_old_nodes_share_the_exchange(broker):
    # An "original" node, declared exactly as Threat Bus 2022.5.16 does: fanout exchange
    # with pika's defaults (not durable), a lazy queue with x-max-length, bound with "".
    connection = broker.connect()
    channel = connection.channel()
    channel.exchange_declare(exchange=broker.exchange, exchange_type="fanout")
    old_queue = f"threatbus.{broker.queue('old')}"
    channel.queue_declare(
        old_queue,
        durable=True,
        exclusive=False,
        auto_delete=False,
        arguments={"x-queue-mode": "lazy", "x-max-length": 100},
    )
    channel.queue_bind(old_queue, broker.exchange, routing_key="")
    try:
        with broker.node("new", queue={"max_items": 100}) as (bus, _):
            connected(bus)
            subscriber = Subscriber(bus)
            ours = indicator("10.7.0.1")
            bus.publish_queue.put(ours)
            get_within(subscriber.queue)
            # The old node gets our message as the plain JSON it knows ...
            body = wait_until(lambda: channel.basic_get(old_queue, auto_ack=True)[2], 10, what="our message")
            assert orjson.loads(body) == ours.payload
            # ... and what it publishes (plain JSON, no properties) reaches our subscribers.
            theirs = indicator("10.7.0.2")
            channel.basic_publish(broker.exchange, "", theirs.encode())
            assert get_within(subscriber.queue).id == theirs.id
    finally:
        connection.close()


def test_a_conflicting_declaration_is_explained_and_retried(broker, caplog):
    connection = broker.connect()
    connection.channel().exchange_declare(exchange=broker.exchange, exchange_type="fanout")  # not durable
    try:
        with broker.node("conflict", exchange_durable=True) as (bus, _):
            wait_until(
                lambda: sum("PRECONDITION_FAILED" in r.getMessage() for r in ours(caplog)) >= 4,
                15,
                what="repeated 406 errors",
            )
            assert not bus.health()["connected"]
            explained = [r for r in ours(caplog) if "PRECONDITION_FAILED" in r.getMessage()]
            assert "exchange_durable" in explained[0].getMessage()
            assert explained[0].levelno == logging.ERROR
    finally:
        connection.close()


def test_an_unreachable_broker_is_retried_and_messages_are_held(broker, caplog):
    port = free_port()
    with broker.node("nobroker", port=port, stop_timeout=1.0) as (bus, backbone):
        for i in range(3):
            bus.publish_queue.put(indicator(f"10.8.0.{i}"))
        wait_until(lambda: bus.health()["outbox"] == 3, what="3 held messages")
        wait_until(
            lambda: any("(attempt 3)" in r.getMessage() for r in ours(caplog)), 15, what="three connection attempts"
        )
        assert not bus.health()["connected"]
        first = next(r for r in ours(caplog) if "cannot connect to RabbitMQ" in r.getMessage())
        assert first.levelno == logging.ERROR
        assert f"amqp://guest@127.0.0.1:{port}/ (attempt 1)" in first.getMessage()
        assert "guest@" in first.getMessage() and "password" not in first.getMessage()
        started = time.monotonic()
    assert time.monotonic() - started < 5, "stop must be bounded while the broker is down"
    assert any("3 message(s) not confirmed" in r.getMessage() for r in ours(caplog))
    assert backbone.publisher.published == 0


def test_stop_sends_and_confirms_what_apps_published_last(broker):
    with broker.node("receiver") as (bus_r, _):
        connected(bus_r)
        subscriber = Subscriber(bus_r)
        with ExitStack() as stack:
            bus_s, sender = stack.enter_context(broker.node("sender"))
            connected(bus_s)
            intel = [indicator(f"10.9.{i // 250}.{i % 250}") for i in range(2000)]
            for message in intel:
                bus_s.publish_queue.put(message)
        # Leaving the block stopped the sender right away: everything was still confirmed.
        assert sender.publisher.published == 2000
        assert len(sender.outbox) == 0
        assert {m.id for m in collect(subscriber.queue, 2000, timeout=30)} == {m.id for m in intel}


def test_a_full_subscriber_queue_loses_messages_counted_not_the_consumer(broker):
    import queue

    with broker.node("slow") as (bus, backbone):
        connected(bus)
        tiny: queue.Queue[Any] = queue.Queue(maxsize=2)
        bus.subscribe("stix2", tiny)
        normal = Subscriber(bus)
        for i in range(5):
            bus.publish_queue.put(indicator(f"10.10.0.{i}"))
        collect(normal.queue, 5)
        assert tiny.qsize() == 2
        assert bus.metrics.value(DROPPED, where="rabbitmq") == 3
        assert backbone.consumer.consumed == 5


def test_what_cannot_be_sent_is_dropped_and_counted_without_stalling_the_publisher(broker):
    with broker.node("odd") as (bus, backbone):
        connected(bus)
        subscriber = Subscriber(bus)
        broken = indicator("10.11.0.1")
        broken.payload["x_odd"] = {1, 2}  # a set: no JSON for it
        bus.publish_queue.put(broken)
        bus.publish_queue.put("not a message")  # type: ignore[arg-type]
        fine = indicator("10.11.0.2")
        bus.publish_queue.put(fine)
        assert get_within(subscriber.queue).id == fine.id
        assert_nothing_more(subscriber.queue)
        assert bus.metrics.value(DROPPED, where="rabbitmq-invalid") == 2
        assert backbone.publisher.connected and len(backbone.outbox) == 0


def test_an_unexpected_error_in_the_consumer_reconnects_instead_of_dying(broker, caplog):
    with broker.node("buggy") as (bus, backbone):
        connected(bus)
        subscriber = Subscriber(bus)
        consumer = backbone.consumer
        original_ack = consumer._ack
        failures = []

        def ack_failing_once() -> None:
            if not failures:
                failures.append(True)
                raise RuntimeError("injected bug")
            original_ack()

        consumer._ack = ack_failing_once  # type: ignore[method-assign]
        first, second = indicator("10.12.0.1"), indicator("10.12.0.2")
        bus.publish_queue.put(first)
        assert get_within(subscriber.queue).id == first.id
        wait_until(lambda: consumer.connects == 2 and consumer.connected, 15, what="the consumer to reconnect")
        bus.publish_queue.put(second)
        # The unacked first message came again and was recognised as a repeat.
        assert get_within(subscriber.queue).id == second.id
        assert_nothing_more(subscriber.queue)
        assert consumer.duplicates == 1
    # Our code logs the bug with its traceback (pika, whose loggers are quiet, would abort the connection).
    bugs = [r for r in ours(caplog) if r.levelno == logging.ERROR and "injected bug" in r.getMessage()]
    assert len(bugs) == 1 and bugs[0].exc_info is not None
    assert "unexpected error handling a delivery" in bugs[0].getMessage()


def test_a_snapshot_request_is_answered_by_an_app_on_another_node(broker):
    held = [indicator("10.13.0.1"), indicator("10.13.0.2")]
    holder = HoldingApp(held)
    # The holder's app subscribes to nothing: its node consumes at once instead of waiting for a subscriber.
    apps = {"holder": holder}
    with broker.node("asker") as (asker, _), broker.node("holder", apps, wait_for_subscribers=0) as (other, _):
        connected(asker, other)
        requester = Subscriber(asker, "stix2/indicator", snapshot=timedelta(days=2))
        envelopes = collect(requester.queue, 2, timeout=15)
        assert {e.stix.id for e in envelopes} == {i.id for i in held}
        assert {e.snapshot_id for e in envelopes} == set(requester.snapshot_ids)
        assert_nothing_more(requester.queue)
        assert [r.snapshot for r in holder.requests] == [timedelta(days=2)]


def test_expiry_is_delivered_on_every_node_without_crossing_the_broker(broker):
    with broker.node("a") as (bus_a, _), broker.node("b") as (bus_b, _):
        connected(bus_a, bus_b)
        at_a, at_b = Subscriber(bus_a, "stix2/indicator"), Subscriber(bus_b, "stix2/indicator")
        consuming(bus_a, bus_b)
        now = datetime.now(timezone.utc)
        ioc = indicator(
            "10.9.0.1",
            valid_from=timestamp(now - timedelta(hours=1)),
            valid_until=timestamp(now + timedelta(seconds=1.5)),
        )
        bus_a.publish_queue.put(ioc)
        for subscriber in (at_a, at_b):
            assert get_within(subscriber.queue, 20) == ioc
        for subscriber in (at_a, at_b):
            removal = get_within(subscriber.queue, 5)
            assert removal.id == ioc.id and removal.payload["x_threatbus_update"] == REMOVE
            assert_nothing_more(subscriber.queue)
        # One message went through the broker: the indicator; each node expired it on its own.
        assert bus_a.metrics.value(BACKBONE_PUBLISHED, backbone="rabbitmq") == 1
        assert bus_b.metrics.value(BACKBONE_PUBLISHED, backbone="rabbitmq") == 0
        assert bus_b.metrics.value(BACKBONE_CONSUMED, backbone="rabbitmq") == 1
