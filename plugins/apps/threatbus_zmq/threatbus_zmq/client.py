"""A client of the ZeroMQ protocol, for the command-line tools and for tests.

It speaks only WIRE.md, so it works with this bus and with the original
Threat Bus alike.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import orjson
import zmq

from threatbus.data import Message, decode
from threatbus_zmq.wire import STATUS_SUCCESS, endpoint, outbound_frame, split_pub_frame, topic_for


class BusUnreachable(Exception):
    """The bus did not answer in time."""


class ManageClient:
    """Requests on the manage endpoint, each with a timeout.

    A REQ socket that timed out is stuck waiting for its reply, so it is
    closed and a fresh one is made for the next request.
    """

    def __init__(self, host: str = "127.0.0.1", manage: int = 13370, timeout: float = 5.0, context: Any = None):
        self.host = host
        self.manage = manage
        self.timeout = timeout
        self.context = context or zmq.Context.instance()
        self.address = endpoint(host, manage)
        self._socket: zmq.Socket | None = None

    def _req(self) -> zmq.Socket:
        if self._socket is None:
            self._socket = self.context.socket(zmq.REQ)
            self._socket.setsockopt(zmq.LINGER, 0)
            if ":" in self.host:
                self._socket.setsockopt(zmq.IPV6, 1)
            self._socket.connect(self.address)
        return self._socket

    def request(self, payload: dict[str, Any] | bytes) -> dict[str, Any]:
        """Send one request, return the JSON reply; ``BusUnreachable`` on timeout."""
        sock = self._req()
        sock.send(payload if isinstance(payload, bytes) else orjson.dumps(payload))
        if not sock.poll(int(self.timeout * 1000)):
            self.reset()
            raise BusUnreachable(f"no reply from the manage endpoint {self.address} within {self.timeout:g}s")
        reply = orjson.loads(sock.recv())
        if not isinstance(reply, dict):
            raise BusUnreachable(f"the manage endpoint {self.address} sent a reply that is not a JSON object")
        return reply

    def reset(self) -> None:
        if self._socket is not None:
            self._socket.close(linger=0)
            self._socket = None

    def subscribe(
        self,
        topic: str | list[str],
        snapshot: float = 0,
        filter: dict[str, Any] | None = None,
        snapshot_end: bool = False,
    ) -> dict[str, Any]:
        """Subscribe; ``filter`` (the keys of ``threatbus.policy``) narrows what this subscriber gets.

        ``snapshot_end`` asks for a ``snapshotend`` frame after the log's answer (the original ignores it).
        """
        request: dict[str, Any] = {"action": "subscribe", "topic": topic, "snapshot": snapshot}
        if filter is not None:
            request["filter"] = filter
        if snapshot_end:
            request["snapshot_end"] = True
        return self.request(request)

    def unsubscribe(self, p2p_topic: str) -> dict[str, Any]:
        return self.request({"action": "unsubscribe", "topic": p2p_topic})

    def heartbeat(self, p2p_topic: str) -> dict[str, Any]:
        return self.request({"action": "heartbeat", "topic": p2p_topic})

    def close(self) -> None:
        self.reset()


class Receiver:
    """Receives what the bus publishes for one p2p topic."""

    def __init__(
        self,
        host: str,
        pub_port: int,
        p2p_topic: str,
        context: Any = None,
        rcvhwm: int = 0,
        before_connect: Callable[[zmq.Socket], None] | None = None,
    ) -> None:
        self.p2p_topic = p2p_topic
        self.context = context or zmq.Context.instance()
        self.socket = self.context.socket(zmq.SUB)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.setsockopt(zmq.RCVHWM, rcvhwm)
        if ":" in host:
            self.socket.setsockopt(zmq.IPV6, 1)
        if before_connect is not None:
            before_connect(self.socket)
        self.socket.connect(endpoint(host, pub_port))
        self.socket.setsockopt(zmq.SUBSCRIBE, p2p_topic.encode())

    def resubscribe(self, p2p_topic: str) -> None:
        self.socket.setsockopt(zmq.UNSUBSCRIBE, self.p2p_topic.encode())
        self.p2p_topic = p2p_topic
        self.socket.setsockopt(zmq.SUBSCRIBE, p2p_topic.encode())

    def recv_frame(self, timeout: float) -> bytes | None:
        if not self.socket.poll(int(timeout * 1000)):
            return None
        return self.socket.recv()

    def recv(self, timeout: float = 5.0) -> tuple[str, Message] | None:
        """The next (kind, message), or None when nothing arrives in time."""
        frame = self.recv_frame(timeout)
        if frame is None:
            return None
        _p2p, kind, body = split_pub_frame(frame)
        return kind, decode(body)

    def close(self) -> None:
        self.socket.close(linger=0)


class Sender:
    """Publishes into the bus's sub endpoint without losing messages.

    An XPUB socket sees when the bus's SUB socket has subscribed, so
    ``wait_ready`` avoids sending into the void; ``XPUB_NODROP`` makes a send
    wait instead of dropping when the bus is busy.
    """

    def __init__(self, host: str, sub_port: int, context: Any = None, send_timeout: float = 10.0) -> None:
        self.context = context or zmq.Context.instance()
        self.address = endpoint(host, sub_port)
        self.socket = self.context.socket(zmq.XPUB)
        self.socket.setsockopt(zmq.XPUB_NODROP, 1)
        self.socket.setsockopt(zmq.SNDTIMEO, int(send_timeout * 1000))
        if ":" in host:
            self.socket.setsockopt(zmq.IPV6, 1)
        self.socket.connect(self.address)
        self.ready = False

    def wait_ready(self, timeout: float = 5.0) -> None:
        """Wait until the bus subscribed to what we send; ``BusUnreachable`` if it does not."""
        deadline = time.monotonic() + timeout
        while not self.ready:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise BusUnreachable(f"the sub endpoint {self.address} did not connect within {timeout:g}s")
            if self.socket.poll(int(remaining * 1000)):
                event = self.socket.recv()
                self.ready = event[:1] == b"\x01"

    def send(self, message: Message, topic: str | None = None) -> None:
        self.send_frame(outbound_frame(topic or topic_for(message), message))

    def send_frame(self, frame: bytes | list[bytes]) -> None:
        if not self.ready:
            self.wait_ready()
        try:
            if isinstance(frame, list):
                self.socket.send_multipart(frame)
            else:
                self.socket.send(frame)
        except zmq.Again:
            raise BusUnreachable(f"the sub endpoint {self.address} accepted nothing for a while") from None

    def close(self, linger: float = 10.0) -> None:
        """Close; queued frames get ``linger`` seconds to reach the bus."""
        self.socket.close(linger=int(linger * 1000))


def is_success(reply: dict[str, Any]) -> bool:
    return reply.get("status") == STATUS_SUCCESS


class SubscriptionRefused(Exception):
    """The bus answered the subscribe request with an error; the reply is the argument."""


@dataclass
class Tail:
    """One subscription kept alive: heartbeats, a new subscription after a bus restart, the pub frames.

    ``notice`` gets one line for each change a user should hear about (the
    bus unreachable, answering again, forgetting the subscription).
    """

    manage: ManageClient
    host: str
    topic: str | list[str]
    snapshot: float  # days; 0: none
    heartbeat: float  # seconds between heartbeats
    notice: Callable[[str], None]
    context: Any = None
    filter: dict[str, Any] | None = None
    receiver: Receiver | None = field(default=None, init=False)
    p2p: str = field(default="", init=False)  # the subscription's topic on the pub socket

    def open(self) -> Receiver:
        """Subscribe; raises ``SubscriptionRefused`` or ``BusUnreachable``."""
        reply = self.manage.subscribe(self.topic, self.snapshot, self.filter, snapshot_end=self.snapshot > 0)
        if not is_success(reply):
            raise SubscriptionRefused(reply)
        self.p2p = reply["topic"]
        self.receiver = Receiver(self.host, reply["pub_port"], self.p2p, context=self.context)
        return self.receiver

    def frames(self, stopped: Callable[[], bool], poll: float = 0.2) -> Iterator[bytes]:
        """Yield pub frames until ``stopped()``; heartbeat every ``heartbeat`` seconds meanwhile."""
        assert self.receiver is not None
        next_heartbeat = time.monotonic() + self.heartbeat
        unreachable = False
        while not stopped():
            frame = self.receiver.recv_frame(timeout=poll)
            if frame is not None:
                yield frame
            if time.monotonic() >= next_heartbeat:
                next_heartbeat = time.monotonic() + self.heartbeat
                try:
                    alive = is_success(self.manage.heartbeat(self.p2p))
                    if unreachable:
                        self.notice("the bus answers again")
                        unreachable = False
                    if not alive:
                        self.notice("the bus forgot this subscription (restarted?); subscribing again")
                        reply = self.manage.subscribe(self.topic, 0)
                        if is_success(reply):
                            self.p2p = reply["topic"]
                            self.receiver.resubscribe(self.p2p)
                except BusUnreachable as err:
                    if not unreachable:
                        self.notice(f"{err}; still trying")
                        unreachable = True

    def close(self) -> None:
        """Unsubscribe (briefly: the bus may be gone) and close the receiver."""
        if self.p2p:
            self.manage.timeout = min(self.manage.timeout, 2.0)
            with contextlib.suppress(BusUnreachable):
                self.manage.unsubscribe(self.p2p)
        if self.receiver is not None:
            self.receiver.close()
