"""The backbone's state on disk and its config (no broker needed): outbox, dedup window, handover, hosts."""

from __future__ import annotations

import os
import queue
import struct
from pathlib import Path
from typing import Any

import pytest

from threatbus import cli
from threatbus import config as core_config
from threatbus.errors import ConfigError, PluginError
from threatbus.node import Node
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
    window.record(digests[:6])  # the apps took the first six
    again = PersistentDeduplicator(100, tmp_path / "dedup.ring")
    assert [again.check(k) == 0 for k in keys] == [True] * 6 + [False] * 4


def test_the_dedup_window_keeps_its_newest_keys_when_it_shrinks_or_wraps(tmp_path):
    path = tmp_path / "dedup.ring"
    window = PersistentDeduplicator(5, path)
    keys = [("k", str(i)) for i in range(8)]  # wraps the ring of 5
    window.record([window.check(k) for k in keys])
    smaller = PersistentDeduplicator(3, path)
    assert [smaller.seen(k) for k in keys[-3:]] == [True] * 3
    assert not smaller.seen(keys[0])


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


def test_handover_releases_tags_only_once_the_apps_took_their_messages():
    app_a, app_b = queue.Queue(), queue.Queue()
    handover = Handover()
    for tag in (1, 2, 3):
        app_a.put(tag)
        app_b.put(tag)
        handover.routed(tag, 100 + tag, (app_a, app_b))
    handover.routed(4, 0, ())  # a duplicate: nothing handed
    assert handover.taken() == (0, [])
    app_a.get()
    app_a.get()
    app_b.get()
    assert handover.taken() == (1, [101])  # 2 is still in app_b's queue
    app_b.get()
    app_a.get()
    app_b.get()
    assert handover.taken() == (4, [102, 103])
    assert len(handover) == 0


def test_a_stuck_app_stops_holding_acks_back_after_a_while(caplog):
    stuck = queue.Queue()
    handover = Handover(slow_after=0.0)
    stuck.put("m")
    handover.routed(1, 7, (stuck,))
    assert handover.taken() == (1, [7])
    assert "took nothing from its queue" in caplog.text


def test_handover_clear_returns_what_was_handed_to_apps():
    handover = Handover()
    handover.routed(1, 5, (queue.Queue(),))
    handover.routed(2, 6, ())
    assert handover.clear() == [5] and len(handover) == 0


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
