"""End to end: real node processes answer snapshots from the intel log in the real RabbitMQ."""

from __future__ import annotations

from collections import Counter
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest

from threatbus.testing import indicator, sighting, wait_until

pytestmark = [pytest.mark.rabbitmq, pytest.mark.e2e]


def stamp(at: datetime) -> str:
    return at.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def snapshot_lines(node: Any) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(envelope bodies, end markers) the node's app wrote so far."""
    got = node.received()
    bodies = [m["body"] for m in got if m.get("type") == "snapshotenvelope"]
    ends = [m for m in got if m.get("type") == "snapshotend"]
    return bodies, ends


def wait_for_ends(node: Any, count: int, timeout: float = 30.0) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    try:
        wait_until(lambda: len(snapshot_lines(node)[1]) >= count, timeout, interval=0.05, what="end markers")
    except AssertionError:
        raise AssertionError(f"{node.name}: no end marker\n--- log tail ---\n{node.log()[-4000:]}") from None
    return snapshot_lines(node)


def test_a_new_node_serves_the_last_days_from_the_log_after_every_publisher_stopped(broker, spawn_node, tmp_path):
    backbone = broker.config()
    now = datetime.now(timezone.utc)
    intel = [indicator(f"10.40.{i // 250}.{i % 250}") for i in range(300)]
    revised_id = intel[0].id
    revised = indicator("10.40.9.1", id=revised_id, modified=stamp(now + timedelta(seconds=1)))
    removed = indicator(
        "10.40.0.2", id=intel[2].id, modified=stamp(now + timedelta(seconds=1)), x_threatbus_update="REMOVE"
    )
    seen = sighting(of=intel[1], source="e2e")
    publisher_name = f"pub-{broker.id}"
    publisher = spawn_node(publisher_name, backbone).start()
    broker.node_queue(publisher_name, tmp_path / f"{publisher_name}.yaml")
    publisher.publish([*intel, revised, removed, seen])
    publisher.wait_received({m.id for m in intel} | {seen.id})
    assert publisher.stop() == 0

    newcomer_name = f"new-{broker.id}"
    broker.node_queue(newcomer_name, tmp_path / f"{newcomer_name}.yaml")
    newcomer = spawn_node(newcomer_name, backbone, snapshot_days=1).start()
    bodies, ends = wait_for_ends(newcomer, 2)
    indicators = [b for b in bodies if b["type"] == "indicator"]
    counts = Counter(b["id"] for b in indicators)
    assert max(counts.values()) == 1, "an indicator arrived twice"
    expected = {m.id for m in intel} - {intel[2].id}
    assert set(counts) == expected
    assert next(b for b in indicators if b["id"] == revised_id)["pattern"] == revised.pattern
    assert [b["id"] for b in bodies if b["type"] == "sighting"] == [seen.id]
    assert sorted(end["count"] for end in ends) == [1, len(expected)]
    assert "answered from the log" in newcomer.log()
    assert newcomer.stop() == 0
    # Nothing more came after the markers: the log answered once.
    assert snapshot_lines(newcomer) == (bodies, ends)


def test_a_node_without_the_stream_protocol_runs_and_says_so_once(broker, spawn_node, tmp_path):
    from threatbus.testing import free_port

    backbone = broker.config(history={"port": free_port()})
    name = f"nostream-{broker.id}"
    broker.node_queue(name, tmp_path / f"{name}.yaml")
    node = spawn_node(name, backbone, snapshot_days=1).start()
    _, ends = wait_for_ends(node, 2)
    assert [end["count"] for end in ends] == [0, 0]
    ioc = indicator("10.41.0.1")
    node.publish([ioc])
    node.wait_received({ioc.id})
    assert node.stop() == 0
    log = node.log()
    assert log.count("running without the intel log") == 1
    assert "Traceback" not in log


@pytest.mark.parametrize("transport", ["queue", "stream"])
def test_sigkill_of_a_receiving_node_mid_stream_loses_nothing_and_repeats_nothing(
    broker, spawn_node, tmp_path, transport
):
    """Nothing lost, nothing twice: the dedup window is on disk (state: disk), for the stream transport too."""
    import threading
    import time

    # The default hold (wait_for_subscribers): consuming starts once the test app subscribed, so what waited
    # in the queue (or the stream) across the restart reaches it (with 0 it may go before the app is back).
    backbone = broker.config(transport=transport)
    sender_name, receiver_name = f"send-{transport}-{broker.id}", f"recv-{transport}-{broker.id}"
    for name in (sender_name, receiver_name):
        broker.node_queue(name, tmp_path / f"{name}.yaml")
    ready = "stream transport: node" if transport == "stream" else "consumer: consuming queue"
    sender = spawn_node(sender_name, backbone).start(ready_line=ready)
    receiver = spawn_node(receiver_name, backbone).start(ready_line=ready)
    intel = [indicator(f"10.60.{i // 250}.{i % 250}") for i in range(3000)]

    def paced() -> None:
        for start in range(0, len(intel), 100):
            sender.publish(intel[start : start + 100])
            time.sleep(0.1)  # load shaping (about 1000/s), not synchronisation

    producer = threading.Thread(target=paced)
    producer.start()
    wait_until(lambda: len(receiver.received()) >= 1000, 30, what="a third at the receiver before the kill")
    receiver.kill()  # SIGKILL
    receiver.start(ready_line=ready)
    producer.join(30)
    ids = {m.id for m in intel}
    got = receiver.wait_received(ids, timeout=60)
    counts = Counter(m["id"] for m in got if m.get("id") in ids)
    assert set(counts) == ids, f"lost {len(ids - set(counts))}"
    repeated = sum(n - 1 for n in counts.values())
    skipped = receiver.log().count("testapp: in doubt and already in the outbox")
    print(f"{transport}: SIGKILL mid-stream: lost 0, repeated {repeated}, skipped {skipped}")
    assert repeated == 0
    assert sender.stop() == 0 and receiver.stop() == 0
