"""The backbone's state on disk and its config (no broker needed): outbox, dedup window, handover, hosts."""

from __future__ import annotations

import hashlib
import os
import queue
import struct
import threading
from pathlib import Path
from typing import Any

import pytest

from threatbus import cli
from threatbus import config as core_config
from threatbus.delivery import DeliveryQueue
from threatbus.errors import ConfigError, PluginError
from threatbus.node import Node
from threatbus.routing import TopicRouter
from threatbus.testing import indicator, settings_from
from threatbus_rabbitmq.dedup import Deduplicator, PersistentDeduplicator, digest, open_dedup
from threatbus_rabbitmq.handover import Handover
from threatbus_rabbitmq.outbox import DurableOutbox
from threatbus_rabbitmq.settings import BrokerSettings, resolve, validators
from threatbus_rabbitmq.state import StateDir


def settings_for(section: dict[str, Any]) -> BrokerSettings:
    settings = settings_from({"plugins": {"backbones": {"rabbitmq": section}}})
    core_config.validate(settings, validators())
    return resolve(core_config.section(settings, "backbones", "rabbitmq"), Node.create("n1"))


# ---- durable outbox -----------------------------------------------------


def test_the_outbox_gives_back_what_was_not_confirmed_in_order_after_a_reopen(tmp_path):
    messages = [indicator(f"10.0.0.{i}") for i in range(10)]
    outbox = DurableOutbox(tmp_path, capacity=100, max_bytes=1 << 20)
    assert all(outbox.put(m) for m in messages)
    # The publisher sends some; the broker confirms 0-2 and 5 (out of order, as after a nack).
    sent = [outbox.items.popleft() for _ in range(6)]
    outbox.settled([sent[0], sent[1], sent[2], sent[5]])
    assert outbox.bytes > 0 and len(outbox) == 4
    # No close(): as after SIGKILL.
    again = DurableOutbox(tmp_path, capacity=100, max_bytes=1 << 20)
    # From the low-water mark on (3): 5 was confirmed above it and comes again (consumers drop the repeat).
    assert [m.id for m in again.items] == [m.id for m in messages[3:]]
    assert again.recovered == 7
    again.settled(list(again.items))
    assert again.bytes == 0
    third = DurableOutbox(tmp_path, capacity=100, max_bytes=1 << 20)
    assert len(third) == 0 and third.recovered == 0


def test_the_outbox_is_bounded_in_bytes_and_refuses_loudly(tmp_path, caplog):
    messages = [indicator(f"10.1.0.{i}") for i in range(5)]
    size = len(messages[0].encode()) + 16  # the record header: 16 bytes
    outbox = DurableOutbox(tmp_path, capacity=1000, max_bytes=3 * size)
    assert [outbox.put(m) for m in messages] == [True, True, True, False, False]
    assert outbox.dropped == 2 and outbox.bytes == 3 * size
    assert "REFUSED" in caplog.text
    outbox.settled([outbox.items.popleft()])
    assert outbox.put(indicator("10.1.1.1"))


def test_the_outbox_deletes_segments_once_everything_in_them_is_confirmed(tmp_path):
    outbox = DurableOutbox(tmp_path, capacity=100_000, max_bytes=256 * 1024)  # segments of 64 KiB
    for i in range(1000):
        outbox.put(indicator(f"10.2.{i // 250}.{i % 250}"))
        outbox.settled([outbox.items.popleft()])
    segments = sorted(tmp_path.glob("*.seg"))
    assert 1 <= len(segments) <= 2 and outbox.bytes == 0


def test_a_damaged_or_cut_outbox_segment_keeps_the_records_before_the_damage(tmp_path, caplog):
    outbox = DurableOutbox(tmp_path, capacity=100, max_bytes=1 << 20)
    messages = [indicator(f"10.3.0.{i}") for i in range(3)]
    for m in messages:
        outbox.put(m)
    outbox.close()
    (segment,) = tmp_path.glob("*.seg")
    data = segment.read_bytes()
    segment.write_bytes(data[:-7])  # the last record cut short, as by a crash mid-write
    again = DurableOutbox(tmp_path, capacity=100, max_bytes=1 << 20)
    assert [m.id for m in again.items] == [m.id for m in messages[:2]]
    assert again.unreadable == 1 and "cut short or damaged" in caplog.text
    again.close()
    # Garbage: a segment of random bytes, an acked file of the wrong size.
    (tmp_path / "ffffffffffffffff.seg").write_bytes(os.urandom(500))
    (tmp_path / "acked").write_bytes(b"xyz")
    third = DurableOutbox(tmp_path, capacity=100, max_bytes=1 << 20)
    assert [m.id for m in third.items] == [m.id for m in messages[:2]]


def test_the_same_message_object_put_twice_is_two_entries(tmp_path):
    outbox = DurableOutbox(tmp_path, capacity=100, max_bytes=1 << 20)
    message = indicator()
    assert outbox.put(message) and outbox.put(message)
    first, second = outbox.items
    outbox.settled([first])
    assert outbox.bytes > 0
    outbox.settled([second])
    assert outbox.bytes == 0


# ---- dedup window -------------------------------------------------------


def test_the_dedup_window_survives_a_reopen_without_close(tmp_path):
    keys = [("indicator", f"indicator--{i}", "", "") for i in range(10)]
    window = PersistentDeduplicator(100, tmp_path / "dedup.ring")
    digests = [window.check(k) for k in keys]
    assert all(digests) and window.check(keys[0]) == 0
    for value in digests[:6]:  # the apps are done with the first six
        window.record(value)
    again = PersistentDeduplicator(100, tmp_path / "dedup.ring")
    assert [again.check(k) == 0 for k in keys] == [True] * 6 + [False] * 4


def test_the_dedup_window_keeps_its_newest_keys_when_it_shrinks_or_wraps(tmp_path):
    path = tmp_path / "dedup.ring"
    window = PersistentDeduplicator(5, path)
    keys = [("k", str(i)) for i in range(8)]  # wraps the ring of 5
    for k in keys:
        window.record(window.check(k))
    smaller = PersistentDeduplicator(3, path)
    assert [smaller.seen(k) for k in keys[-3:]] == [True] * 3
    assert not smaller.seen(keys[0])


def test_what_was_handed_and_never_reported_done_is_in_doubt_after_a_reopen(tmp_path):
    path = tmp_path / "dedup.ring"
    window = PersistentDeduplicator(100, path)
    done, doubtful, both = digest(("a",)), digest(("b",)), digest(("c",))
    window.record(done, window.handed(done))
    window.handed(doubtful)  # the node dies before the app says it is done
    window.handed(both)
    window.record(both, window.handed(both))  # delivered again after an earlier crash, then done
    again = PersistentDeduplicator(100, path)  # no close: as after SIGKILL
    assert again.doubtful == 1
    assert not again.admit(done) and not again.admit(both)
    assert again.admit(doubtful) and again.in_doubt(doubtful) and not again.in_doubt(doubtful)
    assert not again.in_doubt(done)


def test_a_window_file_of_the_previous_format_loads_as_done_keys(tmp_path):
    path = tmp_path / "dedup.ring"
    full = int.from_bytes(hashlib.blake2b(b"a", digest_size=8).digest(), "little")  # digests used all 64 bits
    path.write_bytes(struct.pack("<8sQQ", b"TBDEDUP1", 2, 1) + struct.pack("<2Q", full, 0))
    window = PersistentDeduplicator(10, path)
    assert window.doubtful == 0 and window.seen(("a",))


@pytest.mark.parametrize("garbage", [b"", b"x" * 10, os.urandom(200), struct.pack("<8sQQ", b"TBDEDUP1", 10**9, 0)])
def test_a_garbage_dedup_file_means_an_empty_window(tmp_path, garbage):
    path = tmp_path / "dedup.ring"
    path.write_bytes(garbage)
    window = PersistentDeduplicator(10, path)
    assert len(window) == 0 and not window.seen(("a",))


def test_digests_are_stable_across_processes_and_never_zero():
    assert digest(("indicator", "indicator--1", "", "")) == digest(("indicator", "indicator--1", "", ""))
    assert digest(("a", "b")) != digest(("b", "a"))
    assert isinstance(open_dedup(10, None), Deduplicator) and not isinstance(
        open_dedup(0, Path(".")), PersistentDeduplicator
    )


# ---- handover -----------------------------------------------------------


class Recorder(Deduplicator):
    """A window in memory that notes what it is told: ``recorded`` (done) in order, and by which thread."""

    def __init__(self) -> None:
        super().__init__(100)
        self.recorded: list[int] = []
        self.threads: list[str] = []

    def record(self, value: int, slot: int = -1) -> None:
        self.recorded.append(value)
        self.threads.append(threading.current_thread().name)


def route_all(router, handover, tags):
    """Route one indicator per tag the way the consumer does; returns the messages."""
    messages = []
    for tag in tags:
        message = indicator(f"10.77.0.{tag}")
        delivery = handover.begin(digest(message.dedup_key), router.subscribers(message.topic))
        router.route(message, delivery)
        handover.routed(tag, delivery, digest(message.dedup_key))
        messages.append(message)
    return messages


def test_handover_settles_tags_once_the_apps_took_them_from_plain_queues():
    router, window = TopicRouter(), Recorder()
    app_a, app_b = queue.Queue(), queue.SimpleQueue()
    router.subscribe("stix2", app_a)
    router.subscribe("stix2", app_b)
    handover = Handover(window)
    messages = route_all(router, handover, (1, 2, 3))
    handover.skip(4)  # rejected, or held back by the import filter: nothing to wait for
    assert handover.settle() is None and window.recorded == []
    app_a.get()
    app_a.get()
    app_b.get()
    assert handover.settle() == 1  # 2 is still in app_b's queue
    assert window.recorded == [digest(messages[0].dedup_key)]
    app_b.get()
    app_a.get()
    app_b.get()
    assert handover.settle() == 4
    assert window.recorded == [digest(m.dedup_key) for m in messages]
    assert len(handover) == 0


class Socketlike:
    """A subscriber that neither reports back nor has a size (as the ZeroMQ app's): done once handed a message."""

    def __init__(self) -> None:
        self.items: list[Any] = []

    def put_nowait(self, item: Any) -> None:
        self.items.append(item)


def test_a_message_for_subscribers_that_cannot_report_is_done_once_routed():
    router, window, sink = TopicRouter(), Recorder(), Socketlike()
    router.subscribe("stix2", sink)
    handover = Handover(window)
    (message,) = route_all(router, handover, (1,))
    assert sink.items == [message]
    assert window.recorded == [digest(message.dedup_key)] and handover.settle() == 1


def test_a_delivery_queue_settles_its_message_in_the_apps_thread_when_the_app_acknowledges():
    router, window = TopicRouter(), Recorder()
    app = DeliveryQueue()
    router.subscribe("stix2", app)
    handover = Handover(window)
    (message,) = route_all(router, handover, (1,))
    assert app.get_nowait() == message
    assert handover.settle() is None and window.recorded == []  # taken is not enough: sent on is

    worker = threading.Thread(target=app.task_done, name="the-app")
    worker.start()
    worker.join()
    assert window.recorded == [digest(message.dedup_key)] and window.threads == ["the-app"]
    assert handover.settle() == 1


def test_a_repeat_is_settled_only_once_the_message_it_repeats_is(tmp_path):
    # After a reconnect the broker delivers again what was not acked, while the first copy may still wait.
    router, window = TopicRouter(), Recorder()
    app = DeliveryQueue()
    router.subscribe("stix2", app)
    handover = Handover(window)
    (message,) = route_all(router, handover, (1,))
    handover.clear()  # the channel is gone with tag 1
    handover.repeat(1, digest(message.dedup_key))  # the new channel's tag 1: the same message
    assert handover.settle() is None
    app.get_nowait()
    app.task_done()
    assert window.recorded == [digest(message.dedup_key)]
    assert handover.settle() == 1
    handover.repeat(2, digest(message.dedup_key))  # once more, long after: nothing to wait for
    assert handover.settle() == 2


@pytest.mark.parametrize("make_queue", [queue.Queue, DeliveryQueue])
def test_a_stuck_app_stops_holding_acks_back_after_a_while_until_it_caught_up(caplog, make_queue):
    router, window = TopicRouter(), Recorder()
    stuck = make_queue()
    router.subscribe("stix2", stuck)
    handover = Handover(window, slow_after=0.0)
    route_all(router, handover, (1, 2))
    assert handover.settle() == 2
    assert len(window.recorded) == 2 and "(2 waiting)" in caplog.text
    route_all(router, handover, (3,))
    assert handover.settle() == 3 and len(window.recorded) == 3  # not waited for while it is behind
    for _ in range(3):
        stuck.get_nowait()
    if isinstance(stuck, DeliveryQueue):
        stuck.task_done(3)
    handover.settle()
    handover.slow_after = 60.0
    route_all(router, handover, (4,))
    assert handover.settle() is None  # caught up: waited for again


# ---- state directory ----------------------------------------------------


def test_two_processes_cannot_share_a_state_directory(tmp_path):
    node = Node.create("n1", data_dir=str(tmp_path / "data"))
    first = StateDir.open(node, "rabbitmq")
    assert first is not None
    try:
        # flock is per open file: a second open in this process stands for a second process.
        with pytest.raises(PluginError, match="in use by another Threat Bus process"):
            StateDir.open(node, "rabbitmq")
    finally:
        first.close()
    StateDir.open(node, "rabbitmq").close()
    assert StateDir.open(Node.create("n1"), "rabbitmq") is None


def test_node_data_dir_defaults_per_node_name_and_is_validated(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    settings = settings_from({"node": {"name": "alpha"}})
    core_config.validate(settings, core_config.core_validators())
    node = cli.node_of(settings, tmp_path / "c.yaml")
    assert node.data_dir == tmp_path / "threatbus-data" / "alpha"
    (tmp_path / "file").write_text("x")
    for bad, message in [(str(tmp_path / "file" / "sub"), "is not a directory"), ("", "node.data_dir")]:
        settings = settings_from({"node": {"name": "alpha", "data_dir": bad}})
        with pytest.raises(ConfigError, match=message):
            core_config.validate(settings, core_config.core_validators())
            cli.node_of(settings, tmp_path / "c.yaml")
    settings = settings_from({"node": {"data_dir": 5}})
    with pytest.raises(ConfigError, match="node.data_dir must be a directory path"):
        core_config.validate(settings, core_config.core_validators())


# ---- config keys --------------------------------------------------------


def test_hosts_list_gives_every_broker_in_order_with_default_ports():
    s = settings_for({"hosts": ["a:5673", "b", "[::1]:5674"], "port": 5999})
    assert s.brokers == (("a", 5673), ("b", 5999), ("::1", 5674))
    assert (s.host, s.port) == ("a", 5673) and s.url == "amqp://guest@a:5673/"
    assert [s.parameters("publisher", i).port for i in range(4)] == [5673, 5999, 5674, 5673]
    single = settings_for({"host": "x", "port": 1234})
    assert single.brokers == (("x", 1234),)


@pytest.mark.parametrize(
    "hosts",
    [[], "a:5672", ["a:0"], ["a:99999"], ["a:x"], [":5672"], [5672], ["a:"], [["a"]], ["[::1]x"]],
)
def test_bad_hosts_name_the_key(hosts):
    with pytest.raises(ConfigError, match=r"rabbitmq\.hosts"):
        settings_for({"hosts": hosts})


def test_state_and_outbox_max_bytes_keys():
    s = settings_for({})
    assert s.state_on_disk and s.outbox_max_bytes == 256 * 1024 * 1024
    assert not settings_for({"state": "memory"}).state_on_disk
    for section, key in [({"state": "ram"}, "state"), ({"outbox_max_bytes": 0}, "outbox_max_bytes")]:
        with pytest.raises(ConfigError, match=rf"rabbitmq\.{key}"):
            settings_for(section)
