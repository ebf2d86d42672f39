"""The link to Zeek: one WebSocket connection, kept up by one worker thread."""

from __future__ import annotations

import asyncio
import collections
import logging
import queue
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidURI

from threatbus import stix
from threatbus.data import TOPIC_INDICATOR, Indicator, Message, SnapshotEnvelope, describe
from threatbus.delivery import DeliveryQueue
from threatbus.errors import DecodeError
from threatbus.expiry import ExpirySchedule
from threatbus.metrics import AppCounts
from threatbus.worker import Backoff, ReconnectingWorker
from threatbus_zeek import broker
from threatbus_zeek.mapping import InvalidMatch, Unsupported, ZeekIntel, add_batch_event, sighting_from_match
from threatbus_zeek.settings import ZeekSettings
from threatbus_zeek.state import ZeekIntelState

logger = logging.getLogger(__name__)

# Topics shared with scripts/threatbus.zeek (ThreatBus::intel_topic / ThreatBus::match_topic).
INTEL_TOPIC = "threatbus/zeek/intel"
MATCH_TOPIC = "threatbus/zeek/sighting"

CONNECT_TIMEOUT = 5.0
# How often the sender looks at an empty intel queue, and the link at its stop flag (seconds).
POLL = 0.05
# Messages sent in a row before the sender lets the reader run.
BATCH = 512
# Least seconds between two writes of the state file.
SAVE_INTERVAL = 1.0


def _key(item: ZeekIntel) -> tuple[str, str, str]:
    return (item.indicator, item.intel_type, item.source)


@dataclass
class ZeekStats(AppCounts):
    """Plain counters, read by the metrics read-outs (written by the link worker only).

    ``delivered``: intel items sent to Zeek; ``received``: sightings of Zeek's matches.
    """

    skipped: int = 0
    zeek_errors: int = 0
    connects: int = 0
    connected: bool = False


class ZeekRefused(Exception):
    """Zeek answered the handshake with something other than an ack."""


class ZeekGone(Exception):
    """Zeek closed the connection."""


class ZeekLink(ReconnectingWorker):
    """Connects to Zeek, sends intel from ``intel_queue``, publishes Zeek's matches.

    The thread runs an asyncio loop: websockets' asyncio client drives TLS
    through memory buffers in this one thread (its threaded client reads and
    writes one TLS connection from two threads, which stalled handshakes with
    TLS 1.3 session tickets in our tests).

    Reconnects with backoff whenever the connection fails or drops. An
    intel event whose send failed is kept and sent first after the next
    connect; everything else waits in ``intel_queue`` meanwhile. Messages are
    acknowledged (``DeliveryQueue.task_done``) once the event carrying the
    last of them was sent: what a killed node had not sent comes again. What Zeek
    was given is kept in ``state`` (and its file, if configured), so every
    (re)connect reconciles Zeek with the current intel.
    """

    def __init__(
        self,
        settings: ZeekSettings,
        intel_queue: DeliveryQueue,
        publish_queue: queue.SimpleQueue[Message],
        subscribe: Callable[..., list[str]],
        stats: ZeekStats,
        state: ZeekIntelState | None = None,
        expiry: ExpirySchedule | None = None,
        stale: list[ZeekIntel] | None = None,
    ) -> None:
        super().__init__("zeek-link", Backoff(initial=0.5, maximum=30.0))
        self.settings = settings
        self.intel_queue = intel_queue
        self.publish_queue = publish_queue
        self.subscribe = subscribe
        self.stats = stats
        self.ssl_context = settings.ssl_context()
        # Encoded events not yet sent, with their number of intel items and of queue messages their send
        # completes (acknowledged then): a failed send is retried first after the next connect.
        self._pending: collections.deque[tuple[str, int, int]] = collections.deque()
        self._established = False  # whether the last attempt got as far as the handshake
        self._problem: BaseException | None = None  # what ended the last attempt
        self.state = state if state is not None else ZeekIntelState()  # an empty state is falsy
        self.expiry = expiry if expiry is not None else ExpirySchedule()
        self._stale = list(stale or [])  # items Zeek may hold that are gone (expired while the node was down)
        self._saved = 0.0

    # ---- connection ----------------------------------------------------

    def connect_and_serve(self) -> None:
        # One event loop per connection: the reconnect loop with its backoff is the core's.
        asyncio.run(self._connect_and_serve())

    def finish(self) -> None:
        # What Zeek holds must survive the stop: write the state file one last time.
        self._save(force=True)
        super().finish()

    async def _connect_and_serve(self) -> None:
        self._established = False
        self._problem = None
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
                self._established = True
                self.backoff.reset()
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
            self._problem = err
        except Exception as err:
            self._problem = err
            logger.exception("Zeek link failed")
        finally:
            self.stats.connected = False

    def reconnecting(self, delay: float) -> None:
        if self._established:
            logger.warning(
                "connection to Zeek at %s lost: %s; reconnecting in %.1fs", self.settings.uri, self._problem, delay
            )
        else:
            logger.warning(
                "cannot connect to Zeek at %s: %s; retrying in %.1fs", self.settings.uri, self._problem, delay
            )

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
        taken = 0
        while messages := self.intel_queue.get_many(self.settings.batch_size, 0):
            taken += len(messages)
            for message in messages:
                drained.extend(self._apply(message))
        held = {_key(item) for item in self.state.items()}
        resent = [item for item in before if _key(item) in held]
        events = [*self._stale, *resent, *drained]
        self._stale = []
        self._queue_events(events, taken)
        removed = sum(1 for item in events if item.remove)
        logger.info("reconciled Zeek: %d added, %d removed", len(events) - removed, removed)

    async def _send_intel(self, connection: ClientConnection) -> None:
        while True:
            for _ in range(BATCH):
                if not self._pending:
                    items, taken = self._take(self.settings.batch_size)
                    self._queue_events(items, taken)
                    if not self._pending:
                        break
                    continue
                event, count, completes = self._pending[0]
                await connection.send(event)
                self._pending.popleft()
                self.stats.delivered += count
                if completes:
                    self.intel_queue.task_done(completes)  # sent to Zeek: the backbone may ack them now
            else:
                await asyncio.sleep(0)  # many went out: let the reader run, then go on
                continue
            self._save()
            await asyncio.sleep(POLL)  # the queue is empty: look again soon

    def _take(self, limit: int) -> tuple[list[ZeekIntel], int]:
        """Items for up to about ``limit`` queued indicators (fewer when the queue runs empty), and how many
        messages were taken for them."""
        items: list[ZeekIntel] = []
        taken = 0
        while len(items) < limit:
            messages = self.intel_queue.get_many(limit - len(items), 0)
            if not messages:
                break
            taken += len(messages)
            for message in messages:
                items.extend(self._apply(message))
        return items, taken

    def _queue_events(self, items: list[ZeekIntel], taken: int) -> None:
        """Queue the events for ``items``; the ``taken`` messages they came from are done when the last is sent."""
        events = self._events(items)
        if events:
            event, count = events[-1]
            self._pending.extend((e, c, 0) for e, c in events[:-1])
            self._pending.append((event, count, taken))
        elif self._pending:  # nothing for Zeek in them: done with the event queued before (acks go in order)
            event, count, completes = self._pending.pop()
            self._pending.append((event, count, completes + taken))
        elif taken:
            self.intel_queue.task_done(taken)  # nothing for Zeek in them and nothing before them unsent

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
