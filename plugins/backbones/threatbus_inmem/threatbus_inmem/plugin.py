"""In-memory backbone: one worker hands every published message to local subscribers."""

from __future__ import annotations

import logging
import queue
from collections.abc import Iterable
from datetime import datetime
from typing import Any

import threatbus
from threatbus import history
from threatbus.config import count, option
from threatbus.data import Message, StixObject
from threatbus.deadletters import DEAD_LETTERED, DEAD_LETTERS, DEAD_LETTERS_REPLAYED, UNDELIVERED, HttpDeadLetters
from threatbus.errors import ConfigError
from threatbus.metrics import DELIVERED, DROPPED, QUEUE_DEPTH, Metrics
from threatbus.node import Node
from threatbus.routing import RoutedBackbone, TopicRouter
from threatbus.worker import StoppableWorker, stop_workers
from threatbus_inmem.deadletters import MemoryDeadLetters
from threatbus_inmem.intel_log import MemoryLog

logger = logging.getLogger(__name__)

NAME = "inmem"
PREFIX = f"plugins.backbones.{NAME}"
INTEL_LOG_BYTES = "threatbus_inmem_log_bytes"  # gauge
INTEL_LOG_EVICTED = "threatbus_inmem_log_evicted"  # counter


class _Distributor(StoppableWorker):
    def __init__(self, inq: queue.SimpleQueue[Message], router: TopicRouter, log: MemoryLog | None) -> None:
        super().__init__(name="inmem-distributor")
        self.inq = inq
        self.router = router
        self.log = log

    def _take(self, message: Message) -> None:
        # Only intel goes into the log: snapshots are folded from indicators and sightings.
        if self.log is not None and isinstance(message, StixObject):
            self.log.append(message)
        self.router.route(message)

    def run(self) -> None:
        # Also what apps published before the stop, so nothing accepted is lost.
        for message in self.drain_all(self.inq):
            self._take(message)


class InMemoryBackbone(RoutedBackbone):
    """Backbone for a single node: no broker, no persistence; the intel log in memory."""

    def __init__(self) -> None:
        self.router = TopicRouter()
        self.worker: _Distributor | None = None
        self.dlq: MemoryDeadLetters | None = None
        self.log: MemoryLog | None = None

    @threatbus.backbone
    def config_validators(self) -> list[Any]:
        return [
            option(f"{PREFIX}.dead_letters", dict, default={}),
            count(
                f"{PREFIX}.dead_letters.max_items", default=1000, minimum=0, expected="an integer >= 0 (0 keeps none)"
            ),
            *history.validators(PREFIX),
        ]

    @threatbus.backbone
    def run(self, config: Any, publish_queue: queue.SimpleQueue[Message], node: Node, metrics: Metrics) -> None:
        capacity = int(config["dead_letters"]["max_items"])
        self.dlq = dlq = MemoryDeadLetters(capacity, publish_queue.put, node.name)
        self.router.on_drop = lambda message, why: dlq.add(message, UNDELIVERED, why)
        metrics.counter(DELIVERED, lambda: self.router.delivered, plugin=NAME)
        metrics.counter(DROPPED, lambda: self.router.dropped, where=NAME)
        metrics.counter(DROPPED, lambda: dlq.evicted, where=f"{NAME}-dlq")
        metrics.counter(
            DEAD_LETTERED, "Messages put into the dead-letter queue", lambda: dlq.added[UNDELIVERED],
            backbone=NAME, reason=UNDELIVERED,
        )  # fmt: skip
        metrics.counter(DEAD_LETTERS_REPLAYED, "Dead letters sent again", lambda: dlq.replayed, backbone=NAME)
        metrics.gauge(DEAD_LETTERS, "Messages held in the dead-letter queue", dlq.__len__, backbone=NAME)
        sections = [config.get(direction) for direction in ("export", "import")] if config else []
        if any(isinstance(section, dict) and section.get("filter") for section in sections):
            # One node, no other nodes: everything stays local, so export and import filters change nothing.
            logger.info("inmem: export and import filters have no effect (no other nodes)")
        settings = history.HistorySettings.from_config(config)
        if settings.enabled:
            self.log = log = MemoryLog(settings)
            metrics.gauge(QUEUE_DEPTH, log.__len__, queue="inmem-log")
            metrics.gauge(INTEL_LOG_BYTES, "Bytes of JSON the intel log holds (what max_bytes caps)", lambda: log.bytes)
            metrics.counter(
                INTEL_LOG_EVICTED, "Entries the intel log let go (past max_age or max_bytes)", lambda: log.evicted
            )
        self.worker = _Distributor(publish_queue, self.router, self.log)
        self.worker.start()
        logger.info(
            "in-memory backbone running on node '%s'%s",
            node.name,
            f", intel log of {settings.max_age.days} day(s) in memory" if self.log is not None else ", no intel log",
        )

    @threatbus.backbone
    def dead_letters(self) -> MemoryDeadLetters | None:
        return self.dlq

    @threatbus.backbone
    def dead_letter_admin(self, config: Any, node: Node, http_url: str | None) -> HttpDeadLetters:
        if http_url is None:
            raise ConfigError(
                "http.port is not configured: the inmem backbone keeps its dead letters in the running node's "
                "memory, which `threatbus dlq` reaches through the node's HTTP endpoint; set http.port "
                "(a fixed port, not 0) and http.host in the node's config"
            )
        return HttpDeadLetters(http_url)

    @threatbus.backbone
    def stop(self) -> None:
        if self.worker is not None:
            stop_workers([self.worker])

    @threatbus.backbone
    def history(self, since: datetime, until: datetime) -> Iterable[history.LogEntry] | None:
        return self.log.read(since, until) if self.log is not None else None

    @threatbus.backbone
    def health(self) -> dict[str, Any]:
        running = self.worker is not None and self.worker.is_alive()
        return {
            "backbone": NAME,
            "connected": running,
            "subscriptions": self.router.subscription_count,
            "dead_letters": len(self.dlq) if self.dlq is not None else 0,
        }
