"""TAXII out, the data: the bus's current indicators, as the served collection shows them.

The bus delivers indicator versions to ``IntelFolder``, which folds them
into ``ServedIntel`` with the bus's one definition of the lifecycle
(``threatbus.lifecycle``): the latest ``modified`` per id counts; removals,
revoked and expired indicators are not served. Each served version gets a
``date_added`` (when this node took it), strictly increasing, which TAXII
clients use as their ``added_after`` position.

Policy: the bus puts the app's filter (``plugins.apps.taxii.filter``) in
front of the plugin's subscription, so only versions that pass it are folded
here; nothing in this module filters again.
"""

from __future__ import annotations

import bisect
import itertools
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

from threatbus.data import Indicator, Message, SnapshotEnvelope
from threatbus.delivery import DeliveryQueue
from threatbus.lifecycle import Change, IntelState, is_active
from threatbus.worker import StoppableWorker

logger = logging.getLogger(__name__)

# Removed and expired indicators are remembered this long, so an older version arriving late stays ignored.
TOMBSTONE_AGE = timedelta(days=30)
PRUNE_EVERY = timedelta(hours=1)
# Most messages folded before they are acknowledged in one call (a bulk load keeps the queue from running empty).
ACK_EVERY = 512


def date_added_text(when: datetime) -> str:
    """TAXII timestamps with microseconds: positions must tell apart versions taken in the same millisecond."""
    return when.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass(frozen=True)
class Served:
    """One served object: the version's payload and when this node added it."""

    date_added: datetime
    payload: dict[str, Any]

    @property
    def date_added_text(self) -> str:
        return date_added_text(self.date_added)


class ServedIntel:
    """The current version of every indicator the bus delivered, with its date added.

    Versions are kept in order of date added (a log with lazy deletion: a
    replaced or removed version stays until the next compaction, skipped on
    reading), so a page after a position costs a binary search and the page
    itself, not a sort of everything served. Thread-safe: the folder worker
    writes, the HTTP worker reads.
    """

    def __init__(self, clock: Callable[[], datetime] = lambda: datetime.now(timezone.utc)) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._state = IntelState()
        self._added: dict[str, datetime] = {}  # id -> date added of its live version
        self._log: list[Served] = []  # every version taken, by date added
        self._dates: list[datetime] = []  # the log's dates, for bisect
        self._last_added = datetime.min.replace(tzinfo=timezone.utc)

    def apply(self, payload: dict[str, Any]) -> Change:
        """Take one indicator version from the bus; returns what it changed."""
        with self._lock:
            applied = self._state.apply(payload)
            if applied.change in (Change.ADDED, Change.REPLACED):
                now = self._clock()
                # Strictly increasing, so `added_after=<last date seen>` never skips or repeats a version.
                self._last_added = max(now, self._last_added + timedelta(microseconds=1))
                self._added[payload["id"]] = self._last_added
                self._log.append(Served(self._last_added, payload))
                self._dates.append(self._last_added)
            elif applied.change is Change.REMOVED:
                self._added.pop(payload["id"], None)
            if len(self._log) > 2 * len(self._added) + 1024:
                self._compact()
            return applied.change

    def _live(self, entry: Served) -> bool:
        return self._added.get(entry.payload["id"]) == entry.date_added

    def _compact(self) -> None:
        self._log = [entry for entry in self._log if self._live(entry)]
        self._dates = [entry.date_added for entry in self._log]

    def page(
        self,
        after: datetime | None,
        limit: int,
        accept: Callable[[dict[str, Any]], bool] = lambda payload: True,
        now: datetime | None = None,
    ) -> tuple[list[Served], bool]:
        """Up to ``limit`` served versions added after ``after`` that ``accept`` takes; and whether more follow."""
        now = now or self._clock()
        found: list[Served] = []
        with self._lock:
            index = bisect.bisect_right(self._dates, after) if after is not None else 0
            for entry in itertools.islice(self._log, index, None):
                payload = entry.payload
                if self._live(entry) and is_active(payload, now) and accept(payload):
                    found.append(entry)
                    if len(found) > limit:
                        break
        return found[:limit], len(found) > limit

    def served(self, now: datetime | None = None) -> list[Served]:
        """Everything the collection serves at ``now``, oldest date added first."""
        with self._lock:
            size = len(self._log)
        return self.page(None, size, now=now)[0]

    def __len__(self) -> int:
        """Indicators with a live version (expired ones included until pruned)."""
        with self._lock:
            return len(self._added)

    def prune(self, now: datetime | None = None) -> int:
        """Forget removals and expired indicators older than ``TOMBSTONE_AGE``."""
        now = now or self._clock()
        with self._lock:
            gone = self._state.prune(now - TOMBSTONE_AGE)
            for indicator_id in [i for i in self._added if i not in self._state]:
                del self._added[indicator_id]
            self._compact()
            return gone


class IntelFolder(StoppableWorker):
    """Drains the plugin's subscription into ``ServedIntel``.

    Each message is acknowledged (``DeliveryQueue.task_done``) once it is
    served; in one call per burst (when the queue runs empty, at most
    ``ACK_EVERY`` apart).
    """

    def __init__(self, source: DeliveryQueue, intel: ServedIntel) -> None:
        super().__init__(name="taxii-intel")
        self.source = source
        self.intel = intel
        self.folded = 0
        self.rejected = 0

    def run(self) -> None:
        next_prune = datetime.now(timezone.utc) + PRUNE_EVERY
        folded = 0
        for message in self.drain(self.source):
            folded += 1
            self._fold(message)
            if folded >= ACK_EVERY or self.source.empty():
                self.source.task_done(folded)
                folded = 0
            now = datetime.now(timezone.utc)
            if now >= next_prune:
                self.intel.prune(now)
                next_prune = now + PRUNE_EVERY

    def _fold(self, message: Message) -> None:
        if isinstance(message, SnapshotEnvelope):
            message = message.stix
        if isinstance(message, Indicator):
            try:
                self.intel.apply(message.payload)
                self.folded += 1
            except (KeyError, ValueError, TypeError) as err:
                # Validated where it entered the bus, but another node may run older code.
                self.rejected += 1
                logger.warning("cannot serve indicator %s over TAXII: %s", message.payload.get("id"), err)


__all__ = ["IntelFolder", "Served", "ServedIntel", "date_added_text"]
