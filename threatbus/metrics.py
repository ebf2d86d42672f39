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
APP_RECEIVED = "threatbus_app_received"  # counter{plugin}: messages apps gave this node
APP_REJECTED = "threatbus_app_rejected"  # counter{plugin}: input rejected as invalid
EXPIRED_ON_ENTRY = "threatbus_expired_on_entry"  # counter{plugin}: indicators past valid_until when they came in
EXPIRY_REMOVALS = "threatbus_expiry_removals"  # counter: removals handed to local subscribers at valid_until
EXPIRY_SCHEDULED = "threatbus_expiry_scheduled"  # gauge: indicators waiting for their valid_until
BACKBONE_PUBLISHED = "threatbus_backbone_published"  # counter{backbone}
BACKBONE_CONSUMED = "threatbus_backbone_consumed"  # counter{backbone}
BACKBONE_REJECTED = "threatbus_backbone_rejected"  # counter{backbone}: poison messages
DELIVERED = "threatbus_delivered"  # counter{plugin}: handed to subscribers
DROPPED = "threatbus_dropped"  # counter{where}: lost to full buffers
FILTERED = "threatbus_filtered"  # counter{plugin,rule,reason}: held back by a policy filter (threatbus.policy)
SUBSCRIBERS = "threatbus_subscribers"  # gauge{plugin}
QUEUE_DEPTH = "threatbus_queue_depth"  # gauge{queue}
BACKBONE_CONNECTED = "threatbus_backbone_connected"  # gauge{backbone}: 1 up, 0 down


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

    def counter(self, name: str, documentation: str, read: Callable[[], float], **labels: str) -> None:
        """Expose a monotonically growing number that ``read()`` returns."""
        self._add("counter", name, documentation, read, labels)

    def gauge(self, name: str, documentation: str, read: Callable[[], float], **labels: str) -> None:
        """Expose a number that goes up and down."""
        self._add("gauge", name, documentation, read, labels)

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
