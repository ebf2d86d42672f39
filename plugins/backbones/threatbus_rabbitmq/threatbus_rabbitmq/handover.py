"""Which messages the local apps are done with, so they can be acked (stream transport: their offset stored).

A message is acked, and its dedup key written to disk as done, only once
every app it was routed to is done with it. Acked earlier, a message still
waiting in an app's in-memory queue is lost when the node is killed; keyed
before the app sent it on, it is dropped as a repeat when the broker delivers
it again after the restart. Before routing, its key is written as handed: a
kill between an app sending it on and saying so leaves it in doubt (see
``dedup``).

How an app's queue tells, from exact to not at all:

- ``threatbus.delivery.DeliveryQueue`` (also behind an app's policy filter),
  or another sink with ``put_tracked`` (the zmq app's subscriptions): the
  app acknowledges each message (``task_done``) right after sending it on,
  and the key is written in that call, in the app's thread.
- any other queue with ``qsize`` (``queue.Queue``, ``SimpleQueue``): no app
  has to cooperate. For a queue handed ``c`` messages so far, the one handed
  as number ``n`` is taken once ``c - n >= queue.qsize()`` (everything put
  after it is at most what is still in the queue; other producers on the same
  queue only make this later, never earlier). ``settle`` looks, and writes
  the keys, in the consuming thread (every millisecond while messages wait).
- any other sink: done when handed the message.

A message that waited ``SLOW_AFTER`` seconds stops holding acks back (a stuck
app must not stall the node): the queue holding it is not waited for until
its app caught up (logged).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from typing import Any

from threatbus.delivery import Receipt
from threatbus_rabbitmq.dedup import Deduplicator

logger = logging.getLogger(__name__)

SLOW_AFTER = 1.0


class Delivery(Receipt):
    """One routed message: written to the dedup window as done once its apps are done with it."""

    __slots__ = ("digest", "handover", "queues", "routed_at", "slot")

    def __init__(self, handover: Handover, digest: int, queues: tuple[Any, ...], in_doubt: bool) -> None:
        super().__init__(in_doubt, handover._lock)
        self.handover = handover
        self.digest = digest
        self.queues = queues
        self.routed_at = time.monotonic()
        self.slot = -1  # where the dedup window noted it as handed

    def on_done(self) -> None:
        self.handover._delivered(self)


class _Probe:
    """A plain queue we look into: how many messages we handed it, and which of them may still wait there."""

    __slots__ = ("handed", "marks", "queue", "slow")

    def __init__(self, queue: Any) -> None:
        self.queue = queue
        self.handed = 0
        self.marks: deque[tuple[int, Delivery]] = deque()
        self.slow = False  # not waited for until seen empty


class Handover:
    """Positions (delivery tags, stream offsets) in routing order, each settled once its apps are done.

    The consuming thread calls ``begin``/``routed`` (or ``skip``, ``repeat``)
    for every message in order and ``settle`` now and then; a message is
    recorded in ``dedup`` as done in whichever thread finishes it last,
    usually an app's.
    """

    def __init__(self, dedup: Deduplicator, slow_after: float = SLOW_AFTER) -> None:
        self.dedup = dedup
        self.slow_after = slow_after
        self._lock = threading.Lock()
        self._open: dict[int, Delivery] = {}  # digest -> its delivery while not done: a repeat waits for it
        self._pending: deque[tuple[int, Delivery | None]] = deque()  # None: nothing to wait for
        self._probes: dict[int, _Probe] = {}  # id(queue) -> probe
        # id(router's subscriber tuple) -> (that tuple, whether one tracks deliveries, the plain queues in it)
        self._kinds: dict[int, tuple[tuple[Any, ...], bool, tuple[Any, ...]]] = {}

    def __len__(self) -> int:
        return len(self._pending)

    # ---- the consuming thread ------------------------------------------

    def begin(self, digest: int, queues: tuple[Any, ...], in_doubt: bool = False) -> Delivery | None:
        """A receipt for the message of ``digest`` about to be routed to ``queues``: pass it to the router.

        None when no queue there reports back or is looked into: the message is done once routed.
        ``in_doubt``: handed to the apps before the node's restart and never reported done.
        """
        tracking, plain = self._kinds_of(queues)
        if not tracking and not plain:
            return None
        delivery = Delivery(self, digest, queues, in_doubt)
        for q in plain:
            probe = self._probes.get(id(q))
            if probe is None:
                probe = self._probes[id(q)] = _Probe(q)
            probe.handed += 1  # looked at in this thread only, after routing
            if not probe.slow:
                delivery.expect()
                probe.marks.append((probe.handed, delivery))
        if digest:
            if tracking:  # an app that says when it sent a message on may be asked about it after a crash
                delivery.slot = self.dedup.handed(digest)
            with self._lock:
                self._open[digest] = delivery
        return delivery

    def routed(self, position: int, delivery: Delivery | None, digest: int) -> None:
        """Routing the message of ``digest`` (at ``position``, receipt ``delivery``) ended: wait for its apps."""
        self._pending.append((position, delivery))
        if delivery is None:
            if digest:
                self.dedup.record(digest)  # handed over, and that is all we learn
        else:
            delivery.finish()  # no app to wait for after all: delivered now

    def _kinds_of(self, queues: tuple[Any, ...]) -> tuple[bool, tuple[Any, ...]]:
        # The router's subscriber tuples change only on (un)subscribe: looked at once per tuple.
        kinds = self._kinds.get(id(queues))
        if kinds is None or kinds[0] is not queues:
            if len(self._kinds) > 64:
                self._kinds.clear()
            tracking = any(hasattr(q, "put_tracked") for q in queues)
            plain = tuple(q for q in queues if not hasattr(q, "put_tracked") and hasattr(q, "qsize"))
            kinds = self._kinds[id(queues)] = (queues, tracking, plain)
        return kinds[1], kinds[2]

    def skip(self, position: int) -> None:
        """Nothing at ``position`` reaches an app (rejected, held back, no digest): settled as it comes."""
        self._pending.append((position, None))

    def repeat(self, position: int, digest: int) -> None:
        """A repeat of a recent message: settled once that one is (after a reconnect it may still wait in a queue)."""
        with self._lock:
            delivery = self._open.get(digest)
        self._pending.append((position, delivery if delivery is not None and not delivery.settled else None))

    def settle(self) -> int | None:
        """Pop the leading positions whose apps are done; the last one popped, or None."""
        self._probe()
        pending = self._pending
        last = None
        now = 0.0
        while pending:
            position, delivery = pending[0]
            if delivery is not None and not delivery.settled:
                now = now or time.monotonic()
                if now - delivery.routed_at < self.slow_after:
                    break
                self._stop_waiting(delivery)
            pending.popleft()
            last = position
        return last

    def clear(self) -> None:
        """The positions are gone (a closed channel's tags): forget them; their messages still settle."""
        self._pending.clear()

    # ---- internals -----------------------------------------------------

    def _probe(self) -> None:
        for key, probe in list(self._probes.items()):
            size = probe.queue.qsize()
            marks = probe.marks
            while marks and probe.handed - marks[0][0] >= size:
                marks.popleft()[1].done()
            if probe.slow and size == 0:
                probe.slow = False
                logger.info("handover: an app emptied its queue again: waiting for it again")
            if not marks and not probe.slow:
                del self._probes[key]  # numbering starts afresh: it only makes what counts as taken later

    def _stop_waiting(self, delivery: Delivery) -> None:
        """``delivery`` waited too long: stop waiting for the queues that hold it."""
        for q in delivery.queues:
            release = getattr(q, "release", None)
            released = release(delivery) if release is not None else 0
            probe = self._probes.get(id(q))
            if probe is not None and any(d is delivery for _n, d in probe.marks):
                probe.slow = True
                released = len(probe.marks)
                while probe.marks:
                    probe.marks.popleft()[1].done()
            if released:
                logger.warning(
                    "handover: an app has not finished a message for %.0fs (%d waiting): acking its messages "
                    "without waiting for it until it caught up (they are lost if the node dies now)",
                    self.slow_after,
                    released,
                )
        if not delivery.settled:
            logger.warning("handover: a subscriber never reported a message done: not waiting for it")

    def _delivered(self, delivery: Delivery) -> None:
        # Any thread, usually the app's that just sent the message on: the key goes to disk first.
        digest = delivery.digest
        if digest:
            self.dedup.record(digest, delivery.slot)
            with self._lock:
                if self._open.get(digest) is delivery:
                    del self._open[digest]
