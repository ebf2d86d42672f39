"""Snapshot answers from the store: in a thread of their own, paced by the node's backlog.

The bus calls the ``snapshot`` hook in its snapshot router's thread, the
thread that also hands every answer on to the requester: an answer of a
million indicators given right there would wait whole, decoded, in the
router's queue (gigabytes). The hook hands the request to this worker
instead, which puts the answers on the bus while the node's apps keep up.
"""

from __future__ import annotations

import logging
import queue
from collections.abc import Callable
from datetime import datetime, timezone

from threatbus.data import Indicator, Message, SnapshotEnvelope, SnapshotRequest
from threatbus.stix import timestamp
from threatbus.worker import StoppableWorker
from threatbus_suricata.store import DetectionStore

logger = logging.getLogger(__name__)

# The answer looks at the node's backlog every PACE_EVERY indicators and waits (looking
# every PACE_POLL seconds) while more than PACE_ABOVE messages wait in a queue.
PACE_EVERY = 1000
PACE_ABOVE = 20_000
PACE_POLL = 0.01


class SnapshotAnswers(StoppableWorker):
    """Answers the snapshot requests handed to ``requests`` with the held active indicators."""

    def __init__(self, store: DetectionStore, backlog: Callable[[], int]) -> None:
        super().__init__(name="suricata-snapshots")
        self.store = store
        self.backlog = backlog
        self.requests: queue.SimpleQueue[tuple[SnapshotRequest, queue.SimpleQueue[Message]]] = queue.SimpleQueue()
        self.pace_checks = 0  # looks at the backlog (tests watch it)

    def run(self) -> None:
        for request, result_queue in self.drain(self.requests):
            try:
                self.answer(request, result_queue)
            except Exception:  # a bug must cost this answer, not the next ones
                logger.exception("answering snapshot %s failed", request.snapshot_id)

    def answer(self, request: SnapshotRequest, result_queue: queue.SimpleQueue[Message]) -> None:
        now = datetime.now(timezone.utc)
        since = timestamp(now - request.snapshot)
        answered = 0
        for modified, payload in self.store.payloads(now):  # active intel only
            if modified >= since:
                result_queue.put(SnapshotEnvelope.wrap(request, Indicator(payload)))
                answered += 1
                if answered % PACE_EVERY == 0 and not self._pace():
                    logger.info("stopping: snapshot %s answered with %d indicators only", request.snapshot_id, answered)
                    return
        logger.info("answered snapshot %s with %d indicators", request.snapshot_id, answered)

    def _pace(self) -> bool:
        """Wait while the node's apps are far behind; False when asked to stop meanwhile."""
        while True:
            self.pace_checks += 1
            if self.backlog() <= PACE_ABOVE:
                break
            if self.wait(PACE_POLL):
                return False
        return not self.stopping
