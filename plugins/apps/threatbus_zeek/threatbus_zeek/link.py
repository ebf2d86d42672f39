"""The link to Zeek: one WebSocket connection, kept up by one worker thread."""

from __future__ import annotations

import asyncio
import logging
import queue
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidURI

from threatbus import stix
from threatbus.data import TOPIC_INDICATOR, Indicator, Message, SnapshotEnvelope, describe
from threatbus.errors import DecodeError
from threatbus.worker import Backoff, ReconnectingWorker
from threatbus_zeek import broker
from threatbus_zeek.mapping import InvalidMatch, Unsupported, sighting_from_match, to_zeek_intel
from threatbus_zeek.settings import ZeekSettings

logger = logging.getLogger(__name__)

# Topics shared with scripts/threatbus.zeek (ThreatBus::intel_topic / ThreatBus::match_topic).
INTEL_TOPIC = "threatbus/zeek/intel"
MATCH_TOPIC = "threatbus/zeek/sighting"

CONNECT_TIMEOUT = 5.0
# How often the sender looks at an empty intel queue, and the link at its stop flag (seconds).
POLL = 0.05
# Messages sent in a row before the sender lets the reader run.
BATCH = 512


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


class ZeekLink(ReconnectingWorker):
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
        publish_queue: queue.SimpleQueue[Message],
        subscribe: Callable[..., list[str]],
        stats: ZeekStats,
    ) -> None:
        super().__init__("zeek-link", Backoff(initial=0.5, maximum=30.0))
        self.settings = settings
        self.intel_queue = intel_queue
        self.publish_queue = publish_queue
        self.subscribe = subscribe
        self.stats = stats
        self.ssl_context = settings.ssl_context()
        self._pending: str | None = None
        self._established = False  # whether the last attempt got as far as the handshake
        self._problem: BaseException | None = None  # what ended the last attempt

    # ---- connection ----------------------------------------------------

    def connect_and_serve(self) -> None:
        # One event loop per connection: the reconnect loop with its backoff is the core's.
        asyncio.run(self._connect_and_serve())

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

    async def _send_intel(self, connection: ClientConnection) -> None:
        while True:
            for _ in range(BATCH):
                if self._pending is None:
                    try:
                        message = self.intel_queue.get_nowait()
                    except queue.Empty:
                        break
                    self._pending = self._encode(message)
                    if self._pending is None:
                        continue
                await connection.send(self._pending)
                self._pending = None
                self.stats.sent += 1
            else:
                await asyncio.sleep(0)  # a full batch went out: let the reader run, then go on
                continue
            await asyncio.sleep(POLL)  # the queue is empty: look again soon

    def _encode(self, message: Message) -> str | None:
        """The data message to send to Zeek for ``message``, or None to skip it."""
        if isinstance(message, SnapshotEnvelope):
            message = message.stix
        if not isinstance(message, Indicator):
            return None
        try:
            intel = to_zeek_intel(message)
        except Unsupported as err:
            self.stats.skipped += 1
            logger.debug("skipping indicator %s for Zeek: %s", message.id, err)
            return None
        except Exception:
            # A bug must cost this one indicator, not the connection.
            self.stats.skipped += 1
            logger.exception("cannot map indicator %s for Zeek; skipped", message.id)
            return None
        logger.debug(
            "%s Zeek intel %s %s (%s)",
            "removing" if intel.remove else "adding",
            intel.intel_type,
            intel.indicator,
            intel.source,
        )
        return broker.encode(broker.data_message(INTEL_TOPIC, intel.event(self.settings.module_namespace)))

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
