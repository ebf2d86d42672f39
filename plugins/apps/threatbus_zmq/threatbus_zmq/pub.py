"""The pub endpoint: one thread owns the XPUB socket and drains all subscriber buffers.

The socket is an XPUB with two options that make it safe for many apps:

- ``XPUB_NODROP``: a send to a subscriber whose connection is full fails
  (``zmq.Again``) instead of being lost silently. The message then stays in
  that subscriber's bounded buffer and is retried; only when the buffer is
  full does the bus drop (and count) messages for it. Every frame carries one
  subscriber's p2p topic, so a full connection blocks only its own app.
- ``XPUB_MANUAL``: the bus sees each app's ZeroMQ subscription arrive. Until
  it does, the app's messages wait in its buffer, so nothing is lost between
  the manage reply and the app's connect (the "slow joiner" problem of plain
  PUB sockets; a snapshot answered quickly by another app would otherwise
  never reach the requester). And the bus applies a ZeroMQ subscription only if it names a
  p2p topic that the manage endpoint handed out. A client that subscribes to
  everything (an empty prefix) therefore receives nothing: the p2p topic
  really is the subscriber's secret.
"""

from __future__ import annotations

import logging
import queue
import time

import zmq

from threatbus.ratelimit import RateLimitedLog
from threatbus.worker import StoppableWorker
from threatbus_zmq.subscribers import Subscription, Subscriptions, Tracked
from threatbus_zmq.wire import P2P_TOPIC_LENGTH

logger = logging.getLogger(__name__)

BATCH = 5000
IDLE_WAIT = 0.02  # seconds; also how soon a new ZeroMQ subscription takes effect when idle
RETRY_INTERVAL = 0.005  # seconds between retries of subscribers whose connection is full


class PublisherWorker(StoppableWorker):
    def __init__(self, socket: zmq.Socket, subscriptions: Subscriptions, ready: queue.SimpleQueue) -> None:
        super().__init__(name="zmq-publisher")
        self.socket = socket
        self.subscriptions = subscriptions
        self.ready = ready
        self.delivered = 0
        self.skipped = 0
        self.blocked: set[Subscription] = set()
        self._log_refused = RateLimitedLog(logger, logging.INFO)

    def run(self) -> None:
        get = self.ready.get
        get_nowait = self.ready.get_nowait
        flush = self._flush
        blocked = self.blocked
        last_retry = 0.0
        try:
            while not self.stopping:
                try:
                    # A blocked subscriber is retried soon: its connection drains within milliseconds, and
                    # nothing else may wake this thread meanwhile (a snapshot answer waits for its buffer).
                    sub = get(timeout=RETRY_INTERVAL if blocked else IDLE_WAIT)
                except queue.Empty:
                    sub = None
                # Drain a batch of ready subscribers, then look at blocked ones and new connections.
                for _ in range(BATCH):
                    if sub is None:
                        break
                    if sub.connected and sub not in blocked and sub.pending and not flush(sub):
                        blocked.add(sub)
                    try:
                        sub = get_nowait()
                    except queue.Empty:
                        sub = None
                if sub is not None and sub.connected and sub not in blocked and sub.pending and not flush(sub):
                    blocked.add(sub)
                if blocked:
                    now = time.monotonic()
                    if now - last_retry >= RETRY_INTERVAL:
                        last_retry = now
                        for waiting in list(blocked):
                            if waiting.closed or not waiting.connected or flush(waiting):
                                blocked.discard(waiting)
                self._serve_subscriptions()
        except Exception:
            logger.exception("pub endpoint failed; apps no longer receive intel")
        finally:
            self.release()

    def release(self) -> None:
        self.socket.close(linger=0)

    def _flush(self, sub: Subscription) -> bool:
        """Send what ``sub`` has buffered; False if its connection is full."""
        try:
            return self._send_pending(sub)
        finally:
            sub.made_room()

    def _send_pending(self, sub: Subscription) -> bool:
        pending = sub.pending
        send = self.socket.send
        while pending and not sub.closed:
            try:
                message = pending[0]
            except IndexError:  # cleared by an unsubscribe meanwhile
                return True
            tracked = type(message) is Tracked
            frame = sub.frame(message.message if tracked else message)  # type: ignore[union-attr]
            if frame is not None:
                try:
                    send(frame, zmq.NOBLOCK)
                except zmq.Again:
                    return False
                self.delivered += 1
            else:
                self.skipped += 1
            try:
                popped = pending.popleft()
            except IndexError:
                return True
            if type(popped) is Tracked:  # (another item only if an unsubscribe cleared the buffer meanwhile)
                sub.sent(popped)  # in libzmq's hands: the backbone may ack it
        if sub.released:
            sub.caught_up()
        return True

    def _serve_subscriptions(self) -> None:
        """Apply the ZeroMQ (un)subscriptions of connected apps (XPUB_MANUAL)."""
        sock = self.socket
        while True:
            try:
                event = sock.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            if not event:
                continue
            topic = event[1:]
            sub = self.subscriptions.get(topic[:P2P_TOPIC_LENGTH].decode("ascii", "replace"))
            if event[0] == 1:
                if sub is not None:
                    sock.setsockopt(zmq.SUBSCRIBE, topic)
                    sub.connected = True
                    # Deliver what waited for the app since it subscribed at the manage endpoint.
                    if sub.pending and sub not in self.blocked and not self._flush(sub):
                        self.blocked.add(sub)
                else:
                    self._log_refused(
                        "pub socket: refused a subscription to %r, which is not a p2p topic of a current subscriber "
                        "(an app that missed a bus restart re-subscribes via manage when its heartbeat fails)",
                        topic[:8].decode("ascii", "replace") + ("…" if len(topic) > 8 else ""),
                    )
            elif event[0] == 0:
                sock.setsockopt(zmq.UNSUBSCRIBE, topic)
                if sub is not None:
                    sub.connected = False  # hold its messages (bounded) until it subscribes again
