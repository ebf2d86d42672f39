"""SIGKILL of real node processes mid-stream: counted per message, nothing lost and nothing twice.

The receiving node's dedup window and the sending node's outbox live in
``node.data_dir`` (the tests give each node its own under ``tmp_path``).
``state: memory`` is the behaviour before they did: the tests run it too,
to show the fault they guard against is real.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest

from threatbus.testing import indicator, wait_until

pytestmark = [pytest.mark.rabbitmq, pytest.mark.e2e]


def lost_and_repeated(received: list[dict[str, Any]], ids: list[str]) -> tuple[list[str], dict[str, int]]:
    counts = Counter(m.get("id") for m in received)
    lost = [i for i in ids if counts[i] == 0]
    repeated = {i: counts[i] for i in ids if counts[i] > 1}
    return lost, repeated


def sigkill(node: Any) -> None:
    """SIGKILL ``node``; a line its app was writing at that moment is cut: that message did not arrive."""
    node.kill()
    data = node.outbox.read_bytes() if node.outbox.exists() else b""
    if data and not data.endswith(b"\n"):
        node.outbox.write_bytes(data[: data.rfind(b"\n") + 1])


def kill_receiver_mid_stream(broker: Any, spawn_node: Any, state: str) -> tuple[list[str], dict[str, int], str]:
    """Node B receives a stream from node A, is SIGKILLed twice mid-stream and restarted; (lost, repeated, B's log)."""
    queue_b = broker.queue(f"recv-{state}")
    sender = spawn_node(f"send-{state}-{broker.id}", broker.config(broker.queue(f"send-{state}"), state=state))
    receiver = spawn_node(f"recv-{state}-{broker.id}", broker.config(queue_b, state=state))
    sender.start()
    receiver.start()
    intel = [indicator(f"10.9.{i // 250}.{i % 250}") for i in range(6000)]
    ids = [i.id for i in intel]
    sender.publish(intel)
    for fetched in (1000, 3500):
        # Killed once B fetched that many from its queue: a moment set by the broker's side, not by B's app
        # writing its output (a kill right after the app's output would hit the one window left, see README).
        wait_until(
            lambda f=fetched: len(ids) - broker.message_count(f"threatbus.{queue_b}") >= f,
            60,
            interval=0.005,
            what=f"B to fetch {fetched}",
        )
        sigkill(receiver)  # no stop, no last acks
        killed_at = len(receiver.received())
        assert killed_at < len(ids), f"the kill came after the stream ended ({killed_at})"
        receiver.start()
    wait_until(lambda: {m.get("id") for m in receiver.received()} >= set(ids), 60, what="every message at B")
    assert receiver.stop() == 0
    assert sender.stop() == 0
    lost, repeated = lost_and_repeated(receiver.received(), ids)
    return lost, repeated, receiver.log()


def test_a_receiving_node_killed_mid_stream_loses_nothing_and_repeats_at_most_what_its_app_just_took(
    broker, spawn_node
):
    # Acks and dedup keys follow what the app took from its queue (within a millisecond): nothing is lost, and
    # only a kill between the app taking messages and the consumer noticing it can repeat them (README, Limits).
    lost, repeated, log = kill_receiver_mid_stream(broker, spawn_node, "disk")
    assert lost == [], f"lost {len(lost)}"
    assert len(repeated) <= 2 * 200, f"more repeats than two prefetch windows: {len(repeated)}"
    assert "key(s) of the last window loaded from" in log


@pytest.mark.parametrize(("state", "repeats"), [("disk", 0), ("memory", 500)])
def test_a_receiving_node_recognises_after_its_sigkill_what_it_delivered_before(broker, spawn_node, state, repeats):
    """The same 500 messages come again after the restart (as a resend after a lost confirm would): dropped."""
    sender = spawn_node(f"again-a-{state}-{broker.id}", broker.config(broker.queue(f"again-a-{state}"), state=state))
    receiver = spawn_node(f"again-b-{state}-{broker.id}", broker.config(broker.queue(f"again-b-{state}"), state=state))
    sender.start()
    receiver.start()
    intel = [indicator(f"10.8.{i // 250}.{i % 250}") for i in range(500)]
    ids = [m.id for m in intel]
    sender.publish(intel)
    receiver.wait_received(set(ids))
    sigkill(receiver)
    receiver.start()
    marker = indicator("10.8.9.9")
    broker.publish_raw([m.encode() for m in intel] + [marker.encode()])
    receiver.wait_received({marker.id})
    assert receiver.stop() == 0
    assert sender.stop() == 0
    lost, repeated = lost_and_repeated(receiver.received(), ids)
    assert lost == []
    assert len(repeated) == repeats
