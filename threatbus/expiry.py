"""Expiry: at an indicator's ``valid_until`` each node removes it from its local subscribers.

No message crosses the backbone for it: every node knows the time. The
router (``routing.TopicRouter``) shows the schedule every indicator it hands
to local subscribers, together with the subscribers that got it; when
``valid_until`` passes, the worker hands each of them that is still
subscribed the removal (``lifecycle.as_removal``: ``x_threatbus_update:
REMOVE``) once. A newer version reschedules the indicator (or cancels it,
without ``valid_until``); a removal or revocation cancels it; an older
version changes nothing.

Cost: O(log n) per scheduled indicator, a heap with lazy deletion (a
cancelled entry is only dropped from the index; its heap slot is skipped
when it comes up, and the heap is compacted when such slots pile up).
Memory: the indicator's JSON text and three small objects per indicator.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import orjson

from threatbus.data import Indicator, Message
from threatbus.lifecycle import as_removal, epoch_of, is_removal
from threatbus.ratelimit import RateLimitedLog
from threatbus.worker import POLL_INTERVAL, StoppableWorker

if TYPE_CHECKING:
    from threatbus.delivery import Receipt
    from threatbus.routing import Sink

logger = logging.getLogger(__name__)

# Removals fired per hold of the lock, so that routing is never held up long.
BATCH = 1000

Deliver = Callable[[Indicator, "tuple[Sink, ...]"], int]


def _version_text(stamp: str | None) -> float:
    """A version (``lifecycle.version_of``: modified, else created) as epoch seconds; -inf without one."""
    return epoch_of(stamp) if stamp is not None else float("-inf")


class _Entry:
    """One scheduled indicator: when it expires, which version, who got it."""

    __slots__ = ("indicator_id", "raw", "sinks", "version", "when")

    def __init__(
        self, indicator_id: str, when: float, version: str | None, raw: bytes, sinks: tuple[Sink, ...]
    ) -> None:
        self.indicator_id = indicator_id
        self.when = when
        self.version = version  # the text of modified (created): parsed only when another version comes
        self.raw = raw  # the JSON text: a third of the memory of the parsed payload
        self.sinks = sinks  # usually the router's own targets tuple, shared by many entries


class ExpirySchedule:
    """The indicators delivered on this node that have a ``valid_until``, soonest first.

    Fed by the routing thread(s) through ``route`` and ``observe``, emptied by
    an ``ExpiryWorker`` through ``fire``. ``lock`` orders hand-over and
    expiry: a subscriber never gets the expiry of a version after a newer one.
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.wake = threading.Event()  # set when a new entry became the soonest
        self._heap: list[tuple[float, int, _Entry]] = []
        self._entries: dict[str, _Entry] = {}
        self._sequence = itertools.count()  # ties in the heap never compare entries
        self.scheduled = 0
        self.cancelled = 0
        self.expired = 0  # indicators whose valid_until passed here
        self.removals = 0  # removals handed to subscribers (an expired indicator, once per subscriber)
        self.unparsable = 0  # indicators whose timestamps could not be read: delivered, never expired
        self._log_unparsable = RateLimitedLog(logger)

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, indicator_id: object) -> bool:
        return indicator_id in self._entries

    def expires(self, indicator_id: str) -> float | None:
        """When the scheduled indicator expires (epoch seconds), None if it is not scheduled."""
        entry = self._entries.get(indicator_id)
        return entry.when if entry else None

    # ---- feeding (routing threads) -----------------------------------------

    def route(
        self,
        hand: Callable[[Message, tuple[Sink, ...], Receipt | None], int],
        message: Indicator,
        sinks: tuple[Sink, ...],
        receipt: Receipt | None = None,
    ) -> int:
        """``hand(message, sinks, receipt)`` and take the indicator into the schedule, as one step."""
        if not self._entries and message.payload.get("valid_until") is None:
            # Nothing scheduled and nothing to schedule (most intel): no lock to order against an expiry.
            # A version observed meanwhile by another thread is ordered as if it came after this one.
            return hand(message, sinks, receipt)
        with self.lock:
            handed = hand(message, sinks, receipt)
            self._observe(message, sinks)
        return handed

    def observe(self, message: Indicator, sinks: tuple[Sink, ...]) -> None:
        """Note that ``sinks`` were handed ``message`` (e.g. in a snapshot answer)."""
        with self.lock:
            self._observe(message, sinks)

    def observe_all(self, messages: list[Indicator], sinks: tuple[Sink, ...]) -> None:
        """``observe`` for many indicators handed to the same ``sinks``, holding the lock once."""
        with self.lock:
            entries = self._entries
            for message in messages:
                payload = message.payload
                if payload.get("valid_until") is None and payload["id"] not in entries:
                    continue  # nothing to schedule or cancel: _observe would return at once (most intel)
                self._observe(message, sinks)

    def _observe(self, message: Indicator, sinks: tuple[Sink, ...]) -> None:
        payload = message.payload
        until = payload.get("valid_until")
        entries = self._entries
        if until is None and not entries:
            return  # the common case of intel without an end: nothing to look up
        indicator_id = payload["id"]
        current = entries.get(indicator_id)
        removal = is_removal(payload)
        if current is None and (until is None or removal):
            return
        try:
            self._take(indicator_id, payload, current, until, removal, message, sinks)
        except (TypeError, ValueError) as err:
            # Intel from another node is not validated again: a bad timestamp
            # there costs this indicator its expiry, never the routing thread.
            self.unparsable += 1
            self._log_unparsable("no expiry for %s: %s", indicator_id, err)

    def _take(
        self,
        indicator_id: str,
        payload: dict[str, Any],
        current: _Entry | None,
        until: Any,
        removal: bool,
        message: Indicator,
        sinks: tuple[Sink, ...],
    ) -> None:
        stamp = payload.get("modified") or payload.get("created")
        stamp = stamp if isinstance(stamp, str) else None
        if current is not None:
            # Most repeats are the same text: compare times only when it differs.
            version, current_version = (
                (0.0, 0.0) if stamp == current.version else (_version_text(stamp), _version_text(current.version))
            )
            if version < current_version:
                return  # an older version: the newer one's schedule stands
            if version == current_version and not removal:
                # The same version again (redelivery, a snapshot): more subscribers hold it.
                if sinks is not current.sinks:
                    current.sinks = current.sinks + tuple(s for s in sinks if s not in current.sinks)
                return
            del self._entries[indicator_id]
            self.cancelled += 1
        if until is None or removal or not sinks:
            return
        entry = _Entry(indicator_id, epoch_of(until), stamp, message.encode(), sinks)
        self._entries[indicator_id] = entry
        heapq.heappush(self._heap, (entry.when, next(self._sequence), entry))
        self.scheduled += 1
        if self._heap[0][2] is entry:
            self.wake.set()
        if len(self._heap) > 2 * len(self._entries) + 1024:
            self._compact()

    def _compact(self) -> None:
        entries = self._entries
        self._heap = [item for item in self._heap if entries.get(item[2].indicator_id) is item[2]]
        heapq.heapify(self._heap)

    # ---- firing (the worker) -----------------------------------------------

    def delay(self, now: float) -> float | None:
        """Seconds until the soonest live entry expires (≤ 0: due), None when empty."""
        with self.lock:
            heap, entries = self._heap, self._entries
            while heap and entries.get(heap[0][2].indicator_id) is not heap[0][2]:
                heapq.heappop(heap)  # cancelled: skip it now
            return heap[0][0] - now if heap else None

    def fire(self, now: float, deliver: Deliver, limit: int = BATCH) -> int:
        """Hand the removal of up to ``limit`` indicators due at ``now``; returns how many expired."""
        fired = 0
        with self.lock:
            heap, entries = self._heap, self._entries
            while heap and heap[0][0] <= now and fired < limit:
                _, _, entry = heapq.heappop(heap)
                if entries.get(entry.indicator_id) is not entry:
                    continue
                del entries[entry.indicator_id]
                fired += 1
                payload: dict[str, Any] = orjson.loads(entry.raw)
                self.removals += deliver(Indicator(as_removal(payload)), entry.sinks)
        self.expired += fired
        return fired


def hand_to(removal: Indicator, sinks: tuple[Sink, ...]) -> int:
    """``deliver`` for an app's own schedule: put the removal into each of ``sinks``."""
    handed = 0
    for sink in sinks:
        try:
            sink.put_nowait(removal)
            handed += 1
        except queue.Full:
            logger.warning("queue full: lost the expiry of %s", removal.id)
    return handed


class ExpiryWorker(StoppableWorker):
    """Fires the schedule: each indicator's removal within a fraction of a second of ``valid_until``."""

    def __init__(self, schedule: ExpirySchedule, deliver: Deliver, clock: Callable[[], float] = time.time) -> None:
        super().__init__(name="expiry")
        self.schedule = schedule
        self.deliver = deliver
        self.clock = clock

    def stop(self) -> None:
        super().stop()
        self.schedule.wake.set()

    def run(self) -> None:
        schedule = self.schedule
        while not self.stopping:
            try:
                delay = schedule.delay(self.clock())
                if delay is None or delay > 0:
                    # Woken early when a sooner entry arrives, or to check the stop flag.
                    schedule.wake.wait(POLL_INTERVAL if delay is None else min(delay, POLL_INTERVAL))
                    schedule.wake.clear()
                    continue
                fired = schedule.fire(self.clock(), self.deliver)
                logger.debug("expired %d indicators", fired)
            except Exception:
                logger.exception("expiry failed; retrying")
                self.wait(POLL_INTERVAL)
