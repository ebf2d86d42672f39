"""Threads that stop when asked, and a capped backoff for reconnect loops."""

from __future__ import annotations

import contextlib
import logging
import queue
import random
import threading
import time
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

logger = logging.getLogger(__name__)

T = TypeVar("T")

# Workers must notice a stop request at least this often.
POLL_INTERVAL = 0.5

# Put into the queue a worker drains, so that stop() wakes it at once.
_WAKE_UP = object()


class StoppableWorker(threading.Thread):
    """Base class of every thread in Threat Bus.

    Subclasses implement ``run()`` and return from it soon after ``stop()``
    was called: they check ``stopping`` or use ``wait()`` and ``drain()``,
    which never block longer than ``POLL_INTERVAL``. Workers are not daemon
    threads: shutdown is explicit, through ``stop()`` and ``join()``.
    """

    def __init__(self, name: str | None = None) -> None:
        super().__init__(name=name or type(self).__name__, daemon=False)
        self._stop_event = threading.Event()
        self._draining: queue.Queue[Any] | queue.SimpleQueue[Any] | None = None

    def release(self) -> None:
        """Release what the worker owns (sockets, files); a no-op unless overridden.

        A worker calls it at the end of its own ``run()``; ``stop_workers``
        calls it for a worker that was built but never started, whose
        resources would otherwise stay open (an open ZeroMQ socket makes
        ``Context.term()`` block forever). It must be safe to call twice.
        """

    def stop(self) -> None:
        """Ask the worker to finish. Returns at once; ``join()`` waits."""
        self._stop_event.set()
        draining = self._draining
        wake = getattr(draining, "wake", None)  # a DeliveryQueue: every item taken must be acknowledged
        if wake is not None:
            wake()
        elif draining is not None:
            with contextlib.suppress(queue.Full):
                draining.put_nowait(_WAKE_UP)

    @property
    def stopping(self) -> bool:
        return self._stop_event.is_set()

    def wait(self, seconds: float) -> bool:
        """Sleep up to ``seconds``; True if a stop was requested meanwhile."""
        return self._stop_event.wait(seconds)

    def drain(self, source: queue.Queue[T] | queue.SimpleQueue[T]) -> Iterator[T]:
        """Yield items from ``source`` until the worker is asked to stop."""
        self._draining = source
        while not self._stop_event.is_set():
            try:
                item = source.get(timeout=POLL_INTERVAL)
            except queue.Empty:
                continue
            if item is not _WAKE_UP:
                yield item

    @staticmethod
    def leftovers(source: queue.Queue[T] | queue.SimpleQueue[T]) -> Iterator[T]:
        """Yield what is still in ``source`` without waiting (to finish work after a stop)."""
        while True:
            try:
                item = source.get_nowait()
            except queue.Empty:
                return
            if item is not _WAKE_UP:
                yield item

    def drain_all(self, source: queue.Queue[T] | queue.SimpleQueue[T]) -> Iterator[T]:
        """``drain(source)``, then its ``leftovers``: everything put in before the stop."""
        yield from self.drain(source)
        yield from self.leftovers(source)


class ReconnectingWorker(StoppableWorker):
    """A worker that keeps one connection up: serve it, and after a loss wait (capped backoff) and connect again.

    Subclasses implement ``connect_and_serve()``: connect, call
    ``self.backoff.reset()`` once the connection is usable, serve it until it
    is lost or the worker is asked to stop, then return (an exception counts
    as a loss too). ``connection_failed(err)`` and ``reconnecting(delay)`` log;
    ``finish()`` runs once in the worker's thread when it ends (by default:
    ``release()``).
    """

    def __init__(self, name: str | None = None, backoff: Backoff | None = None) -> None:
        super().__init__(name=name)
        self.backoff = backoff or Backoff()

    def run(self) -> None:
        try:
            while not self.stopping:
                try:
                    self.connect_and_serve()
                except Exception as err:
                    self.connection_failed(err)
                if self.stopping:
                    break
                delay = self.backoff.next_delay()
                self.reconnecting(delay)
                self.wait(delay)
        finally:
            self.finish()

    def connect_and_serve(self) -> None:
        raise NotImplementedError

    def connection_failed(self, err: Exception) -> None:
        logger.error("%s: connection failed; reconnecting", self.name, exc_info=err)

    def reconnecting(self, delay: float) -> None:
        logger.info("%s: reconnecting in %.1fs", self.name, delay)

    def finish(self) -> None:
        """Called in the worker's thread when it ends; releases what the worker owns."""
        self.release()


def stop_workers(workers: Iterable[threading.Thread], timeout: float = 5.0) -> list[str]:
    """Stop all workers first, then join each within one shared deadline.

    Workers that were never started (their plugin failed between building and
    starting them) are closed instead of joined. Returns the names of the
    workers that did not end in time (and logs them).
    """
    workers = list(workers)
    for worker in workers:
        if isinstance(worker, StoppableWorker):
            worker.stop()
    deadline = time.monotonic() + timeout
    stuck = []
    for worker in workers:
        if worker.ident is None:  # never started: nothing runs that would release its resources
            if isinstance(worker, StoppableWorker):
                worker.release()
            continue
        worker.join(max(0.0, deadline - time.monotonic()))
        if worker.is_alive():
            stuck.append(worker.name)
    if stuck:
        logger.warning("workers still running after %.1fs: %s", timeout, ", ".join(stuck))
    return stuck


class Backoff:
    """Capped exponential backoff with jitter that resets after a success.

    ``next_delay()`` gives how long to wait before the next attempt;
    ``reset()`` is called once a connection is established again.
    """

    def __init__(self, initial: float = 0.5, maximum: float = 30.0, factor: float = 2.0) -> None:
        if initial <= 0 or maximum < initial or factor < 1:
            raise ValueError("backoff needs 0 < initial <= maximum and factor >= 1")
        self.initial = initial
        self.maximum = maximum
        self.factor = factor
        self.attempts = 0

    def next_delay(self) -> float:
        base = min(self.maximum, self.initial * self.factor**self.attempts)
        self.attempts += 1
        # Jitter keeps several nodes from reconnecting in lockstep after a broker restart.
        return base * random.uniform(0.8, 1.0)

    def reset(self) -> None:
        self.attempts = 0
