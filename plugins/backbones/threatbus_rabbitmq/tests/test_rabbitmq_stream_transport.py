"""``transport: stream``: nodes publish to and consume from the intel log over the stream protocol."""

from __future__ import annotations

import asyncio
import logging
import queue
from collections.abc import Iterator
from contextlib import contextmanager
from types import SimpleNamespace
from typing import Any

import orjson
import pytest
from testbus import running_bus

from threatbus.bus import Bus
from threatbus.routing import TopicRouter
from threatbus.testing import Subscriber, collect, indicator, wait_until
from threatbus_rabbitmq import RabbitMQBackbone
from threatbus_rabbitmq.intel_log import amqp_body, amqp_data, stream_entry
from threatbus_rabbitmq.stream_transport import StreamTransport

pytestmark = pytest.mark.rabbitmq


@contextmanager
def node(broker: Any, label: str, **overrides: Any) -> Iterator[tuple[Bus, RabbitMQBackbone]]:
    backbone = RabbitMQBackbone()
    overrides.setdefault("wait_for_subscribers", 0)
    config = broker.plugin_config(broker.queue(label), transport="stream", **overrides)
    with running_bus(backbones={"rabbitmq": backbone}, plugin_config=config, node_name=f"{label}-{broker.id}") as bus:
        yield bus, backbone


def ready(*buses: Bus) -> None:
    wait_until(lambda: all(bus.health()["consuming"] for bus in buses), 30, what="stream transport consuming")


def test_two_stream_nodes_get_every_message_once(broker):
    with node(broker, "a") as (bus_a, backbone_a), node(broker, "b") as (bus_b, _):
        ready(bus_a, bus_b)
        at_a, at_b = Subscriber(bus_a), Subscriber(bus_b)
        intel = [indicator(f"10.50.{i // 250}.{i % 250}") for i in range(2000)]
        for message in intel:
            bus_a.publish_queue.put(message)
        for subscriber in (at_a, at_b):
            got = collect(subscriber.queue, len(intel), 30)
            assert [m.id for m in got] == [m.id for m in intel]  # in order, once
        wait_until(lambda: backbone_a.stream.published == len(intel), 10, what="all confirmed")


def test_a_restarted_stream_node_resumes_where_it_stopped(broker, caplog):
    caplog.set_level(logging.INFO, logger="threatbus_rabbitmq")
    first = [indicator(f"10.51.0.{i}") for i in range(50)]
    meanwhile = [indicator(f"10.51.1.{i}") for i in range(200)]
    with node(broker, "pub") as (bus_pub, _):
        ready(bus_pub)
        with node(broker, "sub") as (bus_sub, _):
            ready(bus_sub)
            at_sub = Subscriber(bus_sub)
            for message in first:
                bus_pub.publish_queue.put(message)
            collect(at_sub.queue, len(first), 30)
        for message in meanwhile:
            bus_pub.publish_queue.put(message)
        wait_until(lambda: bus_pub.health()["unconfirmed"] == 0, 10)
        # Restarted, its app subscribes a moment later: what waited in the stream is held for it.
        with node(broker, "sub", wait_for_subscribers=15) as (bus_sub, _):
            wait_until(lambda: bus_sub.health()["connected"], 30)
            assert not bus_sub.health()["consuming"]
            at_sub = Subscriber(bus_sub)
            got = collect(at_sub.queue, len(meanwhile), 30)
            assert [m.id for m in got] == [m.id for m in meanwhile]
    assert any("resuming after offset" in r.getMessage() for r in caplog.records)


def test_stream_transport_warns_that_original_nodes_are_left_out(broker, caplog):
    caplog.set_level(logging.WARNING, logger="threatbus_rabbitmq")
    with node(broker, "a") as (bus, _):
        ready(bus)
    assert any("original Threat Bus nodes" in r.getMessage() for r in caplog.records)


def test_what_is_published_on_the_exchange_reaches_stream_nodes_and_garbage_is_skipped(broker):
    with node(broker, "a") as (bus, backbone):
        ready(bus)
        wait_until(lambda: bus.health()["intel_log"] == "ready", 20)
        at = Subscriber(bus)
        foreign = indicator("10.52.0.1")
        # Well-formed, but its pattern does not parse: what an app would be refused, foreign producers are too.
        bad_pattern = dict(indicator("10.52.0.2").payload, pattern="[ipv4-addr:value = '10.52.0.2'")
        # As an original node publishes: plain JSON on the shared exchange, which the log is bound to.
        broker.publish_raw([b"not json", b'{"type": "indicator"}', orjson.dumps(bad_pattern), foreign.encode()])
        assert collect(at.queue, 1, 20) == [foreign]
        assert backbone.stream.rejected == 3
        assert backbone.stream.foreign == 2  # the two that decoded were checked; our own entries are not


def test_stream_entries_tell_our_stream_nodes_from_other_writers():
    body = indicator("10.52.1.1").encode()
    assert stream_entry(amqp_data(body)) == (body, True)
    assert amqp_body(amqp_data(body)) == body  # readers that know no marker still find the body
    plain = b"\x00Su\xb0" + len(body).to_bytes(4, "big") + body  # rstream's AMQPMessage, another producer
    assert stream_entry(plain) == (body, False)
    with pytest.raises(ValueError):
        stream_entry(amqp_data(body)[:-1])  # cut short: neither ours nor anything else


def test_stream_transport_without_the_log_is_a_config_error(broker):
    from threatbus.errors import ConfigError

    with pytest.raises(ConfigError, match="history.enabled"), node(broker, "a", history={"enabled": False}):
        pass


def test_sub_entry_batches_keep_order_and_stay_under_their_size():
    from threatbus_rabbitmq.sub_entries import SUB_ENTRY_BYTES, SubEntryPublisher

    entries = [bytes([i % 256]) * 1000 for i in range(600)] + [b"x" * (SUB_ENTRY_BYTES + 1)] + [b"y" * 10]
    parts = SubEntryPublisher.split(entries)
    assert [e for part in parts for e in entries[part]] == entries  # every entry once, in order
    assert all(
        sum(len(e) + 4 for e in entries[part]) <= SUB_ENTRY_BYTES for part in parts if part.stop - part.start > 1
    )
    assert [entries[part] for part in parts].count([b"x" * (SUB_ENTRY_BYTES + 1)]) == 1  # too large: alone
    assert SubEntryPublisher.split([]) == []


class _FakeProducer:
    """rstream's producer as the sub-entry publisher uses it: ``confirm_early`` confirms before send returns."""

    def __init__(self, closing: bool = False, confirm_early: bool = False) -> None:
        self.closing = closing
        self.confirm_early = confirm_early
        self.next_id = 0
        self.records: list[int] = []

    async def _send_batch_async(self, stream: str, batch: list[Any]) -> list[int]:
        if self.closing:
            return []
        (notification,) = batch
        self.next_id += notification.entry.messages_count()
        self.records.append(notification.entry.messages_count())
        if self.confirm_early:
            notification.callback(SimpleNamespace(message_id=self.next_id, is_confirmed=True))
        return [self.next_id]


def _transport(producer: _FakeProducer) -> StreamTransport:
    from threatbus_rabbitmq.sub_entries import SubEntryPublisher

    broker = SimpleNamespace(queue_name="threatbus.t", dedup_window=100, reconnect_initial=1, reconnect_max=2)
    transport = StreamTransport(broker, SimpleNamespace(stream="tb.log"), None, queue.SimpleQueue(), TopicRouter())  # type: ignore[arg-type]
    transport._sub_entries = SubEntryPublisher.open(producer)
    return transport


def test_a_sub_entry_is_confirmed_for_all_its_messages_whenever_the_confirm_comes():
    intel = [indicator(f"10.53.0.{i}") for i in range(10)]
    late, early = _FakeProducer(), _FakeProducer(confirm_early=True)
    transport = _transport(late)
    asyncio.run(transport._send(None, intel))
    assert late.records == [10] and transport.in_flight == 10 and transport.published == 0
    transport._on_confirm(SimpleNamespace(message_id=10, is_confirmed=True))
    assert transport.in_flight == 0 and transport.published == 10
    transport = _transport(early)  # the broker's confirm overtook the send's return
    asyncio.run(transport._send(None, intel))
    assert transport.in_flight == 0 and transport.published == 10


def test_what_a_closing_producer_did_not_take_is_kept_for_the_reconnect():
    intel = [indicator(f"10.53.1.{i}") for i in range(5)]
    transport = _transport(_FakeProducer(closing=True))
    asyncio.run(transport._send(None, intel))
    assert transport._unsent == intel and transport.in_flight == 0
