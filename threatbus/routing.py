"""Topic subscriptions with prefix semantics, shared by every backbone."""

from __future__ import annotations

import logging
import queue
import threading
from collections import defaultdict
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Protocol

import threatbus
from threatbus.data import TOPICS, Indicator, Message
from threatbus.delivery import Receipt
from threatbus.lifecycle import as_removal
from threatbus.metrics import Metrics
from threatbus.policy import Filter, FilterStats
from threatbus.ratelimit import RateLimitedLog

if TYPE_CHECKING:
    from threatbus.expiry import ExpirySchedule

logger = logging.getLogger(__name__)


class Sink(Protocol):
    """Anything messages can be handed to without blocking: ``queue.Queue`` and friends."""

    def put_nowait(self, item: Any) -> None: ...


class TopicRouter:
    """Maps topic prefixes to subscriber queues and hands messages to them.

    A subscription to ``stix2`` receives ``stix2/indicator`` and
    ``stix2/sighting``. A queue subscribed with overlapping prefixes gets each
    message once. ``route`` never blocks: a full subscriber queue loses the
    message, which is counted in ``dropped`` and logged.

    A revoked indicator is handed over with ``x_threatbus_update: REMOVE``
    added, so that every removal apps get says so. With ``expiry`` set (the
    bus does it), every indicator handed over is also taken into that
    schedule, which later hands the same subscribers its removal through
    ``deliver_to``.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._subscriptions: dict[str, list[Sink]] = defaultdict(list)
        # Recomputed on every (un)subscribe so that route() is one dict lookup.
        self._targets: dict[str, tuple[Sink, ...]] = {}
        self.delivered = 0
        self.dropped = 0
        self._log_drop = RateLimitedLog(logger)
        self.expiry: ExpirySchedule | None = None
        # Called with a message some subscriber could not take, and why, in the thread that routed it
        # (the backbone's, or the expiry's for removals at expiry): backbones dead-letter it there.
        self.on_drop: Callable[[Message, str], None] | None = None

    def subscribe(self, topic: str, sink: Sink) -> None:
        with self._lock:
            subscribers = self._subscriptions[topic]
            if not any(existing is sink for existing in subscribers):
                subscribers.append(sink)
            self._recompute()

    def unsubscribe(self, topic: str, sink: Sink) -> bool:
        """Remove one subscription; False if it did not exist."""
        with self._lock:
            subscribers = self._subscriptions.get(topic, [])
            remaining = [existing for existing in subscribers if existing is not sink]
            if len(remaining) == len(subscribers):
                return False
            if remaining:
                self._subscriptions[topic] = remaining
            else:
                del self._subscriptions[topic]
            self._recompute()
            return True

    def _recompute(self) -> None:
        targets = {}
        for topic in TOPICS:
            seen: dict[int, Sink] = {}
            for prefix, subscribers in self._subscriptions.items():
                if topic.startswith(prefix):
                    for sink in subscribers:
                        seen.setdefault(id(sink), sink)
            targets[topic] = tuple(seen.values())
        self._targets = targets

    def subscribers(self, topic: str) -> tuple[Sink, ...]:
        """The queues that receive messages of ``topic``."""
        return self._targets.get(topic, ())

    @property
    def subscription_count(self) -> int:
        with self._lock:
            return sum(len(subscribers) for subscribers in self._subscriptions.values())

    def route(self, message: Message, receipt: Receipt | None = None) -> int:
        """Hand ``message`` to every subscriber of its topic; returns how many got it.

        With ``receipt``, sinks that track deliveries (``put_tracked``, see
        ``threatbus.delivery``) take it along and each calls ``receipt.done()``
        once its app is done with the message.
        """
        targets = self._targets.get(message.topic, ())
        if type(message) is Indicator:
            if message.payload.get("revoked") is True:
                # Apps written for the original drop an indicator on REMOVE only.
                message = Indicator(as_removal(message.payload))
            if self.expiry is not None:
                return self.expiry.route(self._hand, message, targets, receipt)
        return self._hand(message, targets, receipt)

    def deliver_to(self, message: Message, sinks: tuple[Sink, ...]) -> int:
        """Hand ``message`` to those of ``sinks`` still subscribed to its topic (removals at expiry)."""
        current = self._targets.get(message.topic, ())
        return self._hand(message, tuple(sink for sink in sinks if sink in current))

    def _hand(self, message: Message, targets: tuple[Sink, ...], receipt: Receipt | None = None) -> int:
        handed = full = 0
        tracking = None
        if receipt is not None:
            tracking = [getattr(sink, "put_tracked", None) for sink in targets]
            expected = len(tracking) - tracking.count(None)
            if expected:
                receipt.expect(expected)  # all before the first hand-over: an app may be done before the next gets it
        for index, sink in enumerate(targets):
            try:
                track = tracking[index] if tracking is not None else None
                if track is None:
                    sink.put_nowait(message)
                else:
                    try:
                        track(message, receipt)
                    except BaseException:
                        receipt.done()  # type: ignore[union-attr]  # not taken: the sink will not call done
                        raise
                handed += 1
            except queue.Full:
                full += 1
                self._log_drop("subscriber queue full, dropped %s %s", message.type_name, _message_ref(message))
        self.delivered += handed
        if full:
            self.dropped += full
            if self.on_drop is not None:
                self.on_drop(message, f"{full} local subscriber queue(s) full")
        return handed


class RoutedBackbone:
    """Mixin for backbones: the ``subscribe`` and ``unsubscribe`` hooks on ``self.router``, and the node's policy.

    The backbone creates ``self.router = TopicRouter()`` and calls
    ``self.router.route(message)`` for every message it delivers locally.

    A backbone that carries messages between nodes calls ``configure_policy``
    in ``run``, then ``exporting(message)`` before a message of its apps
    leaves the node and ``importing(message)`` before it delivers a message
    that came from another node (``plugins.backbones.<name>.export.filter``
    and ``.import.filter``, see ``threatbus.policy``).
    """

    router: TopicRouter
    export_filter: Filter | None = None
    import_filter: Filter | None = None
    export_stats: FilterStats | None = None
    import_stats: FilterStats | None = None

    @threatbus.backbone
    def subscribe(self, topic: str, queue: Sink) -> None:
        self.router.subscribe(topic, queue)

    @threatbus.backbone
    def unsubscribe(self, topic: str, queue: Sink) -> None:
        self.router.unsubscribe(topic, queue)

    def configure_policy(self, name: str, config: Any, metrics: Metrics) -> None:
        """Compile the export and import filters of ``config`` (the bus validated them) and count what they hold."""
        for direction in ("export", "import"):
            section = config.get(direction) if isinstance(config, Mapping) else None
            compiled = Filter.from_config(section, f"plugins.backbones.{name}.{direction}")
            if compiled is None:
                continue
            stats = FilterStats()
            stats.register(metrics, plugin=name, rule=direction)
            setattr(self, f"{direction}_filter", compiled)
            setattr(self, f"{direction}_stats", stats)
            logger.info("%s: %s filter %s", name, direction, compiled.spec)

    def exporting(self, message: Message) -> bool:
        """True when ``message`` from this node's apps may leave the node.

        What the export filter holds back is handed to the local subscribers
        here and now: the node's own apps still get it.
        """
        reason = self.export_filter.check(message) if self.export_filter is not None else None
        if reason is None:
            return True
        self.export_stats.held(reason)  # type: ignore[union-attr]
        self.router.route(message)
        return False

    def importing(self, message: Message) -> bool:
        """True when ``message`` from another node may be delivered on this one."""
        reason = self.import_filter.check(message) if self.import_filter is not None else None
        if reason is None:
            return True
        self.import_stats.held(reason)  # type: ignore[union-attr]
        return False


def _message_ref(message: Message) -> str:
    return str(message.payload.get("id") or message.payload.get("snapshot_id") or "")
