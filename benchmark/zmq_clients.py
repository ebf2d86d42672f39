"""Benchmark apps that speak the ZeroMQ app protocol of Threat Bus (see WIRE.md).

Written from the protocol description, not from the plugin: a ``manage`` REQ
socket to subscribe, a SUB socket per subscription on the bus's ``pub`` port
filtered by the p2p topic, and a PUB socket connected to the bus's ``sub`` port
that sends ``stix2/indicator <json>`` frames.

Each app runs in its own process (see ``benchmark.procs``) and is steered by
the orchestrator over a ``multiprocessing`` pipe. Receivers count deliveries in
a shared integer so that the publisher can keep a bounded number of messages in
flight: ZeroMQ PUB sockets drop messages at their high-water mark, so a
publisher that simply floods would measure loss, not throughput.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Sequence
from multiprocessing.connection import Connection
from typing import Any

import orjson
import zmq

from benchmark.messages import WARMUP_RUN, BodyFactory, read_stamp
from benchmark.stats import RunRecord

PUBLISH_PREFIX = b"stix2/indicator "
WARMUP_INTERVAL = 0.02
MANAGE_TIMEOUT_MS = 10_000


class ManageError(RuntimeError):
    """The bus's manage socket did not answer as the protocol says."""


def manage_request(ctx: zmq.Context, endpoint: str, request: dict[str, Any]) -> dict[str, Any]:
    """One request/reply on the manage socket, with a timeout (a fresh REQ socket each time)."""
    sock = ctx.socket(zmq.REQ)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVTIMEO, MANAGE_TIMEOUT_MS)
    sock.setsockopt(zmq.SNDTIMEO, MANAGE_TIMEOUT_MS)
    try:
        sock.connect(endpoint)
        sock.send(orjson.dumps(request))
        try:
            reply = orjson.loads(sock.recv())
        except zmq.Again:
            raise ManageError(f"no reply from {endpoint} within {MANAGE_TIMEOUT_MS} ms to {request}") from None
    finally:
        sock.close()
    if not isinstance(reply, dict):
        raise ManageError(f"manage reply is not a JSON object: {reply!r}")
    return reply


def publisher_main(conn: Connection, sub_endpoint: str, counters: Sequence[Any]) -> None:
    """Process entry: publish indicators to the bus as the orchestrator commands."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.PUB)
    sock.setsockopt(zmq.SNDHWM, 0)  # never drop on our side; the run window bounds what is in flight
    sock.setsockopt(zmq.LINGER, 2000)
    sock.connect(sub_endpoint)
    bodies = BodyFactory()
    try:
        conn.send({"event": "ready"})
        while True:
            command = conn.recv()
            if command["cmd"] == "stop":
                break
            if command["cmd"] == "warmup":
                seq = 0
                while not conn.poll(WARMUP_INTERVAL):
                    sock.send(PUBLISH_PREFIX + bodies.body(WARMUP_RUN, seq))
                    seq += 1
                continue
            if command["cmd"] == "run":
                conn.send(_publish_run(sock, bodies, counters, **command["args"]))
    finally:
        sock.close()
        ctx.term()


def _publish_run(
    sock: zmq.Socket,
    bodies: BodyFactory,
    counters: Sequence[Any],
    run: str,
    count: int,
    rate: float | None,
    window: int,
    copies: int,
) -> dict[str, Any]:
    """Send ``count`` messages, paced at ``rate`` per second or as fast as the window allows.

    ``window`` bounds messages sent but not yet delivered to all ``copies``
    subscriptions (read from the receivers' shared counters).
    """
    base = sum(c.value for c in counters)
    limit = window * copies
    interval_ns = int(1e9 / rate) if rate else 0
    start_ns = time.monotonic_ns()
    next_due = start_ns
    waits = 0
    for seq in range(count):
        if interval_ns:
            now = time.monotonic_ns()
            if now < next_due:
                time.sleep(max(next_due - now, 50_000) / 1e9)
            next_due += interval_ns
        while seq * copies - (sum(c.value for c in counters) - base) >= limit:
            waits += 1
            time.sleep(0.0002)
        sock.send(PUBLISH_PREFIX + bodies.body(run, seq))
    end_ns = time.monotonic_ns()
    return {"sent": count, "start_ns": start_ns, "end_ns": end_ns, "window_waits": waits}


def receiver_main(conn: Connection, manage_endpoint: str, host: str, subscriptions: int, counter: Any) -> None:
    """Process entry: hold ``subscriptions`` subscriptions and record what arrives."""
    ctx = zmq.Context()
    topics: list[str] = []
    socks: list[zmq.Socket] = []
    try:
        for _ in range(subscriptions):
            reply = manage_request(
                ctx, manage_endpoint, {"action": "subscribe", "topic": "stix2/indicator", "snapshot": 0}
            )
            if reply.get("status") != "success" or not isinstance(reply.get("topic"), str):
                raise ManageError(f"subscribe failed: {reply!r}")
            topic = reply["topic"]
            sock = ctx.socket(zmq.SUB)
            sock.setsockopt(zmq.RCVHWM, 0)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.SUBSCRIBE, topic.encode())
            sock.connect(f"tcp://{host}:{reply['pub_port']}")
            topics.append(topic)
            socks.append(sock)
        conn.send({"event": "subscribed", "topics": topics})
        _receive_loop(conn, socks, counter)
    except Exception as err:
        conn.send({"event": "error", "error": f"{type(err).__name__}: {err}"})
        raise
    finally:
        for topic in topics:
            with contextlib.suppress(ManageError):
                manage_request(ctx, manage_endpoint, {"action": "unsubscribe", "topic": topic})
        for sock in socks:
            sock.close()
        ctx.term()


def _receive_loop(conn: Connection, socks: list[zmq.Socket], counter: Any) -> None:
    poller = zmq.Poller()
    index = {sock: i for i, sock in enumerate(socks)}
    for sock in socks:
        poller.register(sock, zmq.POLLIN)
    poller.register(conn.fileno(), zmq.POLLIN)
    records: dict[str, RunRecord] = {}
    warmed: set[int] = set()
    warm_reported = False
    bad = 0
    while True:
        for item, _ in poller.poll(200):
            if not isinstance(item, zmq.Socket):
                command = conn.recv()
                if command["cmd"] == "stop":
                    return
                if command["cmd"] == "collect":
                    record = records.pop(command["run"], RunRecord())
                    conn.send({**record.export(), "malformed": bad})
                continue
            i = index[item]
            key_base = i << 40
            while True:
                try:
                    frame = item.recv(zmq.NOBLOCK)
                except zmq.Again:
                    break
                now = time.monotonic_ns()
                space = frame.find(b" ")
                stamp = read_stamp(memoryview(frame)[space + 1 :]) if space > 0 else None
                if stamp is None:
                    bad += 1
                    continue
                if stamp.run == WARMUP_RUN:
                    if not warm_reported:
                        warmed.add(i)
                        if len(warmed) == len(socks):
                            warm_reported = True
                            conn.send({"event": "warm"})
                    continue
                record = records.get(stamp.run)
                if record is None:
                    record = records[stamp.run] = RunRecord()
                record.add(key_base | stamp.seq, stamp.sent_ns, now)
                counter.value += 1
