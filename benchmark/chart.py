"""One PNG with the four views of a benchmark result."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt

COLOURS = {"inmem": "tab:blue", "rabbitmq": "tab:orange", "ceiling": "tab:gray"}


def _throughput(ax: Any, result: dict[str, Any]) -> None:
    scenarios = result["scenarios"]
    bars = []
    for name, label in (("inmem", "inmem\n1 node"), ("rabbitmq", "rabbitmq\n2 nodes")):
        value = scenarios.get(name, {}).get("saturation", {}).get("msgs_per_s")
        if value:
            bars.append((label, value, COLOURS[name]))
    for variant, label in (
        ("matched", "raw pika\nsame settings"),
        ("matched_after", "raw pika\nagain, after"),
        ("no_confirms", "raw pika\nno confirms"),
        ("two_queues", "raw pika\n2 queues"),
    ):
        value = scenarios.get("ceiling", {}).get(variant, {}).get("saturation", {}).get("msgs_per_s")
        if value:
            bars.append((label, value, COLOURS["ceiling"]))
    if not bars:
        ax.text(0.5, 0.5, "no throughput measured", ha="center", transform=ax.transAxes)
    labels, values, colours = zip(*bars, strict=True) if bars else ((), (), ())
    ax.bar(labels, values, color=colours)
    for i, value in enumerate(values):
        ax.text(i, value, f"{value:,.0f}", ha="center", va="bottom", fontsize=8)
    ax.axhline(10_000, color="tab:blue", linestyle="--", linewidth=1, label="inmem target 10,000")
    matched = next((t.get("ceiling_msgs_per_s") for t in result.get("targets", []) if "ceiling_msgs_per_s" in t), None)
    if matched:
        ax.axhline(matched / 2, color="tab:orange", linestyle=":", linewidth=1, label="rabbitmq target 0.5 x ceiling")
    ax.set_ylabel("messages/s at saturation")
    ax.set_title("Throughput, app to app")
    _legend(ax)
    ax.tick_params(axis="x", labelsize=8)


def _latency(ax: Any, result: dict[str, Any]) -> None:
    scenarios = result["scenarios"]
    for name in ("inmem", "rabbitmq"):
        rows = [r for r in scenarios.get(name, {}).get("latency", []) if r.get("p99_ms") is not None]
        if not rows:
            continue
        rates = [r["offered_rate"] for r in rows]
        ax.plot(rates, [r["p50_ms"] for r in rows], "o--", color=COLOURS[name], label=f"{name} p50")
        ax.plot(rates, [r["p99_ms"] for r in rows], "s-", color=COLOURS[name], label=f"{name} p99")
    ceiling = scenarios.get("ceiling", {}).get("matched", {}).get("latency")
    if ceiling and ceiling.get("p99_ms") is not None:
        ax.plot([ceiling["offered_rate"]], [ceiling["p99_ms"]], "s", color=COLOURS["ceiling"], label="raw pika p99")
    ax.axhline(10, color="red", linestyle=":", linewidth=1, label="p99 target 10 ms (2 nodes, 1000/s)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    rates = sorted({r["offered_rate"] for n in ("inmem", "rabbitmq") for r in scenarios.get(n, {}).get("latency", [])})
    if rates:
        ax.set_xticks(rates, [str(r) for r in rates])
        ax.minorticks_off()
    ax.set_xlabel("offered messages/s")
    ax.set_ylabel("latency (ms)")
    ax.set_title("Latency app to app at fixed rates")
    _legend(ax)


def _fanout(ax: Any, result: dict[str, Any]) -> None:
    for backbone, rows in result["scenarios"].get("fanout", {}).items():
        subs = [r["subscribers"] for r in rows]
        ax.plot(subs, [r["saturation"]["deliveries_per_s"] or 0 for r in rows], "o-", color=COLOURS.get(backbone),
                label=f"{backbone} deliveries/s")  # fmt: skip
        ax.plot(subs, [r["saturation"]["msgs_per_s"] or 0 for r in rows], "s--", color=COLOURS.get(backbone),
                label=f"{backbone} published msgs/s")  # fmt: skip
    ax.set_xscale("log")
    ax.set_yscale("log")
    subscribers = sorted({r["subscribers"] for rows in result["scenarios"].get("fanout", {}).values() for r in rows})
    if subscribers:
        ax.set_xticks(subscribers, [str(s) for s in subscribers])
    ax.set_xlabel("subscribers")
    ax.set_ylabel("per second at saturation")
    ax.set_title("Fan-out: one publisher, N subscribers")
    _legend(ax)


def _memory(ax: Any, result: dict[str, Any]) -> None:
    for backbone, nodes in result["scenarios"].get("memory", {}).items():
        for i, (node, data) in enumerate(nodes.items()):
            points = data.get("samples") or []
            if not points:
                continue
            ax.plot(
                [m / 1000 for m, _ in points],
                [r / 1024 for _, r in points],
                "-" if i == 0 else "--",
                color=COLOURS.get(backbone),
                label=node,
            )
    ax.set_xlabel("messages passed (thousands)")
    ax.set_ylabel("node RSS (MiB)")
    ax.set_ylim(bottom=0)
    ax.set_title("Memory of the nodes during the saturation run")
    _legend(ax)


def _legend(ax: Any) -> None:
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)


def draw(result: dict[str, Any], path: Path) -> None:
    fig, axes = plt.subplots(2, 2, figsize=(12, 8.5))
    _throughput(axes[0][0], result)
    _latency(axes[0][1], result)
    _fanout(axes[1][0], result)
    _memory(axes[1][1], result)
    meta = result["meta"]
    fig.suptitle(
        f"Threat Bus benchmark ({meta['mode']}) {meta['started']}, {meta['cpus']} CPUs, "
        f"load {meta.get('loadavg_before')}, git {meta.get('git_commit')}",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
