"""Which messages the local apps have taken from their subscriber queues, so they can be acked.

The consumer acks a message (and writes its dedup key to disk) only once every
app it was routed to has taken it from its queue. Acked earlier, a message
still waiting in an app's in-memory queue is lost when the node is killed;
written to the dedup window earlier, it would be dropped as a duplicate
when the broker delivers it again after the restart.

No app has to cooperate: for a queue we handed ``c`` messages so far, the one
handed as number ``n`` is taken once ``c - n >= queue.qsize()`` (everything
put after it is at most what is still in the queue). Other producers on the
same queue only make this later, never earlier. A queue whose app takes
nothing for ``SLOW_AFTER`` seconds stops holding acks back (a stuck app must
not stall the node) until it is seen empty again.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Iterable
from typing import Any

logger = logging.getLogger(__name__)

SLOW_AFTER = 1.0


class Handover:
    """Delivery tags in routing order, each with the queue positions its message was handed to."""

    def __init__(self, slow_after: float = SLOW_AFTER) -> None:
        self.slow_after = slow_after
        self._handed: dict[int, int] = {}  # id(queue) -> messages handed to it
        self._queues: dict[int, Any] = {}
        self._slow: set[int] = set()  # id(queue): not holding acks back until it is seen empty
        # (delivery tag, dedup digest or 0, ((id(queue), number), ...), monotonic time routed)
        self._pending: deque[tuple[int, int, tuple[tuple[int, int], ...], float]] = deque()

    def __len__(self) -> int:
        return len(self._pending)

    def routed(self, tag: int, digest: int, queues: Iterable[Any]) -> None:
        """The message of ``tag`` was handed to ``queues`` (none: a duplicate, or no subscriber)."""
        marks = []
        handed = self._handed
        for q in queues:
            if not hasattr(q, "qsize"):
                continue  # a sink we cannot look into: it takes at once, as far as we can tell
            key = id(q)
            number = handed.get(key, 0) + 1
            handed[key] = number
            self._queues[key] = q
            marks.append((key, number))
        self._pending.append((tag, digest, tuple(marks), time.monotonic()))

    def taken(self) -> tuple[int, list[int]]:
        """Pop the leading messages every app has taken: (last such delivery tag or 0, their digests)."""
        pending = self._pending
        last = 0
        digests: list[int] = []
        now = time.monotonic()
        sizes: dict[int, int] = {}
        while pending:
            tag, digest, marks, routed_at = pending[0]
            for key, number in marks:
                if key in self._slow:
                    continue
                size = sizes.get(key)
                if size is None:
                    size = sizes[key] = self._queues[key].qsize()
                if self._handed[key] - number < size:
                    if now - routed_at < self.slow_after:
                        return last, digests
                    self._slow.add(key)
                    logger.warning(
                        "consumer: an app took nothing from its queue for %.0fs (%d waiting): "
                        "acking its messages without waiting for it (they are lost if the node dies now)",
                        self.slow_after,
                        size,
                    )
            pending.popleft()
            last = tag
            if digest:
                digests.append(digest)
        self._recover_slow(sizes)
        return last, digests

    def _recover_slow(self, sizes: dict[int, int]) -> None:
        for key in list(self._slow):
            if (sizes.get(key) if key in sizes else self._queues[key].qsize()) == 0:
                self._slow.discard(key)

    def clear(self) -> list[int]:
        """The channel is gone (its tags with it): forget the tags; return the digests of routed messages."""
        digests = [digest for _tag, digest, marks, _t in self._pending if digest and marks]
        self._pending.clear()
        return digests
