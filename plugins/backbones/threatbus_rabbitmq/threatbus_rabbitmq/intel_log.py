"""The intel log in a RabbitMQ stream: kept by ``LogKeeper``, read by ``LogReader``.

Topology: a stream (``x-queue-type: stream``, default name
``<exchange_name>.log``) bound to the shared fanout exchange, so it takes
what every node publishes there, original 2022.5.16 nodes included, and to
our durable bridge exchange, so what our nodes publish is logged even while
the non-durable shared exchange is gone after a broker restart (RabbitMQ
puts a message into a queue once, however many bindings lead there).
Retention is the stream's: ``x-max-age`` and ``x-max-length-bytes``.

Reading goes over the stream protocol (plugin ``rabbitmq_stream``, port
5552) with rstream, from a timestamp. rstream is asyncio: its loop runs in
the ``LogReader`` thread; callers in other threads get the entries through
a thread-safe queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import queue
import struct
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import pika
import pika.exceptions

from threatbus import history
from threatbus.config import option, port
from threatbus.history import HistorySettings, LogEntry
from threatbus.ratelimit import RateLimitedLog
from threatbus.worker import POLL_INTERVAL, Backoff, StoppableWorker
from threatbus_rabbitmq.connection import describe_close
from threatbus_rabbitmq.settings import PREFIX, BrokerSettings

logger = logging.getLogger(__name__)

STREAM_PORT = 5552
STREAM_TLS_PORT = 5551
# How long the stream may take to deliver its last entry (found first; none: the stream is empty).
END_WAIT = 2.0
# A read gives up when the stream delivered nothing for this long before reaching that entry.
READ_STALL = 15.0
# A chunk's timestamp is when it was written; entries in it may be a little older.
CHUNK_SLACK_MS = 1000
# Chunks the broker may send ahead of the reader.
READ_CREDIT = 20
# Entries handed to the reading thread at once.
READ_BATCH = 500
# How long a stopping reader waits for consumers still closing (rstream's close alone takes 0.2 s).
CLOSE_WAIT = 2.0
# Bytes rstream reads from its socket at once (see widen_rstream_reads).
RSTREAM_READ = 64 * 1024

NO_STREAMS = (
    "running without the intel log: snapshots are answered only by apps that keep history of their own "
    "(enable streams on the broker: rabbitmq-plugins enable rabbitmq_stream; RabbitMQ >= 3.9)"
)


def validators() -> list[Any]:
    """The ``history`` keys: the shared ones and where the stream lives."""
    return [
        *history.validators(PREFIX),
        option(f"{PREFIX}.history.stream", str, default=None, check=bool, expected="a non-empty stream name"),
        port(f"{PREFIX}.history.port", default=None),
    ]


@dataclass(frozen=True)
class LogSettings:
    enabled: bool
    stream: str
    port: int
    max_age: timedelta
    max_bytes: int

    @classmethod
    def resolve(cls, config: Any, broker: BrokerSettings) -> LogSettings:
        """From the validated backbone section; stream and port left unset follow the broker settings."""
        shared = HistorySettings.from_config(config)
        section = config["history"]
        return cls(
            enabled=shared.enabled,
            stream=section["stream"] or f"{broker.exchange}.log",
            port=int(section["port"] or (STREAM_TLS_PORT if broker.ssl else STREAM_PORT)),
            max_age=shared.max_age,
            max_bytes=shared.max_bytes,
        )

    @property
    def arguments(self) -> dict[str, Any]:
        """The stream's declaration: its type and retention."""
        seconds = int(self.max_age.total_seconds())
        age = f"{seconds // 86400}D" if seconds % 86400 == 0 else f"{max(1, seconds)}s"
        arguments: dict[str, Any] = {"x-queue-type": "stream", "x-max-age": age}
        if self.max_bytes > 0:
            arguments["x-max-length-bytes"] = self.max_bytes
        return arguments


class _NoStreams(Exception):
    """The broker refused the stream: it cannot keep the log."""


class LogKeeper(StoppableWorker):
    """Declares the stream and binds it; again after every reconnect (a restart drops the shared exchange).

    Owns one pika connection. When the broker cannot have the stream (no
    stream support, a queue of that name that is no stream) it logs one
    warning, sets ``refused`` and ends: the node runs without history.
    """

    def __init__(self, broker: BrokerSettings, log: LogSettings) -> None:
        super().__init__(name="rabbitmq-intel-log")
        self.broker = broker
        self.log = log
        self.bound = threading.Event()  # set once the stream is declared and bound
        self.refused: str | None = None
        self._backoff = Backoff(broker.reconnect_initial, broker.reconnect_max)

    def run(self) -> None:
        failures = 0
        while not self.stopping:
            connection = None
            try:
                connection = pika.BlockingConnection(self.broker.parameters("intel-log"))
                self._declare(connection)
                self.bound.set()
                self._backoff.reset()
                failures = 0
                while not self.stopping:
                    connection.process_data_events(time_limit=POLL_INTERVAL)
            except _NoStreams as err:
                self.refused = str(err)
                logger.warning("intel log: the broker refused stream '%s' (%s); %s", self.log.stream, err, NO_STREAMS)
                return
            except (pika.exceptions.AMQPError, OSError) as err:  # OSError: TLS, sockets
                failures += 1
                # The publisher and consumer report an unreachable broker; one line here is enough.
                # A declaration the broker refuses (406: the config is at odds with the exchange) is an error.
                refused = isinstance(err, pika.exceptions.ChannelClosed)
                logger.log(
                    (logging.ERROR if refused else logging.WARNING) if failures == 1 else logging.DEBUG,
                    "intel log: cannot keep the stream (%s); retrying",
                    describe_close(err) if refused else _describe(err),
                )
                self.wait(self._backoff.next_delay())
            except Exception:
                failures += 1
                logger.exception("intel log: unexpected error keeping the stream; retrying")
                self.wait(self._backoff.next_delay())
            finally:
                if connection is not None and connection.is_open:
                    with contextlib.suppress(Exception):
                        connection.close()

    def _declare(self, connection: pika.BlockingConnection) -> None:
        b, log = self.broker, self.log
        channel = connection.channel()
        channel.exchange_declare(b.exchange, "fanout", durable=b.exchange_durable)
        if b.bridge_exchange:
            channel.exchange_declare(b.bridge_exchange, "fanout", durable=True)
        try:
            channel.queue_declare(log.stream, durable=True, arguments=log.arguments)
        except pika.exceptions.ChannelClosedByBroker as err:
            text = str(err.reply_text)
            if err.reply_code != 406 or "inequivalent arg" not in text or "x-queue-type" in text:
                raise _NoStreams(f"{err.reply_code} {text}") from None
            # Another node declared it with other retention: the first declaration wins.
            logger.warning(
                "intel log: stream '%s' exists with other retention than ours (%s); using it as it is "
                "(change retention with a policy, or give every node the same history keys)",
                log.stream,
                text,
            )
            channel = connection.channel()
            channel.queue_declare(log.stream, passive=True)
        for exchange in (b.exchange, b.bridge_exchange):
            if exchange:
                channel.queue_bind(log.stream, exchange)
        if not self.bound.is_set():
            logger.info(
                "intel log: stream '%s' bound to exchange '%s'%s; keeps %s%s",
                log.stream,
                b.exchange,
                f" and '{b.bridge_exchange}'" if b.bridge_exchange else "",
                log.arguments["x-max-age"],
                f", at most {log.max_bytes} bytes" if log.max_bytes else "",
            )


_END = object()

# AMQP 1.0 (how RabbitMQ stores what AMQP 0-9-1 publishes into a stream): a message is a
# sequence of described sections, 0x00 0x53 <code> <value>; the body is the data section(s).
_DATA, _VALUE = 0x75, 0x77
_SIZE1 = frozenset((0xA0, 0xA1, 0xA3, 0xC0, 0xC1))  # vbin8, str8, sym8, list8, map8: one size byte
_SIZE4 = frozenset((0xB0, 0xB1, 0xB3, 0xD0, 0xD1))  # their 32-bit forms
_EMPTY = frozenset((0x40, 0x45))  # null, list0
_ONE_DATA_SECTION = b"\x00Su\xb0"  # a data section with a 32-bit size
_size4 = struct.Struct(">I").unpack_from
_pack_size4 = struct.Struct(">I").pack
# What our stream nodes write before the body: application properties {"threatbus": true} (a map8 of
# one pair), then the head of a data section. Entries without it (what original and queue nodes publish
# on the exchange, other producers) are checked like an app's intel before they are delivered.
_OURS = b"\x00St\xc1\x0d\x02\xa1\x09threatbus\x41" + _ONE_DATA_SECTION
_OURS_SIZE = len(_OURS) + 4


def amqp_data(body: bytes) -> bytes:
    """``body`` as the AMQP 1.0 message our stream nodes write: the marker above, one data section.

    Written directly: rstream's general encoder costs a few µs per message on the publishing hot path.
    """
    return _OURS + _pack_size4(len(body)) + body


def stream_entry(raw: bytes) -> tuple[bytes, bool]:
    """The body of a log entry, and whether one of our stream nodes wrote it (``amqp_data``). Raises ``ValueError``."""
    if raw.startswith(_OURS) and len(raw) >= _OURS_SIZE and _size4(raw, len(_OURS))[0] == len(raw) - _OURS_SIZE:
        return raw[_OURS_SIZE:], True
    return amqp_body(raw), False


def amqp_body(raw: bytes) -> bytes:
    """The body of a message in a stream: its data sections (or a binary/string amqp-value).

    A few lines instead of rstream's general AMQP 1.0 decoder, which is the
    bottleneck of reading the log; anything else raises ``ValueError``.
    """
    end = len(raw)
    if raw[:4] == _ONE_DATA_SECTION and end >= 8 and _size4(raw, 4)[0] == end - 8:
        return raw[8:]  # the whole message is one data section (rstream's publishers write that)
    pos = 0
    parts = []
    while pos < end:
        if raw[pos] != 0x00 or raw[pos + 1] != 0x53 or pos + 3 >= end:
            raise ValueError(f"not an AMQP 1.0 section at byte {pos}")
        code, constructor = raw[pos + 2], raw[pos + 3]
        pos += 4
        if constructor in _SIZE4:
            if pos + 4 > end:
                raise ValueError("an AMQP 1.0 size cut off")
            size = _size4(raw, pos)[0]
            pos += 4
        elif constructor in _SIZE1:
            size = raw[pos]
            pos += 1
        elif constructor in _EMPTY:
            size = 0
        else:
            raise ValueError(f"unexpected AMQP 1.0 constructor 0x{constructor:02x}")
        if code == _DATA or (code == _VALUE and constructor in (0xA0, 0xB0, 0xA1, 0xB1)):
            parts.append(raw[pos : pos + size])
        pos += size
    if not parts or pos != end:
        raise ValueError("no body in the AMQP 1.0 message")
    return parts[0] if len(parts) == 1 else b"".join(parts)


class LogReader(StoppableWorker):
    """Reads windows of the stream over the stream protocol; the asyncio loop of rstream lives in this thread."""

    def __init__(self, broker: BrokerSettings, log: LogSettings) -> None:
        super().__init__(name="rabbitmq-log-reader")
        self.broker = broker
        self.log = log
        self.available: bool | None = None  # None until the first connection attempt
        self.invalid = 0  # log entries that are no Threat Bus message
        self.reads = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closing: set[asyncio.Task[None]] = set()  # consumers closing in the background (kept from the GC)
        self._started = threading.Event()
        self._log_invalid = RateLimitedLog(logger)
        self._log_failure = RateLimitedLog(logger, interval=60.0)

    # ---- any thread ----------------------------------------------------

    def read(self, since: datetime, until: datetime) -> Iterator[LogEntry]:
        """The stream's entries from ``since`` (chunk-granular: a little earlier) to ``until``, as JSON text."""
        return itertools.chain.from_iterable(self._batches(since, until))  # no generator step per entry

    def _batches(self, since: datetime, until: datetime) -> Iterator[list[LogEntry]]:
        self._started.wait(5)
        loop = self._loop
        if loop is None or self.stopping:
            return
        out: queue.SimpleQueue[Any] = queue.SimpleQueue()
        try:
            asyncio.run_coroutine_threadsafe(self._read(since, until, out), loop)
        except RuntimeError:  # the loop closed meanwhile: stopping
            return
        while True:
            try:
                item = out.get(timeout=POLL_INTERVAL)
            except queue.Empty:
                if self.stopping and not self.is_alive():
                    return
                continue
            if item is _END:
                return
            yield item

    # ---- the reader's thread -------------------------------------------

    def run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        self._started.set()
        try:
            loop.run_until_complete(self._main())
        finally:
            # Let running reads end (their consumers close), then close the loop.
            pending = [task for task in asyncio.all_tasks(loop) if not task.done()]
            for task in pending:
                task.cancel()
            if pending:
                loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            self._loop = None
            loop.close()

    async def _main(self) -> None:
        await self._probe()
        while not self.stopping:
            await asyncio.sleep(POLL_INTERVAL)
        if self._closing:  # consumers still closing: let them say goodbye to the broker
            await asyncio.wait(set(self._closing), timeout=CLOSE_WAIT)

    def _consumer(self) -> Any:
        from rstream import Consumer  # rstream pulls in its AMQP 1.0 codec: only when a log is kept

        widen_rstream_reads()
        b = self.broker
        return Consumer(
            b.host,
            self.log.port,
            username=b.username,
            password=b.password,
            vhost=b.vhost,
            ssl_context=b.ssl_options.context if b.ssl_options is not None else None,
            heartbeat=max(b.heartbeat, 10),
            connection_name=f"threatbus {b.node_name} log-reader",
            max_retries=1,
        )

    async def _probe(self) -> None:
        """Connect once at start, so a broker without the stream protocol is reported at once."""
        consumer = self._consumer()
        try:
            await asyncio.wait_for(consumer.start(), self.broker.connect_timeout)
            self.available = True
            logger.info("intel log: stream protocol available at %s:%d", self.broker.host, self.log.port)
        except Exception as err:  # refused, timeout, auth: rstream has no common base class for them
            self.available = False
            logger.warning(
                "intel log: no stream protocol at %s:%d (%s); %s",
                self.broker.host,
                self.log.port,
                _describe(err),
                NO_STREAMS,
            )
        finally:
            with contextlib.suppress(Exception):
                await consumer.close()

    async def _read(self, since: datetime, until: datetime, out: queue.SimpleQueue[Any]) -> None:
        from rstream import ConsumerOffsetSpecification, OffsetType

        self.reads += 1
        since_ms, until_ms = int(since.timestamp() * 1000), int(until.timestamp() * 1000)
        loop = asyncio.get_running_loop()
        done = asyncio.Event()
        finished = False  # done is set: a flag is cheaper to look at per entry
        delivered = 0  # entries the stream delivered: the stall watch looks at it
        taken = 0
        batch: list[LogEntry] = []  # handed over in batches: one queue operation per READ_BATCH entries

        end: list[int] = []  # [offset, timestamp] of the stream's last entry when the read began

        def on_last(_message: Any, context: Any) -> None:
            if not end or context.offset > end[0]:
                end[:] = [context.offset, context.timestamp]
            found_end.set()

        def on_message(message: Any, context: Any) -> None:
            nonlocal finished, delivered, taken
            if finished:
                return
            delivered += 1
            stamp = context.timestamp
            if context.offset >= last_offset:
                finished = True  # the last entry that was there when the read began; this one still counts
                done.set()
            if stamp > until_ms:
                finished = True  # the present: what follows is live traffic, not history
                done.set()
                return
            if stamp < since_ms:
                return
            try:
                body, _ours = stream_entry(message)
            except (ValueError, IndexError) as err:
                self.invalid += 1
                self._log_invalid(
                    "intel log: skipped an entry of stream '%s' at offset %d: %s", self.log.stream, context.offset, err
                )
                return
            # The JSON text as it is: the core's fold parses what it needs, in its own thread.
            taken += 1
            batch.append((stamp / 1000, body))
            if len(batch) >= READ_BATCH:
                out.put(batch.copy())
                batch.clear()

        found_end = asyncio.Event()
        # The probe for the end has a consumer of its own, connecting while the reading one does: a consumer
        # whose last subscription ends closes its connection, and rstream's close takes 0.2 s.
        prober, consumer = self._consumer(), self._consumer()
        probing = True
        try:
            await asyncio.wait_for(asyncio.gather(prober.start(), consumer.start()), self.broker.connect_timeout)
            # Where the log ends now: the read stops there, however slowly the broker delivers.
            await prober.subscribe(
                self.log.stream,
                on_last,
                decoder=bytes,
                offset_specification=ConsumerOffsetSpecification(OffsetType.LAST, None),
                initial_credit=1,
            )
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(found_end.wait(), END_WAIT)  # nothing: an empty stream
            probing = False
            self._close_later(prober)
            if not end or end[1] < since_ms - CHUNK_SLACK_MS:
                return  # empty, or nothing in the period
            last_offset = end[0]
            await consumer.subscribe(
                self.log.stream,
                on_message,
                offset_specification=ConsumerOffsetSpecification(OffsetType.TIMESTAMP, since_ms),
                initial_credit=READ_CREDIT,
            )
            seen, quiet_since = delivered, loop.time()
            while not done.is_set() and not self.stopping and loop.time() - quiet_since < READ_STALL:
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(done.wait(), 0.1)
                if delivered != seen:
                    seen, quiet_since = delivered, loop.time()
            if not done.is_set() and not self.stopping:
                self._log_failure(
                    "intel log: stream '%s' delivered nothing for %.0fs before its end: the snapshot is partial",
                    self.log.stream,
                    READ_STALL,
                )
            logger.debug("intel log: read %d entries of stream '%s' since %s", taken, self.log.stream, since)
        except asyncio.CancelledError:
            raise
        except Exception as err:
            self._log_failure(
                "intel log: reading stream '%s' at %s:%d failed (%s); the snapshot gets what was read so far",
                self.log.stream,
                self.broker.host,
                self.log.port,
                _describe(err),
            )
        finally:
            if batch:
                out.put(batch)
            out.put(_END)
            if probing:
                self._close_later(prober)
            with contextlib.suppress(Exception):
                await consumer.close()

    def _close_later(self, consumer: Any) -> None:
        """Close ``consumer`` without waiting for it (the end of the loop awaits what is still closing)."""
        task = asyncio.get_running_loop().create_task(self._close_quietly(consumer))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def _close_quietly(self, consumer: Any) -> None:
        with contextlib.suppress(Exception):
            await consumer.close()


def widen_rstream_reads() -> None:
    """Let rstream read its socket in pieces of ``RSTREAM_READ`` bytes instead of 256 (rstream 1.1).

    A chunk of the log is hundreds of KB; read 256 bytes at a time, with
    asyncio pausing and resuming the socket in between, it cost more than
    half of the reading thread's time. rstream keeps the size as a module
    constant (``rstream.connection.CHUNK_SIZE``) and has no option for it;
    a version without it is left alone. What a read brings beyond the
    frame stays in rstream's buffer for the next one.
    """
    from rstream import connection

    if 0 < getattr(connection, "CHUNK_SIZE", RSTREAM_READ) < RSTREAM_READ:
        connection.CHUNK_SIZE = RSTREAM_READ


def _describe(err: BaseException) -> str:
    return f"{type(err).__name__}: {err}" if str(err) else type(err).__name__
