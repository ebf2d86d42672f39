"""MISP's attribute notifications, from its ZeroMQ publisher or from Kafka.

MISP publishes one frame per change, ``<topic> <json>``; attribute changes
use topic ``misp_json_attribute`` and the JSON ``{"Attribute": {...},
"Event": {...}, "action": "add"|"edit"|"delete"}``. Its Kafka publisher
sends the same JSON as message value, one Kafka topic per kind of change.
The workers here only receive; ``handle(origin, body)`` of the plugin
decides what a notification means.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import zmq
from zmq.utils.monitor import recv_monitor_message

from threatbus.data import json_object
from threatbus.errors import DecodeError
from threatbus.ratelimit import RateLimitedLog
from threatbus.worker import POLL_INTERVAL, Backoff, ReconnectingWorker, StoppableWorker
from threatbus_misp.mapping import InvalidAttribute, MispAttribute
from threatbus_misp.settings import DEFAULT_ZMQ_TOPIC, MispSettings

logger = logging.getLogger(__name__)

ACTIONS = ("add", "edit", "delete")
# ZeroMQ reconnects by itself; these bound its own exponential backoff (milliseconds).
RECONNECT_IVL_MS = 500
RECONNECT_IVL_MAX_MS = 30_000
# Frames ZeroMQ buffers for us: MISP's PUB drops what does not fit when a burst (a big event
# published at once) outruns this worker, so take bursts in whole.
RCVHWM = 100_000
# Frames taken in a row before the worker looks at its stop flag and the monitor again.
BATCH = 1000

Handler = Callable[[str, bytes], None]


class InvalidNotification(ValueError):
    """A message on MISP's feed that is not an attribute notification."""


@dataclass(frozen=True)
class Notification:
    action: str  # add, edit or delete
    attribute: MispAttribute
    deleted: bool = False  # MISP's soft delete arrives as an edit of an attribute marked deleted


def parse_notification(body: bytes) -> Notification | None:
    """The attribute notification in ``body``; None for actions the plugin ignores.

    Raises ``InvalidNotification`` for anything that is not one.
    """
    try:
        payload = json_object(body)
    except DecodeError as err:
        raise InvalidNotification(str(err)) from None
    action = payload.get("action")
    if not isinstance(action, str):
        raise InvalidNotification("no 'action'")
    if action not in ACTIONS:
        return None
    attribute = payload.get("Attribute")
    try:
        parsed = MispAttribute.from_json(attribute, payload.get("Event"))
    except InvalidAttribute as err:
        raise InvalidNotification(str(err)) from None
    deleted = isinstance(attribute, dict) and str(attribute.get("deleted", "")).lower() in ("1", "true")
    return Notification(action, parsed, deleted)


class FeedStatus:
    """Whether the feed is connected, and how often it (re)connected; read by metrics."""

    def __init__(self) -> None:
        self.connected = False
        self.connects = 0
        self.errors = 0


class ZmqFeed(StoppableWorker):
    """Subscribes to MISP's ZeroMQ publisher and hands every attribute frame to ``handle``.

    ZeroMQ reconnects on its own with capped exponential backoff
    (``RECONNECT_IVL_MS`` to ``RECONNECT_IVL_MAX_MS``); a socket monitor
    tells the worker when the connection comes and goes, for the log and the
    ``connected`` gauge.
    """

    def __init__(self, settings: MispSettings, handle: Handler, status: FeedStatus, context: zmq.Context) -> None:
        super().__init__(name="misp-zmq-feed")
        self.endpoint = settings.zmq_endpoint
        self.ipv6 = bool(settings.zmq_host and ":" in settings.zmq_host)
        self.handle = handle
        self.status = status
        self.context = context

    def run(self) -> None:
        sock = self.context.socket(zmq.SUB)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RECONNECT_IVL, RECONNECT_IVL_MS)
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, RECONNECT_IVL_MAX_MS)
        sock.setsockopt(zmq.RCVHWM, RCVHWM)
        if self.ipv6:
            sock.setsockopt(zmq.IPV6, 1)
        monitor = sock.get_monitor_socket(zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED)
        try:
            sock.setsockopt(zmq.SUBSCRIBE, DEFAULT_ZMQ_TOPIC.encode())
            sock.connect(self.endpoint)
            logger.info("subscribing to MISP's ZeroMQ feed at %s", self.endpoint)
            poller = zmq.Poller()
            poller.register(sock, zmq.POLLIN)
            poller.register(monitor, zmq.POLLIN)
            while not self.stopping:
                ready = dict(poller.poll(int(POLL_INTERVAL * 1000)))
                if monitor in ready:
                    self._monitor_event(monitor)
                if sock in ready:
                    self._receive(sock)
        finally:
            self.status.connected = False
            sock.disable_monitor()
            monitor.close(linger=0)
            sock.close(linger=0)

    def _monitor_event(self, monitor: zmq.Socket) -> None:
        event = recv_monitor_message(monitor)
        if event["event"] == zmq.EVENT_CONNECTED:
            self.status.connected = True
            self.status.connects += 1
            logger.info("connected to MISP's ZeroMQ feed at %s", self.endpoint)
        elif event["event"] == zmq.EVENT_DISCONNECTED:
            self.status.connected = False
            logger.warning(
                "lost MISP's ZeroMQ feed at %s; reconnecting (backoff up to %ds)",
                self.endpoint,
                RECONNECT_IVL_MAX_MS // 1000,
            )

    def _receive(self, sock: zmq.Socket) -> None:
        for _ in range(BATCH):
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            frame = b" ".join(frames)
            topic, _, body = frame.partition(b" ")
            self.handle(f"ZeroMQ topic {topic.decode('utf-8', 'replace')[:60]}", body)


class KafkaFeed(ReconnectingWorker):
    """Consumes MISP's notifications from Kafka topics (``threatbus-misp[kafka]``).

    librdkafka reconnects to the brokers by itself; a consumer that cannot be
    created (bad ``kafka.config``, say) or that fails is made again after a
    backoff. ``connected`` is cleared when librdkafka reports all brokers down
    and set again by the next message.
    """

    def __init__(
        self,
        settings: MispSettings,
        handle: Handler,
        status: FeedStatus,
        consumer_factory: Callable[[dict[str, Any]], Any] | None = None,
    ) -> None:
        super().__init__("misp-kafka-feed", Backoff(initial=1.0, maximum=60.0))
        self.settings = settings
        self.handle = handle
        self.status = status
        self.consumer_factory = consumer_factory
        self.error_log = RateLimitedLog(logger)

    def _consumer(self) -> Any:
        if self.consumer_factory is not None:
            return self.consumer_factory(dict(self.settings.kafka_config))
        from confluent_kafka import Consumer  # the optional extra, checked at config validation

        # librdkafka logs to stderr unless given a logger; kafka.config may set its own of both.
        return Consumer({"logger": logger, "error_cb": self._on_error, **self.settings.kafka_config})

    def _on_error(self, error: Any) -> None:
        """librdkafka's error callback (called from ``poll``, in this thread)."""
        from confluent_kafka import KafkaError

        self.status.errors += 1
        if error.code() == KafkaError._ALL_BROKERS_DOWN:  # librdkafka's local error codes are public, with "_"
            self.status.connected = False
            self.error_log("MISP's Kafka brokers are unreachable: %s; librdkafka reconnects", error.str())
        else:
            logger.debug("Kafka: %s", error.str())

    def connect_and_serve(self) -> None:
        consumer = self._consumer()
        try:
            consumer.subscribe(list(self.settings.kafka_topics))
            self.status.connected = True
            self.status.connects += 1
            self.backoff.reset()
            logger.info("consuming MISP's Kafka topics %s", ", ".join(self.settings.kafka_topics))
            self._consume(consumer)
        finally:
            self.status.connected = False
            try:
                consumer.close()
            except Exception:
                logger.debug("closing the Kafka consumer failed", exc_info=True)

    def _consume(self, consumer: Any) -> None:
        # poll_interval is the poll timeout, as in the original; capped so a stop is seen within a second.
        timeout = min(self.settings.kafka_poll_interval, 1.0)
        while not self.stopping:
            message = consumer.poll(timeout)
            if message is None:
                continue
            if message.error():
                self.status.errors += 1
                logger.warning("Kafka reported an error: %s", message.error())
                continue
            self.status.connected = True
            self.handle(f"Kafka topic {message.topic()}", message.value() or b"")

    def connection_failed(self, err: Exception) -> None:
        self.status.errors += 1
        logger.error("cannot consume MISP's Kafka topics: %s", err)
        logger.debug("the Kafka feed's error", exc_info=err)

    def reconnecting(self, delay: float) -> None:
        logger.info("consuming MISP's Kafka topics again in %.1fs", delay)
