"""Hook specifications of app plugins (project ``threatbus.app``).

An app plugin connects one kind of security tool to the bus. Its entry point
in the group ``threatbus.app`` names a class (or factory) that the core calls
without arguments; the object it returns holds all of the plugin's state and
implements the hooks below, marked with ``@threatbus.app``. Hooks are called
with keyword arguments; an implementation may accept any subset of them.

Threads: every hook is called from the bus's main thread, except ``snapshot``,
which the core's snapshot worker calls. Hooks must return promptly; long work
belongs in the plugin's own ``StoppableWorker`` threads.
"""

from __future__ import annotations

import queue
from collections.abc import Callable, Sequence
from typing import Any

import pluggy
from dynaconf import Validator

from threatbus.backlog import Backlog
from threatbus.data import Message, SnapshotRequest
from threatbus.metrics import Metrics
from threatbus.node import Node
from threatbus.routing import Sink

hookspec = pluggy.HookspecMarker("threatbus.app")

SubscribeCallback = Callable[..., "list[str]"]
"""``subscribe(topic, queue, snapshot=timedelta(0), snapshot_end=False) -> [snapshot_id, ...]``"""
UnsubscribeCallback = Callable[[str, Sink], None]
"""``unsubscribe(topic, queue)``"""


@hookspec
def config_validators() -> Sequence[Validator]:
    """Return the dynaconf validators of this plugin's config section.

    Called once at start-up, before ``run``, also by ``threatbus check``.
    Validator names are full dotted paths, e.g. ``plugins.apps.zmq.manage``;
    defaults set here become part of the config passed to ``run``.
    """


@hookspec
def run(
    config: Any,
    publish_queue: queue.SimpleQueue[Message],
    subscribe: SubscribeCallback,
    unsubscribe: UnsubscribeCallback,
    node: Node,
    metrics: Metrics,
    backlog: Backlog,
) -> None:
    """Start the plugin. Called once, after the backbone started.

    :param config: this plugin's validated section ``plugins.apps.<name>``.
    :param publish_queue: put every message from the connected tool here;
        the bus hands it to the backbone, which delivers it to all
        subscribers on all nodes. It is a ``queue.SimpleQueue``: ``put()``
        never blocks. Validate STIX content first
        (``threatbus.stix.validate``): this is where intel enters the bus.
    :param subscribe: ``subscribe(topic, queue, snapshot=timedelta(0))``
        makes ``queue`` receive every message whose topic starts with
        ``topic``. A positive ``snapshot`` also asks the node's intel log
        (the backbone's ``history``) and every other app for the intel of
        that period (one request per snapshot type the topic covers); the
        answers (``SnapshotEnvelope``, each object once) arrive in the same
        queue. With ``snapshot_end=True`` a ``threatbus.snapshots.SnapshotEnd``
        follows the log's answer to each request. Returns the ids of the
        requests made, empty without snapshot.
        The queue is any object with ``put_nowait`` (``routing.Sink``); the
        backbone never blocks on it: a bounded ``queue.Queue``
        loses (and counts) what does not fit; an unbounded
        ``queue.SimpleQueue`` is the fastest hand-over; a
        ``threatbus.delivery.DeliveryQueue`` whose ``task_done()`` the app
        calls right after sending each item on lets the backbone ack a
        broker exactly then (nothing lost, nothing twice when the node is
        killed). With a policy filter
        configured for the app (``plugins.apps.<name>.filter``) only what
        passes it reaches ``queue``, snapshot answers included.
    :param unsubscribe: ``unsubscribe(topic, queue)`` ends a subscription.
    :param node: the identity of this bus node.
    :param metrics: register read-outs of the plugin's counters here, under
        the shared names of ``threatbus.metrics`` (``APP_RECEIVED``,
        ``APP_REJECTED``, ``DELIVERED``, ``DROPPED``, ``SUBSCRIBERS`` ...)
        with label ``plugin=<name>``.
    :param backlog: ``backlog()`` is the number of messages waiting in the
        node's deepest unbounded subscriber queue (``threatbus.backlog``):
        how far the slowest local app is behind. Where intel enters in bulk,
        hold it back while this is large instead of queueing decoded
        messages without limit, and lose nothing.

    Must not block: start ``StoppableWorker`` threads and return. Raise
    ``threatbus.errors.PluginError`` if the plugin cannot start.
    """


@hookspec
def stop() -> None:
    """Stop all threads of the plugin and release its sockets.

    Called once at shutdown, before the backbone stops. Returns within a few
    seconds (join workers with a timeout).
    """


@hookspec
def snapshot(
    snapshot_request: SnapshotRequest,
    result_queue: queue.SimpleQueue[Message],
    local: bool,
    requester: Sink | None,
) -> None:
    """Answer a snapshot request from another app.

    Called from the core's snapshot worker for every request on the bus, on
    every node, the requester's own plugin included.
    Put ``SnapshotEnvelope.wrap(snapshot_request, stix_object)`` for each
    matching indicator or sighting of the last ``snapshot_request.snapshot``
    into ``result_queue``; the bus routes them to the requester only. Apps
    that relay requests to external tools forward them here. Must not block:
    hand long work to the plugin's own worker.

    :param snapshot_request: what is asked for, and its ``snapshot_id``.
    :param result_queue: where the answers go (the node's publish queue).
    :param local: True if a subscriber on this node made the request.
    :param requester: the queue that made the request (as given to
        ``subscribe``) if it is on this node, else None. A plugin that serves
        several clients does not forward the request to the client whose
        queue this is.
    """


__all__ = [
    "SubscribeCallback",
    "UnsubscribeCallback",
    "config_validators",
    "run",
    "snapshot",
    "stop",
]
