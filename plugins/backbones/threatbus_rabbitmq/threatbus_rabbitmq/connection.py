"""A thread that owns one pika connection and reconnects it with backoff.

pika is not thread-safe: each ``AmqpWorker`` creates its ``SelectConnection``
in its own thread and is the only one touching it. Other threads reach it
only through ``wake()`` / ``add_callback_threadsafe``. Every AMQP step is an
``on_*`` callback; nothing in a callback blocks, so heartbeats stay serviced.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import pika
import pika.exceptions
from pika.channel import Channel

from threatbus.worker import POLL_INTERVAL, Backoff, ReconnectingWorker
from threatbus_rabbitmq.settings import BrokerSettings

logger = logging.getLogger(__name__)

# Broker replies that mean the config (or another node) is at odds with us; they
# do not heal by retrying fast, so they are explained in the log.
_EXPLAIN = {
    403: "access refused: another consumer holds the queue exclusively (another node with the same "
    "queue.name_suffix, or our own previous connection the broker has not yet noticed is dead), "
    "or the user lacks permissions",
    404: "not found",
    406: "precondition failed: an exchange or queue of that name exists with other arguments "
    "(durable, x-queue-type, x-queue-mode, x-max-length ...); every node on the exchange must use the same "
    "exchange_durable and each queue its original settings (queue.type, durable, lazy, max_items), "
    "or delete the object",
}


def describe_close(reason: BaseException | None) -> str:
    if isinstance(reason, (pika.exceptions.ChannelClosed, pika.exceptions.ConnectionClosed)):
        code = reason.reply_code
        text = f"{code} {reason.reply_text}"
        return f"{text} ({_EXPLAIN[code]})" if code in _EXPLAIN else text
    return repr(reason) if reason is not None else "unknown reason"


class AmqpWorker(ReconnectingWorker):
    """Base of the publisher and the consumer: connect, set up, serve, reconnect.

    Subclasses implement ``setup(channel)`` (declare, then call ``ready()``),
    ``on_lost()`` (the connection is gone: reset per-channel state) and
    ``begin_shutdown()`` (finish the work, then call ``close()``).
    """

    role = "amqp"

    def __init__(self, settings: BrokerSettings) -> None:
        super().__init__(f"rabbitmq-{self.role}", Backoff(settings.reconnect_initial, settings.reconnect_max))
        self.settings = settings
        self.connected = False  # channel open and set up: the hot path may use it
        self.connects = 0  # successful set-ups, for health and tests
        self._connection: pika.SelectConnection | None = None
        self._channel: Channel | None = None
        self._closing = False
        self._failures = 0  # attempts since the last successful set-up
        self._address = 0  # index into settings.brokers: the next failure moves on to the next broker
        self._tick_handle: Any = None
        # The broker's flow control (memory or disk alarm): its reason while it blocks this connection.
        self.blocked: str | None = None
        self._blocked_since = 0.0

    @property
    def url(self) -> str:
        """The broker this worker is connected (or connecting) to."""
        return self.settings.url_of(self._address)

    def _next_broker(self) -> None:
        # A cluster: after a failure try the next node (a stopped node's queues live on in the others).
        if len(self.settings.brokers) > 1:
            self._address = (self._address + 1) % len(self.settings.brokers)

    # ---- thread side ---------------------------------------------------

    def connect_and_serve(self) -> None:
        self._serve_one_connection()

    def connection_failed(self, err: Exception) -> None:
        logger.error("%s: unexpected error while closing; reconnecting", self.role, exc_info=err)
        self.connected = False
        self.on_lost()

    def reconnecting(self, delay: float) -> None:
        # After a failed attempt its own line said it all: one line per attempt, not two.
        level = logging.DEBUG if self._failures else logging.INFO
        logger.log(level, "%s: reconnecting to %s in %.1fs", self.role, self.url, delay)

    def finish(self) -> None:
        self.connected = False
        self.on_exit()

    def stop(self) -> None:
        super().stop()
        self.call_threadsafe(self._on_stop_requested)

    def call_threadsafe(self, callback: Any) -> bool:
        """Run ``callback`` in this worker's thread soon; False if there is no connection."""
        connection = self._connection
        if connection is None:
            return False
        try:
            connection.ioloop.add_callback_threadsafe(callback)
        except Exception:  # the ioloop is closing or closed: the next connection takes over
            return False
        return True

    def _serve_one_connection(self) -> None:
        self._closing = False
        try:
            connection = pika.SelectConnection(
                self.settings.parameters(self.role, self._address),
                on_open_callback=self._on_connection_open,
                on_open_error_callback=self._on_open_error,
                on_close_callback=self._on_connection_closed,
            )
        except Exception as err:  # e.g. an unusable TLS context
            self._failed_attempt(err)
            return
        self._connection = connection
        connection.add_on_connection_blocked_callback(self._on_blocked)
        connection.add_on_connection_unblocked_callback(self._on_unblocked)
        self._tick_handle = connection.ioloop.call_later(POLL_INTERVAL, self._on_tick)
        try:
            try:
                connection.ioloop.start()
            except Exception:
                # A bug must not end the backbone for good, nor leave a half-dead connection
                # (an exclusive consumer would lock us out of our own queue): close it, start afresh.
                logger.exception("%s: unexpected error; closing the connection and reconnecting", self.role)
                self.connected = False
                if connection.is_open:
                    self._closing = True
                    connection.close()
                    connection.ioloop.start()  # until _on_connection_closed stops it
        finally:
            self._connection = None
            self._channel = None
            self.connected = False
            try:
                connection.ioloop.close()
            except Exception:
                logger.debug("%s: closing the ioloop failed", self.role, exc_info=True)

    # ---- ioloop side ---------------------------------------------------

    def _on_tick(self) -> None:
        # Safety net: notice a stop even if the threadsafe wake-up got lost.
        if self.stopping:
            self._on_stop_requested()
        if self._connection is not None:
            self._tick_handle = self._connection.ioloop.call_later(POLL_INTERVAL, self._on_tick)

    def _on_stop_requested(self) -> None:
        if self._closing:
            return
        if self.connected:
            self.begin_shutdown()
        else:
            self.close()

    def _failed_attempt(self, err: BaseException) -> None:
        self._failures += 1
        level = logging.ERROR if self._failures == 1 else logging.WARNING
        logger.log(
            level,
            "%s: cannot connect to RabbitMQ at %s (attempt %d): %s; keeps retrying with backoff (max %.0fs)",
            self.role,
            self.url,
            self._failures,
            describe_close(err) if not isinstance(err, pika.exceptions.AMQPConnectionError) else _flatten(err),
            self.settings.reconnect_max,
        )
        self._next_broker()

    def _on_open_error(self, connection: pika.SelectConnection, err: BaseException) -> None:
        self._failed_attempt(err)
        connection.ioloop.stop()

    def _on_connection_open(self, connection: pika.SelectConnection) -> None:
        if self.stopping:
            self.close()
            return
        connection.channel(on_open_callback=self._on_channel_open)

    def _on_channel_open(self, channel: Channel) -> None:
        self._channel = channel
        channel.add_on_close_callback(self._on_channel_closed)
        self.setup(channel)

    def _on_channel_closed(self, channel: Channel, reason: BaseException) -> None:
        was_connected = self.connected
        self._channel = None
        connection = self._connection
        if connection is None or not connection.is_open:
            return  # the whole connection is going: _on_connection_closed tells why (and whether it was up)
        self.connected = False
        if not self._closing:
            logger.error("%s: channel closed by the broker: %s", self.role, describe_close(reason))
            if not was_connected:
                self._failures += 1
            self.close()

    def _on_blocked(self, _connection: pika.SelectConnection, frame: Any) -> None:
        if self.blocked is None:
            self.blocked = str(getattr(frame.method, "reason", "") or "no reason given")
            self._blocked_since = time.monotonic()
            logger.warning(
                "%s: the broker %s blocks this connection (flow control): %s; publishing waits until the "
                "broker's memory or disk alarm clears",
                self.role,
                self.url,
                self.blocked,
            )

    def _on_unblocked(self, _connection: pika.SelectConnection | None = None, _frame: Any = None) -> None:
        if self.blocked is not None:
            logger.info(
                "%s: the broker unblocked this connection after %.1fs (was: %s)",
                self.role,
                time.monotonic() - self._blocked_since,
                self.blocked,
            )
            self.blocked = None

    def _on_connection_closed(self, connection: pika.SelectConnection, reason: BaseException) -> None:
        was_connected = self.connected
        self.connected = False
        self._channel = None
        self._on_unblocked()  # a new connection starts unblocked; the broker tells it again if need be
        self.on_lost()
        if not self._closing:
            level = logging.WARNING if was_connected else logging.ERROR
            logger.log(level, "%s: connection to %s lost: %s", self.role, self.url, describe_close(reason))
            if was_connected:
                self._next_broker()
        if self._tick_handle is not None:
            connection.ioloop.remove_timeout(self._tick_handle)
            self._tick_handle = None
        connection.ioloop.stop()

    def ready(self) -> None:
        """Called by subclasses once the channel is fully set up."""
        self.connected = True
        self.connects += 1
        if self.connects > 1:
            logger.info("%s: reconnected to %s (%d failed attempt(s) before)", self.role, self.url, self._failures)
        else:
            logger.info("%s: connected to %s", self.role, self.url)
        self._failures = 0
        self.backoff.reset()

    def close(self) -> None:
        """Close the connection (the ioloop then stops and ``run`` decides what next)."""
        self._closing = True
        connection = self._connection
        if connection is None:
            return
        if connection.is_closing or connection.is_closed:
            connection.ioloop.stop()
            return
        try:
            connection.close()
        except Exception:
            logger.debug("%s: close failed; stopping the ioloop", self.role, exc_info=True)
            connection.ioloop.stop()

    def call_later(self, delay: float, callback: Any) -> Any:
        assert self._connection is not None
        return self._connection.ioloop.call_later(delay, callback)

    def remove_timeout(self, handle: Any) -> None:
        if self._connection is not None and handle is not None:
            self._connection.ioloop.remove_timeout(handle)

    # ---- for subclasses ------------------------------------------------

    def setup(self, channel: Channel) -> None:
        raise NotImplementedError

    def on_lost(self) -> None:
        """The connection is gone (any reason): forget per-channel state."""

    def begin_shutdown(self) -> None:
        self.close()

    def on_exit(self) -> None:
        """Called in the worker's thread when it ends."""


def _flatten(err: BaseException) -> str:
    # pika wraps the real cause (refused, DNS, TLS, auth) in AMQPConnectionWorkflowFailed.
    inner = err.args[0] if err.args else None
    attempts = getattr(inner, "exceptions", None)
    text = repr(attempts[-1]) if attempts else (str(err) or repr(err))
    return " ".join(text.split())[:400]
