"""The ZeroMQ app plugin: manage, pub and sub endpoints as the original Threat Bus serves them."""

from __future__ import annotations

import logging
import queue
from typing import Any

import zmq

import threatbus
from threatbus.app_plugin import AppPlugin, AppRuntime
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
from threatbus.routing import Sink
from threatbus_zmq.manage import ManageWorker
from threatbus_zmq.pub import PublisherWorker
from threatbus_zmq.settings import ENDPOINTS, NAME, PREFIX, ZmqSettings, validators
from threatbus_zmq.sub import ReceiverWorker
from threatbus_zmq.subscribers import Subscriptions

logger = logging.getLogger(__name__)

# Frames from apps queued inside ZeroMQ before the sending app's own socket holds them back.
RECEIVE_HWM = 100_000


class ZmqApp(AppPlugin):
    """Serves apps over ZeroMQ. All state of the plugin lives in this object."""

    def __init__(self) -> None:
        super().__init__()
        self.context: zmq.Context | None = None
        self.subscriptions: Subscriptions | None = None

    def validators(self) -> list[Any]:
        return validators()

    def start(self, runtime: AppRuntime) -> None:
        settings = ZmqSettings.from_config(runtime.config)
        ready: queue.SimpleQueue = queue.SimpleQueue()
        self.subscriptions = Subscriptions(runtime.subscribe, runtime.unsubscribe, ready, settings)
        self.context = zmq.Context()
        sockets = {
            "manage": self.context.socket(zmq.REP),
            "pub": self.context.socket(zmq.XPUB),
            "sub": self.context.socket(zmq.SUB),
        }
        # The workers own the sockets from here on: stop() releases them, even when a bind below fails.
        manage = ManageWorker(sockets["manage"], self.subscriptions, settings)
        publisher = PublisherWorker(sockets["pub"], self.subscriptions, ready)
        receiver = ReceiverWorker(sockets["sub"], runtime.publish_queue, runtime.backlog)
        runtime.add_workers(publisher, receiver, manage)
        sockets["pub"].setsockopt(zmq.XPUB_NODROP, 1)
        sockets["pub"].setsockopt(zmq.XPUB_MANUAL, 1)
        sockets["pub"].setsockopt(zmq.SNDHWM, settings.send_hwm)
        sockets["sub"].setsockopt(zmq.RCVHWM, RECEIVE_HWM)
        # ZeroMQ disconnects a peer that sends more than this, before the bus allocates it.
        sockets["sub"].setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE_BYTES + 1024)
        # Only a hard cap on memory: requests over manage.MAX_REQUEST_BYTES are received and answered with an error.
        sockets["manage"].setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE_BYTES)
        sockets["sub"].setsockopt(zmq.SUBSCRIBE, b"")  # everything: invalid input is logged, not ignored
        for name in ENDPOINTS:
            sock = sockets[name]
            sock.setsockopt(zmq.LINGER, 0)
            if settings.ipv6:
                sock.setsockopt(zmq.IPV6, 1)
            try:
                sock.bind(settings.endpoint(name))
            except zmq.ZMQError as err:
                raise PluginError(
                    f"{PREFIX}: cannot bind the {name} socket to {settings.endpoint(name)}: {err}"
                ) from err
        self._register_metrics(runtime.metrics, manage, publisher, receiver)
        logger.info(
            "ZeroMQ app plugin on node '%s': manage %s, pub %s, sub %s",
            runtime.node.name,
            *(settings.endpoint(name) for name in ENDPOINTS),
        )

    def _register_metrics(
        self, metrics: Metrics, manage: ManageWorker, publisher: PublisherWorker, receiver: ReceiverWorker
    ) -> None:
        subs = self.subscriptions
        assert subs is not None
        metrics.counter(APP_RECEIVED, lambda: receiver.received, plugin=NAME)
        metrics.gauge(QUEUE_DEPTH, lambda: len(receiver.held), queue=f"{NAME}-held")
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

    def release(self, stuck: list[str]) -> None:
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
