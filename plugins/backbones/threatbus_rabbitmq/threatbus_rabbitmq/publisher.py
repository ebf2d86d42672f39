"""Publishing what the node's apps give it, with pipelined publisher confirms.

Two threads: the ``Feeder`` drains the bus's ``inq`` into the ``Outbox`` (a
bounded deque) and wakes the ``Publisher``, which owns the pika connection.
The publisher keeps up to ``max_in_flight`` messages unconfirmed; a message
leaves its books only when the broker confirms it. Nacked messages, and every
unconfirmed one when the connection drops, go back to the front of the outbox
in their order and are sent again (consumers drop the duplicates this can make).
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any

import pika
from pika.channel import Channel
from pika.spec import Basic

from threatbus.data import Message
from threatbus.worker import StoppableWorker
from threatbus_rabbitmq.connection import AmqpWorker
from threatbus_rabbitmq.outbox import DurableOutbox
from threatbus_rabbitmq.settings import BrokerSettings

logger = logging.getLogger(__name__)

# While stopping, how often the publisher checks whether everything is confirmed.
_SHUTDOWN_CHECK = 0.02
# The feeder moves at most this many messages into the outbox at once.
FEED_BATCH = 256
# At most one "outbox full" log line per this many seconds.
_DROP_LOG_INTERVAL = 5.0


class Outbox:
    """Messages waiting to be published; bounded for what the apps add, counted when full."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.items: deque[Message] = deque()  # deque appends/pops are atomic: no lock needed
        self.dropped = 0
        self._last_drop_log = 0.0
        self._dropped_since_log = 0

    def __len__(self) -> int:
        return len(self.items)

    def put(self, message: Message) -> bool:
        if len(self.items) >= self.capacity:
            self.dropped += 1
            self._dropped_since_log += 1
            now = time.monotonic()
            if now - self._last_drop_log >= _DROP_LOG_INTERVAL:
                logger.error(
                    "outbox full (%d messages held while the broker is unreachable or slow): dropped %d message(s); "
                    "raise outbox_size or fix the broker connection",
                    self.capacity,
                    self._dropped_since_log,
                )
                self._last_drop_log = now
                self._dropped_since_log = 0
            return False
        self.items.append(message)
        return True

    def put_many(self, messages: list[Message]) -> int:
        return sum(self.put(message) for message in messages)

    def settled(self, messages: Iterable[Message]) -> None:
        """The broker confirmed ``messages`` (the durable outbox forgets them on disk; nothing to do here)."""


class Publisher(AmqpWorker):
    """Owns the publishing connection; runs in its own thread."""

    role = "publisher"

    def __init__(self, settings: BrokerSettings, outbox: Outbox | DurableOutbox) -> None:
        super().__init__(settings)
        self.outbox = outbox
        self.feeder_done = threading.Event()
        self.published = 0  # confirmed by the broker
        self.nacked = 0
        self.resent = 0
        self.unencodable = 0
        self._wake_pending = threading.Event()
        self._in_flight: dict[int, Message] = {}
        self._next_tag = 1
        self._oldest_tag = 1
        # app_id (our queue's name, unique per node, always starting "threatbus") lets consumers tell our own
        # messages from other nodes' (import filter) and our nodes' from foreign ones (validated); original
        # nodes ignore it.
        self._properties = pika.BasicProperties(
            content_type="application/json", delivery_mode=2 if settings.persistent else 1, app_id=settings.queue_name
        )
        self._shutdown_deadline: float | None = None
        self._shutdown_timer: Any = None

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)

    # ---- called from other threads -------------------------------------

    def wake(self) -> None:
        """New messages are in the outbox (called by the feeder)."""
        if not self._wake_pending.is_set():
            self._wake_pending.set()
            self.call_threadsafe(self._flush)

    # ---- ioloop side ---------------------------------------------------

    def setup(self, channel: Channel) -> None:
        channel.confirm_delivery(ack_nack_callback=self._on_confirm, callback=lambda _frame: self._declare(channel))

    def _declare(self, channel: Channel) -> None:
        s = self.settings
        channel.exchange_declare(
            exchange=s.exchange,
            exchange_type="fanout",
            durable=s.exchange_durable,
            callback=lambda _frame: self._declare_bridge(channel),
        )

    def _declare_bridge(self, channel: Channel) -> None:
        s = self.settings
        if not s.bridge_exchange:
            self._ready()
            return

        def bind(_frame: Any) -> None:
            channel.exchange_bind(
                destination=s.exchange, source=s.bridge_exchange, routing_key="", callback=lambda _f: self._ready()
            )

        channel.exchange_declare(exchange=s.bridge_exchange, exchange_type="fanout", durable=True, callback=bind)

    def _ready(self) -> None:
        self.ready()
        held = len(self.outbox)
        if held:
            logger.info("publisher: sending %d message(s) held while disconnected", held)
        self._flush()

    def _flush(self) -> None:
        self._wake_pending.clear()  # before draining, so a concurrent wake() schedules another flush
        channel = self._channel
        if not self.connected or channel is None:
            return
        items = self.outbox.items
        exchange = self.settings.publish_exchange
        limit = self.settings.max_in_flight
        in_flight = self._in_flight
        properties = self._properties
        while items and len(in_flight) < limit:
            message = items.popleft()
            try:
                body = message.encode()
            except Exception as err:  # a payload JSON cannot express: no retry helps
                self.unencodable += 1
                logger.error("publisher: dropped a %s that cannot be encoded: %s", type(message).__name__, err)
                self.outbox.settled((message,))
                continue
            try:
                channel.basic_publish(exchange, "", body, properties)
            except Exception as err:
                items.appendleft(message)
                logger.warning("publisher: publish failed, message kept for resending: %s", err)
                return
            in_flight[self._next_tag] = message
            self._next_tag += 1

    def _on_confirm(self, frame: Any) -> None:
        method = frame.method
        tag = method.delivery_tag
        nack = isinstance(method, Basic.Nack)
        in_flight = self._in_flight
        if method.multiple:
            settled = [in_flight.pop(t) for t in range(self._oldest_tag, tag + 1) if t in in_flight]
        else:
            message = in_flight.pop(tag, None)
            settled = [message] if message is not None else []
        while self._oldest_tag < self._next_tag and self._oldest_tag not in in_flight:
            self._oldest_tag += 1
        if nack:
            self.nacked += len(settled)
            self.outbox.items.extendleft(reversed(settled))
            logger.warning("publisher: broker nacked %d message(s); sending them again", len(settled))
        else:
            self.published += len(settled)
            self.outbox.settled(settled)
        if self.outbox.items:
            self._flush()
        elif self._shutdown_deadline is not None:
            self._check_shutdown()

    def on_lost(self) -> None:
        # Unconfirmed messages may or may not have reached the broker: send them
        # again, in order, before anything newer (duplicates are dropped by consumers).
        if self._in_flight:
            unconfirmed = list(self._in_flight.values())
            self.resent += len(unconfirmed)
            self.outbox.items.extendleft(reversed(unconfirmed))
            logger.warning(
                "publisher: %d unconfirmed message(s) will be sent again after reconnecting", len(unconfirmed)
            )
        self._in_flight = {}
        self._next_tag = self._oldest_tag = 1
        self._wake_pending.clear()

    def begin_shutdown(self) -> None:
        if self._shutdown_deadline is None:
            self._shutdown_deadline = time.monotonic() + self.settings.stop_timeout
        self._flush()
        self._check_shutdown()

    def _check_shutdown(self) -> None:
        """Close once the feeder is done and everything is confirmed, or at the deadline."""
        if self._closing or self._shutdown_deadline is None:
            return
        done = self.feeder_done.is_set() and not self.outbox.items and not self._in_flight
        if done or time.monotonic() >= self._shutdown_deadline:
            self.remove_timeout(self._shutdown_timer)
            self._shutdown_timer = None
            self.close()
        elif self._shutdown_timer is None:
            self._shutdown_timer = self.call_later(_SHUTDOWN_CHECK, self._shutdown_step)

    def _shutdown_step(self) -> None:
        self._shutdown_timer = None
        self._flush()
        self._check_shutdown()

    def on_exit(self) -> None:
        # on_lost already moved the unconfirmed messages back into the outbox.
        left = len(self.outbox)
        if left:
            logger.error(
                "publisher: stopped with %d message(s) not confirmed by the broker at %s: they may be lost",
                left,
                self.settings.url,
            )
        else:
            logger.debug("publisher: stopped; %d message(s) confirmed", self.published)


class Feeder(StoppableWorker):
    """Moves messages from the bus's ``inq`` into the outbox and wakes the publisher."""

    def __init__(
        self,
        inq: queue.SimpleQueue[Message],
        outbox: Outbox | DurableOutbox,
        publisher: Publisher,
        exporting: Callable[[Message], bool] | None = None,
    ) -> None:
        super().__init__(name="rabbitmq-feeder")
        self.inq = inq
        self.outbox = outbox
        self.publisher = publisher
        # The node's export filter (RoutedBackbone.exporting): False keeps a message on the node.
        self.exporting = exporting
        self.invalid = 0

    def _take(self, message: Any) -> None:
        self._take_all([message])

    def _take_all(self, messages: list[Any]) -> None:
        accepted = []
        for message in messages:
            if not isinstance(message, Message):
                self.invalid += 1
                logger.error("feeder: dropped an object that is not a Threat Bus message: %r", type(message).__name__)
            elif self.exporting is None or self.exporting(message):
                accepted.append(message)
        # One write to the durable outbox for what the apps handed over meanwhile.
        if accepted and self.outbox.put_many(accepted):
            self.publisher.wake()

    def run(self) -> None:
        try:
            # The apps stopped before the backbone: what they published is in inq; send it too.
            # Batches: one write to the outbox for what arrived meanwhile.
            for message in self.drain_all(self.inq):
                self._take_all([message, *itertools.islice(self.leftovers(self.inq), FEED_BATCH - 1)])
        finally:
            self.publisher.feeder_done.set()
            self.publisher.wake()
