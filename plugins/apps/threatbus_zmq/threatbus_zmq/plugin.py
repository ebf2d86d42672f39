"""The ZeroMQ app plugin: manage, pub and sub endpoints as the original Threat Bus serves them."""

from __future__ import annotations

import logging
import queue
from typing import Any

import zmq

import threatbus
from threatbus.config import count, option, port, seconds
from threatbus.data import MAX_MESSAGE_BYTES, Message, SnapshotRequest
from threatbus.errors import PluginError
from threatbus.metrics import (
    APP_RECEIVED,
    APP_REJECTED,
    DELIVERED,
    DROPPED,
    EXPIRED_ON_ENTRY,
    QUEUE_DEPTH,
    SUBSCRIBERS,
    Metrics,
)
from threatbus.node import Node
from threatbus.routing import Sink
from threatbus.worker import stop_workers
from threatbus_zmq.manage import ManageWorker
from threatbus_zmq.pub import PublisherWorker
from threatbus_zmq.sub import ReceiverWorker
from threatbus_zmq.subscribers import Subscriptions

logger = logging.getLogger(__name__)

NAME = "zmq"
PREFIX = f"plugins.apps.{NAME}"
# Frames queued towards one app inside ZeroMQ before the bus buffers (and, when full, drops) for it.
DEFAULT_SEND_HWM = 1000
# Frames from apps queued inside ZeroMQ before the sending app's own socket holds them back.
RECEIVE_HWM = 100_000


def endpoint(host: str, port_number: int) -> str:
    """A tcp endpoint; IPv6 addresses get brackets."""
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"tcp://{host}:{port_number}"


class ZmqApp:
    """Serves apps over ZeroMQ. All state of the plugin lives in this object."""

    def __init__(self) -> None:
        self.context: zmq.Context | None = None
        self.subscriptions: Subscriptions | None = None
        self.manage: ManageWorker | None = None
        self.publisher: PublisherWorker | None = None
        self.receiver: ReceiverWorker | None = None
        self.endpoints: dict[str, str] = {}

    @threatbus.app
    def config_validators(self) -> list[Any]:
        return [
            option(f"{PREFIX}.host", str, default="127.0.0.1", check=bool, expected="a host name or IP address"),
            port(f"{PREFIX}.manage", default=13370),
            port(f"{PREFIX}.pub", default=13371),
            port(f"{PREFIX}.sub", default=13372),
            seconds(
                f"{PREFIX}.heartbeat_timeout",
                default=120,
                exclusive=False,
                expected="a number of seconds >= 0 (0 disables expiry)",
            ),
            count(f"{PREFIX}.buffer_size", default=10_000, expected="a positive number of messages"),
            count(f"{PREFIX}.send_hwm", default=DEFAULT_SEND_HWM, expected="a positive number of frames"),
            count(f"{PREFIX}.max_subscribers", default=1000, expected="a positive number"),
        ]

    @threatbus.app
    def run(
        self,
        config: Any,
        publish_queue: queue.SimpleQueue[Message],
        subscribe: Any,
        unsubscribe: Any,
        node: Node,
        metrics: Metrics,
    ) -> None:
        host = config["host"]
        ports = {"manage": config["manage"], "pub": config["pub"], "sub": config["sub"]}
        if len(set(ports.values())) != 3:
            raise PluginError(f"{PREFIX}: manage, pub and sub need three different ports, got {ports}")
        ready: queue.SimpleQueue = queue.SimpleQueue()
        self.subscriptions = Subscriptions(
            subscribe,
            unsubscribe,
            ready,
            buffer_size=config["buffer_size"],
            max_subscribers=config["max_subscribers"],
            heartbeat_timeout=float(config["heartbeat_timeout"]),
        )
        self.context = zmq.Context()
        sockets = {
            "manage": self.context.socket(zmq.REP),
            "pub": self.context.socket(zmq.XPUB),
            "sub": self.context.socket(zmq.SUB),
        }
        sockets["pub"].setsockopt(zmq.XPUB_NODROP, 1)
        sockets["pub"].setsockopt(zmq.XPUB_MANUAL, 1)
        sockets["pub"].setsockopt(zmq.SNDHWM, config["send_hwm"])
        sockets["sub"].setsockopt(zmq.RCVHWM, RECEIVE_HWM)
        # ZeroMQ disconnects a peer that sends more than this, before the bus allocates it.
        sockets["sub"].setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE_BYTES + 1024)
        # Only a hard cap on memory: requests over manage.MAX_REQUEST_BYTES are received and answered with an error.
        sockets["manage"].setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE_BYTES)
        sockets["sub"].setsockopt(zmq.SUBSCRIBE, b"")  # everything: invalid input is logged, not ignored
        try:
            for name, sock in sockets.items():
                sock.setsockopt(zmq.LINGER, 0)
                if ":" in host:
                    sock.setsockopt(zmq.IPV6, 1)
                self.endpoints[name] = endpoint(host, ports[name])
                sock.bind(self.endpoints[name])
        except zmq.ZMQError as err:
            for sock in sockets.values():
                sock.close(linger=0)
            self.context.term()
            self.context = None
            raise PluginError(f"{PREFIX}: cannot bind the {name} socket to {self.endpoints[name]}: {err}") from err

        self.manage = ManageWorker(sockets["manage"], self.subscriptions, ports["pub"], ports["sub"])
        self.publisher = PublisherWorker(sockets["pub"], self.subscriptions, ready)
        self.receiver = ReceiverWorker(sockets["sub"], publish_queue)
        self._register_metrics(metrics)
        for worker in (self.publisher, self.receiver, self.manage):
            worker.start()
        logger.info(
            "ZeroMQ app plugin on node '%s': manage %s, pub %s, sub %s",
            node.name,
            self.endpoints["manage"],
            self.endpoints["pub"],
            self.endpoints["sub"],
        )

    def _register_metrics(self, metrics: Metrics) -> None:
        subs, receiver, manage, publisher = self.subscriptions, self.receiver, self.manage, self.publisher
        assert subs is not None and receiver is not None and manage is not None and publisher is not None
        metrics.counter(APP_RECEIVED, lambda: receiver.received, plugin=NAME)
        metrics.counter(APP_REJECTED, lambda: receiver.rejected, plugin=NAME, endpoint="sub")
        metrics.counter(APP_REJECTED, lambda: manage.rejected, plugin=NAME, endpoint="manage")
        metrics.counter(EXPIRED_ON_ENTRY, lambda: receiver.expired, plugin=NAME)
        # Manage requests over 64 KiB, answered with an error.
        metrics.counter(DROPPED, lambda: manage.oversized, where="zmq-manage-oversized", plugin=NAME)
        metrics.counter(DELIVERED, lambda: publisher.delivered, plugin=NAME)
        metrics.counter(DROPPED, subs.dropped, where=NAME, plugin=NAME)
        metrics.gauge(SUBSCRIBERS, lambda: len(subs), plugin=NAME)
        subs.filtered.register(metrics, plugin=NAME, rule="client")
        metrics.gauge(QUEUE_DEPTH, subs.buffered, queue="zmq-subscribers")

    @threatbus.app
    def stop(self) -> None:
        workers = [w for w in (self.manage, self.receiver, self.publisher) if w is not None]
        stuck = stop_workers(workers, timeout=5.0)
        if self.subscriptions is not None:
            self.subscriptions.close_all()
        if self.context is not None:
            if stuck:
                logger.warning("not terminating the ZeroMQ context: %s still running", ", ".join(stuck))
            else:
                self.context.term()
            self.context = None
        logger.info("ZeroMQ app plugin stopped")

    @threatbus.app
    def snapshot(
        self, snapshot_request: SnapshotRequest, result_queue: queue.SimpleQueue[Message], requester: Sink | None
    ) -> None:
        # The apps answer on the sub socket; their envelopes go to the bus from there.
        if self.subscriptions is not None:
            self.subscriptions.forward_request(snapshot_request, requester)
