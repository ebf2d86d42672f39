"""The apps subscribed over the manage socket, and their bounded buffers.

Each ``Subscription`` is the queue the core delivers into (``put_nowait``
only, never blocking the backbone) and the buffer the publisher drains into
the pub socket. ``Subscriptions`` is the registry: it subscribes and
unsubscribes at the core, expires subscribers that stopped heartbeating,
forwards snapshot requests and reports drops.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import orjson

from threatbus.data import TOPIC_SNAPSHOT_ENVELOPE, Message, SnapshotEnvelope, SnapshotRequest, StixObject
from threatbus.delivery import Receipt
from threatbus.policy import Filter, FilterStats
from threatbus.snapshots import SnapshotEnd
from threatbus_zmq.settings import ZmqSettings
from threatbus_zmq.wire import KINDS, SNAPSHOT_END_KIND, new_p2p_topic

logger = logging.getLogger(__name__)

# How often one subscriber's drops are reported at most.
DROP_REPORT_INTERVAL = 10.0


class SubscriptionError(Exception):
    """A subscribe request that cannot be served; the message goes into the reply."""


class Tracked:
    """A buffered message whose backbone waits to hear that it went out (``threatbus.delivery``)."""

    __slots__ = ("message", "receipt")

    def __init__(self, message: Message, receipt: Receipt | None) -> None:
        self.message = message
        self.receipt = receipt  # None once claimed: done by whoever claimed it


class Subscription:
    """One app's subscription: its p2p topic, its topics and its bounded buffer.

    ``put_nowait`` runs in the backbone's and the snapshot router's threads;
    ``frame`` and the buffer's left end belong to the publisher thread.
    ``collections.deque`` appends and pops are atomic, so no lock is needed.

    A backbone that acks a broker hands messages with a receipt
    (``put_tracked``): the publisher reports each done once its frame was
    given to the pub socket (``sent``), so a node killed while messages wait
    here gets them again from the broker. An app whose messages wait too long
    (not connected, not reading) is let go (``release``): done at once until
    its buffer ran empty.
    """

    def __init__(
        self,
        serial: int,
        p2p_topic: str,
        topics: list[str],
        bound: int,
        ready: queue.SimpleQueue,
        client_filter: Filter | None = None,
        filtered: FilterStats | None = None,
    ) -> None:
        self.serial = serial
        self.p2p_topic = p2p_topic
        self.topics = topics
        self.bound = bound
        self.pending: deque[Message | SnapshotEnd | bytes] = deque()  # bytes: framed already (put_answers)
        self.snapshot_ids: frozenset[str] = frozenset()
        self.dropped = 0
        self.reported_dropped = 0
        self.last_drop_report = 0.0
        self.closed = False
        # Set by the publisher once the app's SUB socket subscribed to the p2p
        # topic: until then messages wait in the buffer instead of being lost.
        self.connected = False
        self.last_seen = time.monotonic()
        self._ready = ready
        # The client's own filter, behind the app's (which the core applies before this queue).
        self.filter = client_filter
        self.filtered = filtered or FilterStats()
        self._room = threading.Event()
        self._claims = threading.Lock()  # a receipt is done once: by the publisher, release or retire
        self.released = False
        prefix = p2p_topic.encode("ascii")
        self._prefixes = {cls: prefix + kind.encode() + b" " for cls, kind in KINDS.items()}
        self._end_prefix = prefix + SNAPSHOT_END_KIND.encode() + b" "
        # Envelopes reach this queue through the snapshot router (ours by
        # construction) and, for a subscription to 'threatbus/…', through topic
        # routing as well: only those need checking against our request ids.
        self._sees_all_envelopes = any(TOPIC_SNAPSHOT_ENVELOPE.startswith(topic) for topic in topics)

    def __repr__(self) -> str:
        return f"subscriber #{self.serial} ({', '.join(self.topics)})"

    # ---- the queue interface the core uses -------------------------------

    def put_nowait(self, message: Message | SnapshotEnd) -> None:
        """Buffer ``message`` for the app; when the buffer is full, count it as dropped."""
        if self.closed:
            return
        if self.filter is not None:
            reason = self.filter.check(message)
            if reason is not None:
                self.filtered.held(reason)
                return
        if len(self.pending) >= self.bound:
            self.dropped += 1
            return
        self.pending.append(message)
        self._ready.put(self)

    def put_tracked(self, message: Message, receipt: Receipt) -> None:
        """As ``put_nowait``; ``receipt.done()`` follows once the message went to the pub socket (or nowhere)."""
        if self.closed or self.released:
            self.put_nowait(message)
            receipt.done()
            return
        if self.filter is not None:
            reason = self.filter.check(message)
            if reason is not None:
                self.filtered.held(reason)
                receipt.done()
                return
        if len(self.pending) >= self.bound:
            self.dropped += 1
            receipt.done()
            return
        self.pending.append(Tracked(message, receipt))  # type: ignore[arg-type]
        self._ready.put(self)

    def sent(self, item: Tracked) -> None:
        """The publisher took ``item`` off the buffer (sent, or nothing to send): its receipt is done."""
        with self._claims:
            receipt, item.receipt = item.receipt, None
        if receipt is not None:
            receipt.done()

    def release(self, receipt: Receipt | None = None) -> int:
        """Stop holding the backbone back (if ``receipt`` waits here, or always without one); how many were let go.

        Done with every receipt buffered; until the buffer ran empty
        (``caught_up``), messages are done when buffered.
        """
        with self._claims:
            held = [item for item in list(self.pending) if type(item) is Tracked and item.receipt is not None]
            if not held or (receipt is not None and not any(item.receipt is receipt for item in held)):
                return 0
            self.released = True
            receipts = []
            for item in held:
                receipts.append(item.receipt)
                item.receipt = None
        for r in receipts:
            r.done()  # type: ignore[union-attr]
        return len(receipts)

    def caught_up(self) -> None:
        """The publisher emptied the buffer: a released subscription holds the backbone back again."""
        if self.released and not self.pending:
            self.released = False
            logger.info("%s caught up: the backbone waits for its deliveries again", self)

    def put(self, message: Message | SnapshotEnd, block: bool = True, timeout: float | None = None) -> None:
        """As ``put_nowait``, but a blocking put waits (up to ``timeout``) while the buffer is full.

        The core's log answerer uses it to hand over a large snapshot without
        losing it; raises ``queue.Full`` when no room came in time.
        """
        if block and not self.closed and len(self.pending) >= self.bound:
            deadline = None if timeout is None else time.monotonic() + timeout
            while len(self.pending) >= self.bound and not self.closed:
                self._room.clear()
                if len(self.pending) < self.bound:
                    break
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise queue.Full
                self._room.wait(0.05 if remaining is None else min(remaining, 0.05))
        self.put_nowait(message)

    def put_answers(self, request: SnapshotRequest, answers: list[StixObject], timeout: float | None = None) -> int:
        """Buffer as many of the log's ``answers`` to ``request`` as there is room for, from the first on.

        Returns how many were taken. The core's log answerer hands a large
        snapshot over in batches: one wake-up of the publisher per batch
        instead of one per message, and each answer is framed at once, as
        the body of its envelope (the app sends the body): a buffer of bytes
        costs the garbage collector nothing, while 10,000 waiting messages
        each reached its oldest generation and kept full collections running
        through a snapshot. With no room at all it waits up to ``timeout``
        (None: as long as it takes, 0: not at all). Answers the client's
        filter holds back count as taken; on a closed subscription all do
        (and go nowhere).
        """
        if self.closed:
            return len(answers)
        room = self.bound - len(self.pending)
        if room <= 0 and timeout != 0:
            deadline = None if timeout is None else time.monotonic() + timeout
            while room <= 0 and not self.closed:
                self._room.clear()
                room = self.bound - len(self.pending)
                if room > 0:
                    break
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return 0
                self._room.wait(0.05 if remaining is None else min(remaining, 0.05))
                room = self.bound - len(self.pending)
            if self.closed:
                return len(answers)
        if room <= 0:
            return 0
        taken = answers if room >= len(answers) else answers[:room]
        prefixes = self._prefixes
        if self.filter is None:
            frames = [prefixes[type(answer)] + answer.encode() for answer in taken]
        else:
            frames = []
            for answer in taken:
                reason = self.filter.check(answer)  # the same verdict as on its envelope
                if reason is None:
                    frames.append(prefixes[type(answer)] + answer.encode())
                else:
                    self.filtered.held(reason)
        self.pending.extend(frames)
        self._ready.put(self)
        return len(taken)

    def made_room(self) -> None:
        """Called by the publisher after sending: wakes a blocked ``put``."""
        if len(self.pending) < self.bound:
            self._room.set()

    def qsize(self) -> int:
        return len(self.pending)

    # ---- publisher side ------------------------------------------------

    def frame(self, message: Message | SnapshotEnd | bytes) -> bytes | None:
        """The pub frame of ``message`` for this subscriber, or None if it gets none."""
        if type(message) is bytes:
            return message  # framed already (put_answers)
        prefix = self._prefixes.get(type(message))
        if prefix is not None:
            return prefix + message.encode()  # type: ignore[union-attr]
        if isinstance(message, SnapshotEnvelope):
            if self._sees_all_envelopes and message.snapshot_id not in self.snapshot_ids:
                return None
            # The requester gets the body of an envelope, as the kind of the body (its JSON as it came).
            kind, text = message.body_text()
            return self._prefixes[kind] + text
        if isinstance(message, SnapshotEnd):
            # Only subscribers that asked get one (the core sends it only then).
            body = {
                "snapshot_id": message.snapshot_id,
                "snapshot_type": int(message.snapshot_type),
                "count": message.count,
            }
            return self._end_prefix + orjson.dumps(body)
        return None


class Subscriptions:
    """All subscriptions of one plugin; thread-safe."""

    def __init__(
        self,
        subscribe: Callable[..., list[str]],
        unsubscribe: Callable[[str, Any], None],
        ready: queue.SimpleQueue,
        settings: ZmqSettings,
    ) -> None:
        self._subscribe = subscribe
        self._unsubscribe = unsubscribe
        self._ready = ready
        # Per subscriber: the buffer, and the seconds without a heartbeat that end it; and how many may subscribe.
        self.buffer_size = settings.buffer_size
        self.heartbeat_timeout = settings.heartbeat_timeout
        self.max_subscribers = settings.max_subscribers
        self._lock = threading.Lock()
        self._by_topic: dict[str, Subscription] = {}
        self._serials = itertools.count(1)
        self._retired_dropped = 0
        self.filtered = FilterStats()  # what client filters held back, all clients together

    # ---- manage requests -----------------------------------------------

    def add(
        self, topics: list[str], snapshot: timedelta, client_filter: Filter | None = None, snapshot_end: bool = False
    ) -> Subscription:
        """Subscribe a new app to ``topics`` behind its own filter, if any; request a snapshot if asked
        (with an end marker if asked)."""
        with self._lock:
            if len(self._by_topic) >= self.max_subscribers:
                raise SubscriptionError(f"subscriber limit of {self.max_subscribers} reached")
            p2p_topic = new_p2p_topic()
            while p2p_topic in self._by_topic:  # 26**32 topics: never in practice
                p2p_topic = new_p2p_topic()
        sub = Subscription(
            next(self._serials), p2p_topic, topics, self.buffer_size, self._ready, client_filter, self.filtered
        )
        snapshot_ids: list[str] = []
        subscribed: list[str] = []
        try:
            for topic in topics:
                # snapshot_end only when asked: the subscribe callback of older cores lacks it.
                extra = {"snapshot_end": True} if snapshot_end and snapshot else {}
                snapshot_ids.extend(self._subscribe(topic, sub, snapshot=snapshot, **extra) or [])
                subscribed.append(topic)
        except Exception:
            sub.closed = True
            for topic in subscribed:
                self._unsubscribe_quietly(topic, sub)
            raise
        sub.snapshot_ids = frozenset(snapshot_ids)
        with self._lock:
            self._by_topic[p2p_topic] = sub
        logger.info(
            "%s subscribed%s%s; %d subscribers",
            sub,
            f" with a snapshot of {snapshot}" if snapshot_ids else "",
            f" behind its filter {client_filter.spec}" if client_filter is not None else "",
            len(self._by_topic),
        )
        return sub

    def remove(self, p2p_topic: str, reason: str) -> bool:
        """End a subscription; False if ``p2p_topic`` is unknown."""
        with self._lock:
            sub = self._by_topic.pop(p2p_topic, None)
            if sub is None:
                return False
        self._retire(sub)
        logger.info("%s %s; %d subscribers", sub, reason, len(self._by_topic))
        return True

    def heartbeat(self, p2p_topic: str) -> bool:
        sub = self._by_topic.get(p2p_topic)
        if sub is None:
            return False
        sub.last_seen = time.monotonic()
        return True

    def get(self, p2p_topic: str) -> Subscription | None:
        return self._by_topic.get(p2p_topic)

    # ---- from the core -------------------------------------------------

    def forward_request(self, request: SnapshotRequest, requester: Any = None) -> int:
        """Hand a snapshot request to every subscriber but ``requester``, the one that made it."""
        with self._lock:
            targets = [sub for sub in self._by_topic.values() if sub is not requester]
        for sub in targets:
            sub.put_nowait(request)
        if targets:
            logger.debug("forwarded snapshot request %s to %d subscribers", request.snapshot_id, len(targets))
        return len(targets)

    # ---- housekeeping (manage thread) ---------------------------------

    def expire(self, now: float | None = None) -> int:
        """Drop subscribers whose last heartbeat is older than the timeout."""
        if self.heartbeat_timeout <= 0:
            return 0
        now = time.monotonic() if now is None else now
        with self._lock:
            stale = [p2p for p2p, sub in self._by_topic.items() if now - sub.last_seen > self.heartbeat_timeout]
        for p2p in stale:
            self.remove(p2p, f"expired: no heartbeat for {self.heartbeat_timeout:g}s")
        return len(stale)

    def report_drops(self, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        with self._lock:
            subs = list(self._by_topic.values())
        for sub in subs:
            new = sub.dropped - sub.reported_dropped
            if new and now - sub.last_drop_report >= DROP_REPORT_INTERVAL:
                logger.warning(
                    "%s is not keeping up: dropped %d messages (buffer of %d full); %d dropped in total",
                    sub,
                    new,
                    sub.bound,
                    sub.dropped,
                )
                sub.reported_dropped = sub.dropped
                sub.last_drop_report = now

    # ---- read-outs and shutdown ----------------------------------------

    def __len__(self) -> int:
        return len(self._by_topic)

    def all(self) -> list[Subscription]:
        with self._lock:
            return list(self._by_topic.values())

    def dropped(self) -> int:
        with self._lock:
            return self._retired_dropped + sum(sub.dropped for sub in self._by_topic.values())

    def buffered(self) -> int:
        with self._lock:
            return sum(len(sub.pending) for sub in self._by_topic.values())

    def close_all(self) -> None:
        with self._lock:
            subs = list(self._by_topic.values())
            self._by_topic.clear()
        for sub in subs:
            self._retire(sub)

    def _retire(self, sub: Subscription) -> None:
        sub.closed = True
        for topic in sub.topics:
            self._unsubscribe_quietly(topic, sub)
        unsent = 0
        while True:  # popped one by one: the publisher may pop concurrently, and each receipt is done once
            try:
                item = sub.pending.popleft()
            except IndexError:
                break
            unsent += 1
            if type(item) is Tracked:
                sub.sent(item)  # goes nowhere: done as far as the backbone is concerned
        with self._lock:
            self._retired_dropped += sub.dropped
        if unsent:
            logger.debug("%s: discarded %d undelivered messages", sub, unsent)

    def _unsubscribe_quietly(self, topic: str, sub: Subscription) -> None:
        try:
            self._unsubscribe(topic, sub)
        except Exception:
            logger.exception("failed to unsubscribe %s from %s", sub, topic)
