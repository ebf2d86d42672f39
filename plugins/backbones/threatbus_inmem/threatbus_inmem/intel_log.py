"""The in-memory intel log: what the node carried, bounded by age and size.

The same ``history`` keys as the RabbitMQ stream, so a single node on the
embedded default answers snapshots like a cluster does. Entries are kept as
their encoded JSON (a message object takes about five times the memory) and
handed to a snapshot as that text (the core's fold parses it, and sends it on
as it is); sizes count that JSON, and ``max_bytes: 0`` means a cap of
``MEMORY_CAP_BYTES`` rather than none.
"""

from __future__ import annotations

import bisect
import itertools
import threading
import time
from collections import deque
from collections.abc import Iterator
from datetime import datetime

from threatbus.data import Message
from threatbus.history import HistorySettings, LogEntry

# The cap of ``max_bytes: 0`` in memory (~140,000 indicators of 450 bytes; ~80 MB with overheads).
MEMORY_CAP_BYTES = 64 * 1024 * 1024


class MemoryLog:
    """Append from the distributor thread, read from any thread."""

    def __init__(self, settings: HistorySettings) -> None:
        self.max_age = settings.max_age.total_seconds()
        self.max_bytes = settings.max_bytes or MEMORY_CAP_BYTES
        self._lock = threading.Lock()
        self._times: deque[float] = deque()  # epoch seconds, non-decreasing
        self._entries: deque[bytes] = deque()
        self.bytes = 0
        self.evicted = 0

    def __len__(self) -> int:
        return len(self._entries)

    def append(self, message: Message, now: float | None = None) -> None:
        raw = message.encode()
        stamp = time.time() if now is None else now
        times, entries = self._times, self._entries
        with self._lock:
            if times and stamp < times[-1]:
                stamp = times[-1]  # the wall clock stepped back: keep the order searchable
            times.append(stamp)
            entries.append(raw)
            held = self.bytes + len(raw)
            # A full log (the steady state) lets the oldest go on every append: done here, without a call.
            while held > self.max_bytes:
                held -= len(entries.popleft())
                times.popleft()
                self.evicted += 1
            self.bytes = held
            if times and times[0] < stamp - self.max_age:
                self._trim(stamp)

    def _trim(self, now: float) -> None:
        oldest = now - self.max_age
        times, entries = self._times, self._entries
        while times and (times[0] < oldest or self.bytes > self.max_bytes):
            times.popleft()
            self.bytes -= len(entries.popleft())
            self.evicted += 1

    def read(self, since: datetime, until: datetime) -> Iterator[LogEntry]:
        """The entries from ``since`` to ``until``, each message as its JSON text (a copy: appends go on meanwhile)."""
        start, end = since.timestamp(), until.timestamp()
        with self._lock:
            self._trim(time.time())
            times = self._times
            first = bisect.bisect_left(times, start)
            last = bisect.bisect_right(times, end)
            # islice walks the deques once; indexing a deque in the middle is not O(1).
            stamps = list(itertools.islice(times, first, last))
            texts = list(itertools.islice(self._entries, first, last))
        # Paired as they are read: no tuple kept per entry (100,000 of them cost the garbage collector).
        return zip(stamps, texts, strict=True)
