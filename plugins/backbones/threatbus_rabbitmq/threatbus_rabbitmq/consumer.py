"""Consuming the node's queue and handing each message to the local subscribers.

The consumer owns its pika connection in its own thread. For every delivery
it decodes the body (structure only, ``threatbus.data.decode``), drops it if
an identical message was seen recently (at-least-once delivery repeats
messages after reconnects), routes it with the ``TopicRouter`` (never blocks)
and acknowledges it once the apps are done with it (``handover``). Acks are
batched (``multiple=True``). Messages
that did not come from one of our nodes (``deadletter.from_our_node``) are
first validated like intel entering the bus (``threatbus.stix.validate``).
Poison, invalid intel and what no local app could take are logged, counted
and published to the node's dead-letter queue (``deadletter.py``), then
acked; without a usable dead-letter queue they are rejected without requeue.

After the node starts, the first connection declares and binds the queue but
holds back ``basic_consume`` until an app subscribes to intel locally (or
``wait_for_subscribers`` seconds pass): apps reconnect to a restarted node
within seconds, and what waited in the durable queue is meant for them.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from pika.channel import Channel
from pika.spec import Basic, BasicProperties

from threatbus.data import TOPIC_INDICATOR, TOPIC_SIGHTING, Message, decode, describe
from threatbus.deadletters import INVALID_MESSAGE, INVALID_STIX, UNDELIVERED
from threatbus.routing import TopicRouter
from threatbus.stix import InvalidIntel, validate
from threatbus_rabbitmq.connection import AmqpWorker
from threatbus_rabbitmq.deadletter import DeadLetterQueue, from_our_node, is_replay
from threatbus_rabbitmq.dedup import Deduplicator
from threatbus_rabbitmq.dedup import digest as dedup_digest
from threatbus_rabbitmq.handover import Handover
from threatbus_rabbitmq.settings import BrokerSettings

logger = logging.getLogger(__name__)

# While messages wait for the apps, how often the consumer looks whether they are done (and, for apps whose plain
# queues it looks into, writes their keys: the shorter, the fewer a kill in between repeats) and acks them.
RELEASE_INTERVAL = 0.001
# Acks of settled messages wait at most this long to be batched with later ones.
ACK_DELAY = 0.01
# On a busy queue the consumer looks at what was settled at every this many deliveries too.
RELEASE_EVERY = 16
# Poison messages: at most this many log lines per window, then a summary.
_POISON_LOG_BURST = 20
_POISON_LOG_WINDOW = 10.0
# While holding back consumption, how often the subscriptions are looked at.
HOLD_CHECK = 0.1
# Subscriptions that make the consumer start: the core's own (threatbus/*, snapshots) do not count.
INTEL_TOPICS = (TOPIC_INDICATOR, TOPIC_SIGHTING)


class Consumer(AmqpWorker):
    """Owns the consuming connection; runs in its own thread."""

    role = "consumer"

    def __init__(
        self,
        settings: BrokerSettings,
        router: TopicRouter,
        importing: Callable[[Message], bool] | None = None,
        dedup: Deduplicator | None = None,
        dead_letters: DeadLetterQueue | None = None,
    ) -> None:
        super().__init__(settings)
        self.router = router
        # The node's import filter (RoutedBackbone.importing), for messages other nodes published.
        self.importing = importing
        self.dead_letters = dead_letters
        self.foreign = 0  # messages validated because they came from no node of ours
        self._current: tuple[bytes, BasicProperties, str] | None = None  # the delivery being routed
        router.on_drop = self._on_undelivered
        self.dedup = dedup if dedup is not None else Deduplicator(settings.dedup_window)
        self.handover = Handover(self.dedup)
        self.consumed = 0
        self.rejected = 0
        self.duplicates = 0
        self.backlog_at_connect = 0  # messages waiting in the queue when we last connected
        # Hold back consuming after start until an app subscribes (only the first time).
        self._hold_pending = settings.wait_for_subscribers > 0
        self._hold_deadline: float | None = None  # monotonic; set when the hold begins, kept across reconnects
        self._hold_timer: Any = None
        self.holding = False  # queue declared and bound, consumption held back
        self._consumer_tag: str | None = None
        self._ack_batch = max(1, settings.prefetch // 4)
        self._ack_timer: Any = None
        self._ackable = 0  # the highest delivery tag the apps are done with (all below it too)
        self._acked = 0
        self._ack_due = 0.0  # monotonic: when what was taken must be acked at the latest
        self._poison_window_start = 0.0
        self._poison_logged = 0
        self._poison_suppressed = 0

    # ---- set-up --------------------------------------------------------

    def setup(self, channel: Channel) -> None:
        channel.basic_qos(prefetch_count=self.settings.prefetch, callback=lambda _f: self._declare_exchange(channel))

    def _declare_exchange(self, channel: Channel) -> None:
        s = self.settings
        after = self._declare_bridge if s.bridge_exchange else self._declare_queue
        channel.exchange_declare(
            exchange=s.exchange, exchange_type="fanout", durable=s.exchange_durable, callback=lambda _f: after(channel)
        )

    def _declare_bridge(self, channel: Channel) -> None:
        channel.exchange_declare(
            exchange=self.settings.bridge_exchange,
            exchange_type="fanout",
            durable=True,
            callback=lambda _f: self._declare_queue(channel),
        )

    def _declare_queue(self, channel: Channel) -> None:
        s = self.settings
        channel.queue_declare(
            queue=s.queue_name,
            durable=s.queue_durable,
            exclusive=s.queue_exclusive,
            auto_delete=s.queue_auto_delete,
            arguments=dict(s.queue_arguments),
            callback=lambda frame: self._on_queue_declared(channel, frame),
        )

    def _on_queue_declared(self, channel: Channel, frame: Any) -> None:
        s = self.settings
        self.backlog_at_connect = frame.method.message_count
        others = frame.method.consumer_count
        if others:
            logger.error(
                "consumer: queue '%s' already has %d consumer(s): another Threat Bus node uses the same queue name "
                "(set a distinct queue.name_suffix per node) or our previous connection is not yet gone; %s",
                s.queue_name,
                others,
                "this node stands by (single active consumer of the quorum queue) and receives nothing while "
                "the other consumes"
                if s.quorum
                else "not sharing it: each node must see every message",
            )
        exchanges = [s.exchange, *([s.bridge_exchange] if s.bridge_exchange else [])]
        if self.dead_letters is not None and self._connection is not None:
            # A channel of its own: a broker that refuses it (permissions) must not stop the consuming.
            self.dead_letters.open(self._connection)
        self._bind(channel, exchanges)

    def _bind(self, channel: Channel, exchanges: list[str]) -> None:
        if not exchanges:
            self._consume_or_hold(channel)
            return
        first, rest = exchanges[0], exchanges[1:]
        channel.queue_bind(
            queue=self.settings.queue_name,
            exchange=first,
            routing_key="",
            callback=lambda _f: self._bind(channel, rest),
        )

    # ---- holding back after start -------------------------------------

    def intel_subscribed(self) -> bool:
        """True when a local app subscribed to indicators or sightings (the core's own subscriptions aside)."""
        return any(self.router.subscribers(topic) for topic in INTEL_TOPICS)

    @property
    def hold_seconds_left(self) -> float | None:
        if not self.holding or self._hold_deadline is None:
            return None
        return max(0.0, self._hold_deadline - time.monotonic())

    def _consume_or_hold(self, channel: Channel) -> None:
        if not self._hold_pending or self.intel_subscribed():
            self._hold_pending = False
            self._consume(channel)
            return
        now = time.monotonic()
        if self._hold_deadline is None:
            self._hold_deadline = now + self.settings.wait_for_subscribers
            logger.info(
                "consumer: holding %d waiting message(s) in queue '%s' until an app subscribes to intel, "
                "at most %.0fs (wait_for_subscribers)",
                self.backlog_at_connect,
                self.settings.queue_name,
                self.settings.wait_for_subscribers,
            )
        else:  # the connection dropped during the hold: hold on until the same deadline
            logger.info(
                "consumer: still holding %d waiting message(s) until an app subscribes, at most %.1fs more",
                self.backlog_at_connect,
                max(0.0, self._hold_deadline - now),
            )
        self.holding = True
        self._check_hold(channel)

    def _check_hold(self, channel: Channel) -> None:
        self._hold_timer = None
        if not self.holding or self._closing or self.stopping or channel is not self._channel or not channel.is_open:
            return  # stopping, or the channel went: the next connection (if any) holds on
        assert self._hold_deadline is not None
        left = self._hold_deadline - time.monotonic()
        if self.intel_subscribed():
            waited = self.settings.wait_for_subscribers - max(0.0, left)
            logger.info("consumer: an app subscribed after %.1fs of holding: consuming now", waited)
        elif left <= 0:
            # A warning when intel is at stake; a node whose apps only publish sees this at every start.
            logger.log(
                logging.WARNING if self.backlog_at_connect else logging.INFO,
                "consumer: no app subscribed to intel within %.0fs (wait_for_subscribers): consuming queue '%s' "
                "anyway; what waited there (%d message(s) at connect) reaches no local app",
                self.settings.wait_for_subscribers,
                self.settings.queue_name,
                self.backlog_at_connect,
            )
        else:
            self._hold_timer = self.call_later(min(HOLD_CHECK, left), lambda: self._check_hold(channel))
            return
        self._end_hold()
        self._hold_pending = False
        self._consume(channel)

    def _end_hold(self) -> None:
        self.holding = False
        if self._hold_timer is not None:
            self.remove_timeout(self._hold_timer)
            self._hold_timer = None

    # ---- consuming -----------------------------------------------------

    def _consume(self, channel: Channel) -> None:
        # Classic queues: an exclusive consumer, so a second node on our queue gets ACCESS_REFUSED instead of
        # half the intel (and so do we). Quorum queues ignore the flag; their single active consumer does it.
        self._consumer_tag = channel.basic_consume(
            self.settings.queue_name,
            self._on_message,
            auto_ack=False,
            exclusive=not self.settings.quorum,
            callback=lambda _f: self._on_consuming(),
        )

    def _on_consuming(self) -> None:
        self.ready()
        logger.info(
            "consumer: consuming queue '%s' (%d message(s) waiting) bound to exchange '%s'%s",
            self.settings.queue_name,
            self.backlog_at_connect,
            self.settings.exchange,
            f" and '{self.settings.bridge_exchange}'" if self.settings.bridge_exchange else "",
        )

    # ---- the hot path --------------------------------------------------

    def _on_message(self, channel: Channel, method: Basic.Deliver, properties: BasicProperties, body: bytes) -> None:
        try:
            self._handle(channel, method, properties, body)
        except Exception as err:
            # pika would abort the connection and tell only its own (quiet) loggers: say it here, then start
            # afresh; what was not acked comes again and the dedup window catches what was delivered.
            logger.exception("consumer: unexpected error handling a delivery: %s; reconnecting", err)
            self.connected = False
            self.close()

    def _handle(self, channel: Channel, method: Basic.Deliver, properties: BasicProperties, body: bytes) -> None:
        self.consumed += 1
        try:
            message = decode(body)
            if not from_our_node(properties):
                # Not from one of our nodes (an original node, another producer): check it like an app's intel.
                self.foreign += 1
                validate(message)
            digest = dedup_digest(message.dedup_key)
            # A replay is an operator's explicit "send it again".
            fresh = self.dedup.admit(digest) or is_replay(properties)
        except Exception as err:  # DecodeError, InvalidIntel, or anything else odd input may provoke
            self.rejected += 1
            self._log_poison(err, body, method)
            reason = INVALID_STIX if isinstance(err, InvalidIntel) else INVALID_MESSAGE
            self._dead_letter(channel, method, body, properties, reason, str(err))
            return
        tag = method.delivery_tag
        if not fresh:
            self.duplicates += 1
            self.handover.repeat(tag, digest)
        elif (
            self.importing is not None
            and properties.app_id != self.settings.queue_name  # our own messages passed the export filter
            and not self.importing(message)
        ):
            self.handover.skip(tag)  # held back by the import filter, counted there
        else:
            # Acked (and its key kept on disk) once the apps are done with it: see handover.
            queues = self.router.subscribers(message.topic)
            delivery = self.handover.begin(digest, queues, self.dedup.in_doubt(digest))
            self._current = (body, properties, method.exchange)
            try:
                self.router.route(message, delivery)
            except Exception:
                # A broken subscriber must not stop the consumer nor block the queue.
                logger.exception("consumer: delivering %s to local subscribers failed", message.type_name)
            finally:
                self._current = None
                self.handover.routed(tag, delivery, digest)
        self._ack()

    def _dead_letter(
        self, channel: Channel, method: Basic.Deliver, body: bytes, properties: BasicProperties, reason: str, why: str
    ) -> None:
        if self.dead_letters is not None and self.dead_letters.send(body, properties, method.exchange, reason, why):
            self.handover.skip(method.delivery_tag)  # acked in order, like a message no app wanted
            self._ack()
        else:  # no dead-letter queue (off, or refused by the broker): as before, the broker drops it
            self._flush_acks()
            channel.basic_reject(method.delivery_tag, requeue=False)

    def _on_undelivered(self, message: Message, why: str) -> None:
        # Called by the router when a local app could not take the message: inside _on_message in this
        # thread, or in the expiry worker's thread (removals at expiry), which must not touch our channel.
        if self.dead_letters is not None and self._current is not None and threading.current_thread() is self:
            body, properties, exchange = self._current
            self.dead_letters.send(body, properties, exchange, UNDELIVERED, why)

    def _ack(self) -> None:
        if len(self.handover) >= RELEASE_EVERY:
            self._release_settled()
        if self._ack_timer is None:
            self._ack_timer = self.call_later(RELEASE_INTERVAL, self._on_ack_timer)

    def _on_ack_timer(self) -> None:
        self._ack_timer = None
        self._release_settled(ack_now=time.monotonic() >= self._ack_due)
        waiting = len(self.handover) or self._ackable > self._acked
        if waiting and self._channel is not None and self._channel.is_open:
            self._ack_timer = self.call_later(RELEASE_INTERVAL, self._on_ack_timer)

    def _release_settled(self, ack_now: bool = False) -> None:
        """Ack what the apps are done with (batched unless ``ack_now``); their keys are on disk by then."""
        tag = self.handover.settle()
        if tag is not None:
            if self._ackable == self._acked:
                self._ack_due = time.monotonic() + ACK_DELAY
            self._ackable = tag
        if self._ackable > self._acked and (ack_now or self._ackable - self._acked >= self._ack_batch):
            if self._channel is not None and self._channel.is_open:
                self._channel.basic_ack(self._ackable, multiple=True)
            self._acked = self._ackable

    def _flush_acks(self) -> None:
        """Ack what the apps are done with so far."""
        if self._ack_timer is not None:
            self.remove_timeout(self._ack_timer)
            self._ack_timer = None
        self._release_settled(ack_now=True)

    def _log_poison(self, err: Exception, body: bytes, method: Basic.Deliver) -> None:
        now = time.monotonic()
        if now - self._poison_window_start > _POISON_LOG_WINDOW:
            if self._poison_suppressed:
                logger.warning("consumer: %d more invalid message(s) were not logged", self._poison_suppressed)
            self._poison_window_start = now
            self._poison_logged = self._poison_suppressed = 0
        if self._poison_logged >= _POISON_LOG_BURST:
            self._poison_suppressed += 1
            return
        self._poison_logged += 1
        logger.warning(
            "consumer: rejected invalid message from queue '%s' (exchange '%s', redelivered=%s, %d bytes): %s; body %s",
            self.settings.queue_name,
            method.exchange,
            method.redelivered,
            len(body),
            err,
            describe(body),
        )

    # ---- lifecycle -----------------------------------------------------

    def on_lost(self) -> None:
        # Delivery tags belong to the channel: unacked messages come again. Those the apps are done with were
        # keyed and are dropped; a repeat of one still waiting in an app's queue is acked once that one is done.
        self.handover.clear()
        self._ackable = self._acked = 0
        self._consumer_tag = None
        self._end_hold()
        if self._ack_timer is not None:
            self.remove_timeout(self._ack_timer)
            self._ack_timer = None

    def begin_shutdown(self) -> None:
        channel = self._channel
        if channel is None or self._consumer_tag is None or not channel.is_open:
            self.close()
            return

        def cancelled(_frame: Any) -> None:
            self._flush_acks()
            self.close()

        # Should the broker never answer the cancel, close anyway within the stop bound.
        self.call_later(self.settings.stop_timeout, self.close)
        try:
            channel.basic_cancel(self._consumer_tag, callback=cancelled)
        except Exception:
            logger.debug("consumer: cancel failed; closing", exc_info=True)
            self._flush_acks()
            self.close()
