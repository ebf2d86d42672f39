"""Per-node metrics in the Prometheus text format.

Plugins keep plain integer counters in their own state (cheap on the hot
path, no locks) and register read-outs here; values are read when scraped.
Every series carries the node name as label ``node``.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

# The names every plugin uses for the same facts, so dashboards work across plugins.
APP_RECEIVED = "threatbus_app_received"  # counter{plugin}
APP_REJECTED = "threatbus_app_rejected"  # counter{plugin}
EXPIRED_ON_ENTRY = "threatbus_expired_on_entry"  # counter{plugin}
EXPIRY_REMOVALS = "threatbus_expiry_removals"  # counter
EXPIRY_SCHEDULED = "threatbus_expiry_scheduled"  # gauge
BACKBONE_PUBLISHED = "threatbus_backbone_published"  # counter{backbone}
BACKBONE_CONSUMED = "threatbus_backbone_consumed"  # counter{backbone}
BACKBONE_REJECTED = "threatbus_backbone_rejected"  # counter{backbone}
DELIVERED = "threatbus_delivered"  # counter{plugin}
DROPPED = "threatbus_dropped"  # counter{where}
FILTERED = "threatbus_filtered"  # counter{plugin,rule,reason}: held back by a policy filter (threatbus.policy)
SUBSCRIBERS = "threatbus_subscribers"  # gauge{plugin}
QUEUE_DEPTH = "threatbus_queue_depth"  # gauge{queue}
BACKBONE_CONNECTED = "threatbus_backbone_connected"  # gauge{backbone}

# Their help texts, beside the names: one text per name whichever plugin registers it first.
HELP = {
    APP_RECEIVED: "Messages apps gave this node",
    APP_REJECTED: "Input rejected as invalid",
    EXPIRED_ON_ENTRY: "Indicators past valid_until on entry, dropped",
    EXPIRY_REMOVALS: "Removals handed to local subscribers at valid_until",
    EXPIRY_SCHEDULED: "Indicators waiting for their valid_until",
    BACKBONE_PUBLISHED: "Messages confirmed by the broker",
    BACKBONE_CONSUMED: "Messages consumed from the broker",
    BACKBONE_REJECTED: "Invalid messages rejected (poison messages)",
    DELIVERED: "Messages handed to local subscribers",
    DROPPED: "Messages lost to full queues or buffers",
    SUBSCRIBERS: "Subscribed apps",
    QUEUE_DEPTH: "Messages waiting in a queue of the node",
    BACKBONE_CONNECTED: "1 while the backbone is connected, else 0",
    FILTERED: "Messages a policy filter held back",
}

Reader = Callable[[], float]


def _help_and_reader(name: str, args: tuple[str | Reader, ...]) -> tuple[str, Reader]:
    # (read) for the names in HELP; (documentation, read) for a plugin's own names.
    if len(args) == 1 and callable(args[0]) and name in HELP:
        return HELP[name], args[0]
    if len(args) == 2 and isinstance(args[0], str) and callable(args[1]):
        return HELP.get(name, args[0]), args[1]
    raise TypeError(f"metric {name}: pass read, or documentation and read (only names in metrics.HELP have a text)")


@dataclass
class _Series:
    kind: str  # "counter" or "gauge"
    documentation: str
    readers: list[tuple[dict[str, str], Callable[[], float]]] = field(default_factory=list)


class Metrics(Collector):
    """The metrics of one node, in a registry of its own (tests run many nodes)."""

    def __init__(self, node_name: str) -> None:
        self.node_name = node_name
        self._lock = threading.Lock()
        self._series: dict[str, _Series] = {}
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self)

    def counter(self, name: str, *args: str | Reader, **labels: str) -> None:
        """Expose a monotonically growing number that ``read()`` returns.

        ``counter(NAME, read, **labels)`` for the shared names (help text from
        ``HELP``); ``counter(name, documentation, read, **labels)`` for a
        plugin's own names.
        """
        self._add("counter", name, *_help_and_reader(name, args), labels)

    def gauge(self, name: str, *args: str | Reader, **labels: str) -> None:
        """Expose a number that goes up and down (arguments as for ``counter``)."""
        self._add("gauge", name, *_help_and_reader(name, args), labels)

    def _add(self, kind: str, name: str, documentation: str, read: Callable[[], float], labels: dict[str, str]) -> None:
        with self._lock:
            series = self._series.setdefault(name, _Series(kind, documentation))
            if series.kind != kind:
                raise ValueError(f"metric {name} is a {series.kind}, not a {kind}")
            series.readers.append(({"node": self.node_name, **labels}, read))

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        with self._lock:
            snapshot = {name: (s.kind, s.documentation, list(s.readers)) for name, s in self._series.items()}
        for name, (kind, documentation, readers) in sorted(snapshot.items()):
            label_names = sorted({key for labels, _ in readers for key in labels})
            family_type = CounterMetricFamily if kind == "counter" else GaugeMetricFamily
            family = family_type(name, documentation, labels=label_names)
            for labels, read in readers:
                family.add_metric([labels.get(key, "") for key in label_names], float(read()))
            yield family

    def value(self, name: str, **labels: str) -> float:
        """The current value of one series (sum over series matching ``labels``), for tests and health."""
        with self._lock:
            readers = list(self._series[name].readers) if name in self._series else []
        return sum(read() for series_labels, read in readers if labels.items() <= series_labels.items())

    def render(self) -> bytes:
        """All metrics in the Prometheus text exposition format."""
        return generate_latest(self.registry)


@dataclass
class AppCounts:
    """The counters every app keeps, under the shared names: plain integers its workers add to.

    An app's own counters subclass it (fields with defaults follow these).
    """

    received: int = 0  # messages from the tool put on the bus (APP_RECEIVED)
    rejected: int = 0  # input from the tool rejected as invalid (APP_REJECTED)
    delivered: int = 0  # messages from the bus handed to the tool (DELIVERED)

    def register(self, metrics: Metrics, plugin: str) -> None:
        """Read-outs of the three, labelled ``plugin``."""
        metrics.counter(APP_RECEIVED, lambda: self.received, plugin=plugin)
        metrics.counter(APP_REJECTED, lambda: self.rejected, plugin=plugin)
        metrics.counter(DELIVERED, lambda: self.delivered, plugin=plugin)
