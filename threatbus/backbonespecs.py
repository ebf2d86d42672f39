"""Hook specifications of backbone plugins (project ``threatbus.backbone``).

A backbone carries every message that apps publish to every subscriber:
``inmem`` within one process, ``rabbitmq`` across nodes. Its entry point in
the group ``threatbus.backbone`` names a class (or factory) that the core
calls without arguments; the object holds the backbone's state and
implements the hooks below, marked with ``@threatbus.backbone``. Exactly one
backbone runs per node. Hooks are called with keyword arguments.

Threads: ``config_validators``, ``run``, ``stop`` and ``dead_letter_admin``
are called from the main thread; ``subscribe`` and ``unsubscribe`` from any thread (app workers
subscribe when their clients ask), so they must be thread-safe; ``history``
from the core's log answerer thread.
"""

from __future__ import annotations

import queue
from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Any

import pluggy
from dynaconf import Validator

from threatbus.data import Message
from threatbus.deadletters import DeadLetters
from threatbus.history import LogEntry
from threatbus.metrics import Metrics
from threatbus.node import Node
from threatbus.routing import Sink

hookspec = pluggy.HookspecMarker("threatbus.backbone")


@hookspec
def config_validators() -> Sequence[Validator]:
    """Return the dynaconf validators of this backbone's config section.

    Called once at start-up, before ``run``, also by ``threatbus check``.
    Validator names are full dotted paths, e.g. ``plugins.backbones.rabbitmq.host``.
    """


@hookspec
def run(
    config: Any,
    publish_queue: queue.SimpleQueue[Message],
    node: Node,
    metrics: Metrics,
    inq: queue.SimpleQueue[Message],
) -> None:
    """Start the backbone. Called once, before any app starts.

    :param config: this backbone's validated section ``plugins.backbones.<name>``.
    :param publish_queue: the messages the apps of this node publish (the
        queue apps get as ``publish_queue`` in their ``run``). The backbone
        consumes it and delivers each message to every subscriber whose topic
        prefix matches, on this node and (for distributed backbones) on all
        others. Use ``threatbus.routing.TopicRouter`` for local delivery.
        It is a ``queue.SimpleQueue`` (fast hand-over, no ``task_done``):
        use ``get(timeout=...)``, ``get_nowait()`` or ``StoppableWorker.drain``.
    :param inq: the same queue under its former name, for backbones written
        before it was called ``publish_queue``.
    :param node: the identity of this bus node.
    :param metrics: register read-outs of the backbone's counters here
        (``BACKBONE_PUBLISHED``, ``BACKBONE_CONSUMED``, ``BACKBONE_REJECTED``,
        ``DELIVERED``, ``DROPPED``, ``BACKBONE_CONNECTED`` of
        ``threatbus.metrics``) with label ``backbone=<name>``.

    Must not block: start ``StoppableWorker`` threads and return. Raise
    ``threatbus.errors.PluginError`` if the backbone cannot start at all
    (a broker that is down is not such a case: log and keep retrying).
    """


@hookspec
def stop() -> None:
    """Stop the backbone's threads. Called once at shutdown, after the apps stopped.

    Messages already taken from ``publish_queue`` should be delivered or handed to the
    broker before returning; return within a few seconds all the same.
    """


@hookspec
def subscribe(topic: str, queue: Sink) -> None:
    """Deliver every message whose topic starts with ``topic`` into ``queue``.

    Delivery must never block the backbone: use ``queue.put_nowait`` and
    count what a full queue loses (``TopicRouter`` does).

    :param topic: a topic prefix, e.g. ``stix2/indicator``.
    :param queue: the subscriber, any object with ``put_nowait`` (``routing.Sink``).
    """


@hookspec
def unsubscribe(topic: str, queue: Sink) -> None:
    """End a subscription made with ``subscribe``; unknown ones are ignored.

    :param topic: the topic prefix given to ``subscribe``.
    :param queue: the subscriber given to ``subscribe``.
    """


@hookspec(firstresult=True)
def health() -> dict[str, Any]:
    """Report the backbone's state, e.g. ``{"connected": True}``.

    ``firstresult``: exactly one backbone runs, its answer is the node's.
    ``/health`` answers 200 while ``connected`` is true and ``blocked`` (the
    broker's flow control holds back publishing) is not, else 503.

    Called from any thread (the health endpoint); must be cheap and must not
    touch sockets owned by other threads.
    """


@hookspec(firstresult=True)
def dead_letters() -> DeadLetters | None:
    """The dead letters the running backbone keeps in this node's memory, or None.

    Called after ``run``, from the HTTP endpoint's threads (``GET /dlq`` ...,
    see ``threatbus.observability``), so the store must be thread-safe.
    Backbones that keep dead letters elsewhere (a broker queue) return None.
    """


@hookspec(firstresult=True)
def dead_letter_admin(config: Any, node: Node, http_url: str | None) -> DeadLetters:
    """A ``threatbus.deadletters.DeadLetters`` store for the ``threatbus dlq`` command.

    Called in the command's own process, never in a running node: ``run`` is
    not called first. ``config`` is this backbone's validated section,
    ``node`` the identity of the node the config file describes (the same
    as the node process has), ``http_url`` that node's HTTP endpoint
    (``http://host:port``) or None when ``http.port`` is not configured.
    The store may connect lazily; the command calls its ``close()`` at the
    end. Raise ``ConfigError`` when the dead letters cannot be reached with
    this config (e.g. in node memory, but no HTTP endpoint configured).

    :param config: this backbone's validated config section.
    :param node: the node the config file describes.
    :param http_url: that node's HTTP endpoint, or None.
    """


@hookspec(firstresult=True)
def history(since: datetime, until: datetime) -> Iterable[LogEntry] | None:
    """The messages the bus carried from ``since`` to ``until``, oldest first, from the backbone's intel log.

    Called from the core's log answerer thread when an app of this node
    subscribes with a snapshot; the core folds the entries to the current
    intel (``threatbus.history.fold``) and hands it to the requester only.
    May block while the log is read; the iterable ends at the first entry
    after ``until`` or when the log holds nothing newer, and soon after
    ``stop``. Each entry is ``(when, message)``: ``when`` is the time the log
    took the message, in epoch seconds; entries a little before ``since``
    are allowed (the core filters them). ``message`` is a ``Message`` or,
    cheaper, its JSON text as the log holds it (bytes): the core parses and
    checks only what it needs, and sends the text on as it is. Only
    indicators and sightings count; anything else is left out (text that is
    no message at all is counted and logged). Return None when the backbone
    keeps no log (``history.enabled: false``, or the broker cannot keep one).

    :param since: the start of the period asked for (aware UTC).
    :param until: the end of the period: the time of the request.
    """
