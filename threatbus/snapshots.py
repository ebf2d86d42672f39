"""Snapshot bookkeeping: requests go to every app, envelopes only to the requester."""

from __future__ import annotations

import logging
import queue
import threading
from collections import OrderedDict
from collections.abc import Callable
from datetime import timedelta

from threatbus.data import Indicator, Message, SnapshotEnvelope, SnapshotRequest, SnapshotType
from threatbus.expiry import ExpirySchedule
from threatbus.routing import Sink
from threatbus.worker import StoppableWorker

logger = logging.getLogger(__name__)

# Requests whose answers we still route; the oldest are forgotten beyond this.
MAX_OPEN_REQUESTS = 10_000


class SnapshotRouter(StoppableWorker):
    """Consumes snapshot requests and envelopes from the backbone.

    A request (from any node) is handed to every local app through
    ``ask_apps``, with the local subscriber that made it (None if remote).
    An envelope is delivered to the subscriber queue that made the request,
    if that subscriber lives on this node; other nodes' envelopes are ignored.
    Indicators handed over are taken into ``expiry`` (if given), so the
    requester also gets their removal at ``valid_until``.
    """

    def __init__(
        self,
        publish_queue: queue.SimpleQueue[Message],
        ask_apps: Callable[[SnapshotRequest, Sink | None], None],
        expiry: ExpirySchedule | None = None,
    ) -> None:
        super().__init__(name="snapshot-router")
        self.expiry = expiry
        self.inbox: queue.SimpleQueue[Message] = queue.SimpleQueue()
        self._publish_queue = publish_queue
        self._ask_apps = ask_apps
        self._lock = threading.Lock()
        self._requesters: OrderedDict[str, Sink] = OrderedDict()
        self._seen_requests: OrderedDict[str, None] = OrderedDict()

    def request(self, topic: str, requester: Sink, period: timedelta) -> list[str]:
        """Ask all apps for the intel of ``period`` on ``topic``; answers go to ``requester``."""
        ids = []
        for snapshot_type in SnapshotType.for_topic(topic):
            request = SnapshotRequest.create(snapshot_type, period)
            with self._lock:
                self._requesters[request.snapshot_id] = requester
                while len(self._requesters) > MAX_OPEN_REQUESTS:
                    self._requesters.popitem(last=False)
            logger.info(
                "requesting a %s snapshot of %s (id %s)", snapshot_type.name.lower(), period, request.snapshot_id
            )
            self._publish_queue.put(request)
            ids.append(request.snapshot_id)
        return ids

    def forget(self, requester: Sink) -> None:
        """Stop routing envelopes to ``requester`` (it unsubscribed)."""
        with self._lock:
            for snapshot_id in [sid for sid, q in self._requesters.items() if q is requester]:
                del self._requesters[snapshot_id]

    def run(self) -> None:
        for message in self.drain(self.inbox):
            try:
                if isinstance(message, SnapshotRequest):
                    self._handle_request(message)
                elif isinstance(message, SnapshotEnvelope):
                    self._handle_envelope(message)
            except Exception:
                logger.exception("failed to handle %s", message.type_name)

    def _handle_request(self, request: SnapshotRequest) -> None:
        # At-least-once backbones may redeliver a request; ask apps only once.
        if request.snapshot_id in self._seen_requests:
            return
        self._seen_requests[request.snapshot_id] = None
        while len(self._seen_requests) > MAX_OPEN_REQUESTS:
            self._seen_requests.popitem(last=False)
        with self._lock:
            requester = self._requesters.get(request.snapshot_id)
        self._ask_apps(request, requester)

    def _handle_envelope(self, envelope: SnapshotEnvelope) -> None:
        with self._lock:
            requester = self._requesters.get(envelope.snapshot_id)
        if requester is None:
            return
        body = envelope.stix
        if self.expiry is not None and isinstance(body, Indicator):
            self.expiry.route(lambda _body, _sinks: self._put(requester, envelope), body, (requester,))
        else:
            self._put(requester, envelope)

    @staticmethod
    def _put(requester: Sink, envelope: SnapshotEnvelope) -> int:
        try:
            requester.put_nowait(envelope)
        except queue.Full:
            logger.warning("requester queue full, dropped envelope of snapshot %s", envelope.snapshot_id)
            return 0
        return 1
