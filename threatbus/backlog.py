"""How far the node's consumers are behind: the deepest unbounded subscriber queue.

A bounded subscriber queue loses what does not fit (``routing.TopicRouter``)
and so never holds much; an unbounded one (an app's ``queue.SimpleQueue``)
grows without limit while its app is slower than the intel coming in, a
decoded message (~1-2 KiB) each. Apps where intel enters the bus read
``Backlog`` to hold it back meanwhile in a cheaper form (the zmq app keeps
frames undecoded) or to pace an answer of a million indicators.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from threatbus.policy import FilteredSink
from threatbus.routing import Sink


class Backlog:
    """Callable: the number of messages waiting in the fullest watched queue (or the publish queue)."""

    def __init__(self, publish_queue: object) -> None:
        self._lock = threading.Lock()
        self._watched: dict[int, tuple[Callable[[], int], int]] = {}  # id(sink) -> (qsize, subscriptions)
        self._publish_depth: Callable[[], int] = getattr(publish_queue, "qsize", lambda: 0)
        self._depths: tuple[Callable[[], int], ...] = (self._publish_depth,)

    def watch(self, sink: Sink) -> None:
        """Count ``sink`` (one more subscription of it) if it is an unbounded queue."""
        while isinstance(sink, FilteredSink):
            sink = sink.sink
        qsize = getattr(sink, "qsize", None)
        if qsize is None or getattr(sink, "maxsize", 0) > 0:
            return
        with self._lock:
            _, subscriptions = self._watched.get(id(sink), (qsize, 0))
            self._watched[id(sink)] = (qsize, subscriptions + 1)
            self._recompute()

    def forget(self, sink: Sink) -> None:
        """One subscription of ``sink`` less; it is no longer counted after its last."""
        while isinstance(sink, FilteredSink):
            sink = sink.sink
        with self._lock:
            watched = self._watched.get(id(sink))
            if watched is None:
                return
            qsize, subscriptions = watched
            if subscriptions > 1:
                self._watched[id(sink)] = (qsize, subscriptions - 1)
            else:
                del self._watched[id(sink)]
            self._recompute()

    def _recompute(self) -> None:
        self._depths = (self._publish_depth, *(qsize for qsize, _ in self._watched.values()))

    def __call__(self) -> int:
        return max(depth() for depth in self._depths)
