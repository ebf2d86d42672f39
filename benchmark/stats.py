"""What receivers record per run, and the figures computed from it."""

from __future__ import annotations

from array import array
from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class RunRecord:
    """Everything one receiving process saw of one run (all its subscriptions together)."""

    received: int = 0
    duplicates: int = 0
    first_sent_ns: int = 0
    first_recv_ns: int = 0
    last_recv_ns: int = 0
    latencies_ns: array = field(default_factory=lambda: array("q"))
    seen: set[int] = field(default_factory=set)

    def add(self, key: int, sent_ns: int, recv_ns: int) -> None:
        """``key`` identifies the delivery (subscription and sequence number) for duplicate detection."""
        if key in self.seen:
            self.duplicates += 1
            return
        self.seen.add(key)
        if not self.received:
            self.first_recv_ns = recv_ns
            self.first_sent_ns = sent_ns
        self.first_sent_ns = min(self.first_sent_ns, sent_ns)
        self.received += 1
        self.last_recv_ns = recv_ns
        self.latencies_ns.append(recv_ns - sent_ns)

    def export(self) -> dict[str, Any]:
        return {
            "received": self.received,
            "duplicates": self.duplicates,
            "first_sent_ns": self.first_sent_ns,
            "first_recv_ns": self.first_recv_ns,
            "last_recv_ns": self.last_recv_ns,
            "latencies_ns": self.latencies_ns.tobytes(),
        }


def merge(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Combine the exported records of several receiving processes."""
    got = [r for r in records if r["received"]]
    latencies = np.concatenate(
        [np.frombuffer(r["latencies_ns"], dtype=np.int64) for r in got] or [np.zeros(0, dtype=np.int64)]
    )
    return {
        "received": sum(r["received"] for r in records),
        "duplicates": sum(r["duplicates"] for r in records),
        "first_sent_ns": min((r["first_sent_ns"] for r in got), default=0),
        "last_recv_ns": max((r["last_recv_ns"] for r in got), default=0),
        "latencies_ns": latencies,
    }


def latency_summary(latencies_ns: np.ndarray) -> dict[str, float | None]:
    """p50/p90/p99/max in milliseconds (None without samples)."""
    if not len(latencies_ns):
        return {"p50_ms": None, "p90_ms": None, "p99_ms": None, "p999_ms": None, "max_ms": None, "mean_ms": None}
    ms = latencies_ns / 1e6
    p50, p90, p99, p999 = np.percentile(ms, [50, 90, 99, 99.9])
    return {
        "p50_ms": round(float(p50), 3),
        "p90_ms": round(float(p90), 3),
        "p99_ms": round(float(p99), 3),
        "p999_ms": round(float(p999), 3),
        "max_ms": round(float(ms.max()), 3),
        "mean_ms": round(float(ms.mean()), 3),
    }


def rate(count: int, start_ns: int, end_ns: int) -> float | None:
    if count <= 0 or end_ns <= start_ns:
        return None
    return round(count / ((end_ns - start_ns) / 1e9), 1)


def ratio(measured: float | None, reference: float | None) -> float | None:
    if measured is None or not reference:
        return None
    return round(measured / reference, 3)
