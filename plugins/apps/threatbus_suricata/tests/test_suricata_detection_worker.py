"""When the detection worker writes the files during and after a bulk load (a fake sync that records its flushes)."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

from threatbus.delivery import DeliveryQueue
from threatbus.testing import indicator, wait_until
from threatbus_suricata import detections
from threatbus_suricata.detections import DetectionWorker


class FlushRecorder:
    """Stands for ``DetectionSync``: every indicator is a change; a flush takes ``flush_seconds`` (a large file)."""

    reload_interval = 0.05

    def __init__(self) -> None:
        self.flushes: list[tuple[float, float]] = []  # (start, end)
        self.flush_seconds = 0.05
        self.hold_second = threading.Event()  # the second indicator is applied once this is set
        self.applying_second = threading.Event()
        self.applied = 0

    def apply(self, message: Any) -> bool:
        if self.applied == 1:
            self.applying_second.set()
            assert self.hold_second.wait(10)
            time.sleep(0.3)  # work on the indicator: the hold ends meanwhile
        self.applied += 1
        return True

    def flush(self, final: bool = False) -> bool:
        start = time.monotonic()
        time.sleep(self.flush_seconds)
        self.flushes.append((start, time.monotonic()))
        return True

    def durable(self) -> None:
        pass


def test_the_rest_of_a_load_that_outlasted_the_hold_is_written_once_the_inbox_runs_empty(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(detections, "BULK_HOLD", 0.2)
    sync, inbox = FlushRecorder(), DeliveryQueue()
    worker = DetectionWorker(sync, inbox)  # type: ignore[arg-type]
    worker.start()
    try:
        wait_until(lambda: sync.flushes, 5, interval=0.005, what="the flush of the state read at start")
        inbox.put_nowait(indicator("10.0.0.1"))  # its change starts the timer: a flush due in 0.2 s
        inbox.put_nowait(indicator("10.0.0.2"))
        assert sync.applying_second.wait(5)
        inbox.put_nowait(indicator("10.0.0.3"))  # still waiting when the hold ends: the load goes on
        sync.flush_seconds = 1.0  # the write at the hold's end is slow: the spacing after it is 4 s
        sync.hold_second.set()
        wait_until(lambda: len(sync.flushes) >= 3, 10, interval=0.01, what="the write of the rest")
        (_, cut), (rest, _) = sync.flushes[1], sync.flushes[2]
        # The inbox ran empty right after the write at the hold's end; the spacing would have been 4 s.
        assert rest - cut < 1.5, sync.flushes
        assert sync.applied == 3
    finally:
        worker.stop()
        worker.join(10)
