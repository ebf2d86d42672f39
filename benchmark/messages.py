"""The indicators the benchmark sends, and how receivers read them back.

Every message is a valid STIX 2.1 indicator (it passes ``threatbus.stix.validate``)
with three custom properties that the bus carries untouched:

- ``x_bench_run``: the id of the measurement run it belongs to,
- ``x_bench_seq``: its sequence number within the run,
- ``x_bench_sent_ns``: ``time.monotonic_ns()`` of the sender at send time.

``CLOCK_MONOTONIC`` is system-wide on Linux, so a receiver in another process on
the same host subtracts its own ``monotonic_ns()`` to get the one-way latency.
The JSON is compact (no spaces), as ``orjson`` writes it, so the very same bytes
go to the bus over ZeroMQ and to the raw pika ceiling.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, NamedTuple

import orjson

from threatbus.stix import timestamp

WARMUP_RUN = "warmup"


class BodyFactory:
    """Makes the JSON bodies of one sender: unique ids, a fresh send timestamp each."""

    def __init__(self) -> None:
        # 24 random hex chars of a v4 UUID plus a 12-digit counter keep ids unique and well-formed.
        self._prefix = str(uuid.uuid4())[:24]
        self._counter = 0
        self._created = timestamp()

    def body(self, run: str, seq: int) -> bytes:
        self._counter += 1
        n = self._counter
        return orjson.dumps(
            {
                "type": "indicator",
                "spec_version": "2.1",
                "id": f"indicator--{self._prefix}{n:012x}",
                "created": self._created,
                "modified": self._created,
                "pattern": f"[ipv4-addr:value = '10.{(n >> 16) & 255}.{(n >> 8) & 255}.{n & 255}']",
                "pattern_type": "stix",
                "pattern_version": "2.1",
                "valid_from": self._created,
                "x_bench_run": run,
                "x_bench_seq": seq,
                "x_bench_sent_ns": time.monotonic_ns(),
            }
        )


class Stamp(NamedTuple):
    run: str
    seq: int
    sent_ns: int


def read_stamp(body: bytes | memoryview) -> Stamp | None:
    """The benchmark fields of a received indicator body; None for anything else."""
    try:
        payload: Any = orjson.loads(body)
        return Stamp(payload["x_bench_run"], payload["x_bench_seq"], payload["x_bench_sent_ns"])
    except (orjson.JSONDecodeError, KeyError, TypeError):
        return None
