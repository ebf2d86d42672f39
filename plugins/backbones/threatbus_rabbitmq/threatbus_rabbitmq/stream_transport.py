"""``transport: stream``: our nodes publish to and consume from the intel log over the stream protocol.

Instead of a fanout exchange and a queue per node, every node appends what
its apps publish to the log stream (rstream producer, confirmed batches) and
reads the stream from where it stopped: its offset is stored on the broker
under the node's queue name, so a restarted node resumes exactly there and no
per-node queue grows while a node is gone. Original 2022.5.16 nodes cannot
take part (they publish to and consume from the exchange only); the log's
binding to the exchange still brings what they publish to stream nodes.

rstream is asyncio: one loop runs in the ``rabbitmq-stream`` thread. The
bus's ``inq`` is drained there (polled, so no thread hop per message);
deliveries go to the ``TopicRouter``, which never blocks. The offset stored
is that of the last message the apps are done with (``handover``), so what
still waited in an app's queue when the node died is read again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import time
from collections import deque
from collections.abc import Callable, Hashable
from typing import Any

from threatbus.config import choice
from threatbus.data import Message, decode
from threatbus.ratelimit import RateLimitedLog
from threatbus.routing import TopicRouter
from threatbus.stix import InvalidIntel, validate
from threatbus.worker import Backoff, StoppableWorker
from threatbus_rabbitmq.consumer import INTEL_TOPICS
from threatbus_rabbitmq.dedup import Deduplicator
from threatbus_rabbitmq.dedup import digest as dedup_digest
from threatbus_rabbitmq.handover import Handover
from threatbus_rabbitmq.intel_log import LogKeeper, LogSettings, amqp_data, stream_entry
from threatbus_rabbitmq.settings import PREFIX, BrokerSettings
from threatbus_rabbitmq.sub_entries import SubEntryPublisher

logger = logging.getLogger(__name__)

TRANSPORTS = ("queue", "stream")
# Messages per confirmed batch, and how many may await confirms at once.
BATCH = 1000
MAX_UNCONFIRMED = 20_000
# How often the consumer stores its offset on the broker (seconds).
STORE_INTERVAL = 0.5
# Polling the bus's inq: fast while busy, slower when idle.
POLL_BUSY, POLL_IDLE = 0.001, 0.005


def validators() -> list[Any]:
    return [choice(f"{PREFIX}.transport", TRANSPORTS, default="queue")]


class StreamTransport(StoppableWorker):
    """Publishes the node's messages to the log stream and routes what the stream brings.

    Waits for the ``LogKeeper`` to have declared the stream. Counters mirror
    the queue transport's: ``published`` (confirmed), ``consumed``,
    ``rejected``, ``duplicates``.
    """

    def __init__(
        self,
        broker: BrokerSettings,
        log: LogSettings,
        keeper: LogKeeper,
        inq: queue.SimpleQueue[Message],
        router: TopicRouter,
        exporting: Callable[[Message], bool] | None = None,
        importing: Callable[[Message], bool] | None = None,
        dedup: Deduplicator | None = None,
    ) -> None:
        super().__init__(name="rabbitmq-stream")
        self.broker = broker
        self.log = log
        self.keeper = keeper
        self.inq = inq
        self.router = router
        self.reference = broker.queue_name  # the name the node's offset is stored under
        self.dedup = dedup if dedup is not None else Deduplicator(broker.dedup_window)
        # The node's policy (RoutedBackbone.exporting/importing); our own messages are not imported.
        self.exporting = exporting
        self.importing = importing
        # What this node published lately, by hash of its JSON text, and whether a local app
        # subscribed to its topic then: the stream brings it back, and if none did it is
        # skipped undecoded (a node whose apps only publish reads back all it publishes).
        self._own: dict[int, bool] = {}
        self._own_order: deque[int] = deque()
        self._own_limit = max(1, broker.dedup_window)
        self.published = 0
        self.consumed = 0
        self.rejected = 0
        self.foreign = 0  # entries validated because no stream node of ours wrote them
        self._log_rejected = RateLimitedLog(logger)
        self.duplicates = 0
        self.resent = 0
        self.connected = False
        self.offset: int | None = None  # the last offset routed
        self.handover = Handover(self.dedup)
        self._done: int | None = None  # the last offset the apps are done with (all before it too)
        self._stored: int | None = None
        self._unconfirmed: dict[int, list[Message]] = {}  # publishing id -> the messages it carries
        self._unconfirmed_count = 0
        self._early: dict[int, bool] = {}  # confirmed (or refused) before send returned its id
        self._sub_entries: SubEntryPublisher | None = None
        self._unsent: list[Message] = []  # the producer closed before taking them: sent after a reconnect
        self._held = False
        self.consuming = False
        # A new node reads from when it started (the first chunk may hold a little before: skipped).
        self._started_ms = int(time.time() * 1000)
        self._backoff = Backoff(broker.reconnect_initial, broker.reconnect_max)

    @property
    def in_flight(self) -> int:
        return self._unconfirmed_count

    def run(self) -> None:
        loop = asyncio.new_event_loop()
        try:
            loop.run_until_complete(self._main())
        finally:
            loop.close()
            self.connected = False

    async def _main(self) -> None:
        while not self.stopping and not self.keeper.bound.is_set():
            if self.keeper.refused:
                logger.error("stream transport: the broker refused the log stream; this node carries nothing")
                return
            await asyncio.sleep(0.1)
        failures = 0
        while not self.stopping:
            try:
                await self._serve()
                failures = 0
            except asyncio.CancelledError:
                raise
            except Exception as err:
                failures += 1
                self.connected = False
                logger.log(
                    logging.ERROR if failures == 1 else logging.WARNING,
                    "stream transport: %s (attempt %d); reconnecting",
                    f"{type(err).__name__}: {err}" if str(err) else type(err).__name__,
                    failures,
                )
                await asyncio.sleep(self._backoff.next_delay())

    def _clients(self) -> tuple[Any, Any]:
        from rstream import Consumer, Producer

        b = self.broker
        common = {
            "username": b.username,
            "password": b.password,
            "vhost": b.vhost,
            "ssl_context": b.ssl_options.context if b.ssl_options is not None else None,
            "heartbeat": max(b.heartbeat, 10),
        }
        producer = Producer(b.host, self.log.port, connection_name=f"threatbus {b.node_name} stream-producer", **common)
        consumer = Consumer(b.host, self.log.port, connection_name=f"threatbus {b.node_name} stream-consumer", **common)
        return producer, consumer

    async def _serve(self) -> None:
        from rstream import ConsumerOffsetSpecification, OffsetNotFound, OffsetType

        producer, consumer = self._clients()
        pump: asyncio.Task[None] | None = None
        try:
            await asyncio.wait_for(producer.start(), self.broker.connect_timeout)
            await asyncio.wait_for(consumer.start(), self.broker.connect_timeout)
            if self.offset is None:
                try:
                    self.offset = await consumer.query_offset(self.log.stream, self.reference)
                    logger.info("stream transport: resuming after offset %d (stored by this node)", self.offset)
                except OffsetNotFound:
                    logger.info("stream transport: a new node: consuming '%s' from its start time", self.log.stream)
            # What was published but not confirmed before a reconnect goes again (consumers drop repeats).
            resend = self._unsent + [message for messages in self._unconfirmed.values() for message in messages]
            self._unsent = []
            self._unconfirmed.clear()
            self._unconfirmed_count = 0
            self._early.clear()
            self._sub_entries = SubEntryPublisher.open(producer)
            if self._sub_entries is None:
                logger.info("stream transport: this rstream cannot send sub-entry batches: one entry per message")
            if resend:
                self.resent += len(resend)
                logger.warning("stream transport: sending %d unconfirmed message(s) again", len(resend))
            self.connected = True
            self._backoff.reset()
            pump = asyncio.create_task(self._pump(producer, consumer, resend))
            await self._hold_for_subscribers()
            start = (
                ConsumerOffsetSpecification(OffsetType.OFFSET, self.offset + 1)
                if self.offset is not None
                else ConsumerOffsetSpecification(OffsetType.TIMESTAMP, self._started_ms)
            )
            if not self.stopping:
                await consumer.subscribe(
                    self.log.stream,
                    self._on_message,
                    decoder=bytes,
                    offset_specification=start,
                    subscriber_name=self.reference,
                    initial_credit=10,
                )
                self.consuming = True
                logger.info(
                    "stream transport: node '%s' publishes to and consumes stream '%s' at %s:%d",
                    self.broker.node_name,
                    self.log.stream,
                    self.broker.host,
                    self.log.port,
                )
            await pump
        finally:
            self.connected = self.consuming = False
            if pump is not None and not pump.done():
                pump.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await pump
            await self._store(consumer)
            for client in (producer, consumer):
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(client.close(), 5)

    async def _hold_for_subscribers(self) -> None:
        """After start, what waited in the stream is meant for the apps: consume once one subscribed to intel.

        At most ``wait_for_subscribers`` seconds, and only once per process (as the queue transport).
        """
        if self._held:
            return
        self._held = True
        deadline = time.monotonic() + self.broker.wait_for_subscribers
        while not self.stopping and time.monotonic() < deadline:
            if any(self.router.subscribers(topic) for topic in INTEL_TOPICS):
                return
            await asyncio.sleep(0.05)

    async def _pump(self, producer: Any, consumer: Any, backlog: list[Message]) -> None:
        """Move the bus's messages into the stream in confirmed batches until stopped."""
        get = self.inq.get_nowait
        next_store = time.monotonic() + STORE_INTERVAL
        draining_until: float | None = None
        while True:
            batch = backlog[:BATCH]
            backlog = backlog[BATCH:]
            while len(batch) < BATCH:
                try:
                    item = get()
                except queue.Empty:
                    break
                if isinstance(item, Message) and (self.exporting is None or self.exporting(item)):
                    batch.append(item)
            if batch and self._unconfirmed_count < MAX_UNCONFIRMED:
                await self._send(producer, batch)
            elif batch:
                backlog = batch + backlog  # wait for confirms first
            self._settle()
            now = time.monotonic()
            if now >= next_store:
                await self._store(consumer)
                next_store = now + STORE_INTERVAL
            if self.stopping:
                # Send what the apps published last, wait (bounded) for its confirms, then stop.
                if draining_until is None:
                    draining_until = now + self.broker.stop_timeout
                if (not batch and not backlog and not self._unconfirmed) or now >= draining_until:
                    if self._unconfirmed or backlog or self._unsent:
                        logger.error(
                            "stream transport: stopped with %d message(s) not confirmed: they may be lost",
                            self._unconfirmed_count + len(backlog) + len(self._unsent),
                        )
                    return
            if not batch:
                await asyncio.sleep(POLL_BUSY if self._unconfirmed or draining_until else POLL_IDLE)

    async def _send(self, producer: Any, batch: list[Message]) -> None:
        entries, sent = [], []
        for message in batch:
            try:
                body = message.encode()
            except Exception as err:  # a payload JSON cannot express
                logger.error("stream transport: dropped a %s that cannot be encoded: %s", type(message).__name__, err)
                continue
            entries.append(amqp_data(body))
            sent.append(message)
            self._remember_own(hash(body), bool(self.router.subscribers(message.topic)))
        if not entries:
            return
        if self._sub_entries is not None:
            for part in self._sub_entries.split(entries):
                publishing_id = await self._sub_entries.send(self.log.stream, entries[part], self._on_confirm)
                if publishing_id is None:
                    self._unsent.extend(sent[part])
                else:
                    self._book(publishing_id, sent[part])
        else:
            ids = await producer.send_batch(self.log.stream, entries, on_publish_confirm=self._on_confirm)
            # rstream returns the ids as a set would list them; they rise in the order sent.
            ids.sort()
            for publishing_id, message in zip(ids, sent, strict=False):
                self._book(publishing_id, [message])
            self._unsent.extend(sent[len(ids) :])

    def _book(self, publishing_id: int, messages: list[Message]) -> None:
        """Wait for the confirm of ``publishing_id``, unless it came while it was being sent."""
        confirmed = self._early.pop(publishing_id, None)
        if confirmed is None:
            self._unconfirmed[publishing_id] = messages
            self._unconfirmed_count += len(messages)
        else:
            self._settled(confirmed, len(messages), publishing_id)

    def _remember_own(self, body_hash: int, routed_here: bool) -> None:
        own, order = self._own, self._own_order
        if len(order) >= self._own_limit:
            own.pop(order.popleft(), None)
        own[body_hash] = routed_here
        order.append(body_hash)

    def _on_confirm(self, status: Any) -> None:
        messages = self._unconfirmed.pop(status.message_id, None)
        if messages is None:
            self._early[status.message_id] = status.is_confirmed  # booked by _book when send returns
            return
        self._unconfirmed_count -= len(messages)
        self._settled(status.is_confirmed, len(messages), status.message_id)

    def _settled(self, confirmed: bool, count: int, publishing_id: int) -> None:
        if confirmed:
            self.published += count
        else:
            logger.warning(
                "stream transport: the broker refused %d message(s) (publishing id %d); dropped", count, publishing_id
            )

    def _on_message(self, raw: bytes, context: Any) -> None:
        if self._stored is None and self.offset is None and context.timestamp < self._started_ms:
            return  # a new node's first chunk: before its time
        self.consumed += 1
        offset = self.offset = context.offset
        handover = self.handover
        own = None  # this node's: False when no local app subscribed to its topic then, else True
        try:
            body, from_stream_node = stream_entry(raw)
            if from_stream_node:
                own = self._own.pop(hash(body), None)
                if own is False:
                    handover.skip(offset)  # nobody here to deliver it to: not even decoded
                    return
            message = decode(body)
            if not from_stream_node:
                # Published on the exchange (an original or queue node, another producer): checked like an app's intel.
                self.foreign += 1
                validate(message)
            key: Hashable = message.dedup_key
        except (ValueError, IndexError, InvalidIntel) as err:
            self.rejected += 1
            self._log_rejected("stream transport: skipped an invalid entry at offset %d: %s", offset, err)
            handover.skip(offset)
            return
        digest = dedup_digest(key)
        if not self.dedup.admit(digest):
            self.duplicates += 1
            handover.repeat(offset, digest)
            return
        if self.importing is not None and own is None and not self.importing(message):
            handover.skip(offset)
            return
        # Its key is remembered (on disk with state: disk) once the apps are done with it: see handover.
        delivery = handover.begin(digest, self.router.subscribers(message.topic), self.dedup.in_doubt(digest))
        try:
            self.router.route(message, delivery)
        except Exception:
            logger.exception("stream transport: delivering %s to local subscribers failed", message.type_name)
        finally:
            handover.routed(offset, delivery, digest)

    def _settle(self) -> None:
        done = self.handover.settle()
        if done is not None:
            self._done = done

    async def _store(self, consumer: Any) -> None:
        self._settle()
        offset = self._done
        if offset is None or offset == self._stored:
            return
        try:
            await asyncio.wait_for(consumer.store_offset(self.log.stream, self.reference, offset), 5)
            self._stored = offset
        except Exception as err:
            logger.debug("stream transport: storing offset %d failed: %s", offset, err)
