"""The publisher thread on its own, with a fake socket."""

from __future__ import annotations

import queue
from datetime import timedelta

from threatbus.data import SnapshotEnvelope, SnapshotRequest, SnapshotType
from threatbus.policy import Filter
from threatbus.testing import indicator, intel_mix, wait_until
from threatbus_zmq.pub import BATCH, IDLE_WAIT, RETRY_INTERVAL, PublisherWorker
from threatbus_zmq.subscribers import Subscription
from threatbus_zmq.testing import FakeSocket, connected, run_worker, subscriptions
from threatbus_zmq.wire import new_p2p_topic


def test_more_ready_subscribers_than_one_batch_are_all_served():
    ready: queue.SimpleQueue = queue.SimpleQueue()
    subs = [connected(ready) for _ in range(BATCH + 3)]
    message = indicator()
    for sub in subs:
        sub.put_nowait(message)
    sock = FakeSocket()
    worker = run_worker(sock, ready)
    try:
        wait_until(lambda: len(sock.frames) == len(subs), 10, what="every subscriber served")
        assert sorted(frame[:32] for frame in sock.frames) == sorted(sub.p2p_topic.encode() for sub in subs)
        assert sock.frames[0][32:].startswith(b"indicator {")
    finally:
        worker.stop()
        worker.join(5)


def test_a_full_connection_keeps_messages_in_the_bounded_buffer_and_drops_beyond():
    ready: queue.SimpleQueue = queue.SimpleQueue()
    sub = connected(ready, bound=5)
    sock = FakeSocket(accept=2)
    worker = run_worker(sock, ready)
    try:
        messages = [indicator(f"10.0.0.{i}") for i in range(10)]
        for message in messages:
            sub.put_nowait(message)
        wait_until(lambda: len(sock.frames) == 2 and sub in worker.blocked, 10, what="the connection to fill")
        assert len(sub.pending) <= 5 and sub.dropped >= 3
        assert len(sub.pending) + sub.dropped + len(sock.frames) == 10
        sock.accept = 100  # the app reads again
        wait_until(lambda: not sub.pending, 10, what="the buffer to drain")
        assert len(sock.frames) + sub.dropped == 10
    finally:
        worker.stop()
        worker.join(5)


def test_messages_wait_until_the_app_connects_and_closed_subscriptions_get_nothing():
    ready: queue.SimpleQueue = queue.SimpleQueue()
    waiting = Subscription(1, new_p2p_topic(), ["stix2"], 100, ready)
    gone = connected(ready)
    gone.closed = True
    sock = FakeSocket()
    worker = run_worker(sock, ready)
    try:
        waiting.put_nowait(indicator())
        gone.put_nowait(indicator())
        wait_until(lambda: ready.empty(), 5, what="the publisher to look at both")
        assert sock.frames == [] and len(waiting.pending) == 1 and not gone.pending
    finally:
        worker.stop()
        worker.join(5)


REQUEST = SnapshotRequest.create(SnapshotType.INDICATOR, timedelta(days=1))


def test_put_answers_takes_what_fits_in_order_framed_with_one_wake_up_and_waits_for_room():
    ready: queue.SimpleQueue = queue.SimpleQueue()
    sub = connected(ready, bound=5)
    answers = [indicator(f"10.1.0.{i}") for i in range(8)]
    assert sub.put_answers(REQUEST, answers, timeout=0) == 5
    # Framed at once, as the bodies of their envelopes: bytes wait in the buffer, not objects.
    assert list(sub.pending) == [sub.frame(SnapshotEnvelope.wrap(REQUEST, a)) for a in answers[:5]]
    assert ready.qsize() == 1  # one wake-up of the publisher per batch
    assert sub.put_answers(REQUEST, answers[5:], timeout=0) == 0 and sub.dropped == 0  # full: none taken, none lost
    # The publisher makes room meanwhile: a waiting put_answers takes the rest.
    sock = FakeSocket()
    worker = run_worker(sock, ready)
    try:
        assert sub.put_answers(REQUEST, answers[5:], timeout=5) == 3
        wait_until(lambda: len(sock.frames) == 8, 5, what="all sent")
        assert [frame.split(b" ", 1) for frame in sock.frames] == [
            [sub.p2p_topic.encode() + b"indicator", a.encode()] for a in answers
        ]
    finally:
        worker.stop()
        worker.join(5)
    sub.closed = True
    assert sub.put_answers(REQUEST, answers, timeout=0) == len(answers) and len(sub.pending) == 0


def test_put_answers_applies_the_client_filter():
    ready: queue.SimpleQueue = queue.SimpleQueue()
    sub = Subscription(1, new_p2p_topic(), ["stix2"], 10, ready, Filter({"unmarked": "deny"}))
    mix = intel_mix()
    taken = sub.put_answers(REQUEST, [mix["unmarked"], mix["green"], mix["white"]], timeout=0)
    assert taken == 3  # held back counts as taken: it is done with
    assert list(sub.pending) == [sub.frame(mix["green"]), sub.frame(mix["white"])]
    assert sub.filtered.counts["unmarked"] == 1


class RecordingReady:
    """The ready queue, recording how long the publisher is prepared to wait for new work."""

    def __init__(self) -> None:
        self.inner: queue.SimpleQueue = queue.SimpleQueue()
        self.waits: list[float | None] = []

    def put(self, item) -> None:
        self.inner.put(item)

    def get(self, block: bool = True, timeout: float | None = None):
        self.waits.append(timeout)
        return self.inner.get(block, timeout)

    def get_nowait(self):
        return self.inner.get_nowait()


def test_a_blocked_subscriber_is_retried_soon_not_after_an_idle_wait():
    # A snapshot fills a connection and then waits for room in the buffer: nothing new wakes the publisher.
    ready = RecordingReady()
    sub = Subscription(1, new_p2p_topic(), ["stix2"], 100, ready)  # type: ignore[arg-type]
    sub.connected = True
    sock = FakeSocket(accept=2)
    worker = PublisherWorker(sock, subscriptions(ready), ready)  # type: ignore[arg-type]
    worker.start()
    try:
        sub.put_answers(REQUEST, [indicator(f"10.2.0.{i}") for i in range(10)], timeout=0)
        wait_until(lambda: sub in worker.blocked, 5, what="the connection to fill")
        waits_while_blocked = len(ready.waits)
        wait_until(lambda: len(ready.waits) > waits_while_blocked + 2, 5, what="the publisher to go round")
        assert set(ready.waits[waits_while_blocked:]) == {RETRY_INTERVAL}
        sock.accept = 100
        wait_until(lambda: len(sock.frames) == 10, 5, what="the rest sent")
        wait_until(lambda: ready.waits[-1] == IDLE_WAIT, 5, what="an idle wait again")
    finally:
        worker.stop()
        worker.join(5)
