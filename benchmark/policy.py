"""Cost of a policy filter (``threatbus.policy.Filter.check``) per evaluation, in-process.

A filter runs on the hot path once per message and subscriber queue behind
it (the bus's app filters, each ZeroMQ client's, the backbone's export and
import filters), so its cost adds to every delivery. Measured on the plain
JSON messages the bus routes: indicators as ``threatbus.testing.intel_mix``
makes them (every TLP, unmarked, detection-flagged or not) and a sighting
embedding its indicator.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

from threatbus.policy import Filter
from threatbus.testing import intel_mix, sighting

FILTERS: dict[str, dict[str, Any]] = {
    "empty": {},
    # The recipes of the README: a TLP boundary, a detection-only sensor, a high-confidence blocklist.
    "tlp_boundary": {"tlp": "amber"},
    "detection_sensor": {"detection_only": True, "tlp": "amber", "pattern_types": ["stix"]},
    "blocklist": {"min_confidence": 80, "unmarked": "deny", "labels": {"exclude": ["benign"]}},
    "every_key": {
        "tlp": "amber",
        "unmarked": "deny",
        "min_confidence": 50,
        "detection_only": True,
        "pattern_types": ["stix"],
        "labels": {"include": ["malicious-activity"], "exclude": ["benign"]},
        "created_by": {"exclude": ["identity--00000000-0000-4000-8000-000000000000"]},
        "max_age": 30,
    },
}
TYPICAL = "detection_sensor"


def _messages() -> list[Any]:
    mix = intel_mix()
    for item in mix.values():
        item.payload["labels"] = ["malicious-activity"]
    return [*mix.values(), sighting(of=mix["amber"])]


def _per_evaluation_us(compiled: Filter, messages: list[Any], rounds: int) -> float:
    # CPU time of this thread: on a busy machine wall time would count the time others ran.
    check = compiled.check
    started = time.thread_time()
    for _ in range(rounds):
        for message in messages:
            check(message)
    return (time.thread_time() - started) / (rounds * len(messages)) * 1e6


def policy_scenario(quick: bool) -> dict[str, Any]:
    """CPU µs per evaluation of each filter of ``FILTERS``: the median of 5 runs and the best one."""
    messages = _messages()
    rounds = 2_000 if quick else 40_000
    result: dict[str, Any] = {"messages": len(messages), "evaluations_per_run": rounds * len(messages)}
    filters: dict[str, Any] = {}
    for name, spec in FILTERS.items():
        compiled = Filter(spec)
        runs = [_per_evaluation_us(compiled, messages, rounds) for _ in range(5)]
        passing = [m for m in messages if compiled.check(m) is None]
        # A message that passes runs every check: the dearest case.
        worst = [_per_evaluation_us(compiled, passing, rounds) for _ in range(3)] if passing else [0.0]
        filters[name] = {
            "spec": spec,
            "us_per_evaluation_median": round(statistics.median(runs), 3),
            "us_per_evaluation_best": round(min(runs), 3),
            "us_per_passing_evaluation_median": round(statistics.median(worst), 3),
            "held_back_of_mix": f"{len(messages) - len(passing)}/{len(messages)}",
        }
    result["filters"] = filters
    result["typical"] = TYPICAL
    return result
