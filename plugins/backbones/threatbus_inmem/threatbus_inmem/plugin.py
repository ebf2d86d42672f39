"""In-memory backbone: one worker hands every published message to local subscribers."""

from __future__ import annotations

import logging
import queue
from typing import Any

import threatbus
from threatbus.data import Message
from threatbus.metrics import DELIVERED, DROPPED, Metrics
from threatbus.node import Node
from threatbus.routing import RoutedBackbone, TopicRouter
from threatbus.worker import StoppableWorker, stop_workers

logger = logging.getLogger(__name__)


class _Distributor(StoppableWorker):
    def __init__(self, inq: queue.SimpleQueue[Message], router: TopicRouter) -> None:
        super().__init__(name="inmem-distributor")
        self.inq = inq
        self.router = router

    def run(self) -> None:
        # Also what apps published before the stop, so nothing accepted is lost.
        for message in self.drain_all(self.inq):
            self.router.route(message)


class InMemoryBackbone(RoutedBackbone):
    """Backbone for a single node: no broker, no persistence."""

    def __init__(self) -> None:
        self.router = TopicRouter()
        self.worker: _Distributor | None = None

    @threatbus.backbone
    def config_validators(self) -> list[Any]:
        return []

    @threatbus.backbone
    def run(self, config: Any, publish_queue: queue.SimpleQueue[Message], node: Node, metrics: Metrics) -> None:
        metrics.counter(DELIVERED, lambda: self.router.delivered, plugin="inmem")
        metrics.counter(DROPPED, lambda: self.router.dropped, where="inmem")
        sections = [config.get(direction) for direction in ("export", "import")] if config else []
        if any(isinstance(section, dict) and section.get("filter") for section in sections):
            # One node, no other nodes: everything stays local, so export and import filters change nothing.
            logger.info("inmem: export and import filters have no effect (no other nodes)")
        self.worker = _Distributor(publish_queue, self.router)
        self.worker.start()
        logger.info("in-memory backbone running on node '%s'", node.name)

    @threatbus.backbone
    def stop(self) -> None:
        if self.worker is not None:
            stop_workers([self.worker])

    @threatbus.backbone
    def health(self) -> dict[str, Any]:
        running = self.worker is not None and self.worker.is_alive()
        return {"backbone": "inmem", "connected": running, "subscriptions": self.router.subscription_count}
