"""One PNG with the views of a benchmark result: throughput, latency, fan-out, memory, bulk intel."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt

COLOURS = {"inmem": "tab:blue", "rabbitmq": "tab:orange", "rabbitmq_stream": "tab:green", "ceiling": "tab:gray"}


def _throughput(ax: Any, result: dict[str, Any]) -> None:
    scenarios = result["scenarios"]
    bars = []
    for name, label in (
        ("inmem", "inmem\n1 node"),
        ("rabbitmq", "rabbitmq\n2 nodes"),
        ("rabbitmq_stream", "stream\n2 nodes"),
    ):
        value = scenarios.get(name, {}).get("saturation", {}).get("msgs_per_s")
        if value:
            bars.append((label, value, COLOURS[name]))
    for variant, label in (
        ("matched", "raw pika\nsame"),
        ("matched_after", "raw pika\nafter"),
        ("no_confirms", "raw pika\nno confirm"),
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
    inmem = scenarios.get("inmem", {}).get("saturation", {}).get("msgs_per_s")
    if inmem and scenarios.get("rabbitmq_stream"):
        ax.axhline(inmem / 2, color="tab:green", linestyle=":", linewidth=1, label="stream target 0.5 x inmem")
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
    nodes = result["scenarios"].get("fanout_nodes")
    if nodes and nodes["saturation"].get("deliveries_per_s"):
        ax.plot([nodes["subscribers"]], [nodes["saturation"]["deliveries_per_s"]], "*", markersize=12,
                color="tab:red", label=f"rabbitmq {nodes['nodes']} nodes, an app on each: deliveries/s")  # fmt: skip
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
                label=f"{node} ({backbone})",
            )
    ax.set_xlabel("messages passed (thousands)")
    ax.set_ylabel("node RSS (MiB)")
    ax.set_ylim(bottom=0)
    ax.set_title("Memory of the nodes during the saturation run")
    _legend(ax)


BULK_TARGETS = (
    ("suricata_datasets", "suricata\ndatasets"),
    ("suricata_rules", "suricata\nrules"),
    ("zeek", "zeek"),
    ("snapshot", "snapshot to\na new zeek"),
)


def _bulk_time(ax: Any, result: dict[str, Any]) -> None:
    bulk = result.get("bulk") or {}
    rows = [(label, bulk[key]) for key, label in BULK_TARGETS if key in bulk]
    if not rows:
        ax.text(0.5, 0.5, "bulk scenario not run", ha="center", transform=ax.transAxes)
        ax.set_axis_off()
        return
    seconds = [r["seconds_until_held"] or 0 for _, r in rows]
    ax.bar([label for label, _ in rows], seconds, color="tab:green")
    for i, (_, r) in enumerate(rows):
        rss = r["peak_rss_mib"]
        text = "not held" if r["seconds_until_held"] is None else f"{r['seconds_until_held']:.0f} s"
        ax.text(i, seconds[i], f"{text}\nRSS node {rss['node']:.0f} MiB\nstand-in {rss['standin']:.0f} MiB",
                ha="center", va="bottom", fontsize=7)  # fmt: skip
    ax.axhline(60, color="tab:blue", linestyle=":", linewidth=1, label="target suricata datasets 60 s")
    ax.axhline(120, color="tab:purple", linestyle=":", linewidth=1, label="target zeek 120 s")
    ax.set_ylim(0, max(max(seconds), 120) * 1.35)
    ax.set_ylabel("seconds until the stand-in holds all")
    ax.set_title(f"Bulk: {bulk['indicators']:,} indicators into one node")
    _legend(ax)
    ax.tick_params(axis="x", labelsize=8)


def _bulk_cpu(ax: Any, result: dict[str, Any]) -> None:
    bulk = result.get("bulk") or {}
    rows = [(label, bulk[key]["cpu_us_per_indicator"]) for key, label in BULK_TARGETS if key in bulk]
    if not rows:
        ax.set_axis_off()
        return
    bottoms = [0.0] * len(rows)
    for process, colour in (("node", "tab:blue"), ("standin", "tab:orange"), ("publisher", "tab:gray")):
        values = [cpu.get(process, 0) for _, cpu in rows]
        ax.bar([label for label, _ in rows], values, bottom=bottoms, color=colour, label=process)
        bottoms = [b + v for b, v in zip(bottoms, values, strict=True)]
    for i, total in enumerate(bottoms):
        ax.text(i, total, f"{total:.0f}", ha="center", va="bottom", fontsize=8)
    ax.set_ylabel("CPU µs per indicator")
    ax.set_title("Bulk: CPU per indicator and process")
    _legend(ax)
    ax.tick_params(axis="x", labelsize=8)


def _legend(ax: Any) -> None:
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)


def draw(result: dict[str, Any], path: Path) -> None:
    fig, axes = plt.subplots(3, 2, figsize=(12, 12.5))
    _throughput(axes[0][0], result)
    _latency(axes[0][1], result)
    _fanout(axes[1][0], result)
    _memory(axes[1][1], result)
    _bulk_time(axes[2][0], result)
    _bulk_cpu(axes[2][1], result)
    meta = result["meta"]
    fig.suptitle(
        f"Threat Bus benchmark ({meta['mode']}) {meta['started']}, {meta['cpus']} CPUs, "
        f"load {meta.get('loadavg_before')}, git {meta.get('git_commit')}",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
