"""Snapshot bookkeeping: requests go to every app, envelopes only to the requester.

Answers reach a requester from two sides: its own node's intel log
(``threatbus.history.LogAnswerer``) and apps anywhere that keep history of
their own. Both pass one gate per request that drops an object already sent
(same id and version), so a requester sees each object once.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass, field
from datetime import timedelta

from threatbus.data import Indicator, Message, SnapshotEnvelope, SnapshotRequest, SnapshotType, StixObject
from threatbus.expiry import ExpirySchedule
from threatbus.history import LogAnswerer, ReadLog
from threatbus.routing import Sink
from threatbus.worker import POLL_INTERVAL, StoppableWorker

logger = logging.getLogger(__name__)

# Requests whose answers we still route; the oldest are forgotten beyond this.
MAX_OPEN_REQUESTS = 10_000


@dataclass(frozen=True)
class SnapshotEnd:
    """Put into a requester's queue after the log's answer to its request, if it asked (``snapshot_end``).

    Not a wire message: apps translate it for their clients (the zmq app's
    ``snapshotend`` frame). ``count`` is how many objects the requester got
    for the request until then; apps with history of their own may still
    answer after it.
    """

    snapshot_id: str
    snapshot_type: SnapshotType
    count: int


# How long the log's answer waits for room in a full requester queue, per object.
LOG_ANSWER_PUT_TIMEOUT = 10.0


def _put_waiting(put: Callable[..., None], item: object, stopping: Callable[[], bool]) -> bool:
    """``put`` with a timeout, in short steps so that a stop of the bus is noticed."""
    deadline = time.monotonic() + LOG_ANSWER_PUT_TIMEOUT
    while True:
        try:
            put(item, timeout=POLL_INTERVAL)
            return True
        except queue.Full:
            if stopping() or time.monotonic() >= deadline:
                return False


class _LogHandover:
    """Hands one log answer to its requester, waiting for room, and counts what it could not take.

    A requester with ``put_answers(request, answers, timeout)`` (it returns
    how many of ``answers`` it took, from the first on, and makes of each
    what it sends: the zmq app frames the body at once) gets whole batches
    of the objects themselves; one with ``put(item, timeout=...)`` gets
    envelopes one by one; any other ``Sink`` only what fits at once. One
    that takes nothing for ``LOG_ANSWER_PUT_TIMEOUT`` is not waited for
    again: the rest goes in without waiting, or is lost.
    """

    def __init__(self, requester: Sink, request: SnapshotRequest, stopping: Callable[[], bool]) -> None:
        self.requester = requester
        self.request = request
        self.stopping = stopping
        self.put_answers: Callable[..., int] | None = getattr(requester, "put_answers", None)
        self.put: Callable[..., None] | None = getattr(requester, "put", None)
        self.waiting = True
        self.lost = 0

    def over(self, answers: list[StixObject]) -> list[StixObject]:
        """Hand ``answers`` over; those the requester took."""
        if self.put_answers is not None:
            taken = self._batch(self.put_answers, answers)
            self.lost += len(answers) - taken
            return answers if taken == len(answers) else answers[:taken]
        handed = []
        for envelope, answer in zip(SnapshotEnvelope.wrap_all(self.request, answers), answers, strict=True):
            if self._one(envelope):
                handed.append(answer)
            else:
                self.lost += 1
        return handed

    def _batch(self, put_answers: Callable[..., int], answers: list[StixObject]) -> int:
        done = 0
        deadline = time.monotonic() + LOG_ANSWER_PUT_TIMEOUT
        while done < len(answers):
            rest = answers[done:] if done else answers
            taken = put_answers(self.request, rest, timeout=POLL_INTERVAL if self.waiting else 0)
            if taken:
                done += taken
                deadline = time.monotonic() + LOG_ANSWER_PUT_TIMEOUT
            elif not self.waiting or self.stopping():
                break
            elif time.monotonic() >= deadline:
                self.waiting = False  # a requester that takes nothing for that long: no more waiting on it
                break
        return done

    def _one(self, envelope: SnapshotEnvelope) -> bool:
        if self.put is not None and self.waiting:
            # Thousands of answers at once: wait for room rather than lose them, but not for ever.
            if _put_waiting(self.put, envelope, self.stopping):
                return True
            self.waiting = False
            return False
        try:
            self.requester.put_nowait(envelope)
        except queue.Full:
            return False
        return True


@dataclass
class _Open:
    """One request of a local requester: where answers go and what it already got.

    ``sent`` holds the hash of each object's ``dedup_key``, not the key: an
    int instead of a tuple and two strings of its own, ~70 bytes per object
    sent instead of ~300 (a snapshot of a million indicators: 70 MB instead
    of 300). Two keys of the same 64-bit hash would drop the second object as
    a repeat: for a million objects, about one snapshot in 30 million.
    """

    requester: Sink
    snapshot_type: SnapshotType
    want_end: bool
    sent: set[int] = field(default_factory=set)
    duplicates: int = 0


class SnapshotRouter(StoppableWorker):
    """Consumes snapshot requests and envelopes from the backbone.

    A request (from any node) is handed to every local app through
    ``ask_apps``, with the local subscriber that made it (None if remote).
    An envelope is delivered to the subscriber queue that made the request,
    if that subscriber lives on this node; other nodes' envelopes are ignored.
    Indicators handed over are taken into ``expiry`` (if given), so the
    requester also gets their removal at ``valid_until``.
    """

    def __init__(
        self,
        publish_queue: queue.SimpleQueue[Message],
        ask_apps: Callable[[SnapshotRequest, Sink | None], None],
        expiry: ExpirySchedule | None = None,
        read_log: ReadLog | None = None,
    ) -> None:
        super().__init__(name="snapshot-router")
        self.expiry = expiry
        self.inbox: queue.SimpleQueue[Message] = queue.SimpleQueue()
        self._publish_queue = publish_queue
        self._ask_apps = ask_apps
        self._lock = threading.Lock()
        self._requesters: OrderedDict[str, _Open] = OrderedDict()
        self._seen_requests: OrderedDict[str, None] = OrderedDict()
        self.duplicates = 0  # answers dropped because the requester already had the object
        self.answerer = LogAnswerer(read_log or (lambda _since, _until: None), self._deliver_log, self._log_done)

    def start(self) -> None:
        super().start()
        self.answerer.start()

    def stop(self) -> None:
        self.answerer.stop()
        super().stop()

    def join(self, timeout: float | None = None) -> None:
        self.answerer.join(timeout)
        super().join(timeout)

    def request(self, topic: str, requester: Sink, period: timedelta, snapshot_end: bool = False) -> list[str]:
        """Ask the log and all apps for the intel of ``period`` on ``topic``; answers go to ``requester``.

        With ``snapshot_end`` the requester gets a ``SnapshotEnd`` per request
        once the log's answer is in its queue.
        """
        ids = []
        for snapshot_type in SnapshotType.for_topic(topic):
            request = SnapshotRequest.create(snapshot_type, period)
            with self._lock:
                self._requesters[request.snapshot_id] = _Open(requester, snapshot_type, snapshot_end)
                while len(self._requesters) > MAX_OPEN_REQUESTS:
                    self._requesters.popitem(last=False)
            logger.info(
                "requesting a %s snapshot of %s (id %s)", snapshot_type.name.lower(), period, request.snapshot_id
            )
            # The log first: its answer is the bulk, and it is read on this node only.
            self.answerer.submit(request)
            self._publish_queue.put(request)
            ids.append(request.snapshot_id)
        return ids

    def forget(self, requester: Sink) -> None:
        """Stop routing envelopes to ``requester`` (it unsubscribed)."""
        with self._lock:
            for snapshot_id in [sid for sid, o in self._requesters.items() if o.requester is requester]:
                del self._requesters[snapshot_id]

    # ---- the gate: each object once per request ---------------------------

    def _pass(self, envelope: SnapshotEnvelope, key: Hashable | None = None) -> None:
        with self._lock:
            open_request = self._requesters.get(envelope.snapshot_id)
            if open_request is None:
                return
            digest = hash(envelope.stix.dedup_key if key is None else key)
            if digest in open_request.sent:
                open_request.duplicates += 1
                self.duplicates += 1
                return
            open_request.sent.add(digest)
        requester = open_request.requester
        body = envelope.stix
        if self.expiry is not None and isinstance(body, Indicator):
            # Handed over and scheduled in one step: the requester also gets the removal at valid_until.
            self.expiry.route(lambda _body, _sinks, _receipt: self._put(requester, envelope), body, (requester,))
        else:
            self._put(requester, envelope)

    @staticmethod
    def _put(requester: Sink, envelope: SnapshotEnvelope) -> int:
        try:
            requester.put_nowait(envelope)
        except queue.Full:
            logger.warning("requester queue full, dropped envelope of snapshot %s", envelope.snapshot_id)
            return 0
        return 1

    def _deliver_log(self, request: SnapshotRequest, batches: Iterable[list[StixObject]]) -> None:
        """Hand the log's answer to the requester; a bounded requester makes this wait (its own thread).

        A batch at a time: a requester that takes several at once
        (``put_answers``, as the zmq app's subscriptions do) gets one
        hand-over per batch, and the expiry schedule is updated once per batch.
        """
        with self._lock:
            open_request = self._requesters.get(request.snapshot_id)
        if open_request is None:
            return
        requester = open_request.requester
        hand = _LogHandover(requester, request, lambda: self.answerer.stopping)
        # Only active intel comes from the log: the requester gets the removal of each at valid_until.
        expiry = self.expiry if request.snapshot_type is SnapshotType.INDICATOR else None
        for intel in batches:
            with self._lock:
                sent = open_request.sent
                fresh = []
                for stix in intel:
                    digest = hash(stix.dedup_key)
                    if digest not in sent:
                        sent.add(digest)
                        fresh.append(stix)
                repeated = len(intel) - len(fresh)
                open_request.duplicates += repeated
                self.duplicates += repeated
            if not fresh:
                continue
            handed = hand.over(fresh)
            if expiry is not None and handed:
                expiry.observe_all(handed, (requester,))  # type: ignore[arg-type]
            if self.answerer.stopping:
                return
        if hand.lost:
            logger.warning("requester queue full: lost %d object(s) of snapshot %s", hand.lost, request.snapshot_id)

    def _put_waiting(self, put: Callable[..., None], item: object) -> bool:
        """``put`` with a timeout, in short steps so that a stop of the bus is noticed."""
        return _put_waiting(put, item, lambda: self.answerer.stopping)

    def _log_done(self, request: SnapshotRequest) -> None:
        with self._lock:
            open_request = self._requesters.get(request.snapshot_id)
            if open_request is None or not open_request.want_end:
                return
            end = SnapshotEnd(request.snapshot_id, request.snapshot_type, len(open_request.sent))
        put = getattr(open_request.requester, "put", None)
        try:
            if put is None:
                open_request.requester.put_nowait(end)
            elif not self._put_waiting(put, end):
                raise queue.Full
        except queue.Full:
            logger.warning("requester queue full, dropped the end marker of snapshot %s", request.snapshot_id)

    def run(self) -> None:
        for message in self.drain(self.inbox):
            try:
                if isinstance(message, SnapshotRequest):
                    self._handle_request(message)
                elif isinstance(message, SnapshotEnvelope):
                    self._handle_envelope(message)
            except Exception:
                logger.exception("failed to handle %s", message.type_name)

    def _handle_request(self, request: SnapshotRequest) -> None:
        # At-least-once backbones may redeliver a request; ask apps only once.
        if request.snapshot_id in self._seen_requests:
            return
        self._seen_requests[request.snapshot_id] = None
        while len(self._seen_requests) > MAX_OPEN_REQUESTS:
            self._seen_requests.popitem(last=False)
        with self._lock:
            open_request = self._requesters.get(request.snapshot_id)
        self._ask_apps(request, open_request.requester if open_request is not None else None)

    def _handle_envelope(self, envelope: SnapshotEnvelope) -> None:
        self._pass(envelope)
