"""The node's dead-letter queue on the broker, and how our messages are told from others'.

What the consumer rejects (not a Threat Bus message, invalid STIX from a
foreign producer, a message no local app could take) is published, with
the reason, origin and time in headers, to a durable queue of this node,
``<queue name>.dlq`` by default. It is a separate queue that only this node
publishes to (through the default exchange) and nobody consumes: the shared
exchange and every node's queue keep the original declarations (WIRE.md).

Messages our publisher sends carry the AMQP property ``app_id``: the
sending node's queue name, which always starts with ``threatbus``; original
nodes and other producers set none (or another). Those are validated like
intel entering the bus. ``app_id`` is a label, not
authentication: whoever may publish on the exchange can set it.

``BrokerDeadLetters`` is what ``threatbus dlq`` works with: a blocking pika
connection of its own, in the command's process.
"""

from __future__ import annotations

import logging
import uuid
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pika
import pika.exceptions
from pika.channel import Channel
from pika.spec import BasicProperties

from threatbus.config import option
from threatbus.deadletters import DEFAULT_LIST_LIMIT, DeadLetter, DeadLetterError, Replayed, now
from threatbus_rabbitmq.connection import _flatten, describe_close
from threatbus_rabbitmq.settings import PREFIX, BrokerSettings

logger = logging.getLogger(__name__)

# Our publishers set app_id to their node's queue name, which always starts with this.
OUR_APP_ID_PREFIX = "threatbus"
ORIGIN_OURS = "threatbus"
ORIGIN_FOREIGN = "foreign"

# Headers of a dead letter.
H_REASON = "x-threatbus-dlq-reason"
H_DETAIL = "x-threatbus-dlq-detail"
H_TIME = "x-threatbus-dlq-time"
H_ORIGIN = "x-threatbus-dlq-origin"
H_NODE = "x-threatbus-dlq-node"
H_APP_ID = "x-threatbus-dlq-app-id"  # the producer's own app_id, restored on replay
H_EXCHANGE = "x-threatbus-dlq-exchange"
DLQ_HEADERS = (H_REASON, H_DETAIL, H_TIME, H_ORIGIN, H_NODE, H_APP_ID, H_EXCHANGE)
# On a replayed message: consumers deliver it even if their dedup window remembers it.
H_REPLAY = "x-threatbus-replay"

MAX_DETAIL = 1000


def validators() -> list[Any]:
    p = f"{PREFIX}.dead_letters"
    return [
        option(p, dict, default={}),
        option(f"{p}.enabled", bool, default=True),
        option(f"{p}.queue", str, default=None, check=bool, expected="a non-empty queue name"),
        option(f"{p}.max_items", int, default=0, check=lambda n: n >= 0, expected="an integer >= 0 (0 = unbounded)"),
    ]


@dataclass(frozen=True)
class DeadLetterSettings:
    enabled: bool
    queue: str
    max_items: int

    @classmethod
    def resolve(cls, config: Any, broker: BrokerSettings) -> DeadLetterSettings:
        """From the validated backbone section; a queue left unset is named after the node's queue."""
        section = config["dead_letters"]
        return cls(
            enabled=bool(section["enabled"]),
            queue=section["queue"] or f"{broker.queue_name}.dlq",
            max_items=int(section["max_items"]),
        )

    @property
    def arguments(self) -> dict[str, Any]:
        return {"x-max-length": self.max_items} if self.max_items > 0 else {}


def from_our_node(properties: BasicProperties | None) -> bool:
    app_id = properties.app_id if properties is not None else None
    return app_id is not None and app_id.startswith(OUR_APP_ID_PREFIX)


def origin_of(properties: BasicProperties | None) -> str:
    return ORIGIN_OURS if from_our_node(properties) else ORIGIN_FOREIGN


def is_replay(properties: BasicProperties | None) -> bool:
    headers = properties.headers if properties is not None else None
    return bool(headers) and H_REPLAY in headers


class DeadLetterQueue:
    """The node side: declares the DLQ and publishes rejected messages to it (consumer's thread only).

    It uses a channel of its own on the consumer's connection, so that a
    broker refusing the DLQ (a user without the permissions: configure and
    write on the DLQ, write on ``amq.default``) only turns dead-lettering
    off, logged once, and the node keeps consuming.
    """

    def __init__(self, settings: DeadLetterSettings, node_name: str) -> None:
        self.settings = settings
        self.node_name = node_name
        self.sent: Counter[str] = Counter()  # by reason
        self.failed = 0
        self.depth_at_connect = 0
        self.refused: str | None = None  # why the broker refused the DLQ, until the next connection
        self._channel: Channel | None = None

    @property
    def available(self) -> bool:
        return self._channel is not None and self._channel.is_open

    def open(self, connection: Any) -> None:
        """Open the DLQ's channel and declare the queue (asynchronously; dead letters are rejected until then)."""
        self._channel = None
        try:
            connection.channel(on_open_callback=self._on_open)
        except Exception as err:
            logger.error("cannot open a channel for the dead-letter queue: %s; rejecting dead letters", err)

    def _on_open(self, channel: Channel) -> None:
        channel.add_on_close_callback(self._on_closed)

        def declared(frame: Any) -> None:
            self._channel = channel
            self.depth_at_connect = frame.method.message_count
            if self.refused is not None:
                logger.info("dead-letter queue '%s' usable again", self.settings.queue)
                self.refused = None
            if self.depth_at_connect:
                logger.info(
                    "dead-letter queue '%s' holds %d message(s): see `threatbus dlq list`",
                    self.settings.queue,
                    self.depth_at_connect,
                )

        channel.queue_declare(
            queue=self.settings.queue, durable=True, arguments=self.settings.arguments, callback=declared
        )

    def _on_closed(self, channel: Channel, reason: BaseException) -> None:
        if channel is self._channel or self._channel is None:
            self._channel = None
        connection_going = isinstance(reason, pika.exceptions.ChannelClosedByClient) or not getattr(
            channel.connection, "is_open", False
        )
        if connection_going:
            return
        if self.refused is None:
            self.refused = describe_close(reason)
            logger.error(
                "dead-letter queue '%s' refused by the broker: %s; rejected messages are dropped (not "
                "dead-lettered) until the next connection. The node's user needs configure and write "
                "on '%s' and write on 'amq.default' (see deploy/README.md), or set dead_letters.enabled: false",
                self.settings.queue,
                self.refused,
                self.settings.queue,
            )

    def send(self, body: bytes, properties: BasicProperties | None, exchange: str, reason: str, detail: str) -> bool:
        """Publish one dead letter; False when the DLQ cannot take it (the caller rejects the message)."""
        channel = self._channel
        if channel is None or not channel.is_open:
            self.failed += 1
            return False
        headers = dict(properties.headers or {}) if properties is not None else {}
        headers.pop(H_REPLAY, None)
        app_id = properties.app_id if properties is not None else None
        headers.update(
            {
                H_REASON: reason,
                H_DETAIL: " ".join(detail.split())[:MAX_DETAIL],
                H_TIME: now(),
                H_ORIGIN: origin_of(properties),
                H_NODE: self.node_name,
                H_EXCHANGE: exchange,
            }
        )
        if app_id:
            headers[H_APP_ID] = app_id
        letter = BasicProperties(
            message_id=uuid.uuid4().hex[:16],
            content_type=properties.content_type if properties is not None else None,
            delivery_mode=2,
            headers=headers,
        )
        try:
            channel.basic_publish("", self.settings.queue, body, letter)
        except Exception as err:
            self.failed += 1
            logger.warning("cannot publish to dead-letter queue '%s': %s", self.settings.queue, err)
            return False
        self.sent[reason] += 1
        return True


def _text(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return "" if value is None else str(value)


def to_dead_letter(properties: BasicProperties, body: bytes) -> DeadLetter:
    headers = properties.headers or {}
    return DeadLetter(
        id=_text(properties.message_id) or "?",
        reason=_text(headers.get(H_REASON)),
        detail=_text(headers.get(H_DETAIL)),
        time=_text(headers.get(H_TIME)),
        origin=_text(headers.get(H_ORIGIN)),
        node=_text(headers.get(H_NODE)),
        body=body,
    )


class BrokerDeadLetters:
    """``threatbus.deadletters.DeadLetters`` of one node's DLQ, for ``threatbus dlq`` (blocking pika).

    Looking is ``basic.get`` without ack: the messages go back to the queue,
    in their order, when the channel closes.
    """

    def __init__(self, broker: BrokerSettings, settings: DeadLetterSettings) -> None:
        self.broker = broker
        self.settings = settings
        self._connection: pika.BlockingConnection | None = None

    def _channel(self) -> Any:
        if self._connection is None or not self._connection.is_open:
            causes = []
            for index in range(len(self.broker.brokers)):  # each broker of a cluster in turn
                try:
                    self._connection = pika.BlockingConnection(self.broker.parameters("dlq", index))
                    break
                except pika.exceptions.AMQPError as err:
                    cause = (
                        _flatten(err) if isinstance(err, pika.exceptions.AMQPConnectionError) else describe_close(err)
                    )
                    causes.append(f"{self.broker.url_of(index)}: {cause}")
            else:
                raise DeadLetterError(f"cannot reach RabbitMQ at {'; '.join(causes)}")
        try:
            return self._connection.channel()
        except pika.exceptions.AMQPError as err:
            raise DeadLetterError(f"cannot open a channel on RabbitMQ: {describe_close(err)}") from None

    def _depth(self, channel: Any) -> int:
        try:
            return channel.queue_declare(self.settings.queue, passive=True).method.message_count
        except pika.exceptions.ChannelClosedByBroker as err:
            if err.reply_code == 404:
                return -1  # the node never ran with a DLQ: nothing there
            raise DeadLetterError(f"dead-letter queue '{self.settings.queue}': {describe_close(err)}") from None

    def _fetch(self, channel: Any, count: int) -> list[tuple[int, BasicProperties, bytes]]:
        got = []
        for _ in range(count):
            method, properties, body = channel.basic_get(self.settings.queue, auto_ack=False)
            if method is None:
                break
            got.append((method.delivery_tag, properties, body))
        return got

    def _close(self, channel: Any) -> None:
        try:
            if channel.is_open:
                channel.close()  # what was fetched and not acked goes back to the queue
        except pika.exceptions.AMQPError:
            logger.debug("closing the dlq channel failed", exc_info=True)

    def list(self, limit: int = DEFAULT_LIST_LIMIT) -> list[DeadLetter]:
        channel = self._channel()
        try:
            depth = self._depth(channel)
            if depth <= 0:
                return []
            return [to_dead_letter(props, body) for _tag, props, body in self._fetch(channel, min(limit, depth))]
        finally:
            self._close(channel)

    def get(self, letter_id: str) -> DeadLetter | None:
        channel = self._channel()
        try:
            depth = self._depth(channel)
            for _tag, props, body in self._fetch(channel, max(depth, 0)):
                if props.message_id == letter_id:
                    return to_dead_letter(props, body)
            return None
        finally:
            self._close(channel)

    def replay(self, ids: Sequence[str] | None) -> Replayed:
        wanted = None if ids is None else list(dict.fromkeys(ids))
        channel = self._channel()
        replayed: list[str] = []
        try:
            depth = self._depth(channel)
            channel.confirm_delivery()
            for tag, props, body in self._fetch(channel, max(depth, 0)):
                if wanted is not None and props.message_id not in wanted:
                    continue
                headers = props.headers or {}
                again = BasicProperties(
                    content_type=props.content_type or "application/json",
                    delivery_mode=2 if self.broker.persistent else 1,
                    app_id=_text(headers.get(H_APP_ID)) or None,  # foreign stays foreign: validated again
                    headers={
                        **{k: v for k, v in headers.items() if k not in DLQ_HEADERS},
                        H_REPLAY: _text(props.message_id),
                    },
                )
                exchange = _text(headers.get(H_EXCHANGE)) or self.broker.publish_exchange
                channel.basic_publish(exchange, "", body, again)  # confirmed (raises if nacked)
                channel.basic_ack(tag)
                replayed.append(_text(props.message_id))
        except pika.exceptions.AMQPError as err:
            raise DeadLetterError(f"replay stopped after {len(replayed)} message(s): {describe_close(err)}") from None
        finally:
            self._close(channel)
        if replayed:
            logger.info("replayed %d dead letter(s) from '%s'", len(replayed), self.settings.queue)
        missing = [] if wanted is None else [i for i in wanted if i not in set(replayed)]
        return Replayed(replayed, missing)

    def purge(self) -> int:
        channel = self._channel()
        try:
            if self._depth(channel) < 0:
                return 0
            return channel.queue_purge(self.settings.queue).method.message_count
        finally:
            self._close(channel)

    def close(self) -> None:
        if self._connection is not None and self._connection.is_open:
            try:
                self._connection.close()
            except pika.exceptions.AMQPError:
                logger.debug("closing the dlq connection failed", exc_info=True)
