"""A snapshot answer of many indicators goes out in the app's own thread, waits while the node's apps
are behind, and loses none."""

from __future__ import annotations

import queue
from datetime import timedelta
from pathlib import Path

from threatbus.data import SnapshotRequest, SnapshotType
from threatbus.testing import indicator, wait_until
from threatbus.worker import stop_workers
from threatbus_suricata.answers import PACE_ABOVE, PACE_EVERY, SnapshotAnswers
from threatbus_suricata.mapping import Settings
from threatbus_suricata.plugin import SuricataApp
from threatbus_suricata.store import DetectionStore

HELD = 2 * PACE_EVERY + 500


def store_holding(tmp_path: Path, count: int) -> DetectionStore:
    store = DetectionStore(tmp_path / "threatbus.rules", Settings(mode="datasets"), 1_000_000, 1_999_999)
    store.load()
    for n in range(count):
        store.apply(indicator(f"10.9.{n // 256}.{n % 256}"))
    return store


def request() -> SnapshotRequest:
    return SnapshotRequest.create(SnapshotType.INDICATOR, timedelta(days=1))


def test_the_hook_returns_at_once_and_the_answer_waits_while_the_backlog_is_high(tmp_path: Path) -> None:
    app = SuricataApp()
    behind = [PACE_ABOVE + 1]
    app.answers = SnapshotAnswers(store_holding(tmp_path, HELD), lambda: behind[0])
    app.answers.start()
    answers: queue.SimpleQueue = queue.SimpleQueue()
    try:
        app.snapshot(snapshot_request=request(), result_queue=answers, requester=None)  # returns at once
        wait_until(lambda: answers.qsize() == PACE_EVERY, 10, what="the first thousand")
        wait_until(lambda: app.answers.pace_checks >= 5, 10, what="five looks at the backlog")  # type: ignore[union-attr]
        assert answers.qsize() == PACE_EVERY  # waiting for the apps to catch up
        behind[0] = 0
        wait_until(lambda: answers.qsize() == HELD, 10, what="the whole answer")
        ids = {answers.get_nowait().stix.id for _ in range(HELD)}
        assert len(ids) == HELD
    finally:
        stop_workers([app.answers])


def test_a_stop_ends_a_waiting_answer(tmp_path: Path) -> None:
    answers_worker = SnapshotAnswers(store_holding(tmp_path, PACE_EVERY + 10), lambda: PACE_ABOVE + 1)
    answers_worker.start()
    answers: queue.SimpleQueue = queue.SimpleQueue()
    answers_worker.requests.put((request(), answers))
    wait_until(lambda: answers.qsize() == PACE_EVERY, 10, what="the first thousand")
    stop_workers([answers_worker], timeout=5)
    assert not answers_worker.is_alive()
    assert answers.qsize() == PACE_EVERY  # the rest is not answered by a stopping app
