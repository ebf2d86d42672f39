"""The lifecycle app plugins share: the ``config_validators``, ``run`` and ``stop`` hooks, written once.

An app subclasses ``AppPlugin`` and implements ``validators`` and ``start``.
``start`` builds the app's workers and subscriptions through the
``AppRuntime`` it gets; the base class starts the workers once ``start``
returned, and ``stop`` undoes exactly what was built: it unsubscribes, stops
the workers (releasing those that never started, when ``start`` failed half
way) and then calls ``release`` for what the workers do not own.
"""

from __future__ import annotations

import logging
import queue
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from dynaconf import Validator

import threatbus
from threatbus.appspecs import SubscribeCallback, UnsubscribeCallback
from threatbus.backlog import Backlog
from threatbus.data import Message
from threatbus.metrics import Metrics
from threatbus.node import Node
from threatbus.routing import Sink
from threatbus.worker import StoppableWorker, stop_workers

logger = logging.getLogger(__name__)


@dataclass
class AppRuntime:
    """One run of an app: what the bus gave its ``run`` hook, and what the app built from it.

    The first fields are the ``run`` hook's parameters (``threatbus.appspecs.run``);
    ``subscribe`` and ``unsubscribe`` are the bus's own, for apps that manage
    subscriptions themselves. ``subscribe_until_stop`` and ``add_workers``
    record what ``stop`` must undo.
    """

    config: Any
    publish_queue: queue.SimpleQueue[Message]
    subscribe: SubscribeCallback
    unsubscribe: UnsubscribeCallback
    node: Node
    metrics: Metrics
    backlog: Backlog
    workers: list[StoppableWorker] = field(default_factory=list)
    subscriptions: list[tuple[str, Sink]] = field(default_factory=list)

    def subscribe_until_stop(self, topic: str, sink: Sink, snapshot: timedelta = timedelta(0)) -> list[str]:
        """``subscribe(topic, sink, snapshot)``, ended by ``stop``; returns the snapshot request ids."""
        # Recorded first: a subscribe that fails half way (its snapshot request, say) is undone too.
        self.subscriptions.append((topic, sink))
        return self.subscribe(topic, sink, snapshot)

    def add_workers(self, *workers: StoppableWorker) -> None:
        """Workers to start after ``start`` (in this order) and to stop with the app.

        Add a worker as soon as it is built: if ``start`` fails later, ``stop``
        still releases what it owns.
        """
        self.workers.extend(workers)

    def start_workers(self) -> None:
        for worker in self.workers:
            worker.start()

    def stop(self, timeout: float) -> list[str]:
        """Unsubscribe, then stop the workers; returns the names of those still running after ``timeout``."""
        while self.subscriptions:
            topic, sink = self.subscriptions.pop()
            try:
                self.unsubscribe(topic, sink)
            except Exception:  # the workers must stop all the same
                logger.exception("unsubscribing from %s failed", topic)
        return stop_workers(self.workers, timeout=timeout)


class AppPlugin:
    """Base class of app plugins; see the module docstring.

    ``stop_timeout`` bounds how long ``stop`` waits for the workers; an app
    whose worker may be inside a blocking call (an HTTP request, a socket
    command) sets it above that call's timeout.
    """

    stop_timeout = 5.0

    def __init__(self) -> None:
        self.runtime: AppRuntime | None = None

    @property
    def workers(self) -> list[StoppableWorker]:
        """The workers of the current (or last) run, in start order."""
        return list(self.runtime.workers) if self.runtime is not None else []

    # ---- what an app implements ------------------------------------------

    def validators(self) -> Sequence[Validator]:
        """The validators of the app's section, with its defaults (``config_validators``)."""
        raise NotImplementedError

    def start(self, runtime: AppRuntime) -> None:
        """Build the workers (``runtime.add_workers``), subscribe, register metrics; must not block.

        Raise ``threatbus.errors.PluginError`` when the app cannot start.
        """
        raise NotImplementedError

    def release(self, stuck: list[str]) -> None:
        """Release what the workers do not own (sockets, contexts), after they stopped.

        ``stuck`` names the workers still running: they may still use it.
        """

    # ---- the hooks -------------------------------------------------------

    @threatbus.app
    def config_validators(self) -> Sequence[Validator]:
        return self.validators()

    @threatbus.app
    def run(self, config, publish_queue, subscribe, unsubscribe, node, metrics, backlog) -> None:  # appspecs.run
        self.runtime = AppRuntime(config, publish_queue, subscribe, unsubscribe, node, metrics, backlog)
        self.start(self.runtime)
        self.runtime.start_workers()

    @threatbus.app
    def stop(self) -> None:
        # Also called after a failed run: the runtime holds whatever was built by then.
        stuck = self.runtime.stop(self.stop_timeout) if self.runtime is not None else []
        self.release(stuck)


__all__ = ["AppPlugin", "AppRuntime"]
