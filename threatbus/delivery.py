"""Apps telling the backbone when they are done with a message: receipts and the queue that carries them.

A backbone that must not lose nor repeat messages across a crash (it acks a
broker, keeps dedup keys on disk) needs to know when an app has acted on a
message: acked earlier, a message still waiting in the app's queue is lost
when the node dies; keyed earlier, it is dropped as a repeat after the
restart; keyed later, it comes twice.

The backbone hands the router a ``Receipt`` with the message. A sink that
has ``put_tracked(item, receipt)`` (``DeliveryQueue``, the policy filter's
wrapper around one) takes the receipt along; the router counts it
(``expect``) and the sink calls ``receipt.done()`` once its app is done with
the item. The last ``done`` runs ``on_done``, in that thread: for an app that
acknowledges with ``DeliveryQueue.task_done`` right after sending an item on,
in the app's own thread, a few microseconds after the send. Sinks without
``put_tracked`` are done when handed the message, as far as receipts go.

Between an app sending a message on and its ``task_done`` the node may die;
the message then comes again after the restart, marked ``in_doubt``. Only the
app can tell whether it got out: a ``DeliveryQueue`` given
``already_delivered`` asks it and skips what it already has.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections import deque
from collections.abc import Callable
from typing import Any

logger = logging.getLogger(__name__)


class Receipt:
    """One message on its way to the apps; ``on_done`` runs once every tracking sink that took it is done.

    Whoever hands the message on counts the sinks first (``expect``), all of
    them before handing it to any (an app may finish before the next sink got
    it). Nothing expected after routing: the backbone calls ``finish``.
    """

    __slots__ = ("_left", "_lock", "expected", "in_doubt", "settled")

    def __init__(self, in_doubt: bool = False, lock: threading.Lock | None = None) -> None:
        self._left = 0
        self._lock = lock or threading.Lock()  # a backbone may share one between its receipts (never nested)
        self.expected = False  # some sink was to call done
        self.settled = False  # set after on_done returned
        # Handed to the apps before the node died and never reported done: an app may already have it.
        self.in_doubt = in_doubt

    def expect(self, count: int = 1) -> None:
        """``count`` more sinks take the message and will call ``done``."""
        with self._lock:
            self._left += count
            self.expected = True

    def done(self) -> None:
        """One sink is done (or did not take the message after all); the last one runs ``on_done``."""
        with self._lock:
            self._left -= 1
            last = self._left == 0
        if last:
            self.on_done()
            self.settled = True

    def finish(self) -> None:
        """Routing ended: if no sink was expected, the message is done now (else the last ``done`` says so)."""
        if not self.expected:
            self.on_done()
            self.settled = True

    def on_done(self) -> None:
        """Runs once, in the thread of the last ``done``: subclasses record the delivery here."""


class DeliveryQueue:
    """A subscriber queue whose app acknowledges each message once it acted on it.

    Use it like ``queue.Queue``: ``get`` an item (or ``get_many``), send it
    to the tool, then ``task_done()`` (``task_done(n)`` for a batch of
    ``n``). The backbone then learns in that very call that the message was
    delivered, so a node killed a moment later neither loses it nor delivers
    it again after its restart. ``task_done`` acknowledges the oldest items
    taken and not yet acknowledged: one worker per queue, or workers that
    acknowledge in the order they took. Every item taken must be
    acknowledged, the ones the app skips too.

    ``already_delivered(item) -> bool``, if given, is asked about messages in
    doubt after a crash (``Receipt.in_doubt``: the node died between handing
    them over and the app's ``task_done``); those it already delivered are
    acknowledged and skipped by ``get``. It runs under the queue's lock: keep
    it to a lookup.

    An app that stops acknowledging must not stall the node: the backbone
    calls ``release`` when a message waited too long; the queue then gives up
    the receipts it holds and stops tracking (items are done when handed
    over) until the app caught up: queue empty, everything acknowledged.
    ``maxsize`` bounds it like ``queue.Queue`` (``put_nowait`` raises
    ``queue.Full``; the router counts and drops).
    """

    # Items and receipts are kept apart, receipts numbered by the item they go with: an item without a
    # receipt (every one on a backbone that acknowledges nothing, such as inmem) costs one deque slot, not a
    # tuple more for the garbage collector to walk while a million wait. Conditions are notified only when
    # someone waits on them (a bulk load puts and takes millions of items while nobody does).

    def __init__(self, maxsize: int = 0, already_delivered: Callable[[Any], bool] | None = None) -> None:
        self.maxsize = maxsize
        self.already_delivered = already_delivered
        self._items: deque[Any] = deque()
        self._put = 0  # items ever queued: the number of the next one
        self._out = 0  # items ever left the queue (taken or skipped): the number of the next one to leave
        self._receipts: deque[tuple[int, Receipt]] = deque()  # (item number, receipt) of the queued items
        self._took = 0  # items ever taken
        self._acknowledged = 0  # of those, acknowledged (task_done)
        self._taken: deque[tuple[int, Receipt]] = deque()  # (take number, receipt), taken and not acknowledged
        self._released = False
        self._woken = False  # wake() was called: a waiting get returns Empty
        self._mutex = threading.Lock()
        self._not_empty = threading.Condition(self._mutex)
        self._not_full = threading.Condition(self._mutex)
        self._getters = 0  # waiting on _not_empty
        self._putters = 0  # waiting on _not_full

    # ---- the backbone's side -------------------------------------------

    def put_tracked(self, item: Any, receipt: Receipt) -> None:
        """Queue ``item``; ``receipt.done()`` follows once the app acknowledged it. Raises ``queue.Full``."""
        with self._mutex:
            if self.maxsize > 0 and len(self._items) >= self.maxsize:
                raise queue.Full
            released = self._released
            if not released:
                self._receipts.append((self._put, receipt))
            self._append(item)
        if released:
            receipt.done()

    def put_nowait(self, item: Any) -> None:
        """Queue ``item`` without a receipt; raises ``queue.Full`` when bounded and full."""
        with self._mutex:
            if self.maxsize > 0 and len(self._items) >= self.maxsize:
                raise queue.Full
            self._append(item)

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        """Queue ``item`` without a receipt (waits for room when bounded, like ``queue.Queue.put``)."""
        if not block or self.maxsize <= 0:
            self.put_nowait(item)
            return
        with self._mutex:
            if len(self._items) >= self.maxsize:
                self._putters += 1
                try:
                    if not self._not_full.wait_for(lambda: len(self._items) < self.maxsize, timeout):
                        raise queue.Full
                finally:
                    self._putters -= 1
            self._append(item)

    def _append(self, item: Any) -> None:
        """Queue ``item`` (the caller holds ``_mutex``) and wake a waiting taker."""
        self._items.append(item)
        self._put += 1
        if self._getters:
            self._not_empty.notify()

    def release(self, receipt: Receipt | None = None) -> int:
        """Stop holding the backbone back (if this queue holds ``receipt``, or always without one).

        Done with every receipt held, untracked until the app caught up;
        returns how many receipts were given up.
        """
        with self._mutex:
            held = [r for _n, r in self._receipts] + [r for _n, r in self._taken]
            if not held or (receipt is not None and not any(r is receipt for r in held)):
                return 0
            self._receipts.clear()
            self._taken.clear()
            self._released = True
        for r in held:
            r.done()
        return len(held)

    @property
    def released(self) -> bool:
        return self._released

    # ---- the app's side ------------------------------------------------

    def wake(self) -> None:
        """Let a ``get`` waiting on the empty queue return (``queue.Empty``) now: a worker asked to stop.

        A marker item put in instead would be taken and need a ``task_done`` of its own, out of order.
        """
        with self._mutex:
            self._woken = True
            self._not_empty.notify_all()

    def get(self, block: bool = True, timeout: float | None = None) -> Any:
        """The oldest item, like ``queue.Queue.get``; raises ``queue.Empty``."""
        with self._mutex:
            if self._items and not self._receipts:  # the common case, without a list
                self._out += 1
                self._took += 1
                if self._putters:
                    self._not_full.notify()
                return self._items.popleft()
        taken = self.get_many(1, timeout if block else 0)
        if not taken:
            raise queue.Empty
        return taken[0]

    def get_nowait(self) -> Any:
        return self.get(block=False)

    def get_many(self, max_items: int, timeout: float | None = None) -> list[Any]:
        """Up to ``max_items`` of the oldest items, all that are there up to that.

        Waits up to ``timeout`` seconds (None: until an item comes, 0: not
        at all) while the queue is empty; returns an empty list if nothing
        came, or at once when ``wake`` was called. One ``task_done(len(...))``
        acknowledges them all.
        """
        done: list[Receipt] = []
        with self._mutex:
            taken = self._take(max_items, timeout, done)
        for receipt in done:
            receipt.done()  # in doubt and delivered before the crash: the app has it
        return taken

    def _take(self, max_items: int, timeout: float | None, done: list[Receipt]) -> list[Any]:
        items = self._items
        taken: list[Any] = []
        while not taken:
            if not items:
                if timeout is not None and timeout <= 0:
                    return taken
                self._getters += 1
                try:
                    self._not_empty.wait_for(lambda: items or self._woken, timeout)
                finally:
                    self._getters -= 1
                if not items:  # timed out or woken
                    self._woken = False
                    return taken
            count = min(max_items, len(items))
            receipts = self._receipts
            if not receipts or receipts[0][0] >= self._out + count:
                # None of them carries a receipt (nothing in doubt either): the app takes them as they are.
                taken = [items.popleft() for _ in range(count)]
                self._out += count
                self._took += count
            else:
                for _ in range(count):
                    item = items.popleft()
                    receipt = receipts.popleft()[1] if receipts and receipts[0][0] == self._out else None
                    self._out += 1
                    if (
                        receipt is not None
                        and receipt.in_doubt
                        and self.already_delivered is not None
                        and self.already_delivered(item)
                    ):
                        done.append(receipt)
                        continue
                    if receipt is not None:
                        self._taken.append((self._took, receipt))
                    self._took += 1
                    taken.append(item)
            if self._putters:
                self._not_full.notify(len(taken) or 1)
        return taken

    def task_done(self, count: int = 1) -> None:
        """The app is done with the ``count`` oldest items it took and did not acknowledge yet."""
        done: list[Receipt] = []
        caught_up = False
        with self._mutex:
            if self._acknowledged + count > self._took:
                raise ValueError("task_done() called more often than items were taken")
            self._acknowledged += count
            taken = self._taken
            while taken and taken[0][0] < self._acknowledged:
                done.append(taken.popleft()[1])
            if self._released and not self._items and self._acknowledged == self._took:
                self._released = False
                caught_up = True
        for receipt in done:
            receipt.done()
        if caught_up:
            logger.info("subscriber queue: its app caught up; the backbone waits for its acknowledgements again")

    def qsize(self) -> int:
        return len(self._items)

    def empty(self) -> bool:
        return not self._items

    def full(self) -> bool:
        return 0 < self.maxsize <= len(self._items)
