"""The intel log in a RabbitMQ stream, in-process against the real broker."""

from __future__ import annotations

import logging
import queue
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone
from typing import Any

import pika
import pytest
from testbus import running_bus

from threatbus import config as core_config
from threatbus.bus import Bus
from threatbus.data import SnapshotEnvelope, SnapshotType, decode
from threatbus.snapshots import SnapshotEnd
from threatbus.testing import Subscriber, free_port, get_within, indicator, settings_from, sighting, wait_until
from threatbus_rabbitmq import RabbitMQBackbone, intel_log
from threatbus_rabbitmq.intel_log import LogSettings

pytestmark = pytest.mark.rabbitmq


@contextmanager
def node(broker: Any, label: str, **overrides: Any) -> Iterator[tuple[Bus, RabbitMQBackbone]]:
    backbone = RabbitMQBackbone()
    overrides.setdefault("wait_for_subscribers", 0)
    config = broker.plugin_config(broker.queue(label), **overrides)
    with running_bus(backbones={"rabbitmq": backbone}, plugin_config=config, node_name=f"{label}-{broker.id}") as bus:
        yield bus, backbone


def log_ready(bus: Bus) -> None:
    wait_until(lambda: bus.health()["intel_log"] == "ready", 20, what="the intel log to be bound and readable")
    wait_until(lambda: bus.health()["consuming"], 20, what="the consumer")


def publish_through(bus: Bus, messages: list[Any]) -> None:
    """Publish and wait until the node got them back from the broker (so the stream has them too)."""
    echo = Subscriber(bus)
    for message in messages:
        bus.publish_queue.put(message)
    for _ in messages:
        get_within(echo.queue, 20)
    bus.unsubscribe(echo.topic, echo.queue)


def snapshot(bus: Bus, topic: str = "stix2/indicator", days: float = 1) -> tuple[list[SnapshotEnvelope], SnapshotEnd]:
    sink: queue.Queue[Any] = queue.Queue()
    ids = bus.subscribe(topic, sink, snapshot=timedelta(days=days), snapshot_end=True)
    envelopes = []
    while True:
        item = get_within(sink, 30)
        if isinstance(item, SnapshotEnd):
            assert item.snapshot_id in ids
            return envelopes, item
        if isinstance(item, SnapshotEnvelope):
            envelopes.append(item)


def stamp(at: datetime) -> str:
    return at.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def test_a_new_node_answers_a_snapshot_from_the_log_after_every_publisher_stopped(broker):
    now = datetime.now(timezone.utc)
    ident = "indicator--00000000-0000-4000-8000-0000000000a1"
    old = indicator("1.1.1.1", id=ident, modified=stamp(now - timedelta(hours=2)))
    new = indicator("1.1.1.2", id=ident, modified=stamp(now - timedelta(hours=1)))
    kept = [indicator(f"10.1.0.{n}") for n in range(20)]
    dropped = indicator("10.9.9.9", id="indicator--00000000-0000-4000-8000-0000000000a2")
    removal = indicator(
        "10.9.9.9",
        id="indicator--00000000-0000-4000-8000-0000000000a2",
        modified=stamp(now + timedelta(seconds=1)),
        x_threatbus_update="REMOVE",
    )
    with node(broker, "publisher") as (bus, _):
        log_ready(bus)
        publish_through(bus, [old, new, *kept, dropped, removal, sighting()])
    with node(broker, "newcomer") as (bus, backbone):
        log_ready(bus)
        envelopes, end = snapshot(bus)
        got = [e.stix for e in envelopes]
        assert len(got) == len(set(got)) == len(kept) + 1
        assert set(got) == {new, *kept}
        assert end.count == len(kept) + 1 and end.snapshot_type is SnapshotType.INDICATOR
        sightings, _ = snapshot(bus, "stix2/sighting")
        assert len(sightings) == 1
        assert backbone.log_reader.reads == 2


def test_what_an_original_node_publishes_on_the_shared_exchange_is_in_the_log(broker):
    foreign = indicator("10.2.0.1")
    with node(broker, "reader") as (bus, _):
        log_ready(bus)
        broker.publish_raw([foreign.encode(), b"not json", b'{"type": "indicator"}'])
        echo = Subscriber(bus)
        wait_until(lambda: not echo.queue.empty() or bus.health()["consuming"], 10)
        envelopes, end = snapshot(bus)
        assert [e.stix for e in envelopes] == [foreign]
        assert end.count == 1


def test_only_the_requesters_node_reads_the_log(broker):
    with node(broker, "a") as (bus_a, backbone_a), node(broker, "b") as (bus_b, backbone_b):
        log_ready(bus_a)
        log_ready(bus_b)
        publish_through(bus_a, [indicator("10.3.0.1"), indicator("10.3.0.2")])
        envelopes, end = snapshot(bus_b)
        assert len(envelopes) == 2 and end.count == 2
        assert backbone_b.log_reader.reads == 1
        assert backbone_a.log_reader.reads == 0


def test_entries_before_the_period_are_left_out(broker):
    with node(broker, "a") as (bus, backbone):
        log_ready(bus)
        publish_through(bus, [indicator("10.4.0.1")])
        after = datetime.now(timezone.utc) + timedelta(milliseconds=50)
        wait_until(lambda: datetime.now(timezone.utc) > after, 2)
        publish_through(bus, [indicator("10.4.0.2")])
        entries = list(backbone.history(since=after, until=datetime.now(timezone.utc)))
        # Reading from a timestamp starts at its chunk: the core's fold filters by each entry's time.
        cut = after.timestamp()
        assert [decode(m).payload["pattern"] for when, m in entries if when >= cut] == [
            "[ipv4-addr:value = '10.4.0.2']"
        ]


def test_retention_is_declared_on_the_stream(broker):
    with node(broker, "a", history={"max_age": 2, "max_bytes": 5_000_000}) as (bus, _):
        log_ready(bus)
        connection = pika.BlockingConnection(pika.ConnectionParameters("127.0.0.1"))
        try:
            channel = connection.channel()
            # Redeclaring with the same arguments succeeds; other arguments would close the channel (406).
            channel.queue_declare(
                f"{broker.exchange}.log",
                durable=True,
                arguments={"x-queue-type": "stream", "x-max-age": "2D", "x-max-length-bytes": 5_000_000},
            )
            with pytest.raises(pika.exceptions.ChannelClosedByBroker, match="inequivalent arg"):
                channel.queue_declare(
                    f"{broker.exchange}.log", durable=True, arguments={"x-queue-type": "stream", "x-max-age": "30D"}
                )
        finally:
            connection.close()


def log_settings(section: dict[str, Any]) -> LogSettings:
    """LogSettings from the validated backbone section (``section``), for a broker exchange ``tb`` without TLS."""
    broker_settings = type("B", (), {"exchange": "tb", "ssl": False})()
    settings = settings_from({"plugins": {"backbones": {"rabbitmq": section}}})
    core_config.validate(settings, intel_log.validators())
    return LogSettings.resolve(core_config.section(settings, "backbones", "rabbitmq"), broker_settings)  # type: ignore[arg-type]


def test_retention_arguments():
    settings = log_settings({"history": {"max_age": 0.5}})
    assert settings.arguments == {"x-queue-type": "stream", "x-max-age": "43200s"}
    assert settings.stream == "tb.log" and settings.port == 5552
    assert log_settings({}).arguments["x-max-age"] == "30D"


def test_a_node_whose_log_exists_with_other_retention_uses_it_and_says_so(broker, caplog):
    caplog.set_level(logging.INFO, logger="threatbus_rabbitmq")
    with node(broker, "a", history={"max_age": 7}) as (bus_a, _):
        log_ready(bus_a)
        with node(broker, "b", history={"max_age": 3}) as (bus_b, _):
            log_ready(bus_b)
            publish_through(bus_a, [indicator("10.5.0.1")])
            envelopes, _ = snapshot(bus_b)
            assert len(envelopes) == 1
    assert any("exists with other retention" in r.getMessage() for r in caplog.records)


def test_a_broker_without_the_stream_protocol_gives_one_warning_and_the_node_runs_without_history(broker, caplog):
    caplog.set_level(logging.INFO)
    with node(broker, "a", history={"port": free_port()}) as (bus, _):
        wait_until(lambda: bus.health()["intel_log"] == "unavailable", 20, what="the log found unavailable")
        wait_until(lambda: bus.health()["consuming"], 20)
        live = Subscriber(bus)
        sent = indicator("10.6.0.1")
        bus.publish_queue.put(sent)
        assert get_within(live.queue, 20) == sent
        envelopes, end = snapshot(bus)
        assert envelopes == [] and end.count == 0
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING and "intel log" in r.getMessage()]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    assert "rabbitmq-plugins enable rabbitmq_stream" in warnings[0].getMessage()
    assert not any(r.exc_info for r in caplog.records), "a traceback was logged"


def test_history_disabled_declares_no_stream(broker):
    with node(broker, "a", history={"enabled": False}) as (bus, _):
        wait_until(lambda: bus.health()["consuming"], 20)
        assert bus.health()["intel_log"] == "off"
        envelopes, end = snapshot(bus)
        assert envelopes == [] and end.count == 0
    connection = pika.BlockingConnection(pika.ConnectionParameters("127.0.0.1"))
    try:
        with pytest.raises(pika.exceptions.ChannelClosedByBroker, match="NOT_FOUND"):
            connection.channel().queue_declare(f"{broker.exchange}.log", passive=True)
    finally:
        if connection.is_open:
            connection.close()


def test_a_classic_queue_in_the_way_of_the_log_is_refused_with_one_warning(broker, caplog):
    caplog.set_level(logging.INFO)
    connection = pika.BlockingConnection(pika.ConnectionParameters("127.0.0.1"))
    try:
        connection.channel().queue_declare(f"{broker.exchange}.log", durable=True)
    finally:
        connection.close()
    with node(broker, "a") as (bus, _):
        wait_until(lambda: bus.health()["intel_log"] == "unavailable", 20, what="the log refused")
        wait_until(lambda: bus.health()["consuming"], 20)
        envelopes, end = snapshot(bus)
        assert envelopes == [] and end.count == 0
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING and "intel log" in r.getMessage()]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    assert not any(r.exc_info for r in caplog.records)


# ---- the AMQP 1.0 body of a stream entry (no broker) ------------------------

STORED_FROM_AMQP091 = (
    b"\x00Sr\xc1C\x06\xa3\rx-routing-key\xa1\x00\xa3\nx-exchange\xa1\nraw-622238\xa3\x15x-basic-delivery-modeP\x02"
    b'\x00Ss\xc0\x1f\r@@@@@@\xa3\x10application/json@@@@@@\x00Su\xa0\x08{"a": 1}'
)


@pytest.mark.parametrize(
    ("raw", "body"),
    [
        (STORED_FROM_AMQP091, b'{"a": 1}'),
        (
            b'\x00Sr\xc1*\x04\xa3\rx-routing-key\xa1\x00\xa3\nx-exchange\xa1\nraw-622238\x00Su\xa0\x08{"b": 2}',
            b'{"b": 2}',
        ),
        (b'\x00Su\xa0\x08{"c": 3}', b'{"c": 3}'),
        (b"\x00Su\xb0\x00\x00\x00\x03abc\x00Su\xa0\x02de", b"abcde"),
        (b"\x00Su\xb0\x00\x00\x00\x03abc", b"abc"),  # one data section, as rstream writes it
        (b"\x00Su\xb0\x00\x00\x00\x03abc\x00Su\xb0\x00\x00\x00\x02de", b"abcde"),
        (b"\x00Sw\xa1\x02hi", b"hi"),
    ],
)
def test_amqp_body_finds_the_data_sections(raw, body):
    from threatbus_rabbitmq.intel_log import amqp_body

    assert amqp_body(raw) == body


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"{}",
        b"\x00Su",
        b"\x00Su\xa0\x08{",
        b"\x00Sr\xc1\x01\x00",
        b"\x00Su\x99\x01x",
        b"\x00Su\xa0\x01x!",
        b"\x00Su\xb0\x00\x00\x00\x05abc",
        b"\x00Su\xb0\x00\x00",
    ],
)
def test_amqp_body_refuses_garbage(raw):
    from threatbus_rabbitmq.intel_log import amqp_body

    with pytest.raises((ValueError, IndexError)):
        amqp_body(raw)


def test_rstream_reads_its_socket_in_wide_pieces(monkeypatch):
    from rstream import connection

    from threatbus_rabbitmq.intel_log import RSTREAM_READ, widen_rstream_reads

    monkeypatch.setattr(connection, "CHUNK_SIZE", 256)  # rstream 1.1's own
    widen_rstream_reads()
    assert connection.CHUNK_SIZE == RSTREAM_READ
    monkeypatch.setattr(connection, "CHUNK_SIZE", 4 * RSTREAM_READ)  # a version that reads wider already
    widen_rstream_reads()
    assert connection.CHUNK_SIZE == 4 * RSTREAM_READ
    monkeypatch.delattr(connection, "CHUNK_SIZE")  # a version without the constant: nothing to do
    widen_rstream_reads()
    assert not hasattr(connection, "CHUNK_SIZE")
