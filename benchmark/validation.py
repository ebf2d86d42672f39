"""What validating foreign messages costs the RabbitMQ consumer, per message, in-process.

The consumer decodes every message (structure only); a message that does not
come from one of our nodes (no ``app_id`` ``threatbus``) is also checked
with ``threatbus.stix.validate`` before it is delivered. This measures both
paths on the same bodies, in µs per message (best of a few repetitions, one
core, no broker): point patterns (nearly all shared intel: a strict regular
expression), compound patterns seen before (the stix2-patterns parser ran
once, its verdict is cached) and compound patterns never seen before (the
parser runs for each message: the worst case a flood of unique compound
patterns causes).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from benchmark.messages import BodyFactory
from threatbus.data import decode
from threatbus.stix import validate

REPEAT = 3


def _compound(n: int, created: str) -> bytes:
    import orjson

    return orjson.dumps(
        {
            "type": "indicator",
            "spec_version": "2.1",
            "id": f"indicator--00000000-0000-4000-8000-{n:012x}",
            "created": created,
            "modified": created,
            "pattern": f"[ipv4-addr:value = '10.0.{(n >> 8) & 255}.{n & 255}'] OR [domain-name:value = 'h{n}.example']",
            "pattern_type": "stix",
            "pattern_version": "2.1",
            "valid_from": created,
        }
    )


def _best_us(bodies: list[bytes], work: Callable[[bytes], Any], repeat: int = REPEAT) -> float:
    best = float("inf")
    for _ in range(repeat):
        started = time.perf_counter_ns()
        for body in bodies:
            work(body)
        best = min(best, (time.perf_counter_ns() - started) / len(bodies) / 1000)
    return round(best, 2)


def _ours(body: bytes) -> None:
    decode(body)


def _foreign(body: bytes) -> None:
    validate(decode(body))


def validation_scenario(count: int) -> dict[str, Any]:
    factory = BodyFactory()
    point = [factory.body("validation", i) for i in range(count)]
    created = "2026-01-01T00:00:00.000Z"
    known = [_compound(i % 100, created) for i in range(count)]
    for body in known[:100]:
        _foreign(body)  # the parser's verdicts for these 100 patterns are now cached
    unseen_count = max(100, count // 20)
    unseen = [_compound(1_000_000 + i, created) for i in range(unseen_count * REPEAT)]
    batches = iter([unseen[i * unseen_count : (i + 1) * unseen_count] for i in range(REPEAT)])

    def unseen_best() -> float:
        best = float("inf")
        for batch in batches:  # a fresh batch each repetition, so nothing is cached
            best = min(best, _best_us(batch, _foreign, repeat=1))
        return best

    result = {
        "messages": count,
        "point_pattern": {"ours_us": _best_us(point, _ours), "foreign_validated_us": _best_us(point, _foreign)},
        "compound_pattern_cached": {
            "ours_us": _best_us(known, _ours),
            "foreign_validated_us": _best_us(known, _foreign),
        },
        "compound_pattern_unseen": {
            "ours_us": _best_us(unseen[:unseen_count], _ours),
            "foreign_validated_us": unseen_best(),
        },
    }
    for row in result.values():
        if isinstance(row, dict):
            row["validation_us"] = round(row["foreign_validated_us"] - row["ours_us"], 2)
    return result
