"""The in-memory intel log: what the node carried, bounded by age and size.

The same ``history`` keys as the RabbitMQ stream, so a single node on the
embedded default answers snapshots like a cluster does. Sizes count the
encoded JSON (what a stream stores); the Python objects behind them take
several times that in memory, hence a cap even when ``max_bytes`` is 0.
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

# The cap of ``max_bytes: 0`` in memory (encoded bytes; ~5x that in Python objects).
MEMORY_CAP_BYTES = 256 * 1024 * 1024


class MemoryLog:
    """Append from the distributor thread, read from any thread."""

    def __init__(self, settings: HistorySettings) -> None:
        self.max_age = settings.max_age.total_seconds()
        self.max_bytes = settings.max_bytes or MEMORY_CAP_BYTES
        self._lock = threading.Lock()
        self._times: deque[float] = deque()  # epoch seconds, non-decreasing
        self._entries: deque[tuple[Message, int]] = deque()
        self.bytes = 0
        self.evicted = 0

    def __len__(self) -> int:
        return len(self._entries)

    def append(self, message: Message, now: float | None = None) -> None:
        size = len(message.encode())
        stamp = time.time() if now is None else now
        with self._lock:
            if self._times and stamp < self._times[-1]:
                stamp = self._times[-1]  # the wall clock stepped back: keep the order searchable
            self._times.append(stamp)
            self._entries.append((message, size))
            self.bytes += size
            self._trim(stamp)

    def _trim(self, now: float) -> None:
        oldest = now - self.max_age
        times, entries = self._times, self._entries
        while times and (times[0] < oldest or self.bytes > self.max_bytes):
            times.popleft()
            self.bytes -= entries.popleft()[1]
            self.evicted += 1

    def read(self, since: datetime, until: datetime) -> Iterator[LogEntry]:
        """The entries from ``since`` to ``until`` (a copy: appends go on meanwhile)."""
        start, end = since.timestamp(), until.timestamp()
        with self._lock:
            self._trim(time.time())
            times = self._times
            first = bisect.bisect_left(times, start)
            last = bisect.bisect_right(times, end)
            # islice walks the deques once; indexing a deque in the middle is not O(1).
            window = list(itertools.islice(zip(times, self._entries, strict=True), first, last))
        for stamp, (message, _size) in window:
            yield stamp, message
