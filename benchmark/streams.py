"""The intel log's figures: the raw stream-protocol ceiling and snapshot replay to a new subscriber.

- ``stream_ceiling``: rstream publishes the benchmark's indicator bodies into
  a fresh stream in confirmed batches, then consumes them from the start;
  both rates, beside the pika ceiling of ``scenarios.ceiling_scenario``.
- ``snapshot_scenario``: a node (inmem, or rabbitmq with its log in a stream)
  holds ``count`` indicators in its intel log; a new ZeroMQ subscriber asks
  for a snapshot with the end marker, and we time from the subscribe request
  to the marker, counting the indicators that arrived.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from pathlib import Path
from typing import Any

import orjson
import zmq

from benchmark.messages import BodyFactory
from benchmark.nodes import BusNode, rabbitmq_backbone, start_node, stop_nodes, unique_name

logger = logging.getLogger("benchmark")

STREAM_PORT = 5552
BATCH = 1000


def _bodies(count: int) -> list[bytes]:
    factory = BodyFactory()
    run = uuid.uuid4().hex[:12]
    return [factory.body(run, seq) for seq in range(count)]


async def _fill_stream(broker: dict[str, Any], stream: str, bodies: list[bytes], create: bool) -> float:
    """Publish ``bodies`` as AMQP 1.0 messages (as RabbitMQ stores AMQP 0-9-1 publishes); seconds taken."""
    from rstream import AMQPMessage, Producer

    async with Producer(
        broker["host"], STREAM_PORT, username=broker["username"], password=broker["password"], vhost=broker["vhost"]
    ) as producer:
        if create:
            await producer.create_stream(stream, exists_ok=True, arguments={"max-age": "1D"})
        messages = [AMQPMessage(body=body) for body in bodies]
        started = time.perf_counter()
        for start in range(0, len(messages), BATCH):
            await producer.send_batch(stream, messages[start : start + BATCH])  # type: ignore[arg-type]
        return time.perf_counter() - started


async def _consume_stream(broker: dict[str, Any], stream: str, count: int) -> float:
    from rstream import Consumer, ConsumerOffsetSpecification, OffsetType, amqp_decoder

    done = asyncio.Event()
    seen = 0
    started = 0.0

    def on_message(_message: Any, _context: Any) -> None:
        nonlocal seen, started
        if seen == 0:
            started = time.perf_counter()
        seen += 1
        if seen >= count:
            done.set()

    async with Consumer(
        broker["host"], STREAM_PORT, username=broker["username"], password=broker["password"], vhost=broker["vhost"]
    ) as consumer:
        begun = time.perf_counter()
        await consumer.subscribe(
            stream,
            on_message,
            decoder=amqp_decoder,
            offset_specification=ConsumerOffsetSpecification(OffsetType.FIRST, None),
            initial_credit=20,
        )
        await asyncio.wait_for(done.wait(), 120)
        return time.perf_counter() - begun


async def _delete_stream(broker: dict[str, Any], stream: str) -> None:
    from rstream import Producer

    async with Producer(
        broker["host"], STREAM_PORT, username=broker["username"], password=broker["password"], vhost=broker["vhost"]
    ) as producer:
        await producer.delete_stream(stream, missing_ok=True)


def stream_ceiling(broker: dict[str, Any], count: int) -> dict[str, Any]:
    """rstream alone: publish ``count`` bodies in confirmed batches, then consume them from the start."""
    stream = unique_name("stream-ceiling")
    bodies = _bodies(count)
    try:
        published_s = asyncio.run(_fill_stream(broker, stream, bodies, create=True))
        consumed_s = asyncio.run(_consume_stream(broker, stream, count))
    finally:
        asyncio.run(_delete_stream(broker, stream))
    return {
        "count": count,
        "body_bytes": round(sum(map(len, bodies)) / len(bodies)),
        "batch": BATCH,
        "published_msgs_per_s": round(count / published_s, 1),
        "consumed_msgs_per_s": round(count / consumed_s, 1),
    }


class _SnapshotClient:
    """A ZeroMQ app that subscribes with a snapshot and the end marker."""

    def __init__(self, node: BusNode) -> None:
        self.context = zmq.Context()
        self.node = node

    def request(self, days: float, timeout: float) -> dict[str, Any]:
        manage = self.context.socket(zmq.REQ)
        manage.setsockopt(zmq.LINGER, 0)
        manage.connect(self.node.manage_endpoint)
        sub = self.context.socket(zmq.SUB)
        sub.setsockopt(zmq.LINGER, 0)
        sub.setsockopt(zmq.RCVHWM, 0)
        try:
            started = time.perf_counter()
            manage.send(orjson.dumps({"action": "subscribe", "topic": "stix2/indicator", "snapshot": days,
                                      "snapshot_end": True}))  # fmt: skip
            if not manage.poll(int(timeout * 1000)):
                raise RuntimeError("no reply from the manage endpoint")
            reply = orjson.loads(manage.recv())
            sub.connect(f"tcp://{self.node.host}:{reply['pub_port']}")
            sub.setsockopt(zmq.SUBSCRIBE, reply["topic"].encode())
            end_kind = reply["topic"].encode() + b"snapshotend "
            received = 0
            first = None
            deadline = time.monotonic() + timeout
            while True:
                if not sub.poll(int(max(0.0, deadline - time.monotonic()) * 1000)):
                    raise RuntimeError(f"no end marker within {timeout}s ({received} indicators arrived)")
                frame = sub.recv()
                if frame.startswith(end_kind):
                    elapsed = time.perf_counter() - started
                    marker = orjson.loads(frame[len(end_kind) :])
                    break
                if first is None:
                    first = time.perf_counter() - started
                received += 1
            manage.send(orjson.dumps({"action": "unsubscribe", "topic": reply["topic"]}))
            manage.poll(2000)
            return {
                "indicators": received,
                "marker_count": marker["count"],
                "seconds": round(elapsed, 3),
                "first_after_s": round(first, 3) if first is not None else None,
                "indicators_per_s": round(received / elapsed, 1) if elapsed else None,
            }
        finally:
            manage.close()
            sub.close()

    def close(self) -> None:
        self.context.destroy(linger=0)


def _publish_through_zmq(node: BusNode, bodies: list[bytes]) -> None:
    """Into the node's sub socket, as apps publish (it logs what it carries)."""
    context = zmq.Context()
    pub = context.socket(zmq.XPUB)
    pub.setsockopt(zmq.XPUB_NODROP, 1)
    pub.setsockopt(zmq.SNDHWM, 0)
    pub.connect(node.sub_endpoint)
    try:
        if not pub.poll(10_000):
            raise RuntimeError("the node's sub socket did not connect")
        pub.recv()
        for body in bodies:
            pub.send(b"stix2/indicator " + body)
    finally:
        pub.close(linger=30_000)
        context.term()


def snapshot_scenario(
    workdir: Path, broker: dict[str, Any] | None, count: int, timeout: float = 120.0
) -> dict[str, Any]:
    """Snapshot replay from an inmem node's log and, with ``broker``, from a rabbitmq node's stream."""
    bodies = _bodies(count)
    result: dict[str, Any] = {"count": count}
    inmem = start_node(workdir / "snapshot-inmem", "bench-snapshot-inmem", {"inmem": {}})
    client = _SnapshotClient(inmem)
    try:
        _publish_through_zmq(inmem, bodies)
        # The node takes them in at its own pace: ask until the log holds them all.
        deadline = time.monotonic() + timeout
        while True:
            run = client.request(1, timeout)
            if run["indicators"] >= count or time.monotonic() > deadline:
                break
        result["inmem"] = client.request(1, timeout)
    finally:
        client.close()
        stop_nodes([inmem])
    if broker is not None:
        exchange = unique_name("snapshot-exchange")
        stream = f"{exchange}.log"
        suffix = f"bench-{uuid.uuid4().hex[:12]}"
        config = rabbitmq_backbone(broker, exchange, suffix, {"durable": True}, {"wait_for_subscribers": 0})
        node = start_node(workdir / "snapshot-rabbitmq", "bench-snapshot-rabbitmq", config)
        client = _SnapshotClient(node)
        try:
            wait_log = time.monotonic() + 30
            while "stream protocol available" not in node.process.log() and time.monotonic() < wait_log:
                time.sleep(0.1)
            fill_s = asyncio.run(_fill_stream(broker, stream, bodies, create=False))
            result["rabbitmq_fill_msgs_per_s"] = round(count / fill_s, 1)
            result["rabbitmq"] = client.request(1, timeout)
        finally:
            client.close()
            stop_nodes([node])
            _cleanup(broker, exchange, suffix)
    return result


def _cleanup(broker: dict[str, Any], exchange: str, suffix: str) -> None:
    import pika

    from benchmark.pika_clients import connection_parameters

    connection = pika.BlockingConnection(connection_parameters(broker))
    try:
        for queue in (f"{exchange}.log", f"threatbus.{suffix}", f"threatbus.{suffix}.dlq"):
            connection.channel().queue_delete(queue)
        for name in (exchange, f"{exchange}.durable"):
            connection.channel().exchange_delete(name)
    finally:
        connection.close()
