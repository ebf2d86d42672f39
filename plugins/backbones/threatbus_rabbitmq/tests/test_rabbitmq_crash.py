"""SIGKILL of real node processes mid-stream: counted per message, nothing lost and nothing twice.

The receiving node's dedup window and the sending node's outbox live in
``node.data_dir`` (the tests give each node its own under ``tmp_path``).
``state: memory`` is the behaviour before they did: the tests run it too,
to show the fault they guard against is real.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import orjson
import pytest

from threatbus.data import decode
from threatbus.testing import indicator, wait_until
from threatbus_rabbitmq.dedup import FILE_NAME, digest, in_doubt, read_slots

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


class Killed:
    """What a receiving node killed mid-stream delivered, and what it had in doubt at each kill."""

    def __init__(self, ids: list[str], received: list[dict[str, Any]], log: str, doubt: set[int]) -> None:
        self.lost, self.repeated = lost_and_repeated(received, ids)
        self.received = received
        self.log = log
        self.doubt = doubt  # digests handed to the app and not reported done when the node died
        self.skipped = log.count("testapp: in doubt and already in the outbox")


def kill_receiver_mid_stream(broker: Any, spawn_node: Any, state: str, knows_delivered: bool = True) -> Killed:
    """Node B receives a stream from node A, is SIGKILLed twice mid-stream and restarted."""
    label = f"{state}{'' if knows_delivered else '-cannot-tell'}"
    queue_b = broker.queue(f"recv-{label}")
    sender = spawn_node(f"send-{label}-{broker.id}", broker.config(broker.queue(f"send-{label}"), state=state))
    receiver = spawn_node(
        f"recv-{label}-{broker.id}", broker.config(queue_b, state=state), knows_delivered=knows_delivered
    )
    sender.start()
    receiver.start()
    intel = [indicator(f"10.9.{i // 250}.{i % 250}") for i in range(6000)]
    ids = [i.id for i in intel]
    sender.publish(intel)
    doubt: set[int] = set()
    for fetched in (1000, 3500):
        # Killed once B fetched that many from its queue: a moment set by the broker's side, not by B's app.
        wait_until(
            lambda f=fetched: len(ids) - broker.message_count(f"threatbus.{queue_b}") >= f,
            60,
            interval=0.005,
            what=f"B to fetch {fetched}",
        )
        sigkill(receiver)  # no stop, no last acks
        killed_at = len(receiver.received())
        assert killed_at < len(ids), f"the kill came after the stream ended ({killed_at})"
        doubt |= in_doubt(read_slots(receiver.data_dir / "rabbitmq" / FILE_NAME))
        receiver.start()
    wait_until(lambda: {m.get("id") for m in receiver.received()} >= set(ids), 60, what="every message at B")
    assert receiver.stop() == 0
    assert sender.stop() == 0
    return Killed(ids, receiver.received(), receiver.log(), doubt)


def test_a_receiving_node_killed_mid_stream_loses_nothing_and_repeats_nothing(broker, spawn_node):
    # Acked and keyed as done once the app acknowledged what it wrote; what it wrote and had not acknowledged
    # yet when the node died comes again in doubt, and the app, which can look into its output, skips it.
    killed = kill_receiver_mid_stream(broker, spawn_node, "disk")
    print(f"queue: killed twice: lost {len(killed.lost)}, repeated {len(killed.repeated)}, skipped {killed.skipped}")
    assert killed.lost == [], f"lost {len(killed.lost)}"
    assert killed.repeated == {}, f"repeated {len(killed.repeated)}"
    assert "key(s) of the last window loaded from" in killed.log


def test_an_app_that_cannot_tell_gets_again_only_what_was_in_doubt_when_the_node_died(broker, spawn_node):
    """The one window left (README, Limits): between an app sending a message on and acknowledging it."""
    killed = kill_receiver_mid_stream(broker, spawn_node, "disk", knows_delivered=False)
    print(f"queue, app that cannot tell: lost {len(killed.lost)}, repeated {len(killed.repeated)}")
    assert killed.lost == [], f"lost {len(killed.lost)}"
    by_id = {m["id"]: m for m in killed.received}
    outside = [i for i in killed.repeated if digest(decode(orjson.dumps(by_id[i])).dedup_key) not in killed.doubt]
    assert outside == [], f"{len(outside)} of {len(killed.repeated)} repeats were not in doubt"


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
