"""Test support for the zmq app's publisher: a fake pub socket and a worker around it, no ZeroMQ timing."""

from __future__ import annotations

import queue

import zmq

from threatbus_zmq.pub import PublisherWorker
from threatbus_zmq.settings import ZmqSettings
from threatbus_zmq.subscribers import Subscription, Subscriptions
from threatbus_zmq.wire import new_p2p_topic


class FakeSocket:
    """Accepts ``accept`` frames, then reports a full connection (zmq.Again)."""

    def __init__(self, accept: int = 10**9) -> None:
        self.frames: list[bytes] = []
        self.accept = accept

    def send(self, frame: bytes, flags: int = 0) -> None:
        if len(self.frames) >= self.accept:
            raise zmq.Again()
        self.frames.append(frame)

    def recv(self, flags: int = 0) -> bytes:
        raise zmq.Again()

    def close(self, linger: int | None = None) -> None:
        pass


def subscriptions(ready: queue.SimpleQueue) -> Subscriptions:
    limits = ZmqSettings("127.0.0.1", {}, heartbeat_timeout=0, buffer_size=100, send_hwm=1000, max_subscribers=10)
    return Subscriptions(lambda *a, **k: [], lambda *a: None, ready, limits)


def connected(ready: queue.SimpleQueue, bound: int = 100) -> Subscription:
    sub = Subscription(1, new_p2p_topic(), ["stix2"], bound, ready)
    sub.connected = True
    return sub


def run_worker(sock: FakeSocket, ready: queue.SimpleQueue) -> PublisherWorker:
    worker = PublisherWorker(sock, subscriptions(ready), ready)  # type: ignore[arg-type]
    worker.start()
    return worker
