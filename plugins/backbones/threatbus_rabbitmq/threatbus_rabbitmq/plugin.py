"""The RabbitMQ backbone plugin object: configuration, workers, hooks."""

from __future__ import annotations

import logging
import queue
from collections.abc import Iterable
from datetime import datetime
from typing import Any

import threatbus
from threatbus.data import Message
from threatbus.deadletters import DEAD_LETTERED, REASONS
from threatbus.errors import ConfigError, PluginError
from threatbus.history import LogEntry
from threatbus.metrics import (
    BACKBONE_CONNECTED,
    BACKBONE_CONSUMED,
    BACKBONE_PUBLISHED,
    BACKBONE_REJECTED,
    DELIVERED,
    DROPPED,
    QUEUE_DEPTH,
    Metrics,
)
from threatbus.node import Node
from threatbus.routing import RoutedBackbone, TopicRouter
from threatbus.worker import stop_workers
from threatbus_rabbitmq import intel_log, stream_transport
from threatbus_rabbitmq.consumer import Consumer
from threatbus_rabbitmq.deadletter import BrokerDeadLetters, DeadLetterQueue, DeadLetterSettings
from threatbus_rabbitmq.deadletter import validators as dead_letter_validators
from threatbus_rabbitmq.dedup import Deduplicator, open_dedup
from threatbus_rabbitmq.outbox import DIR_NAME, DurableOutbox
from threatbus_rabbitmq.publisher import Feeder, Outbox, Publisher
from threatbus_rabbitmq.settings import NAME, PREFIX, BrokerSettings, resolve, validators
from threatbus_rabbitmq.state import StateDir

logger = logging.getLogger(__name__)

DUPLICATES = "threatbus_backbone_duplicates"  # counter{backbone}: repeats dropped by the consumer
RESENT = "threatbus_backbone_resent"  # counter{backbone}: unconfirmed publishes sent again
OUTBOX_BYTES = "threatbus_backbone_outbox_bytes"  # gauge{backbone}: durable outbox records not yet confirmed
BLOCKED = "threatbus_backbone_blocked"  # gauge{backbone}: 1 while the broker's flow control blocks us


class RabbitMQBackbone(RoutedBackbone):
    """Backbone for several nodes: publishes to a fanout exchange, consumes the node's own queue.

    Threads: ``rabbitmq-feeder`` (bus inq -> outbox), ``rabbitmq-publisher``
    and ``rabbitmq-consumer`` (each owns one pika connection).
    """

    def __init__(self) -> None:
        self.router = TopicRouter()
        self.settings: BrokerSettings | None = None
        self.outbox: Outbox | DurableOutbox | None = None
        self.state: StateDir | None = None
        self.dedup: Deduplicator | None = None
        self.publisher: Publisher | None = None
        self.consumer: Consumer | None = None
        self.feeder: Feeder | None = None
        self.dlq: DeadLetterQueue | None = None
        self.log_keeper: intel_log.LogKeeper | None = None
        self.log_reader: intel_log.LogReader | None = None
        self.stream: stream_transport.StreamTransport | None = None

    @threatbus.backbone
    def config_validators(self) -> list[Any]:
        return validators() + dead_letter_validators() + intel_log.validators() + stream_transport.validators()

    @threatbus.backbone
    def run(self, config: Any, publish_queue: queue.SimpleQueue[Message], node: Node, metrics: Metrics) -> None:
        settings = resolve(config, node)
        self.settings = settings
        self._open_state(settings, node)
        if (config.get("transport") if config else None) == "stream":
            self._run_stream(config, publish_queue, node, metrics)
            return
        self.publisher = Publisher(settings, self.outbox)
        self.configure_policy(NAME, config, metrics)
        dlq_settings = DeadLetterSettings.resolve(config, settings)
        self.dlq = DeadLetterQueue(dlq_settings, node.name) if dlq_settings.enabled else None
        self.consumer = Consumer(
            settings, self.router, importing=self.importing, dedup=self.dedup, dead_letters=self.dlq
        )
        self.feeder = Feeder(publish_queue, self.outbox, self.publisher, exporting=self.exporting)
        self._register_metrics(metrics, self.publisher, self.consumer, self.outbox, self.feeder)
        logger.info(
            "RabbitMQ backbone on node '%s': broker %s, exchange '%s'%s, %s queue '%s' (durable=%s, lazy=%s)",
            node.name,
            settings.url,
            settings.exchange,
            f" via durable bridge exchange '{settings.bridge_exchange}'" if settings.bridge_exchange else "",
            settings.queue_type,
            settings.queue_name,
            settings.queue_durable,
            dict(settings.queue_arguments).get("x-queue-mode") == "lazy",
        )
        self._start_log(intel_log.LogSettings.resolve(config, settings))
        self.consumer.start()
        self.publisher.start()
        self.feeder.start()

    def _open_state(self, settings: BrokerSettings, node: Node) -> None:
        """The outbox and the dedup window: on disk under node.data_dir (``state: disk``), else in memory."""
        self.state = StateDir.open(node, NAME) if settings.state_on_disk else None
        if self.state is None:
            self.outbox = Outbox(settings.outbox_size)
            self.dedup = open_dedup(settings.dedup_window, None)
            return
        try:
            self.outbox = DurableOutbox(self.state.path / DIR_NAME, settings.outbox_size, settings.outbox_max_bytes)
            self.dedup = open_dedup(settings.dedup_window, self.state.path)
        except OSError as err:
            self._close_state()
            raise PluginError(f"cannot open the backbone's state in {self.state.path} (node.data_dir): {err}") from err

    def _close_state(self) -> None:
        for closable in (self.outbox, self.dedup, self.state):
            if closable is not None and hasattr(closable, "close"):
                try:
                    closable.close()
                except OSError:
                    logger.exception("closing the backbone's state failed")

    def _run_stream(self, config: Any, publish_queue: queue.SimpleQueue[Message], node: Node, metrics: Metrics) -> None:
        log = intel_log.LogSettings.resolve(config, self.settings)
        if not log.enabled:
            raise ConfigError(f"{PREFIX}.transport stream needs the intel log: history.enabled must be true")
        self.configure_policy(NAME, config, metrics)
        logger.warning(
            "RabbitMQ backbone on node '%s': stream transport over '%s': original Threat Bus nodes on exchange '%s' "
            "do not receive what this node publishes (they read only the exchange); see the README on mixed clusters",
            node.name,
            log.stream,
            self.settings.exchange,
        )
        self._start_log(log)
        assert self.log_keeper is not None
        self.stream = stream_transport.StreamTransport(
            self.settings,
            log,
            self.log_keeper,
            publish_queue,
            self.router,
            exporting=self.exporting,
            importing=self.importing,
            dedup=self.dedup,  # on disk with state: disk, so a restart after SIGKILL repeats nothing
        )
        stream = self.stream
        label = {"backbone": NAME}
        metrics.counter(BACKBONE_PUBLISHED, "Messages confirmed by the broker", lambda: stream.published, **label)
        metrics.counter(BACKBONE_CONSUMED, "Messages consumed from the broker", lambda: stream.consumed, **label)
        metrics.counter(BACKBONE_REJECTED, "Invalid messages rejected", lambda: stream.rejected, **label)
        metrics.counter(DUPLICATES, "Repeated deliveries dropped", lambda: stream.duplicates, **label)
        metrics.counter(DELIVERED, "Messages handed to local subscribers", lambda: self.router.delivered, plugin=NAME)
        metrics.counter(DROPPED, "Messages lost to full subscriber queues", lambda: self.router.dropped, where=NAME)
        metrics.gauge(
            BACKBONE_CONNECTED, "1 while the stream connections are up", lambda: int(stream.connected), **label
        )
        stream.start()

    def _start_log(self, log: intel_log.LogSettings) -> None:
        if not log.enabled:
            logger.info("intel log off (history.enabled false): snapshots come only from apps with history")
            return
        self.log_keeper = intel_log.LogKeeper(self.settings, log)
        self.log_reader = intel_log.LogReader(self.settings, log)
        self.log_keeper.start()
        self.log_reader.start()

    @threatbus.backbone
    def history(self, since: datetime, until: datetime) -> Iterable[LogEntry] | None:
        keeper, reader = self.log_keeper, self.log_reader
        if keeper is None or reader is None or keeper.refused or reader.available is False:
            return None
        return reader.read(since, until)

    def _register_metrics(
        self, metrics: Metrics, publisher: Publisher, consumer: Consumer, outbox: Outbox | DurableOutbox, feeder: Feeder
    ) -> None:
        label = {"backbone": NAME}
        metrics.counter(BACKBONE_PUBLISHED, lambda: publisher.published, **label)
        metrics.counter(BACKBONE_CONSUMED, lambda: consumer.consumed, **label)
        metrics.counter(BACKBONE_REJECTED, lambda: consumer.rejected, **label)
        metrics.counter(DUPLICATES, "Repeated deliveries dropped", lambda: consumer.duplicates, **label)
        metrics.counter(RESENT, "Unconfirmed messages published again", lambda: publisher.resent, **label)
        metrics.counter(DELIVERED, lambda: self.router.delivered, plugin=NAME)
        metrics.counter(DROPPED, lambda: self.router.dropped, where=NAME)
        metrics.counter(DROPPED, lambda: outbox.dropped, where=f"{NAME}-outbox")
        metrics.counter(
            DROPPED,
            lambda: publisher.unencodable + feeder.invalid,
            where=f"{NAME}-invalid",
        )
        metrics.gauge(QUEUE_DEPTH, outbox.__len__, queue=f"{NAME}-outbox")
        if isinstance(outbox, DurableOutbox):
            metrics.gauge(OUTBOX_BYTES, "Bytes in the durable outbox not yet confirmed", lambda: outbox.bytes, **label)
        dlq = self.dlq
        if dlq is not None:
            for reason in REASONS:
                metrics.counter(
                    DEAD_LETTERED,
                    "Messages put into the dead-letter queue",
                    lambda reason=reason: dlq.sent[reason],
                    backbone=NAME,
                    reason=reason,
                )
            metrics.counter(DROPPED, lambda: dlq.failed, where=f"{NAME}-dlq")  # dead letters not published
        metrics.gauge(
            QUEUE_DEPTH,
            lambda: publisher.in_flight,
            queue=f"{NAME}-unconfirmed",
        )
        metrics.gauge(
            BLOCKED,
            "1 while the broker blocks a connection (memory or disk alarm)",
            lambda: int(bool(publisher.blocked or consumer.blocked)),
            **label,
        )
        metrics.gauge(
            BACKBONE_CONNECTED,
            lambda: int(publisher.connected and (consumer.connected or consumer.holding)),
            **label,
        )

    @threatbus.backbone
    def stop(self) -> None:
        workers = [
            w
            for w in (self.feeder, self.publisher, self.consumer, self.stream, self.log_reader, self.log_keeper)
            if w is not None
        ]
        if not workers:
            return
        timeout = (self.settings.stop_timeout if self.settings else 5.0) + 2.0
        # The feeder moves what the apps published last into the outbox; the
        # publisher sends it and waits for its confirms; the consumer acks what it routed.
        if not stop_workers(workers, timeout=timeout):
            self._close_state()  # what the broker did not confirm stays on disk for the next start
        # else a worker still runs and may write: the files close with the process (the next start reads them)
        logger.info(
            "RabbitMQ backbone stopped: %d published, %d consumed, %d rejected, %d duplicates dropped",
            self.publisher.published if self.publisher else 0,
            self.consumer.consumed if self.consumer else 0,
            self.consumer.rejected if self.consumer else 0,
            self.consumer.duplicates if self.consumer else 0,
        )

    @threatbus.backbone
    def dead_letters(self) -> None:
        return None  # they live in a queue on the broker: `threatbus dlq` reads it there

    @threatbus.backbone
    def dead_letter_admin(self, config: Any, node: Node, http_url: str | None) -> BrokerDeadLetters:
        broker = resolve(config, node)
        dlq = DeadLetterSettings.resolve(config, broker)
        if not dlq.enabled:
            logger.warning("%s.dead_letters.enabled is false: the node keeps no dead letters", PREFIX)
        return BrokerDeadLetters(broker, dlq)

    @threatbus.backbone
    def health(self) -> dict[str, Any]:
        if self.stream is not None:
            return {
                "backbone": NAME,
                "transport": "stream",
                "connected": self.stream.connected,
                "consuming": self.stream.consuming,
                "broker": self.settings.url if self.settings else None,
                "stream": self.stream.log.stream,
                "offset": self.stream.offset,
                "unconfirmed": self.stream.in_flight,
                "subscriptions": self.router.subscription_count,
                "intel_log": self._log_health(),
            }
        publisher, consumer = self.publisher, self.consumer
        publishing = bool(publisher and publisher.connected)
        consuming = bool(consumer and consumer.connected)
        # Holding back consumption after start (wait_for_subscribers): connected, queue bound, not consuming yet.
        holding = bool(consumer and consumer.holding)
        blocked = (publisher.blocked if publisher else None) or (consumer.blocked if consumer else None)
        return {
            "backbone": NAME,
            "connected": publishing and (consuming or holding),
            "blocked": blocked is not None,  # flow control: /health answers 503 while true
            "blocked_reason": blocked,
            "publisher_connected": publishing,
            "consumer_connected": consuming or holding,
            "consuming": consuming,
            "waiting_for_subscribers": holding,
            "hold_seconds_left": consumer.hold_seconds_left if consumer else None,
            "held_messages": consumer.backlog_at_connect if holding and consumer else 0,
            "broker": self.settings.url if self.settings else None,
            "exchange": self.settings.exchange if self.settings else None,
            "queue": self.settings.queue_name if self.settings else None,
            "outbox": len(self.outbox) if self.outbox else 0,
            "outbox_bytes": self.outbox.bytes if isinstance(self.outbox, DurableOutbox) else None,
            "outbox_max_bytes": self.outbox.max_bytes if isinstance(self.outbox, DurableOutbox) else None,
            "state_dir": str(self.state.path) if self.state else None,
            "unconfirmed": publisher.in_flight if publisher else 0,
            "subscriptions": self.router.subscription_count,
            "dead_lettered": sum(self.dlq.sent.values()) if self.dlq else 0,
            "dead_letter_queue": self.dlq.settings.queue if self.dlq else None,
            "intel_log": self._log_health(),
        }

    def _log_health(self) -> str:
        keeper, reader = self.log_keeper, self.log_reader
        if keeper is None or reader is None:
            return "off"
        if keeper.refused or reader.available is False:
            return "unavailable"
        return "ready" if keeper.bound.is_set() and reader.available else "starting"
