"""The expiry schedule at scale, in-process: what scheduling costs, its memory, removals/s, lateness.

Three measurements on the core pieces a node runs (``TopicRouter`` with an
``ExpirySchedule``, one ``ExpiryWorker``), one subscriber:

- *schedule*: ``count`` indicators with ``valid_until`` spread over
  ``spread_s`` (an hour in the full run) are routed; the extra CPU time per
  indicator over routing without expiry, and the memory the schedule keeps
  per indicator once the messages themselves are gone (tracemalloc).
- *fire*: the same schedule fired in one go (the clock jumps past the
  hour): removals handed to the subscriber per second of CPU time.
- *lateness*: ``lateness_count`` indicators expiring over ``lateness_s`` of
  real time; for each removal, when it reached the subscriber minus its
  ``valid_until``. An hour of wall clock is too long for a benchmark, so
  this run packs the expiries tighter (a higher removal rate than the hour
  would need).
"""

from __future__ import annotations

import gc
import time
import tracemalloc
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

import numpy as np
import orjson

from threatbus.data import Message, decode
from threatbus.expiry import ExpirySchedule, ExpiryWorker
from threatbus.lifecycle import parse_timestamp
from threatbus.routing import TopicRouter
from threatbus.stix import timestamp


@dataclass(frozen=True)
class ExpiryProfile:
    count: int
    spread_s: float
    lateness_count: int
    lateness_s: float


EXPIRY_PROFILES = {
    "quick": ExpiryProfile(10_000, 3600.0, 5_000, 3.0),
    "full": ExpiryProfile(100_000, 3600.0, 100_000, 60.0),
}


class _Counting:
    """A subscriber that only counts (the router's hand-over is what is measured)."""

    def __init__(self) -> None:
        self.count = 0

    def put_nowait(self, item: Message) -> None:
        self.count += 1


class _Timing:
    """A subscriber that notes when each removal arrived."""

    def __init__(self) -> None:
        self.arrivals: list[tuple[str, float]] = []

    def put_nowait(self, item: Message) -> None:
        if item.payload.get("x_threatbus_update") == "REMOVE":
            self.arrivals.append((item.payload["id"], time.time()))


def _raw_indicators(count: int, start: float, spread_s: float, seed: str) -> list[tuple[bytes, float]]:
    """JSON texts of indicators expiring evenly over ``spread_s`` from epoch ``start``, with their expiry."""
    now = datetime.now(timezone.utc)
    created = timestamp(now - timedelta(hours=1))
    out = []
    for i in range(count):
        until_text = timestamp(datetime.fromtimestamp(start + spread_s * (i + 1) / count, timezone.utc))
        payload = {
            "type": "indicator",
            "spec_version": "2.1",
            "id": f"indicator--{uuid.uuid5(uuid.NAMESPACE_URL, f'{seed}/{i}')}",
            "created": created,
            "modified": created,
            "pattern": f"[ipv4-addr:value = '10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}']",
            "pattern_type": "stix",
            "pattern_version": "2.1",
            "valid_from": created,
            "valid_until": until_text,
        }
        out.append((orjson.dumps(payload), parse_timestamp(until_text).timestamp()))
    return out


def _route_all(router: TopicRouter, raws: list[tuple[bytes, float]]) -> float:
    """Decode and route every indicator as a backbone does; returns the seconds spent routing.

    Each text is copied first, as if it came off a socket: the schedule keeps
    it, and the memory measurement must see it.
    """
    messages = [decode(bytes(memoryview(raw))) for raw, _ in raws]
    started = time.process_time()  # CPU time: wall time on a busy 2-core machine says more about the load
    for message in messages:
        router.route(message)
    return time.process_time() - started


def _router(sink: Any, expiry: bool) -> TopicRouter:
    router = TopicRouter()
    if expiry:
        router.expiry = ExpirySchedule()
    router.subscribe("stix2/indicator", sink)
    return router


def schedule_and_fire(profile: ExpiryProfile) -> dict[str, Any]:
    start = time.time() + 60
    raws = _raw_indicators(profile.count, start, profile.spread_s, "schedule")
    plain_s = _route_all(_router(_Counting(), expiry=False), raws)
    routed_s = _route_all(_router(_Counting(), expiry=True), raws)

    sink = _Counting()
    router = _router(sink, expiry=True)
    schedule = router.expiry
    assert schedule is not None
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    _route_all(router, raws)  # the decoded messages are gone when it returns; the schedule holds the rest
    gc.collect()
    kept = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    if len(schedule) != profile.count:
        raise RuntimeError(f"scheduled {len(schedule)} of {profile.count} indicators")

    delivered_before = sink.count
    started = time.process_time()
    fired = 0
    while True:
        batch = schedule.fire(start + profile.spread_s + 1, router.deliver_to)
        if not batch:
            break
        fired += batch
    fire_s = time.process_time() - started
    removals = sink.count - delivered_before
    raw_bytes = sum(len(raw) for raw, _ in raws) / len(raws)
    return {
        "indicators": profile.count,
        "valid_until_spread_s": profile.spread_s,
        "route_us_per_indicator": round(plain_s / profile.count * 1e6, 2),
        "route_with_expiry_us_per_indicator": round(routed_s / profile.count * 1e6, 2),
        "schedule_overhead_us_per_indicator": round((routed_s - plain_s) / profile.count * 1e6, 2),
        "memory_bytes_per_scheduled_indicator": round(kept / profile.count),
        "of_which_indicator_json_bytes": round(raw_bytes),
        "memory_total_mib": round(kept / 2**20, 1),
        "fired": fired,
        "removals_delivered": removals,
        "removals_per_s": round(removals / fire_s) if fire_s else None,
    }


def lateness(profile: ExpiryProfile) -> dict[str, Any]:
    sink = _Timing()
    router = _router(sink, expiry=True)
    schedule = router.expiry
    assert schedule is not None
    # Decoding and routing take a while (~20 µs each on a busy machine): the first expiry comes after it.
    start = time.time() + 2.0 + profile.lateness_count / 10_000
    raws = _raw_indicators(profile.lateness_count, start, profile.lateness_s, "lateness")
    expected = {orjson.loads(raw)["id"]: until for raw, until in raws}
    worker = ExpiryWorker(schedule, router.deliver_to)
    worker.start()
    try:
        _route_all(router, raws)
        if time.time() > start:
            raise RuntimeError("routing took longer than the head start; lateness would be meaningless")
        deadline = start + profile.lateness_s + 30
        while len(sink.arrivals) < profile.lateness_count and time.time() < deadline:
            time.sleep(0.1)
    finally:
        worker.stop()
        worker.join(5)
    late_ms = sorted((arrived - expected[indicator_id]) * 1000 for indicator_id, arrived in sink.arrivals)
    return {
        "indicators": profile.lateness_count,
        "valid_until_spread_s": profile.lateness_s,
        "removals_received": len(late_ms),
        "early": sum(1 for ms in late_ms if ms < 0),
        "late_p50_ms": round(float(np.percentile(late_ms, 50)), 1) if late_ms else None,
        "late_p99_ms": round(float(np.percentile(late_ms, 99)), 1) if late_ms else None,
        "late_max_ms": round(late_ms[-1], 1) if late_ms else None,
    }


def expiry_scenario(mode: str) -> dict[str, Any]:
    profile = EXPIRY_PROFILES[mode]
    return {"schedule": schedule_and_fire(profile), "lateness": lateness(profile)}
