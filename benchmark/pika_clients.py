"""The transport's ceiling: raw pika publish to a fanout exchange and consume from a bound queue.

One process publishes, one consumes, with the same message bodies, queue
declaration and publisher-confirm setting as the bus configuration under test.
The publisher uses pika's ``SelectConnection`` with pipelined confirms (a
window of unconfirmed messages), which is how pika publishes fastest with
confirms; the consumer uses a ``BlockingConnection`` with a prefetch and
acknowledges every ``ack_every`` messages (``multiple=True``).
"""

from __future__ import annotations

import collections
import time
from multiprocessing.connection import Connection
from typing import Any

import pika
from pika.spec import Basic

from benchmark.messages import WARMUP_RUN, BodyFactory, read_stamp
from benchmark.stats import RunRecord

# Publishing without confirms: hand the I/O loop this many messages at a time so it can write.
UNCONFIRMED_CHUNK = 200
# Paced publishing sleeps at least this long (due messages then go out together).
PACING_MIN_DELAY = 0.002


def connection_parameters(broker: dict[str, Any]) -> pika.ConnectionParameters:
    return pika.ConnectionParameters(
        host=broker["host"],
        port=broker["port"],
        virtual_host=broker["vhost"],
        credentials=pika.PlainCredentials(broker["username"], broker["password"]),
        heartbeat=60,
    )


class _PublishRun:
    """Publishes one run on its own ``SelectConnection`` and returns when all are sent (and confirmed)."""

    def __init__(
        self,
        broker: dict[str, Any],
        exchange: str,
        bodies: BodyFactory,
        run: str,
        count: int,
        rate: float | None,
        confirms: bool,
        window: int,
        persistent: bool,
    ) -> None:
        self.broker = broker
        self.exchange = exchange
        self.bodies = bodies
        self.run = run
        self.count = count
        self.interval_ns = int(1e9 / rate) if rate else 0
        self.confirms = confirms
        self.window = window
        self.properties = pika.BasicProperties(delivery_mode=2 if persistent else 1)
        self.channel: Any = None
        self.connection: Any = None
        self.sent = 0
        self.acked = 0
        self.nacked = 0
        self.outstanding: collections.deque[int] = collections.deque()
        self.start_ns = 0
        self.end_ns = 0
        self.next_due = 0
        self.error: str | None = None

    def execute(self) -> dict[str, Any]:
        self.connection = pika.SelectConnection(
            connection_parameters(self.broker),
            on_open_callback=lambda conn: conn.channel(on_open_callback=self._on_channel),
            on_open_error_callback=self._on_open_error,
            on_close_callback=lambda _conn, _reason: self.connection.ioloop.stop(),
        )
        self.connection.ioloop.start()
        if self.error:
            raise RuntimeError(self.error)
        return {
            "sent": self.sent,
            "acked": self.acked,
            "nacked": self.nacked,
            "start_ns": self.start_ns,
            "end_ns": self.end_ns,
        }

    def _on_open_error(self, _conn: Any, err: Any) -> None:
        self.error = f"cannot connect to RabbitMQ: {err}"
        self.connection.ioloop.stop()

    def _on_channel(self, channel: Any) -> None:
        self.channel = channel
        if self.confirms:
            channel.confirm_delivery(self._on_confirm, callback=lambda _frame: self._begin())
        else:
            self._begin()

    def _begin(self) -> None:
        self.start_ns = self.next_due = time.monotonic_ns()
        self._pump()

    def _on_confirm(self, frame: Any) -> None:
        method = frame.method
        tag = method.delivery_tag
        if method.multiple:
            confirmed = 0
            while self.outstanding and self.outstanding[0] <= tag:
                self.outstanding.popleft()
                confirmed += 1
        else:
            self.outstanding.remove(tag)
            confirmed = 1
        if isinstance(method, Basic.Ack):
            self.acked += confirmed
        else:
            self.nacked += confirmed
        self._pump()

    def _pump(self) -> None:
        burst = 0
        while self.sent < self.count:
            if self.confirms and len(self.outstanding) >= self.window:
                return  # the next confirm calls us again
            if self.interval_ns:
                now = time.monotonic_ns()
                if now < self.next_due:
                    # The I/O loop polls with millisecond timeouts: a shorter delay would spin.
                    delay = max((self.next_due - now) / 1e9, PACING_MIN_DELAY)
                    self.connection.ioloop.call_later(delay, self._pump)
                    return
                self.next_due += self.interval_ns
            elif not self.confirms and burst >= UNCONFIRMED_CHUNK:
                self.connection.ioloop.call_later(0, self._pump)
                return
            self.channel.basic_publish(
                self.exchange, "", self.bodies.body(self.run, self.sent), properties=self.properties
            )
            self.sent += 1
            burst += 1
            if self.confirms:
                self.outstanding.append(self.sent)  # delivery tags count from 1 per channel
        if not self.outstanding and not self.end_ns:
            self.end_ns = time.monotonic_ns()
            self.connection.close()


def publisher_main(conn: Connection, broker: dict[str, Any], exchange: str) -> None:
    """Process entry: publish runs as the orchestrator commands."""
    bodies = BodyFactory()
    conn.send({"event": "ready"})
    while True:
        command = conn.recv()
        if command["cmd"] == "stop":
            return
        if command["cmd"] == "warmup":
            _PublishRun(broker, exchange, bodies, WARMUP_RUN, 1, None, False, 1, False).execute()
            continue
        if command["cmd"] == "run":
            args = command["args"]
            try:
                result = _PublishRun(broker, exchange, bodies, **args).execute()
            except Exception as err:
                result = {"error": f"{type(err).__name__}: {err}"}
            conn.send(result)


def consumer_main(
    conn: Connection, broker: dict[str, Any], queue_name: str, prefetch: int, ack_every: int, counter: Any
) -> None:
    """Process entry: consume ``queue_name`` and record every benchmark message."""
    connection = pika.BlockingConnection(connection_parameters(broker))
    channel = connection.channel()
    channel.basic_qos(prefetch_count=prefetch)
    records: dict[str, RunRecord] = {}
    state = {"unacked": 0, "last_tag": 0, "warm": False}

    def on_message(ch: Any, method: Any, _properties: Any, body: bytes) -> None:
        now = time.monotonic_ns()
        stamp = read_stamp(body)
        state["unacked"] += 1
        state["last_tag"] = method.delivery_tag
        if state["unacked"] >= ack_every:
            ch.basic_ack(method.delivery_tag, multiple=True)
            state["unacked"] = 0
        if stamp is None:
            return
        if stamp.run == WARMUP_RUN:
            if not state["warm"]:
                state["warm"] = True
                conn.send({"event": "warm"})
            return
        record = records.get(stamp.run)
        if record is None:
            record = records[stamp.run] = RunRecord()
        record.add(stamp.seq, stamp.sent_ns, now)
        counter.value += 1

    channel.basic_consume(queue_name, on_message)
    conn.send({"event": "subscribed"})
    try:
        while True:
            connection.process_data_events(time_limit=0.05)
            if state["unacked"]:
                channel.basic_ack(state["last_tag"], multiple=True)
                state["unacked"] = 0
            if conn.poll():
                command = conn.recv()
                if command["cmd"] == "stop":
                    return
                if command["cmd"] == "collect":
                    conn.send({**records.pop(command["run"], RunRecord()).export(), "malformed": 0})
    finally:
        connection.close()
