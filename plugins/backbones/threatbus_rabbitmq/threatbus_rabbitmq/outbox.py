"""The durable outbox: what the node accepted from its apps, on local disk until the broker confirms it.

An append-only log of segment files in ``<node.data_dir>/rabbitmq/outbox``.
``put`` writes the message's record (one ``write``) before the publisher can
see it, so a message the node accepted survives SIGKILL: the kernel holds it.
When the broker confirms messages, ``settled`` advances the low-water mark
(the oldest sequence number not yet confirmed, in the file ``acked``) and
deletes segments that hold only confirmed records. At start, every record
from the low-water mark on is loaded, in order, and sent before anything
newer. A message confirmed just before a crash may be sent once more:
receiving nodes drop it as a duplicate.

Record: ``<length u32><crc32 u32><seq u64><body>``. A record cut short by a
crash, or damaged, ends its segment (logged; what follows is dropped).

The outbox is bounded in bytes (``outbox_max_bytes``, records not yet
confirmed) and in messages (``outbox_size``): what does not fit is refused,
logged and counted (``dropped``), never silently lost.
"""

from __future__ import annotations

import logging
import os
import struct
import threading
import time
import zlib
from collections import deque
from collections.abc import Iterable
from pathlib import Path

from threatbus.data import Message, decode

logger = logging.getLogger(__name__)

DIR_NAME = "outbox"
ACKED_FILE = "acked"
SEGMENT_SUFFIX = ".seg"
_RECORD = struct.Struct("<IIQ")
_ACKED = struct.Struct("<Q")
# At most one "outbox full" log line per this many seconds.
_DROP_LOG_INTERVAL = 5.0
# Segment files roll at this size (or a quarter of the byte bound, if smaller).
SEGMENT_BYTES = 16 * 1024 * 1024


class DurableOutbox:
    """Drop-in for ``publisher.Outbox`` (``items``, ``put``, ``dropped``) that keeps every message on disk.

    Threads: ``put`` runs in the feeder, ``settled`` and the ``items`` deque
    operations in the publisher; the books shared by both are under a lock.
    """

    def __init__(self, directory: Path, capacity: int, max_bytes: int) -> None:
        self.directory = directory
        self.capacity = capacity
        self.max_bytes = max_bytes
        self.segment_bytes = max(64 * 1024, min(SEGMENT_BYTES, max_bytes // 4))
        self.items: deque[Message] = deque()
        self.dropped = 0
        self.unreadable = 0  # records lost to damage, found at start
        self.recovered = 0  # messages loaded at start, sent before anything newer
        self.bytes = 0  # records not yet confirmed
        self._lock = threading.Lock()
        self._seq_of: dict[int, int] = {}  # id(message) -> seq, while in items or in flight
        self._size_of: dict[int, int] = {}  # seq -> record bytes, until confirmed
        self._done: set[int] = set()  # confirmed seqs above the low-water mark
        self._low = 1  # every seq below it is confirmed
        self._next = 1
        self._segments: deque[tuple[int, Path]] = deque()  # (first seq, path), oldest first
        self._fd = -1
        self._segment_size = 0
        self._last_drop_log = 0.0
        self._dropped_since_log = 0
        directory.mkdir(parents=True, exist_ok=True)
        self._acked_fd = os.open(directory / ACKED_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        self._recover()
        self._roll()

    def __len__(self) -> int:
        return len(self.items)

    # ---- start ---------------------------------------------------------

    def _recover(self) -> None:
        raw = os.pread(self._acked_fd, _ACKED.size, 0)
        self._low = _ACKED.unpack(raw)[0] if len(raw) == _ACKED.size else 1
        self._next = self._low
        paths = sorted(self.directory.glob(f"*{SEGMENT_SUFFIX}"))
        for path in paths:
            for seq, body in self._records(path):
                self._next = max(self._next, seq + 1)
                if seq < self._low:
                    continue
                try:
                    message = decode(body)
                except Exception as err:  # written by us, so only damage gets here
                    self.unreadable += 1
                    logger.error("outbox: record %d in %s cannot be decoded, dropped: %s", seq, path, err)
                    self._done.add(seq)
                    continue
                self._seq_of[id(message)] = seq
                self._size_of[seq] = _RECORD.size + len(body)
                self.bytes += _RECORD.size + len(body)
                self.items.append(message)
            self._segments.append((int(path.stem, 16), path))
        self.recovered = len(self.items)
        self._advance()
        if self.recovered:
            logger.warning(
                "outbox: %d message(s) (%d bytes) accepted before the last stop were not confirmed by the broker: "
                "sending them first",
                self.recovered,
                self.bytes,
            )

    def _records(self, path: Path) -> Iterable[tuple[int, bytes]]:
        data = path.read_bytes()
        offset = 0
        while offset < len(data):
            if offset + _RECORD.size > len(data):
                break
            length, crc, seq = _RECORD.unpack_from(data, offset)
            body = data[offset + _RECORD.size : offset + _RECORD.size + length]
            if len(body) != length or zlib.crc32(body) != crc:
                break
            yield seq, body
            offset += _RECORD.size + length
        if offset < len(data):
            self.unreadable += 1
            logger.error(
                "outbox: %s is cut short or damaged at byte %d of %d (a crash while writing?): the rest is dropped",
                path,
                offset,
                len(data),
            )
            os.truncate(path, offset)

    def _roll(self) -> None:
        """Start a new segment for appends (always a new file: no partial record to append after)."""
        if self._fd >= 0:
            os.close(self._fd)
        path = self.directory / f"{self._next:016x}{SEGMENT_SUFFIX}"
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        self._segment_size = os.fstat(self._fd).st_size
        if not self._segments or self._segments[-1][1] != path:
            self._segments.append((self._next, path))
        self._remove_settled_segments()

    # ---- feeder side ---------------------------------------------------

    def put(self, message: Message) -> bool:
        """On disk and queued for the publisher: True; refused (full): False, logged and counted."""
        return self.put_many([message]) == 1

    def put_many(self, messages: list[Message]) -> int:
        """``put`` for several, with one ``write``; returns how many were taken (the rest is refused)."""
        records = []
        taken = []
        with self._lock:
            if self._segment_size >= self.segment_bytes:
                self._roll()
            seq = self._next
            for message in messages:
                body = message.encode()
                size = _RECORD.size + len(body)
                if len(self.items) + len(taken) >= self.capacity or self.bytes + size > self.max_bytes:
                    self._refuse()
                    continue
                if id(message) in self._seq_of:  # the same object twice: give the second its own identity
                    message = type(message)(message.payload, body)
                records.append(_RECORD.pack(len(body), zlib.crc32(body), seq))
                records.append(body)
                self._seq_of[id(message)] = seq
                self._size_of[seq] = size
                self.bytes += size
                self._segment_size += size
                taken.append(message)
                seq += 1
            if taken:
                os.write(self._fd, b"".join(records))
                self._next = seq
                self.items.extend(taken)  # only now: the publisher sends nothing that is not on disk
        return len(taken)

    def _refuse(self) -> None:
        self.dropped += 1
        self._dropped_since_log += 1
        now = time.monotonic()
        if now - self._last_drop_log >= _DROP_LOG_INTERVAL:
            logger.error(
                "outbox full (%d messages, %d of %d bytes held for the broker): REFUSED %d message(s); "
                "raise outbox_size / outbox_max_bytes or fix the broker connection",
                len(self.items),
                self.bytes,
                self.max_bytes,
                self._dropped_since_log,
            )
            self._last_drop_log = now
            self._dropped_since_log = 0

    # ---- publisher side ------------------------------------------------

    def settled(self, messages: Iterable[Message]) -> None:
        """The broker confirmed these (or they cannot be sent at all): forget them on disk."""
        with self._lock:
            for message in messages:
                seq = self._seq_of.pop(id(message), None)
                if seq is None:
                    continue
                self.bytes -= self._size_of.pop(seq, 0)
                self._done.add(seq)
            self._advance()

    def _advance(self) -> None:
        low = self._low
        done = self._done
        while low in done:
            done.remove(low)
            low += 1
        if low != self._low:
            self._low = low
            os.pwrite(self._acked_fd, _ACKED.pack(low), 0)
            self._remove_settled_segments()

    def _remove_settled_segments(self) -> None:
        # A segment is all confirmed when the next one starts at or below the low-water mark.
        segments = self._segments
        while len(segments) > 1 and segments[1][0] <= self._low:
            _first, path = segments.popleft()
            path.unlink(missing_ok=True)

    def close(self) -> None:
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1
            os.close(self._acked_fd)
