"""StoppableWorker, stop_workers and Backoff."""

import queue
import threading
import time

import pytest

from threatbus.worker import POLL_INTERVAL, Backoff, ReconnectingWorker, StoppableWorker, stop_workers


class Echo(StoppableWorker):
    def __init__(self, source, sink):
        super().__init__(name="echo")
        self.source, self.sink = source, sink

    def run(self):
        for item in self.drain(self.source):
            self.sink.put(item)


def test_worker_processes_items_and_stops_promptly():
    source, sink = queue.Queue(), queue.Queue()
    worker = Echo(source, sink)
    worker.start()
    source.put(1)
    assert sink.get(timeout=5) == 1
    started = time.monotonic()
    worker.stop()
    worker.join(5)
    assert not worker.is_alive()
    assert time.monotonic() - started < POLL_INTERVAL + 1
    assert not worker.daemon


def test_wait_returns_early_on_stop():
    worker = StoppableWorker()
    threading.Timer(0.05, worker.stop).start()
    started = time.monotonic()
    assert worker.wait(10)
    assert time.monotonic() - started < 5


def test_stop_workers_reports_stuck_threads():
    release = threading.Event()
    stuck = threading.Thread(target=release.wait, name="stubborn")
    good = Echo(queue.Queue(), queue.Queue())
    never_started = Echo(queue.Queue(), queue.Queue())
    stuck.start()
    good.start()
    try:
        assert stop_workers([good, stuck, never_started], timeout=POLL_INTERVAL * 3) == ["stubborn"]
        assert not good.is_alive()
    finally:
        release.set()
        stuck.join()


def test_backoff_grows_caps_and_resets():
    backoff = Backoff(initial=1, maximum=8)
    delays = [backoff.next_delay() for _ in range(6)]
    assert all(0.8 * min(8, 2**i) <= d <= min(8, 2**i) for i, d in enumerate(delays))
    assert max(delays) <= 8
    backoff.reset()
    assert backoff.next_delay() <= 1


def test_backoff_rejects_nonsense():
    with pytest.raises(ValueError):
        Backoff(initial=0)


def test_stop_wakes_a_draining_worker_at_once_and_leftovers_skip_the_wake_up():
    source, sink = queue.Queue(), queue.Queue()
    worker = Echo(source, sink)
    worker.start()
    source.put("first")
    assert sink.get(timeout=5) == "first"
    started = time.monotonic()
    worker.stop()
    worker.join(5)
    assert time.monotonic() - started < POLL_INTERVAL / 2
    source.put("late")
    assert list(worker.leftovers(source)) == ["late"]


def test_stop_workers_closes_workers_that_never_started():
    closed = []

    class Owner(StoppableWorker):
        def run(self) -> None:
            self.wait(5)

        def release(self) -> None:
            closed.append(self.name)

    started, built = Owner(name="started"), Owner(name="built")
    started.start()
    assert stop_workers([started, built], timeout=5) == []
    # The started worker closes itself in run(); stop_workers closes only the one that never ran.
    assert closed == ["built"]


def test_drain_all_yields_what_was_put_before_the_stop():
    source: queue.SimpleQueue[int] = queue.SimpleQueue()
    got: list[int] = []

    class Collector(StoppableWorker):
        def run(self) -> None:
            got.extend(self.drain_all(source))

    worker = Collector()
    for item in range(3):
        source.put(item)
    worker.stop()  # before the start: drain yields nothing, leftovers everything
    worker.start()
    worker.join(5)
    assert got == [0, 1, 2]


def test_reconnecting_worker_retries_with_backoff_until_stopped():
    attempts: list[float] = []
    finished = threading.Event()

    class Flaky(ReconnectingWorker):
        def connect_and_serve(self) -> None:
            attempts.append(time.monotonic())
            if len(attempts) == 1:
                raise OSError("refused")
            if len(attempts) == 3:
                self.backoff.reset()
                self.wait(10)  # "connected" until stopped

        def finish(self) -> None:
            finished.set()

    worker = Flaky(backoff=Backoff(initial=0.05, maximum=0.1))
    worker.start()
    deadline = time.monotonic() + 5
    while len(attempts) < 3 and time.monotonic() < deadline:
        worker.wait(0.01)
    assert len(attempts) == 3
    assert worker.backoff.attempts == 0  # reset once connected
    assert stop_workers([worker]) == []
    assert finished.is_set() and len(attempts) == 3
