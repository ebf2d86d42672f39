"""Node-to-node throughput and latency of the RabbitMQ backbone.

Two processes, each one Threat Bus node (a ``Bus`` with this backbone, as
``threatbus`` runs it): node 1's "app" puts indicators into its publish
queue, node 2's subscriber receives them. Durable lazy queue, persistent
messages, publisher confirms: the defaults.

    python bench/throughput.py [--count 20000] [--rate 1000] [--seconds 5]

prints messages/s for a burst of ``--count`` messages (from the first put
on node 1 to the last message at node 2's app) and the latency percentiles at a steady ``--rate``.
Needs RabbitMQ at 127.0.0.1:5672 (guest/guest).
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pika

from threatbus.testing import indicator, wait_until
from threatbus_rabbitmq import RabbitMQBackbone

# running_bus is test support of the repository (tests/testbus.py), not of the installed core.
sys.path.insert(0, str(Path(__file__).resolve().parents[4] / "tests"))
from testbus import running_bus


def config(exchange: str, label: str) -> dict:
    return {
        "backbones": {
            "rabbitmq": {
                "host": "127.0.0.1",
                "exchange_name": exchange,
                "queue": {"name_suffix": f"bench-{label}-{exchange}"},
                # The sending node has no app subscribed: consume at once rather than hold its queue
                # for wait_for_subscribers and drain the pile in the middle of the measurement.
                "wait_for_subscribers": 0 if label == "tx" else 15,
            }
        }
    }


def receive(exchange: str, count: int, mode: str) -> None:
    with running_bus(
        backbones={"rabbitmq": RabbitMQBackbone()}, plugin_config=config(exchange, "rx"), node_name="rx"
    ) as bus:
        wait_until(lambda: bus.health()["connected"], 20)
        inbox: queue.Queue = queue.Queue()
        bus.subscribe("stix2", inbox)
        print("ready", flush=True)
        latencies = []
        for _ in range(count):
            message = inbox.get(timeout=120)
            if mode == "latency":
                latencies.append(time.time() - message.payload["x_bench_sent"])
        print(json.dumps({"end": time.time(), "count": count, "latencies": sorted(latencies)}), flush=True)


def cleanup(exchange: str) -> None:
    connection = pika.BlockingConnection(pika.ConnectionParameters("127.0.0.1"))
    channel = connection.channel()
    for label in ("rx", "tx"):
        channel.queue_delete(f"threatbus.bench-{label}-{exchange}")
    channel.exchange_delete(exchange)
    channel.exchange_delete(f"{exchange}.durable")
    connection.close()


def run(mode: str, count: int, rate: float) -> dict:
    exchange = f"bench-{uuid.uuid4().hex[:8]}"
    receiver = subprocess.Popen(
        [sys.executable, __file__, "--receive", exchange, "--count", str(count), "--mode", mode],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        assert receiver.stdout is not None
        assert receiver.stdout.readline().strip() == "ready"
        with running_bus(
            backbones={"rabbitmq": RabbitMQBackbone()}, plugin_config=config(exchange, "tx"), node_name="tx"
        ) as bus:
            wait_until(lambda: bus.health()["connected"], 20)
            intel = [indicator(f"10.{i // 65536 % 256}.{i // 256 % 256}.{i % 256}") for i in range(count)]
            start = time.perf_counter()
            result_start = time.time()
            for i, message in enumerate(intel):
                if mode == "latency":
                    delay = start + i / rate - time.perf_counter()
                    if delay > 0:
                        time.sleep(delay)
                    message.payload["x_bench_sent"] = time.time()
                bus.publish_queue.put(message)
            result = json.loads(receiver.stdout.readline())
            result["elapsed"] = result["end"] - result_start
        receiver.wait(30)
        return result
    finally:
        if receiver.poll() is None:
            receiver.kill()
        cleanup(exchange)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--count", type=int, default=20000)
    parser.add_argument("--rate", type=float, default=1000.0)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--receive")
    parser.add_argument("--mode", default="burst")
    args = parser.parse_args()
    if args.receive:
        receive(args.receive, args.count, args.mode)
        return
    burst = run("burst", args.count, args.rate)
    print(f"burst: {burst['count']} messages node1 app -> node2 app: {burst['count'] / burst['elapsed']:.0f} msg/s")
    steady = run("latency", int(args.rate * args.seconds), args.rate)
    lat = steady["latencies"]
    pick = lambda q: lat[min(len(lat) - 1, int(q * len(lat)))] * 1000  # noqa: E731
    print(
        f"steady {args.rate:.0f} msg/s: latency p50 {pick(0.5):.2f} ms, p99 {pick(0.99):.2f} ms, max {lat[-1] * 1000:.2f} ms"
    )


if __name__ == "__main__":
    main()
