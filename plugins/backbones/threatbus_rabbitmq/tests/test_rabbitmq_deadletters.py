"""Foreign messages are validated; what a node rejects goes to its dead-letter queue; `threatbus dlq` works it.

Real broker, real node processes for the command line.
"""

from __future__ import annotations

import os
import queue
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import orjson
import pika
import pytest
import yaml
from testbus import running_bus

from threatbus import cli
from threatbus.bus import Bus
from threatbus.deadletters import DEAD_LETTERED, INVALID_MESSAGE, INVALID_STIX, UNDELIVERED
from threatbus.metrics import BACKBONE_REJECTED
from threatbus.testing import Subscriber, assert_nothing_more, collect, indicator, wait_until
from threatbus_rabbitmq import RabbitMQBackbone
from threatbus_rabbitmq.deadletter import H_ORIGIN, H_REASON, H_REPLAY

pytestmark = pytest.mark.rabbitmq


@contextmanager
def node(broker: Any, label: str, **overrides: Any) -> Iterator[tuple[Bus, RabbitMQBackbone]]:
    backbone = RabbitMQBackbone()
    config = broker.plugin_config(broker.queue(label), **overrides)
    with running_bus(backbones={"rabbitmq": backbone}, plugin_config=config, node_name=f"{label}-{broker.id}") as bus:
        yield bus, backbone


def connected(*buses: Bus) -> None:
    wait_until(lambda: all(bus.health()["connected"] for bus in buses), 20, what="backbones to connect")


def broken(**changes: Any) -> bytes:
    """A valid-looking indicator with ``changes`` applied (e.g. a pattern the grammar refuses)."""
    return orjson.dumps({**indicator("10.9.9.9").payload, **changes})


INVALID = {
    "pattern": broken(pattern="[ipv4-addr:value = '1.2.3.4'"),
    "grammar": broken(pattern="[ipv4-addr:value = '1.2.3.4'] AND ["),
    "timestamp": broken(created="yesterday"),
    "spec_version": broken(spec_version="2.0"),
}


def dlq_messages(broker: Any, name: str) -> list[tuple[pika.BasicProperties, bytes]]:
    """Everything in a DLQ, left in place (not acked)."""
    connection = broker.connect()
    try:
        channel = connection.channel()
        got = []
        while True:
            method, properties, body = channel.basic_get(name, auto_ack=False)
            if method is None:
                return got
            got.append((properties, body))
    finally:
        connection.close()


def test_invalid_intel_from_a_foreign_producer_is_dead_lettered_valid_around_it_delivered(broker):
    with node(broker, "foreign") as (bus, backbone):
        connected(bus)
        subscriber = Subscriber(bus)
        valid = [indicator(f"10.9.0.{i}") for i in range(len(INVALID) + 1)]
        bodies = [valid[0].encode()]
        for bad, good in zip(INVALID.values(), valid[1:], strict=True):
            bodies += [bad, good.encode()]
        broker.publish_raw(bodies)  # no app_id: an original node or another producer
        assert [m.id for m in collect(subscriber.queue, len(valid))] == [m.id for m in valid]
        assert_nothing_more(subscriber.queue)
        dlq = f"threatbus.foreign-{broker.id}.dlq"
        wait_until(lambda: broker.message_count(dlq) == len(INVALID), what="the invalid intel in the DLQ")
        letters = dlq_messages(broker, dlq)
        assert [body for _p, body in letters] == list(INVALID.values())
        for properties, _body in letters:
            assert properties.headers[H_REASON] == INVALID_STIX
            assert properties.headers[H_ORIGIN] == "foreign"
            assert properties.message_id and properties.delivery_mode == 2
        assert bus.metrics.value(DEAD_LETTERED, reason=INVALID_STIX) == len(INVALID)
        assert bus.metrics.value(BACKBONE_REJECTED, backbone="rabbitmq") == len(INVALID)
        assert backbone.consumer.foreign == len(bodies)
        assert broker.message_count(f"threatbus.foreign-{broker.id}") == 0  # nothing stuck in the node's queue


def test_poison_goes_to_the_dlq_with_its_reason(broker):
    with node(broker, "poison-dlq") as (bus, _backbone):
        connected(bus)
        subscriber = Subscriber(bus)
        good = indicator("10.9.1.1")
        broker.publish_raw([b"\x00\xff not json", good.encode()])
        assert collect(subscriber.queue, 1)[0].id == good.id
        dlq = f"threatbus.poison-dlq-{broker.id}.dlq"
        wait_until(lambda: broker.message_count(dlq) == 1, what="the poison in the DLQ")
        ((properties, body),) = dlq_messages(broker, dlq)
        assert body == b"\x00\xff not json" and properties.headers[H_REASON] == INVALID_MESSAGE
        assert bus.metrics.value(DEAD_LETTERED, reason=INVALID_MESSAGE) == 1


def test_messages_of_our_nodes_are_not_validated_again(broker):
    with node(broker, "ours") as (bus, backbone), node(broker, "sender") as (sender, _):
        connected(bus, sender)
        subscriber = Subscriber(bus)
        sent = indicator("10.9.2.2")
        sender.publish_queue.put(sent)
        assert collect(subscriber.queue, 1)[0].id == sent.id
        assert backbone.consumer.foreign == 0  # the sender's app_id marks it as one of ours
        # app_id is a label, not authentication: a producer setting it is trusted like a node (README).
        broker.publish_raw([INVALID["pattern"]], properties=pika.BasicProperties(app_id="threatbus.another-node"))
        assert collect(subscriber.queue, 1)[0].payload["pattern"] == "[ipv4-addr:value = '1.2.3.4'"


def test_what_no_local_app_could_take_is_dead_lettered(broker):
    with node(broker, "full") as (bus, _backbone):
        connected(bus)
        tiny: queue.Queue[Any] = queue.Queue(maxsize=1)
        bus.subscribe("stix2", tiny)
        normal = Subscriber(bus)
        sent = [indicator(f"10.9.3.{i}") for i in range(3)]
        for message in sent:
            bus.publish_queue.put(message)
        collect(normal.queue, 3)
        dlq = f"threatbus.full-{broker.id}.dlq"
        wait_until(lambda: broker.message_count(dlq) == 2, what="two undelivered in the DLQ")
        letters = dlq_messages(broker, dlq)
        assert [body for _p, body in letters] == [m.encode() for m in sent[1:]]
        assert {p.headers[H_REASON] for p, _b in letters} == {UNDELIVERED}
        assert {p.headers[H_ORIGIN] for p, _b in letters} == {"threatbus"}
        assert bus.metrics.value(DEAD_LETTERED, reason=UNDELIVERED) == 2


def test_disabled_dead_letters_reject_as_before(broker):
    with node(broker, "nodlq", dead_letters={"enabled": False}) as (bus, backbone):
        connected(bus)
        subscriber = Subscriber(bus)
        good = indicator("10.9.4.4")
        broker.publish_raw([INVALID["pattern"], good.encode()])
        assert collect(subscriber.queue, 1)[0].id == good.id
        wait_until(lambda: backbone.consumer.rejected == 1, what="the rejection")
        connection = broker.connect()
        try:
            with pytest.raises(pika.exceptions.ChannelClosedByBroker, match="NOT_FOUND"):
                connection.channel().queue_declare(f"threatbus.nodlq-{broker.id}.dlq", passive=True)
        finally:
            connection.close()


# ---- the command line ---------------------------------------------------


def write_config(tmp_path: Path, broker: Any, suffix: str) -> Path:
    path = tmp_path / "node.yaml"
    path.write_text(yaml.safe_dump({"plugins": {"backbones": {"rabbitmq": broker.config(suffix)}}}))
    return path


def run_dlq(path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "threatbus", "dlq", *args, "-c", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        env=os.environ,
    )


@pytest.mark.e2e
def test_dlq_command_lists_shows_replays_and_purges(broker, tmp_path, capsys):
    suffix = broker.queue("cli")
    path = write_config(tmp_path, broker, suffix)
    dlq = f"threatbus.{suffix}.dlq"
    with node(broker, "cli") as (bus, _backbone):  # the same queue name: broker.queue("cli") gives one per test
        connected(bus)
        tiny: queue.Queue[Any] = queue.Queue(maxsize=1)
        bus.subscribe("stix2", tiny)
        undelivered = [indicator(f"10.9.5.{i}") for i in range(3)]
        for message in undelivered:
            bus.publish_queue.put(message)
        broker.publish_raw([INVALID["grammar"]])
        wait_until(lambda: broker.message_count(dlq) == 3, what="three dead letters")

        listed = run_dlq(path, "list")
        assert listed.returncode == 0, listed.stderr
        rows = listed.stdout.splitlines()
        assert rows[-1] == "3 dead letter(s)"
        ids = [row.split()[0] for row in rows[1:-1]]
        assert [row.split()[2] for row in rows[1:-1]] == [UNDELIVERED, UNDELIVERED, INVALID_STIX]
        assert broker.message_count(dlq) == 3  # looking leaves them there

        shown = run_dlq(path, "show", ids[2])
        assert shown.returncode == 0, shown.stderr
        assert f"reason: {INVALID_STIX}" in shown.stdout and "origin: foreign" in shown.stdout
        assert "[ipv4-addr:value = '1.2.3.4'] AND [" in shown.stdout

        assert tiny.get_nowait().id == undelivered[0].id  # the app catches up
        replayed = run_dlq(path, "replay", ids[0])
        assert (replayed.returncode, replayed.stdout) == (0, "replayed 1 dead letter(s)\n"), replayed.stderr
        assert tiny.get(timeout=10).id == undelivered[1].id  # delivered again despite the dedup window

        # Replaying the invalid foreign message validates it again: back into the DLQ, not delivered.
        assert cli.main(["dlq", "replay", ids[2], "-c", str(path)]) == 0
        wait_until(lambda: [p.headers.get(H_REASON) for p, _b in dlq_messages(broker, dlq)] == [
            UNDELIVERED, INVALID_STIX
        ], what="the invalid one dead-lettered again")  # fmt: skip
        assert_nothing_more(tiny)
        assert all(H_REPLAY not in p.headers for p, _b in dlq_messages(broker, dlq))

        missing = run_dlq(path, "replay", "nosuch")
        assert missing.returncode == 1 and "not found: nosuch" in missing.stderr
        purged = run_dlq(path, "purge")
        assert (purged.returncode, purged.stdout) == (0, "purged 2 dead letter(s)\n"), purged.stderr
        assert broker.message_count(dlq) == 0
    capsys.readouterr()


@pytest.mark.e2e
def test_dlq_command_with_the_broker_unreachable_is_one_line(broker, tmp_path):
    path = tmp_path / "node.yaml"
    section = broker.config(broker.queue("away"), port=1)  # nothing listens on port 1
    path.write_text(yaml.safe_dump({"plugins": {"backbones": {"rabbitmq": section}}}))
    result = run_dlq(path, "list")
    assert result.returncode == 1
    lines = [line for line in result.stderr.splitlines() if line.startswith("threatbus:")]
    assert len(lines) == 1 and "cannot reach RabbitMQ at amqp://guest@127.0.0.1:1/" in lines[0], result.stderr
    assert "Traceback" not in result.stderr
