"""Export and import filters between nodes over the real RabbitMQ, in-process and as real node processes."""

from __future__ import annotations

import queue
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

import pytest
from testbus import running_bus

import threatbus
from threatbus.bus import Bus
from threatbus.data import SnapshotEnvelope
from threatbus.testing import (
    TLP1,
    Subscriber,
    assert_nothing_more,
    collect,
    get_within,
    indicator,
    intel_mix,
    wait_until,
)
from threatbus_rabbitmq import RabbitMQBackbone

pytestmark = pytest.mark.rabbitmq

TLP_BOUNDARY = {"tlp": "amber"}  # RED and AMBER+STRICT stay on the node
CONFIDENT = {"min_confidence": 50}
ABOVE_AMBER = {"red", "red2", "amber_strict"}
UNSURE = {"green", "unmarked"}  # confidence 30 and 10


@contextmanager
def node(broker: Any, label: str, apps: dict[str, object] | None = None, **overrides: Any) -> Iterator[Bus]:
    config = broker.plugin_config(broker.queue(label), **overrides)
    with running_bus(
        apps=apps, backbones={"rabbitmq": RabbitMQBackbone()}, plugin_config=config, node_name=f"{label}-{broker.id}"
    ) as bus:
        yield bus


def connected(*buses: Bus) -> None:
    wait_until(lambda: all(bus.health()["connected"] for bus in buses), 20, what="backbones to connect")


def sentinel(last: int = 9) -> Any:
    return indicator(f"10.9.9.{last}", object_marking_refs=[TLP1["white"]], confidence=100)


def names_until(source: queue.Queue, stop_id: str, names: dict[str, str]) -> set[str]:
    got = set()
    while True:
        message = get_within(source, 20)
        if isinstance(message, SnapshotEnvelope):
            message = message.stix
        if message.id == stop_id:
            return got
        got.add(names[message.id])


def test_export_keeps_red_on_the_node_and_import_takes_only_confident_intel(broker):
    with (
        node(broker, "site-a", export={"filter": TLP_BOUNDARY}, **{"import": {"filter": CONFIDENT}}) as site_a,
        node(broker, "site-b") as site_b,
    ):
        connected(site_a, site_b)
        at_a, at_b = Subscriber(site_a), Subscriber(site_b)
        # Published at site A: its own apps get everything (own messages skip A's import filter too),
        # site B gets what A exports.
        mix, end = intel_mix(), sentinel(1)
        names = {item.id: name for name, item in mix.items()}
        for item in [*mix.values(), end]:
            site_a.publish_queue.put(item)
        assert names_until(at_b.queue, end.id, names) == set(mix) - ABOVE_AMBER
        held_locally = set()
        while len(held_locally) < len(mix) + 1:
            held_locally.add(get_within(at_a.queue, 20).id)
        assert held_locally == {*names, end.id}
        assert_nothing_more(at_a.queue)
        # Published at site B: A imports only what is confident enough.
        mix, end = intel_mix(), sentinel(2)
        names = {item.id: name for name, item in mix.items()}
        for item in [*mix.values(), end]:
            site_b.publish_queue.put(item)
        assert names_until(at_a.queue, end.id, names) == set(mix) - UNSURE
        assert names_until(at_b.queue, end.id, names) == set(mix)
        metrics = site_a.metrics
        assert metrics.value("threatbus_filtered", plugin="rabbitmq", rule="export", reason="tlp") == 3
        assert metrics.value("threatbus_filtered", plugin="rabbitmq", rule="import", reason="confidence") == 2
        assert site_b.metrics.value("threatbus_filtered") == 0


class HoldingApp:
    def __init__(self, held: list[Any]) -> None:
        self.held = held

    @threatbus.app
    def snapshot(self, snapshot_request: Any, result_queue: Any) -> None:
        for item in self.held:
            result_queue.put(SnapshotEnvelope.wrap(snapshot_request, item))


def test_snapshot_answers_obey_the_export_filter_of_the_answering_node(broker):
    mix = intel_mix()
    holder = HoldingApp(list(mix.values()))
    with (
        node(broker, "asker") as asker,
        node(
            broker, "holder", {"holder": holder}, wait_for_subscribers=0, export={"filter": {"tlp": "green"}}
        ) as other,
    ):
        connected(asker, other)
        requester = Subscriber(asker, "stix2/indicator", snapshot=timedelta(days=1))
        expected = set(mix) - ABOVE_AMBER - {"amber"}
        envelopes = collect(requester.queue, len(expected), timeout=20)
        names = {item.id: name for name, item in mix.items()}
        assert {names[e.stix.id] for e in envelopes} == expected
        assert_nothing_more(requester.queue)


@pytest.mark.e2e
def test_two_node_processes_the_export_filter_keeps_red_local(broker, spawn_node):
    site_a = spawn_node(f"a-{broker.id}", broker.config(broker.queue("a"), export={"filter": TLP_BOUNDARY}))
    site_b = spawn_node(f"b-{broker.id}", broker.config(broker.queue("b")))
    site_a.start()
    site_b.start()
    mix, end = intel_mix(), sentinel(3)
    site_a.publish([*mix.values(), end])
    # The node's own app still gets RED; the other site never does.
    at_a = {m["id"] for m in site_a.wait_received({*(i.id for i in mix.values()), end.id})}
    at_b = {m["id"] for m in site_b.wait_received({end.id})}
    assert {mix[name].id for name in ABOVE_AMBER} <= at_a
    assert at_b == {end.id} | {item.id for name, item in mix.items() if name not in ABOVE_AMBER}
    assert site_a.stop() == 0 and site_b.stop() == 0
    assert "rabbitmq: export filter" in site_a.log()
