"""The sub endpoint: a SUB socket where apps publish intel into the bus."""

from __future__ import annotations

import logging
import queue
import time
from collections import deque
from collections.abc import Callable

import zmq

from threatbus import stix
from threatbus.data import Indicator, Message, Sighting, SnapshotEnvelope, decode, describe
from threatbus.errors import DecodeError
from threatbus.ratelimit import RateLimitedLog
from threatbus.worker import StoppableWorker
from threatbus_zmq.wire import ENVELOPE_TOPIC, STIX2_PREFIX

logger = logging.getLogger(__name__)

# Frames taken per wake-up before the stop flag is checked again.
BATCH = 2000
# Messages waiting in the node's fullest subscriber queue (``backlog``) above which frames
# wait here undecoded (a third of a decoded message's memory) until the apps catch up.
HOLD_ABOVE = 20_000
# Milliseconds between looks at the backlog while frames are held.
HELD_POLL_MS = 20
# Seconds a stopping receiver spends handing held frames to the bus.
STOP_RELEASE_SECONDS = 2.0


class ReceiverWorker(StoppableWorker):
    """Decodes and validates every frame, then hands it to the bus.

    This is where intel enters the bus: structure (``data.decode``) and STIX
    content (``stix.validate``) are checked here, once. Anything invalid is
    logged (rate-limited), counted in ``rejected`` and dropped.

    While the node's apps are behind (``backlog() > HOLD_ABOVE``, e.g. a
    million indicators arriving faster than a sensor app applies them) frames
    are still read, so no publisher loses anything, but kept as they came
    (``held``) and decoded, in order, as the apps catch up.
    """

    def __init__(
        self,
        socket: zmq.Socket,
        publish_queue: queue.SimpleQueue[Message],
        backlog: Callable[[], int] | None = None,
    ) -> None:
        super().__init__(name="zmq-receiver")
        self.socket = socket
        self.publish_queue = publish_queue
        self.backlog = backlog
        self.held: deque[bytes] = deque()
        self.held_checks = 0  # looks at the backlog with frames held (tests watch it)
        self.received = 0
        self.rejected = 0
        self.expired = 0  # valid indicators past their valid_until: not delivered, counted apart
        self._log_rejected = RateLimitedLog(logger)
        self._log_expired = RateLimitedLog(logger)

    def run(self) -> None:
        try:
            while not self.stopping:
                if self.socket.poll(HELD_POLL_MS if self.held else 250):
                    self._receive_batch()
                if self.held:
                    self._release_held(min(BATCH, HOLD_ABOVE - self._backlog()))
        except Exception:
            logger.exception("sub endpoint failed; apps can no longer publish")
        finally:
            self._release_on_stop()
            self.release()

    def _release_on_stop(self) -> None:
        """Hand what was received but held to the bus, as if never held; within a bounded time."""
        deadline = time.monotonic() + STOP_RELEASE_SECONDS
        while self.held and time.monotonic() < deadline:
            self._release_held(BATCH)
        if self.held:
            logger.warning("stopping with %d received frames not handed to the bus (apps were behind)", len(self.held))

    def release(self) -> None:
        self.socket.close(linger=0)

    def _receive_batch(self) -> None:
        sock = self.socket
        recv = sock.recv
        put = self.publish_queue.put
        accept = self.accept
        hold = self.held.append if self.held or self._backlog() > HOLD_ABOVE else None
        for _ in range(BATCH):
            try:
                part = recv(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            frame = part.bytes
            # The frame knows whether more follow; sock.get(RCVMORE) builds an enum per call (~1 µs, pyzmq 27).
            if part.more:
                self._reject_multipart(frame)
                continue
            if hold is not None:
                hold(frame)
                continue
            message = accept(frame)
            if message is not None:
                put(message)
                self.received += 1

    def _backlog(self) -> int:
        return self.backlog() if self.backlog is not None else 0

    def _release_held(self, room: int) -> None:
        """Decode up to ``room`` held frames, oldest first, and hand them to the bus."""
        self.held_checks += 1
        held, put, accept = self.held, self.publish_queue.put, self.accept
        for _ in range(min(room, len(held))):
            message = accept(held.popleft())
            if message is not None:
                put(message)
                self.received += 1

    def accept(self, frame: bytes) -> Message | None:
        """The message of one frame, or None (logged and counted) if it is invalid."""
        topic, sep, body = frame.partition(b" ")
        try:
            if not sep:
                raise DecodeError("expected '<topic> <json>'")
            if topic.startswith(STIX2_PREFIX):
                wanted: tuple[type[Message], ...] = (Indicator, Sighting)
            elif topic == ENVELOPE_TOPIC:
                wanted = (SnapshotEnvelope,)
            else:
                raise DecodeError(f"unknown topic {describe(topic, 60)}")
            message = decode(body)
            if type(message) not in wanted:
                raise DecodeError(f"a {message.type_name} cannot be published on topic {describe(topic, 60)}")
            stix.validate(message)
        except stix.ExpiredIntel as err:
            self.expired += 1
            self._log_expired("dropped on the sub socket: %s", err)
            return None
        except DecodeError as err:
            self.rejected += 1
            self._log_rejected("rejected frame on the sub socket: %s; frame %s", err, describe(frame))
            return None
        return message

    def _reject_multipart(self, first: bytes) -> None:
        parts = 1
        while self.socket.get(zmq.RCVMORE):
            self.socket.recv()
            parts += 1
        self.rejected += 1
        self._log_rejected(
            "rejected a message of %d frames on the sub socket (one expected): %s", parts, describe(first)
        )
