"""The Zeek app plugin: one WebSocket link to Zeek, kept up by one worker thread.

Indicators from the bus become Zeek events that add or remove intel items
(see ``mapping``); ``intel_match`` events from Zeek become sightings on the
bus. The Zeek side is ``scripts/threatbus.zeek`` in this package.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import queue
import re
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidURI

import threatbus
from threatbus import stix
from threatbus.config import option, port
from threatbus.data import TOPIC_INDICATOR, Indicator, Message, SnapshotEnvelope, SnapshotRequest, describe
from threatbus.errors import DecodeError, PluginError
from threatbus.expiry import ExpirySchedule, ExpiryWorker, hand_to
from threatbus.metrics import APP_RECEIVED, APP_REJECTED, DELIVERED, QUEUE_DEPTH, SUBSCRIBERS, Metrics
from threatbus.worker import Backoff, StoppableWorker, stop_workers
from threatbus_zeek import broker
from threatbus_zeek.mapping import InvalidMatch, Unsupported, ZeekIntel, add_batch_event, sighting_from_match
from threatbus_zeek.state import ZeekIntelState

logger = logging.getLogger(__name__)

PLUGIN = "zeek"
PREFIX = f"plugins.apps.{PLUGIN}"

# Topics shared with scripts/threatbus.zeek (ThreatBus::intel_topic / ThreatBus::match_topic).
INTEL_TOPIC = "threatbus/zeek/intel"
MATCH_TOPIC = "threatbus/zeek/sighting"

SKIPPED = "threatbus_zeek_skipped"  # counter: indicators Zeek cannot express
ZEEK_ERRORS = "threatbus_zeek_errors"  # counter: error messages Zeek sent back
CONNECTS = "threatbus_zeek_connects"  # counter: successful (re)connections

CONNECT_TIMEOUT = 5.0
# The cipher Broker selects for TLS without certificates.
ANONYMOUS_CIPHERS = "AECDH-AES256-SHA"
# How often the sender looks at an empty intel queue, and the link at its stop flag (seconds).
POLL = 0.05
# Messages sent in a row before the sender lets the reader run.
BATCH = 512
# Least seconds between two writes of the state file.
SAVE_INTERVAL = 1.0
# Intel items per add_intels event, by default (config key batch_size).
BATCH_SIZE = 500
MAX_BATCH_SIZE = 10_000

_NAMESPACE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(::[A-Za-z_][A-Za-z0-9_]*)*$")


def _key(item: ZeekIntel) -> tuple[str, str, str]:
    return (item.indicator, item.intel_type, item.source)


def _writable_dir(path: str) -> bool:
    parent = os.path.dirname(os.path.abspath(path))
    return os.path.isdir(parent) and os.access(parent, os.W_OK | os.X_OK)


def script_path() -> Path:
    """The Zeek script to load into Zeek (``zeek ... <path>``)."""
    return Path(__file__).with_name("scripts") / "threatbus.zeek"


@dataclass(frozen=True)
class ZeekSettings:
    host: str = "127.0.0.1"
    port: int = 9997
    module_namespace: str = "ThreatBus"
    snapshot_days: float = 0
    queue_size: int = 0
    batch_size: int = BATCH_SIZE
    tls: bool = False
    ca_file: str = ""
    cert_file: str = ""
    key_file: str = ""
    skip_verify: bool = False
    anonymous: bool = False
    state_file: str = ""

    @classmethod
    def from_config(cls, config: Any) -> ZeekSettings:
        config = config or {}
        tls = config.get("tls") or {}
        return cls(
            host=config.get("host", cls.host),
            port=int(config.get("port", cls.port)),
            module_namespace=config.get("module_namespace", cls.module_namespace),
            snapshot_days=config.get("snapshot") or 0,
            queue_size=config.get("queue_size") or 0,
            batch_size=int(config.get("batch_size") or BATCH_SIZE),
            tls=bool(tls.get("enabled", False)),
            ca_file=tls.get("ca_file") or "",
            cert_file=tls.get("cert_file") or "",
            key_file=tls.get("key_file") or "",
            skip_verify=bool(tls.get("skip_verify", False)),
            anonymous=bool(tls.get("anonymous", False)),
            state_file=config.get("state_file") or "",
        )

    @property
    def uri(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'wss' if self.tls or self.anonymous else 'ws'}://{host}:{self.port}{broker.WEBSOCKET_PATH}"

    @property
    def snapshot(self) -> timedelta:
        return timedelta(days=self.snapshot_days)

    @property
    def match_event(self) -> str:
        return f"{self.module_namespace}::intel_match"

    def ssl_context(self) -> ssl.SSLContext | None:
        """The client TLS context, or None for plain ``ws://``. Raises ``PluginError`` on bad files."""
        if self.anonymous:
            return _anonymous_context()
        if not self.tls:
            return None
        try:
            context = ssl.create_default_context(cafile=self.ca_file or None)
            if self.cert_file:
                context.load_cert_chain(self.cert_file, self.key_file or None)
        except (OSError, ssl.SSLError) as err:
            raise PluginError(f"{PREFIX}.tls: cannot load certificates: {err}") from err
        if self.skip_verify:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        return context


def _anonymous_context() -> ssl.SSLContext:
    """TLS as Broker speaks it by default (Zeek 5.x to 7.x without certificates): anonymous ECDH ciphers.

    This encrypts but authenticates neither side.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    try:
        context.set_ciphers(ANONYMOUS_CIPHERS + "@SECLEVEL=0")
    except ssl.SSLError:
        try:
            context.set_ciphers(ANONYMOUS_CIPHERS)
        except ssl.SSLError as err:
            raise PluginError(f"{PREFIX}.tls.anonymous: this OpenSSL has no anonymous ciphers: {err}") from err
    return context


@dataclass
class ZeekStats:
    """Plain counters, read by the metrics read-outs (written by the link worker only)."""

    sent: int = 0
    skipped: int = 0
    received: int = 0
    rejected: int = 0
    zeek_errors: int = 0
    connects: int = 0
    connected: bool = False


class ZeekRefused(Exception):
    """Zeek answered the handshake with something other than an ack."""


class ZeekGone(Exception):
    """Zeek closed the connection."""


class ZeekLink(StoppableWorker):
    """Connects to Zeek, sends intel from ``intel_queue``, publishes Zeek's matches.

    The thread runs an asyncio loop: websockets' asyncio client drives TLS
    through memory buffers in this one thread (its threaded client reads and
    writes one TLS connection from two threads, which stalled handshakes with
    TLS 1.3 session tickets in our tests).

    Reconnects with backoff whenever the connection fails or drops. An
    intel event whose send failed is kept and sent first after the next
    connect; everything else waits in ``intel_queue`` meanwhile.
    """

    def __init__(
        self,
        settings: ZeekSettings,
        intel_queue: queue.Queue[Message],
        publish_queue: queue.Queue[Message],
        subscribe: Callable[..., list[str]],
        stats: ZeekStats,
        state: ZeekIntelState | None = None,
        expiry: ExpirySchedule | None = None,
        stale: list[ZeekIntel] | None = None,
    ) -> None:
        super().__init__(name="zeek-link")
        self.settings = settings
        self.intel_queue = intel_queue
        self.publish_queue = publish_queue
        self.subscribe = subscribe
        self.stats = stats
        self.ssl_context = settings.ssl_context()
        # Encoded events not yet sent, with their number of intel items: a failed send is retried
        # first after the next connect.
        self._pending: collections.deque[tuple[str, int]] = collections.deque()
        self._backoff = Backoff(initial=0.5, maximum=30.0)
        self.state = state or ZeekIntelState()
        self.expiry = expiry or ExpirySchedule()
        self._stale = list(stale or [])  # items Zeek may hold that are gone (expired while the node was down)
        self._saved = 0.0

    def run(self) -> None:
        try:
            asyncio.run(self._main())
        finally:
            self._save(force=True)

    # ---- connection ----------------------------------------------------

    async def _main(self) -> None:
        while not self.stopping:
            established = False
            problem: BaseException | None = None
            try:
                async with connect(
                    self.settings.uri,
                    ssl=self.ssl_context,
                    open_timeout=CONNECT_TIMEOUT,
                    close_timeout=2,
                    compression=None,
                    proxy=None,
                    additional_headers={"X-Application-Name": "threatbus"},
                ) as connection:
                    await self._handshake(connection)
                    established = True
                    self._backoff.reset()
                    await self._serve(connection)
            except (
                OSError,
                TimeoutError,
                InvalidHandshake,
                InvalidURI,
                ConnectionClosed,
                ZeekRefused,
                ZeekGone,
            ) as err:
                problem = err
            except Exception as err:
                problem = err
                logger.exception("Zeek link failed")
            finally:
                self.stats.connected = False
            if self.stopping:
                break
            delay = self._backoff.next_delay()
            if established:
                logger.warning(
                    "connection to Zeek at %s lost: %s; reconnecting in %.1fs", self.settings.uri, problem, delay
                )
            else:
                logger.warning("cannot connect to Zeek at %s: %s; retrying in %.1fs", self.settings.uri, problem, delay)
            await self._sleep(delay)

    async def _sleep(self, seconds: float) -> None:
        """Sleep up to ``seconds``, less if the worker is asked to stop."""
        deadline = time.monotonic() + seconds
        while not self.stopping and time.monotonic() < deadline:
            await asyncio.sleep(min(POLL, max(0.0, deadline - time.monotonic())))

    async def _handshake(self, connection: ClientConnection) -> None:
        await connection.send(broker.handshake([MATCH_TOPIC]).decode())
        raw = await asyncio.wait_for(connection.recv(), CONNECT_TIMEOUT)
        try:
            answer = broker.decode_message(raw)
        except DecodeError as err:
            raise ZeekRefused(f"unexpected handshake answer ({err}): {describe(raw)}") from None
        if isinstance(answer, broker.ErrorMessage):
            raise ZeekRefused(f"handshake refused: {answer.code}: {answer.context}")
        if not isinstance(answer, broker.Ack):
            raise ZeekRefused(f"expected an ack to the handshake, got {describe(raw)}")
        self.stats.connects += 1
        self.stats.connected = True
        logger.info(
            "connected to Zeek at %s (endpoint %s, version %s)", self.settings.uri, answer.endpoint, answer.version
        )

    async def _serve(self, connection: ClientConnection) -> None:
        """Send intel and read Zeek's messages until the connection fails or the worker stops."""
        if self.settings.snapshot > timedelta(0):
            # Zeek keeps its intel only in memory: ask the bus for the recent intel on every (re)connect.
            self.subscribe(TOPIC_INDICATOR, self.intel_queue, snapshot=self.settings.snapshot)
        self._reconcile()
        tasks = [
            asyncio.create_task(self._send_intel(connection), name="zeek-send"),
            asyncio.create_task(self._read_zeek(connection), name="zeek-read"),
            asyncio.create_task(self._sleep(float("inf")), name="zeek-stop-watch"),
        ]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        for task in done:
            task.result()  # raises what ended the connection

    # ---- Threat Bus -> Zeek --------------------------------------------

    def _reconcile(self) -> None:
        """Bring a (re)connected Zeek to the current intel: what went meanwhile out, everything held in.

        Zeek may have restarted (its intel lives in memory) or kept its
        items; inserting a held item again is harmless, so all are sent:
        first the removals of what expired while the node was down, then the
        items held before, then what arrived while Zeek was away, in order.
        """
        before = self.state.items()
        drained: list[ZeekIntel] = []
        while True:
            try:
                message = self.intel_queue.get_nowait()
            except queue.Empty:
                break
            drained.extend(self._apply(message))
        held = {_key(item) for item in self.state.items()}
        resent = [item for item in before if _key(item) in held]
        events = [*self._stale, *resent, *drained]
        self._stale = []
        self._pending.extend(self._events(events))
        removed = sum(1 for item in events if item.remove)
        logger.info("reconciled Zeek: %d added, %d removed", len(events) - removed, removed)

    async def _send_intel(self, connection: ClientConnection) -> None:
        while True:
            for _ in range(BATCH):
                if not self._pending:
                    items = self._take(self.settings.batch_size)
                    if not items:
                        break
                    self._pending.extend(self._events(items))
                    continue
                event, count = self._pending[0]
                await connection.send(event)
                self._pending.popleft()
                self.stats.sent += count
            else:
                await asyncio.sleep(0)  # many went out: let the reader run, then go on
                continue
            self._save()
            await asyncio.sleep(POLL)  # the queue is empty: look again soon

    def _take(self, limit: int) -> list[ZeekIntel]:
        """Items for up to about ``limit`` queued indicators (fewer when the queue runs empty)."""
        items: list[ZeekIntel] = []
        while len(items) < limit:
            try:
                message = self.intel_queue.get_nowait()
            except queue.Empty:
                break
            items.extend(self._apply(message))
        return items

    def _events(self, items: list[ZeekIntel]) -> list[tuple[str, int]]:
        """The encoded events for ``items`` in their order, with their number of items each.

        Consecutive additions travel together in one ``add_intels`` event of
        up to ``batch_size`` items (a bulk load, snapshot or reconciliation of
        a million indicators is 2,000 events, not a million); a removal is
        sent on its own, after the additions before it.
        """
        events: list[tuple[str, int]] = []
        batch: list[ZeekIntel] = []
        size = self.settings.batch_size

        def flush() -> None:
            if len(batch) == 1:
                events.append((self._event(batch[0]), 1))
            elif batch:
                event = add_batch_event(batch, self.settings.module_namespace)
                events.append((broker.encode(broker.data_message(INTEL_TOPIC, event)), len(batch)))
            batch.clear()

        for item in items:
            if item.remove or size == 1:
                flush()
                events.append((self._event(item), 1))
                continue
            batch.append(item)
            if len(batch) >= size:
                flush()
        flush()
        return events

    def _apply(self, message: Message) -> list[ZeekIntel]:
        """The Zeek items to remove and add for ``message`` (``state.ZeekIntelState``)."""
        if isinstance(message, SnapshotEnvelope):
            message = message.stix
        if not isinstance(message, Indicator):
            return []
        try:
            items = self.state.apply(message)
        except Unsupported as err:
            self.stats.skipped += 1
            logger.debug("skipping indicator %s for Zeek: %s", message.id, err)
            return []
        except Exception:
            # A bug must cost this one indicator, not the connection.
            self.stats.skipped += 1
            logger.exception("cannot map indicator %s for Zeek; skipped", message.id)
            return []
        if message.id in self.expiry:  # held since before a restart: a newer version moves its expiry
            self.expiry.observe(message, (self.intel_queue,))
        if logger.isEnabledFor(logging.DEBUG):  # a million per bulk load
            for item in items:
                logger.debug(
                    "%s Zeek intel %s %s (%s)",
                    "removing" if item.remove else "adding",
                    item.intel_type,
                    item.indicator,
                    item.source,
                )
        return items

    def _event(self, item: ZeekIntel) -> str:
        return broker.encode(broker.data_message(INTEL_TOPIC, item.event(self.settings.module_namespace)))

    def _save(self, force: bool = False) -> None:
        """Write the state file (if configured) when it changed, at most every SAVE_INTERVAL."""
        if not self.settings.state_file or not self.state.dirty:
            return
        now = time.monotonic()
        if not force and now - self._saved < SAVE_INTERVAL:
            return
        self._saved = now
        try:
            self.state.save(Path(self.settings.state_file))
        except OSError as err:
            logger.warning("cannot write the Zeek state file %s: %s; retrying", self.settings.state_file, err)

    # ---- Zeek -> Threat Bus --------------------------------------------

    async def _read_zeek(self, connection: ClientConnection) -> None:
        async for raw in connection:
            try:
                self._handle(raw)
            except Exception:
                # A bug must cost this one message, not the connection.
                self.stats.rejected += 1
                logger.exception("cannot handle message from Zeek; dropped: %s", describe(raw))
        reason = f", {connection.close_reason}" if connection.close_reason else ""
        raise ZeekGone(f"closed by Zeek (code {connection.close_code}{reason})")

    def _handle(self, raw: str | bytes) -> None:
        try:
            message = broker.decode_message(raw)
        except DecodeError as err:
            self.stats.rejected += 1
            logger.warning("dropping malformed message from Zeek: %s: %s", err, describe(raw))
            return
        if isinstance(message, broker.ErrorMessage):
            self.stats.zeek_errors += 1
            logger.warning("Zeek reported an error: %s: %s", message.code, message.context)
        elif isinstance(message, broker.ZeekEvent) and message.name == self.settings.match_event:
            self._publish_sighting(message, raw)
        else:
            logger.debug("ignoring message from Zeek: %s", describe(raw))

    def _publish_sighting(self, event: broker.ZeekEvent, raw: str | bytes) -> None:
        try:
            sighting = sighting_from_match(event)
            stix.validate(sighting)
        except (InvalidMatch, DecodeError) as err:
            self.stats.rejected += 1
            logger.warning("dropping invalid intel match from Zeek: %s: %s", err, describe(raw))
            return
        self.stats.received += 1
        logger.debug("Zeek sighted %s (%s)", sighting.sighting_of_ref, sighting.payload["x_threatbus_indicator_value"])
        self.publish_queue.put(sighting)


class ZeekApp:
    """Threat Bus app plugin ``zeek``: bridges the bus and Zeek's Intel framework."""

    def __init__(self) -> None:
        self.stats = ZeekStats()
        self.intel_queue: queue.Queue[Message] | None = None
        self.link: ZeekLink | None = None
        self.expiry_worker: ExpiryWorker | None = None
        self._unsubscribe: Callable[..., None] | None = None

    @threatbus.app
    def config_validators(self) -> list[Any]:
        return [
            option(f"{PREFIX}.host", str, default="127.0.0.1", check=bool, expected="a host name or address"),
            port(f"{PREFIX}.port", default=9997),
            option(
                f"{PREFIX}.module_namespace",
                str,
                default="ThreatBus",
                check=lambda name: bool(_NAMESPACE.match(name)),
                expected="a Zeek module name such as ThreatBus",
            ),
            option(
                f"{PREFIX}.snapshot",
                (int, float),
                default=0,
                check=lambda days: 0 <= days < 100_000,
                expected="a number of days >= 0",
            ),
            option(
                f"{PREFIX}.queue_size",
                int,
                default=0,
                check=lambda size: size >= 0,
                expected="a number of indicators >= 0 (0: unbounded)",
            ),
            option(
                f"{PREFIX}.batch_size",
                int,
                default=BATCH_SIZE,
                check=lambda size: 1 <= size <= MAX_BATCH_SIZE,
                expected=f"a number of intel items from 1 to {MAX_BATCH_SIZE} (1: one add_intel event each)",
            ),
            option(f"{PREFIX}.tls.enabled", bool, default=False),
            option(f"{PREFIX}.tls.ca_file", str, default=""),
            option(f"{PREFIX}.tls.cert_file", str, default=""),
            option(f"{PREFIX}.tls.key_file", str, default=""),
            option(f"{PREFIX}.tls.skip_verify", bool, default=False),
            option(f"{PREFIX}.tls.anonymous", bool, default=False),
            option(
                f"{PREFIX}.state_file",
                str,
                default="",
                check=lambda path: path == "" or _writable_dir(path),
                expected="'' (keep the state in memory) or a file path in an existing, writable directory",
            ),
        ]

    @threatbus.app
    def run(
        self,
        config: Any,
        publish_queue: queue.Queue[Message],
        subscribe: Callable[..., list[str]],
        unsubscribe: Callable[..., None],
        metrics: Metrics,
    ) -> None:
        settings = ZeekSettings.from_config(config)
        self.intel_queue = queue.Queue(maxsize=settings.queue_size)
        self._register_metrics(metrics, self.intel_queue)
        state, expiry, stale = self._restore(settings, self.intel_queue)
        self.link = ZeekLink(settings, self.intel_queue, publish_queue, subscribe, self.stats, state, expiry, stale)
        self.expiry_worker = ExpiryWorker(expiry, hand_to)
        # Subscribe before connecting: intel arriving while Zeek is away waits in the queue.
        subscribe(TOPIC_INDICATOR, self.intel_queue)
        self._unsubscribe = unsubscribe
        self.link.start()
        self.expiry_worker.start()
        logger.info("Zeek app started: connecting to %s, Zeek module %s", settings.uri, settings.module_namespace)

    @staticmethod
    def _restore(
        settings: ZeekSettings, intel_queue: queue.Queue[Message]
    ) -> tuple[ZeekIntelState, ExpirySchedule, list[ZeekIntel]]:
        """The state a previous run left (``state_file``), what expired since, and the expiry of the rest."""
        state, expiry = ZeekIntelState(), ExpirySchedule()
        if not settings.state_file:
            return state, expiry, []
        try:
            loaded = state.load(Path(settings.state_file))
        except OSError as err:
            raise PluginError(f"{PREFIX}.state_file: cannot read {settings.state_file}: {err}") from err
        stale = state.drop_expired()
        for payload in state.payloads():
            if "valid_until" in payload:
                expiry.observe(Indicator(payload), (intel_queue,))
        if loaded:
            logger.info(
                "Zeek state from %s: %d indicators, %d of them expired while the node was down",
                settings.state_file,
                loaded,
                len(stale),
            )
        return state, expiry, stale

    def _register_metrics(self, metrics: Metrics, intel_queue: queue.Queue[Message]) -> None:
        stats = self.stats
        metrics.counter(APP_RECEIVED, "Messages apps gave this node", lambda: stats.received, plugin=PLUGIN)
        metrics.counter(APP_REJECTED, "Input rejected as invalid", lambda: stats.rejected, plugin=PLUGIN)
        metrics.counter(DELIVERED, "Messages handed to subscribers", lambda: stats.sent, plugin=PLUGIN)
        metrics.gauge(SUBSCRIBERS, "Connected subscribers", lambda: int(stats.connected), plugin=PLUGIN)
        metrics.gauge(QUEUE_DEPTH, "Messages waiting in a queue of the node", intel_queue.qsize, queue=PLUGIN)
        metrics.counter(
            SKIPPED, "Indicators Zeek's Intel framework cannot express", lambda: stats.skipped, plugin=PLUGIN
        )
        metrics.counter(ZEEK_ERRORS, "Error messages Zeek sent back", lambda: stats.zeek_errors, plugin=PLUGIN)
        metrics.counter(CONNECTS, "Successful connections to Zeek", lambda: stats.connects, plugin=PLUGIN)

    @threatbus.app
    def stop(self) -> None:
        workers = [w for w in (self.expiry_worker, self.link) if w is not None]
        if workers:
            stop_workers(workers)
        if self._unsubscribe is not None and self.intel_queue is not None:
            self._unsubscribe(TOPIC_INDICATOR, self.intel_queue)
            self._unsubscribe = None

    @threatbus.app
    def snapshot(self, snapshot_request: SnapshotRequest, result_queue: queue.Queue[Message]) -> None:
        """Answers nothing: Zeek keeps no intel history that Threat Bus could query.

        Zeek's Intel framework holds only the current intel, in memory, and
        its matches are published as sightings as they happen; there is no
        store of past indicators or sightings to replay for a snapshot.
        """
        logger.debug("Zeek has no history to answer snapshot %s", snapshot_request.snapshot_id)


__all__ = ["INTEL_TOPIC", "MATCH_TOPIC", "ZeekApp", "ZeekSettings", "script_path"]
