"""The zmq app's subscriptions report to the backbone when a message went out (``threatbus.delivery``)."""

from __future__ import annotations

import queue

from threatbus.testing import TrackedReceipt, indicator, wait_until
from threatbus_zmq.subscribers import Subscription
from threatbus_zmq.testing import FakeSocket, connected, run_worker, subscriptions
from threatbus_zmq.wire import new_p2p_topic


class Tracked(TrackedReceipt):
    """A receipt that also notes how many frames had gone out when the app reported its message done."""

    def __init__(self, sock: FakeSocket | None = None) -> None:
        super().__init__()
        self.sock = sock
        self.frames_then: int | None = None

    def on_done(self) -> None:
        self.frames_then = len(self.sock.frames) if self.sock is not None else None
        super().on_done()


def test_a_tracked_message_is_done_once_its_frame_went_to_the_socket():
    ready: queue.SimpleQueue = queue.SimpleQueue()
    sub = connected(ready, bound=5)
    sock = FakeSocket(accept=1)
    worker = run_worker(sock, ready)
    try:
        receipts = [Tracked(sock) for _ in range(3)]
        for n, receipt in enumerate(receipts):
            sub.put_tracked(indicator(f"10.0.0.{n}"), receipt)
        wait_until(lambda: sub in worker.blocked, 10, what="the connection to fill")
        assert receipts[0].delivered.is_set() and receipts[0].frames_then == 1
        assert not receipts[1].delivered.is_set(), "done while its frame waited in the buffer"
        sock.accept = 100
        assert receipts[2].delivered.wait(5)
        assert [r.frames_then for r in receipts] == [1, 2, 3]
    finally:
        worker.stop()
        worker.join(5)


def test_tracked_messages_that_go_nowhere_are_done_at_once():
    ready: queue.SimpleQueue = queue.SimpleQueue()
    full = Subscription(1, new_p2p_topic(), ["stix2"], 1, ready)
    kept, dropped = Tracked(), Tracked()
    full.put_tracked(indicator("10.0.0.1"), kept)
    full.put_tracked(indicator("10.0.0.2"), dropped)  # the buffer is full
    assert dropped.delivered.is_set() and full.dropped == 1
    assert not kept.delivered.is_set()
    subs = subscriptions(ready)
    subs._retire(full)  # unsubscribed: what waited goes nowhere
    assert kept.delivered.is_set() and not full.pending


def test_a_released_subscription_is_done_at_once_until_its_buffer_ran_empty():
    ready: queue.SimpleQueue = queue.SimpleQueue()
    waiting = Subscription(1, new_p2p_topic(), ["stix2"], 100, ready)  # the app never connected
    first, second = Tracked(), Tracked()
    waiting.put_tracked(indicator("10.0.0.1"), first)
    assert waiting.release(Tracked()) == 0  # a receipt it does not hold
    assert waiting.release(first) == 1 and first.delivered.is_set()
    waiting.put_tracked(indicator("10.0.0.2"), second)
    assert second.delivered.is_set() and len(waiting.pending) == 2
    sock = FakeSocket()
    worker = run_worker(sock, ready)
    try:
        waiting.connected = True
        ready.put(waiting)
        wait_until(lambda: not waiting.released, 5, what="the buffer to run empty")
        assert len(sock.frames) == 2
        third = Tracked(sock)
        waiting.put_tracked(indicator("10.0.0.3"), third)
        assert third.delivered.wait(5) and third.frames_then == 3
    finally:
        worker.stop()
        worker.join(5)
