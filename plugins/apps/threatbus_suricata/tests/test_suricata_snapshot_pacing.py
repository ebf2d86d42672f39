"""A snapshot answer of many indicators waits while the node's apps are behind, and loses none."""

from __future__ import annotations

import queue
import threading
from datetime import timedelta
from pathlib import Path

from threatbus.data import SnapshotRequest, SnapshotType
from threatbus.testing import indicator, wait_until
from threatbus_suricata.mapping import Settings
from threatbus_suricata.plugin import PACE_ABOVE, PACE_EVERY, SuricataApp
from threatbus_suricata.store import DetectionStore

HELD = 2 * PACE_EVERY + 500


def app_holding(tmp_path: Path, count: int) -> SuricataApp:
    app = SuricataApp()
    app.store = DetectionStore(tmp_path / "threatbus.rules", Settings(mode="datasets"), 1_000_000, 1_999_999)
    app.store.load()
    for n in range(count):
        app.store.apply(indicator(f"10.9.{n // 256}.{n % 256}"))
    return app


def test_the_answer_waits_while_the_backlog_is_high_then_all_of_it_arrives(tmp_path: Path) -> None:
    app = app_holding(tmp_path, HELD)
    answers: queue.SimpleQueue = queue.SimpleQueue()
    behind = [PACE_ABOVE + 1]
    app.backlog = lambda: behind[0]
    request = SnapshotRequest.create(SnapshotType.INDICATOR, timedelta(days=1))
    answering = threading.Thread(target=app.snapshot, args=(request, answers, None))
    answering.start()
    try:
        wait_until(lambda: answers.qsize() == PACE_EVERY, 10, what="the first thousand")
        assert answering.is_alive()  # waiting for the apps to catch up
        behind[0] = 0
        answering.join(10)
        assert not answering.is_alive()
        ids = set()
        while not answers.empty():
            ids.add(answers.get_nowait().stix.id)
        assert len(ids) == HELD
    finally:
        app.stopping.set()
        answering.join(10)


def test_a_stop_ends_a_waiting_answer(tmp_path: Path) -> None:
    app = app_holding(tmp_path, PACE_EVERY + 10)
    app.backlog = lambda: PACE_ABOVE + 1
    answers: queue.SimpleQueue = queue.SimpleQueue()
    request = SnapshotRequest.create(SnapshotType.INDICATOR, timedelta(days=1))
    answering = threading.Thread(target=app.snapshot, args=(request, answers, None))
    answering.start()
    wait_until(lambda: answers.qsize() == PACE_EVERY, 10, what="the first thousand")
    app.stop()
    answering.join(10)
    assert not answering.is_alive()
    assert answers.qsize() == PACE_EVERY  # the rest is not answered by a stopping app
