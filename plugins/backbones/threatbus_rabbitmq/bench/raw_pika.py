"""Baseline for ``throughput.py``: raw pika, same settings, no Threat Bus.

A publisher process sends ``--count`` persistent messages to a fanout
exchange with pipelined publisher confirms (``--in-flight`` unconfirmed at
most); ``--queues`` consumer processes (prefetch 200, acks batched with
``multiple``) each drain a durable lazy queue bound to it, as two Threat Bus
nodes do (the sender's node consumes its own messages too). Prints
messages/s from the publisher's start to the last consumer's last message.

    python bench/raw_pika.py [--count 20000] [--queues 2]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import uuid

import pika

from threatbus.testing import indicator

PARAMS = pika.ConnectionParameters("127.0.0.1")


def consume(exchange: str, queue: str, count: int) -> None:
    connection = pika.BlockingConnection(PARAMS)
    channel = connection.channel()
    channel.exchange_declare(exchange, "fanout")
    channel.queue_declare(queue, durable=True, arguments={"x-queue-mode": "lazy"})
    channel.queue_bind(queue, exchange, "")
    channel.basic_qos(prefetch_count=200)
    print("ready", flush=True)
    state = {"n": 0, "unacked": 0}

    def on_message(ch, method, _props, body):
        state["n"] += 1
        json.loads(body)  # touch the body as a consumer would
        state["unacked"] += 1
        if state["unacked"] >= 50 or state["n"] == count:
            ch.basic_ack(method.delivery_tag, multiple=True)
            state["unacked"] = 0
        if state["n"] == count:
            ch.stop_consuming()

    channel.basic_consume(queue, on_message)
    channel.start_consuming()
    print(json.dumps({"end": time.time()}), flush=True)
    channel.queue_delete(queue)
    connection.close()


def publish(exchange: str, bodies: list[bytes], in_flight: int) -> None:
    state = {"next": 0, "confirmed": 0, "sent": 0}
    props = pika.BasicProperties(delivery_mode=2, content_type="application/json")

    def on_open(connection):
        connection.channel(on_open_callback=on_channel)

    def on_channel(channel):
        channel.confirm_delivery(
            on_confirm,
            callback=lambda _f: channel.exchange_declare(exchange, "fanout", callback=lambda _g: pump(channel)),
        )
        state["channel"] = channel

    def pump(channel):
        while state["sent"] < len(bodies) and state["sent"] - state["confirmed"] < in_flight:
            channel.basic_publish(exchange, "", bodies[state["sent"]], props)
            state["sent"] += 1

    def on_confirm(frame):
        tag = frame.method.delivery_tag
        state["confirmed"] = tag if frame.method.multiple else max(state["confirmed"], tag)
        if state["confirmed"] >= len(bodies):
            state["connection"].close()
        else:
            pump(state["channel"])

    connection = pika.SelectConnection(PARAMS, on_open_callback=on_open, on_close_callback=lambda c, e: c.ioloop.stop())
    state["connection"] = connection
    connection.ioloop.start()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--count", type=int, default=20000)
    parser.add_argument("--in-flight", type=int, default=1000)
    parser.add_argument("--queues", type=int, default=2)
    parser.add_argument("--consume", nargs=2)
    args = parser.parse_args()
    if args.consume:
        consume(*args.consume, args.count)
        return
    exchange = f"raw-{uuid.uuid4().hex[:8]}"
    consumers = [
        subprocess.Popen(
            [sys.executable, __file__, "--consume", exchange, f"{exchange}-q{i}", "--count", str(args.count)],
            stdout=subprocess.PIPE,
            text=True,
        )
        for i in range(args.queues)
    ]
    for consumer in consumers:
        assert consumer.stdout is not None and consumer.stdout.readline().strip() == "ready"
    bodies = [indicator(f"10.{i // 65536 % 256}.{i // 256 % 256}.{i % 256}").encode() for i in range(args.count)]
    start = time.time()
    publish(exchange, bodies, args.in_flight)
    ends = [json.loads(c.stdout.readline())["end"] for c in consumers]  # type: ignore[union-attr]
    elapsed = max(ends) - start
    for consumer in consumers:
        consumer.wait(30)
    cleanup = pika.BlockingConnection(PARAMS)
    cleanup.channel().exchange_delete(exchange)
    cleanup.close()
    print(f"raw pika: {args.count} messages publisher -> {args.queues} consumer(s): {args.count / elapsed:.0f} msg/s")


if __name__ == "__main__":
    main()
