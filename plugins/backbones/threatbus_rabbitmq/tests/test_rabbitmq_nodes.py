"""End to end: real node processes sharing intel through the real RabbitMQ."""

from __future__ import annotations

import time
from collections import Counter
from typing import Any

import pytest

from threatbus.testing import indicator, sighting, wait_until

pytestmark = [pytest.mark.rabbitmq, pytest.mark.e2e]


def assert_exactly_once(received: list[dict[str, Any]], ids: set[str], who: str) -> None:
    counts = Counter(m["id"] for m in received if m["id"] in ids)
    repeated = {i: n for i, n in counts.items() if n > 1}
    assert not repeated, f"{who} got duplicates: {list(repeated.items())[:5]}"
    assert set(counts) == ids, f"{who} is missing {len(ids - set(counts))} of {len(ids)}"


def test_three_nodes_share_intel_exactly_once_and_a_sighting_flows_back(broker, spawn_node, tmp_path):
    backbone = broker.config()  # default queue names: unique per node on this one host
    names = [f"n1-{broker.id}", f"n2-{broker.id}", f"n3-{broker.id}"]
    # node 3 gets its password from the environment only (the file has a wrong one).
    node3_section = {**backbone, "password": "wrong-password"}
    env3 = {"THREATBUS_PLUGINS__BACKBONES__RABBITMQ__PASSWORD": "guest"}
    node1 = spawn_node(names[0], backbone)
    node2 = spawn_node(names[1], backbone)
    node3 = spawn_node(names[2], node3_section, extra_env=env3)
    queue_of = {name: broker.node_queue(name, tmp_path / f"{name}.yaml") for name in names}
    assert len(set(queue_of.values())) == 3
    for node in (node1, node2, node3):
        node.start()
        assert f"consuming queue '{queue_of[node.name]}'" in node.log()

    intel = [indicator(f"10.1.{i // 250}.{i % 250}") for i in range(300)]
    ids = {i.id for i in intel}
    node1.publish(intel)
    for node in (node1, node2, node3):
        assert_exactly_once(node.wait_received(ids), ids, node.name)

    seen = sighting(of=intel[0], source="node3-test")
    node3.publish([seen])
    for node in (node1, node2, node3):
        received = node.wait_received({seen.id})
        match = [m for m in received if m["id"] == seen.id]
        assert len(match) == 1 and match[0]["sighting_of_ref"] == intel[0].id

    for node in (node1, node2, node3):
        assert node.stop() == 0
        assert "RabbitMQ backbone stopped" in node.log()
        assert "may be lost" not in node.log()
    # Nothing was sent twice or left behind: every app got exactly the 301 messages.
    for node in (node1, node2, node3):
        assert_exactly_once(node.received(), ids | {seen.id}, node.name)


def test_a_stopped_node_catches_up_from_its_durable_queue(broker, spawn_node, tmp_path):
    backbone = broker.config()
    name1, name2 = f"pub-{broker.id}", f"late-{broker.id}"
    node1 = spawn_node(name1, backbone).start()
    node2 = spawn_node(name2, backbone).start()
    queue2 = broker.node_queue(name2, tmp_path / f"{name2}.yaml")
    broker.node_queue(name1, tmp_path / f"{name1}.yaml")

    before = [indicator(f"10.2.0.{i}") for i in range(20)]
    node1.publish(before)
    node2.wait_received({i.id for i in before})
    assert node2.stop() == 0

    meanwhile = [indicator(f"10.2.1.{i}") for i in range(200)]
    node1.publish(meanwhile)
    node1.wait_received({i.id for i in meanwhile})
    wait_until(lambda: broker.message_count(queue2) == len(meanwhile), 20, what="the backlog in node 2's queue")

    # Restarted, its app takes a while to subscribe again (as a ZeroMQ app reconnecting): the backlog waits.
    node2.app_away()
    node2.start(ready_line="holding 200 waiting message(s)")
    end = time.monotonic() + 2.0
    while time.monotonic() < end:
        assert "consumer: consuming queue" not in node2.log().split("holding 200")[-1]
        time.sleep(0.1)  # sampling over a window, not synchronisation
    assert broker.message_count(queue2) == 200
    node2.app_back()
    all_ids = {i.id for i in before + meanwhile}
    assert_exactly_once(node2.wait_received(all_ids), all_ids, name2)
    assert "an app subscribed after" in node2.log() and "(200 message(s) waiting)" in node2.log()
    assert node1.stop() == 0
    assert node2.stop() == 0
