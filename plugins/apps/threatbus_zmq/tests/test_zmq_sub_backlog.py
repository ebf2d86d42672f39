"""The sub endpoint holds frames back, undecoded, while the node's apps are behind, and loses none."""

from __future__ import annotations

import queue

import zmq

from threatbus.testing import collect, indicator, wait_until
from threatbus_zmq.client import Sender
from threatbus_zmq.sub import HOLD_ABOVE, ReceiverWorker
from threatbus_zmq.wire import outbound_frame, topic_for

COUNT = 3000  # more than one batch of the receiver


class Behind:
    """A backlog the test sets (``depth``), plus what the receiver handed on and nobody took (``waiting``)."""

    def __init__(self, depth: int) -> None:
        self.depth = depth
        self.waiting: queue.SimpleQueue | None = None

    def __call__(self) -> int:
        return self.depth + (self.waiting.qsize() if self.waiting is not None else 0)


def receiver_with(backlog: Behind) -> tuple[ReceiverWorker, queue.SimpleQueue, Sender, zmq.Context]:
    context = zmq.Context()
    sub = context.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    port = sub.bind_to_random_port("tcp://127.0.0.1")
    published: queue.SimpleQueue = queue.SimpleQueue()
    backlog.waiting = published
    worker = ReceiverWorker(sub, published, backlog)
    worker.start()
    sender = Sender("127.0.0.1", port, context=context)
    sender.wait_ready()
    return worker, published, sender, context


def test_frames_wait_undecoded_while_the_apps_are_behind_and_all_arrive_in_order() -> None:
    backlog = Behind(HOLD_ABOVE + 1)
    worker, published, sender, context = receiver_with(backlog)
    try:
        sent = [indicator(f"10.1.{n // 256}.{n % 256}") for n in range(COUNT)]
        for message in sent:
            sender.send(message)
        wait_until(lambda: len(worker.held) == COUNT, 20, what="every frame held")
        assert published.empty() and worker.received == 0
        backlog.depth, backlog.waiting = 0, None  # the apps caught up
        arrived = collect(published, COUNT, timeout=20)
        assert [m.id for m in arrived] == [m.id for m in sent]
        assert not worker.held and worker.received == COUNT
    finally:
        sender.close(linger=0)
        worker.stop()
        worker.join(5)
        context.term()


def test_only_what_fits_below_the_mark_is_decoded() -> None:
    backlog = Behind(HOLD_ABOVE + 1)
    worker, published, sender, context = receiver_with(backlog)
    try:
        for n in range(COUNT):
            sender.send(indicator(f"10.2.{n // 256}.{n % 256}"))
        wait_until(lambda: len(worker.held) == COUNT, 20, what="every frame held")
        backlog.depth = HOLD_ABOVE - 100  # room for 100 more: what the receiver hands on counts too
        wait_until(lambda: worker.received == 100, 20, what="the room filled")
        # Nobody takes them: the receiver looks again and again, and hands on no more.
        wait_until(lambda: worker.held_checks >= 5, 5, what="five more looks at the backlog")
        assert worker.received == 100 and len(worker.held) == COUNT - 100
        assert published.qsize() == 100
    finally:
        sender.close(linger=0)
        worker.stop()
        worker.join(5)
        context.term()


def test_held_frames_are_handed_on_when_the_receiver_stops() -> None:
    backlog = Behind(HOLD_ABOVE + 1)
    worker, published, sender, context = receiver_with(backlog)
    try:
        sent = [indicator(f"10.3.0.{n}") for n in range(200)]
        for message in sent:
            sender.send(message)
        wait_until(lambda: len(worker.held) == len(sent), 20, what="every frame held")
    finally:
        sender.close(linger=0)
        worker.stop()
        worker.join(5)
        context.term()
    assert [m.id for m in collect(published, len(sent))] == [m.id for m in sent]


def test_invalid_frames_held_back_are_rejected_when_released() -> None:
    backlog = Behind(HOLD_ABOVE + 1)
    worker, published, sender, context = receiver_with(backlog)
    try:
        good = indicator("10.4.0.1")
        sender.send_frame(b"stix2/indicator {not json")
        sender.send_frame(outbound_frame(topic_for(good), good))
        wait_until(lambda: len(worker.held) == 2, 20)
        backlog.depth, backlog.waiting = 0, None
        assert collect(published, 1)[0].id == good.id
        wait_until(lambda: worker.rejected == 1, 5)
    finally:
        sender.close(linger=0)
        worker.stop()
        worker.join(5)
        context.term()
