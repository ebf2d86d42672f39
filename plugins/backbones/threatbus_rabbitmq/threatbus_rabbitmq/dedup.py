"""The consumer's dedup window, kept in a memory-mapped file so it survives a crash.

A receiving node killed between handing messages to its apps and acking them
gets them again from the broker after its restart. With the window of keys
it had seen on disk, it drops them instead of delivering them twice.

Each key is written twice: marked *handed* just before the message goes to
the apps, unmarked once every app it went to is done with it (see
``handover``), often from the app's own thread. After a restart a message
whose key is still marked is *in doubt*: an app may have sent it on right
before the kill, before it could say so. It is delivered again, marked in
doubt (``Receipt.in_doubt``), so that an app able to tell whether it already
has it skips it (``DeliveryQueue(already_delivered=...)``).

The file is a ring of 64-bit slots behind a small header: a key's 63-bit
digest, the top bit set while handed. Writing is a store into shared memory
(no system call on the hot path): the kernel owns those pages, so a key is in
the file as soon as it is written, even if the process is killed the next
instant. The kernel writes the pages to the disk in the background: a crash
of the whole host may forget the last seconds' keys (those messages may then
be delivered once more).
"""

from __future__ import annotations

import hashlib
import logging
import mmap
import os
import struct
import threading
from collections import deque
from collections.abc import Hashable
from pathlib import Path

logger = logging.getLogger(__name__)

MAGIC = b"TBDEDUP2"
MAGIC_V1 = b"TBDEDUP1"  # every slot a done key (64-bit digests)
_HEADER = struct.Struct("<8sQQ")  # magic, slots, next slot to write
_SLOT = struct.Struct("<Q")
_HEAD_OFFSET = 16
HANDED = 1 << 63  # in a slot: handed to the apps, not (yet) done
DIGEST_BITS = HANDED - 1
FILE_NAME = "dedup.ring"


def digest(key: Hashable) -> int:
    """A stable 63-bit digest of a dedup key (``hash()`` differs between processes); never 0 (an empty slot)."""
    text = "\x1f".join(key) if isinstance(key, tuple) else str(key)
    value = int.from_bytes(hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "little")
    return (value & DIGEST_BITS) or 1


class Deduplicator:
    """Remembers the last ``size`` message keys (as digests: 100k keys take a few MB).

    The consuming thread asks ``admit`` (a repeat or not) and ``in_doubt``,
    and calls ``handed`` before routing a message; ``record`` (any thread) is
    told the messages delivered for good. Kept in memory only here: nothing
    is in doubt, ``handed`` and ``record`` keep nothing.
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self._order: deque[int] = deque()
        self._keys: set[int] = set()
        self._doubt: set[int] = set()  # handed before the last restart, never reported done

    def admit(self, value: int) -> bool:
        """False for a digest seen recently; else True, and it is seen from now on."""
        if self.size <= 0:
            return True
        if value in self._keys:
            return False
        if len(self._order) >= self.size:
            self._keys.discard(self._order.popleft())
        self._order.append(value)
        self._keys.add(value)
        return True

    def check(self, key: Hashable) -> int:
        """The key's digest, or 0 for a repeat."""
        value = digest(key)
        return value if self.admit(value) else 0

    def seen(self, key: Hashable) -> bool:
        return self.check(key) == 0

    def in_doubt(self, value: int) -> bool:
        """True (once) for a message an app may have delivered right before the node died."""
        if value in self._doubt:
            self._doubt.discard(value)
            return True
        return False

    @property
    def doubtful(self) -> int:
        return len(self._doubt)

    def handed(self, value: int) -> int:
        """The message of ``value`` goes to the apps now; returns where that is noted (for ``record``), or -1."""
        return -1

    def record(self, value: int, slot: int = -1) -> None:
        """The message of ``value`` (noted at ``slot`` by ``handed``) reached the apps."""

    def __len__(self) -> int:
        return len(self._order)

    def close(self) -> None:
        pass


class PersistentDeduplicator(Deduplicator):
    """The window also in ``path``, loaded again at the next start."""

    def __init__(self, size: int, path: Path) -> None:
        super().__init__(size)
        self.path = path
        self._head = 0
        self._lock = threading.Lock()  # record runs in the apps' threads
        self._file, self._map = self._open(self._load())
        self._closed = False

    def _load(self) -> list[int]:
        return read_slots(self.path)

    def _open(self, known: list[int]) -> tuple[int, mmap.mmap]:
        known = known[-self.size :]
        done = [s for s in known if not s & HANDED]
        self._doubt = in_doubt(known)
        self._order.extend(done)
        self._keys.update(done)
        self._head = len(known) % self.size
        ring = known + [0] * (self.size - len(known))
        tmp = self.path.with_suffix(".tmp")
        # Rewritten at each start (a few MB at most): the window size may have changed.
        with open(tmp, "wb") as out:
            out.write(_HEADER.pack(MAGIC, self.size, self._head))
            out.write(struct.pack(f"<{self.size}Q", *ring))
        os.replace(tmp, self.path)
        fd = os.open(self.path, os.O_RDWR)
        try:
            return fd, mmap.mmap(fd, _HEADER.size + self.size * _SLOT.size)
        except Exception:
            os.close(fd)
            raise

    def _append(self, value: int) -> int:
        head = self._head
        # The key first, then the head: a kill in between leaves the key readable (loads take every slot).
        _SLOT.pack_into(self._map, _HEADER.size + head * _SLOT.size, value)
        self._head = head + 1 if head + 1 < self.size else 0
        _SLOT.pack_into(self._map, _HEAD_OFFSET, self._head)
        return head

    def handed(self, value: int) -> int:
        with self._lock:
            return -1 if self._closed else self._append(value | HANDED)

    def record(self, value: int, slot: int = -1) -> None:
        with self._lock:
            if self._closed:
                return  # an app finishing after the backbone stopped: delivered again at the next start
            offset = _HEADER.size + slot * _SLOT.size
            if slot >= 0 and _SLOT.unpack_from(self._map, offset)[0] == value | HANDED:
                _SLOT.pack_into(self._map, offset, value)  # one 8-byte store: handed becomes done
            else:
                self._append(value)  # its slot was taken over since (a ring that went round)

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            try:
                self._map.flush()
                self._map.close()
            finally:
                os.close(self._file)


def read_slots(path: Path) -> list[int]:
    """The slots of the window file at ``path``, oldest first (any window size; a damaged file counts as empty)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return []
    except OSError as err:
        logger.warning("dedup: cannot read %s (%s): starting with an empty window", path, err)
        return []
    if len(data) < _HEADER.size:
        return []
    magic, slots, head = _HEADER.unpack_from(data)
    if magic not in (MAGIC, MAGIC_V1) or len(data) < _HEADER.size + slots * _SLOT.size or head >= max(slots, 1):
        logger.warning("dedup: %s is not a dedup window file: starting with an empty window", path)
        return []
    ring = struct.unpack_from(f"<{slots}Q", data, _HEADER.size)
    ordered = [d for d in ring[head:] + ring[:head] if d]
    if magic == MAGIC_V1:  # all done, full 64-bit digests
        return [(d & DIGEST_BITS) or 1 for d in ordered]
    return ordered


def in_doubt(slots: list[int]) -> set[int]:
    """The digests handed to apps and never reported done, of ``read_slots``."""
    return {s & DIGEST_BITS for s in slots if s & HANDED} - {s for s in slots if not s & HANDED}


def open_dedup(size: int, directory: Path | None) -> Deduplicator:
    """The window on disk in ``directory``; in memory only without a directory or with size 0."""
    if directory is None or size <= 0:
        return Deduplicator(size)
    window = PersistentDeduplicator(size, directory / FILE_NAME)
    logger.info(
        "dedup: %d key(s) of the last window loaded from %s, %d in doubt (handed to apps, never reported done: "
        "delivered again, marked in doubt)",
        len(window),
        window.path,
        window.doubtful,
    )
    return window
