"""The consumer's dedup window, kept in a memory-mapped file so it survives a crash.

A receiving node killed between handing messages to its apps and acking them
gets them again from the broker after its restart. With the window of keys
it had seen on disk, it drops them instead of delivering them twice.

Keys are written once the apps took the message (see ``handover``). The file is a ring of 64-bit key digests behind a small header. Writing a key
is a store into shared memory (no system call on the hot path): the kernel
owns those pages, so a key is in the file as soon as it is written, even if
the process is killed the next instant. The kernel writes the pages to the
disk in the background: a crash of the whole host may forget the last
seconds' keys (those messages may then be delivered once more).
"""

from __future__ import annotations

import hashlib
import logging
import mmap
import os
import struct
from collections import deque
from collections.abc import Hashable
from pathlib import Path

logger = logging.getLogger(__name__)

MAGIC = b"TBDEDUP1"
_HEADER = struct.Struct("<8sQQ")  # magic, slots, next slot to write
_SLOT = struct.Struct("<Q")
_HEAD_OFFSET = 16
FILE_NAME = "dedup.ring"


def digest(key: Hashable) -> int:
    """A stable 64-bit digest of a dedup key (``hash()`` differs between processes); never 0 (an empty slot)."""
    text = "\x1f".join(key) if isinstance(key, tuple) else str(key)
    value = int.from_bytes(hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "little")
    return value or 1


class Deduplicator:
    """Remembers the last ``size`` message keys (as 64-bit digests: 100k keys take a few MB).

    ``check`` returns 0 for a repeat, else the key's digest; ``record`` is
    told the digests of messages handed over for good (kept in memory only here).
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self._order: deque[int] = deque()
        self._keys: set[int] = set()

    def check(self, key: Hashable) -> int:
        if self.size <= 0:
            return digest(key)
        value = digest(key)
        if value in self._keys:
            return 0
        if len(self._order) >= self.size:
            self._keys.discard(self._order.popleft())
        self._order.append(value)
        self._keys.add(value)
        return value

    def seen(self, key: Hashable) -> bool:
        return self.check(key) == 0

    def record(self, digests: list[int]) -> None:
        """The messages of ``digests`` reached the apps (nothing to keep beyond memory here)."""

    def __len__(self) -> int:
        return len(self._order)

    def close(self) -> None:
        pass


class PersistentDeduplicator(Deduplicator):
    """The window also in ``path``: ``record`` writes the digests there, loaded again at the next start."""

    def __init__(self, size: int, path: Path) -> None:
        super().__init__(size)
        self.path = path
        self._head = 0
        self._file, self._map = self._open(self._load())

    def _load(self) -> list[int]:
        """The digests in the file, oldest first (any window size; a damaged file counts as empty)."""
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return []
        except OSError as err:
            logger.warning("dedup: cannot read %s (%s): starting with an empty window", self.path, err)
            return []
        if len(data) < _HEADER.size:
            return []
        magic, slots, head = _HEADER.unpack_from(data)
        if magic != MAGIC or len(data) < _HEADER.size + slots * _SLOT.size or head >= max(slots, 1):
            logger.warning("dedup: %s is not a dedup window file: starting with an empty window", self.path)
            return []
        ring = struct.unpack_from(f"<{slots}Q", data, _HEADER.size)
        return [d for d in ring[head:] + ring[:head] if d]

    def _open(self, known: list[int]) -> tuple[int, mmap.mmap]:
        known = known[-self.size :]
        self._order.extend(known)
        self._keys.update(known)
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

    def record(self, digests: list[int]) -> None:
        mapped, head, size = self._map, self._head, self.size
        for value in digests:
            # The key first, then the head: a kill in between leaves the key readable (loads take every slot).
            _SLOT.pack_into(mapped, _HEADER.size + head * _SLOT.size, value)
            head += 1
            if head == size:
                head = 0
        self._head = head
        _SLOT.pack_into(mapped, _HEAD_OFFSET, head)

    def close(self) -> None:
        try:
            self._map.flush()
            self._map.close()
        finally:
            os.close(self._file)


def open_dedup(size: int, directory: Path | None) -> Deduplicator:
    """The window on disk in ``directory``; in memory only without a directory or with size 0."""
    if directory is None or size <= 0:
        return Deduplicator(size)
    window = PersistentDeduplicator(size, directory / FILE_NAME)
    logger.info("dedup: %d key(s) of the last window loaded from %s", len(window), window.path)
    return window
