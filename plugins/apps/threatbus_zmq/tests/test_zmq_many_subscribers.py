"""Fifty apps at once, one of which never reads: the others get everything, memory stays bounded."""

from __future__ import annotations

import time

import pytest
import zmq

from threatbus.data import decode
from threatbus.metrics import DROPPED, SUBSCRIBERS
from threatbus.testing import indicator, wait_until
from threatbus_zmq.client import Receiver
from threatbus_zmq.wire import split_pub_frame

MESSAGES = 3000
PADDING = "x" * 4000  # 12 MB for the stuck app: more than ZeroMQ and the kernel buffer for it
CHUNK = 100  # the readers read each chunk before the next is sent, so only the stuck app lags
BUFFER = 500
SEND_HWM = 50


def _read_all(readers: list[Receiver], count: int, timeout: float) -> dict[Receiver, list[str]]:
    """Read ``count`` frames from every reader; returns the ids each got, in order."""
    poller = zmq.Poller()
    for reader in readers:
        poller.register(reader.socket, zmq.POLLIN)
    by_socket = {reader.socket: reader for reader in readers}
    got: dict[Receiver, list[str]] = {reader: [] for reader in readers}
    deadline = time.monotonic() + timeout
    while any(len(ids) < count for ids in got.values()):
        remaining = deadline - time.monotonic()
        assert remaining > 0, f"readers got {sorted(len(ids) for ids in got.values())} of {count} within {timeout}s"
        for sock, _ in poller.poll(min(remaining, 1.0) * 1000):
            reader = by_socket[sock]
            while True:
                try:
                    frame = sock.recv(zmq.NOBLOCK)
                except zmq.Again:
                    break
                got[reader].append(decode(split_pub_frame(frame)[2]).payload["id"])
    return got


@pytest.mark.parametrize("kind", ["inprocess", "process"])
def test_fifty_subscribers_one_never_reading(configured_bus, kind):
    with configured_bus(kind, buffer_size=BUFFER, send_hwm=SEND_HWM) as bus:
        readers = [bus.fake_app("stix2/indicator") for _ in range(49)]
        stuck = bus.fake_app("stix2/indicator", rcvhwm=1)  # subscribed and connected, never reads
        stuck.receiver.socket.setsockopt(zmq.RCVBUF, 4096)
        if bus.bus is not None:
            assert bus.metric(SUBSCRIBERS, plugin="zmq") == 50

        sent = [indicator(f"10.{i // 250}.{i % 250}.1", description=PADDING) for i in range(MESSAGES)]
        sender = bus.sender()
        got: dict[Receiver, list[str]] = {app.receiver: [] for app in readers}
        for start in range(0, MESSAGES, CHUNK):
            for message in sent[start : start + CHUNK]:
                sender.send(message)
            for reader, ids in _read_all(list(got), CHUNK, timeout=20).items():
                got[reader].extend(ids)

        expected = [message.id for message in sent]
        for reader, ids in got.items():
            assert ids == expected, f"{reader.p2p_topic[:4]}…: got {len(ids)} of {MESSAGES} or out of order"

        if bus.bus is not None:
            wait_until(lambda: bus.metric(DROPPED, plugin="zmq") > 0, 10, what="drops for the stuck app")
            stuck_sub = bus.app.subscriptions.get(stuck.p2p_topic)
            assert len(stuck_sub.pending) <= BUFFER
            assert stuck_sub.dropped > 0
            assert all(bus.app.subscriptions.get(app.p2p_topic).dropped == 0 for app in readers)
            assert bus.metric(DROPPED, plugin="zmq") == stuck_sub.dropped
        else:
            bus.process.wait_for_log("is not keeping up: dropped", 15)
