"""SIGKILL of a receiving node whose intel goes out to a ZeroMQ subscriber: counted per message at the subscriber.

The receiving node is a real ``threatbus`` process with the zmq app; the
subscriber is a real ``threatbus-zmq tail --raw`` process that keeps its
subscription across the node's restarts (it subscribes again when the node
forgot it). A ZeroMQ subscriber cannot tell the node what it already has:
what the node sent and had not recorded as done when it died comes again
(README, Limits). Measured over many runs with ``TB_ZMQ_CRASH_RUNS=N``.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import socket
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import orjson
import pytest

from threatbus.testing import ThreatBusProcess, indicator, wait_until
from threatbus_rabbitmq.dedup import FILE_NAME, in_doubt, read_slots

pytestmark = [pytest.mark.rabbitmq, pytest.mark.e2e]

MESSAGES = 6000
KILLS_AT = (1000, 3500)  # messages at the tail when B is killed
# Repeats allowed per kill: the one publisher thread reports each frame done right after libzmq took it, so at
# most one frame is sent and not yet recorded done when the node dies (README, Limits: 1 repeat in 10 runs).
REPEATS_PER_KILL = 1
# Frames libzmq took and may not have written at a kill (measured: 4 at most; README, Limits).
UNWRITTEN_PER_KILL = 10


class TailProcess:
    """``threatbus-zmq tail --raw``: one JSON line per message on its stdout file."""

    def __init__(self, workdir: Path, manage_port: int) -> None:
        self.out = workdir / "tail.jsonl"
        self.err = workdir / "tail.err"
        command = [
            str(Path(sys.executable).with_name("threatbus-zmq")),
            "tail",
            "--raw",
            "--topic",
            "stix2/indicator",
            "--manage",
            str(manage_port),
            "--heartbeat",
            "0.2",
            "--timeout",
            "1",
        ]
        with self.out.open("wb") as out, self.err.open("wb") as err:
            env = {**os.environ, "PYTHONUNBUFFERED": "1"}  # each line in the file as it comes
            self.process = subprocess.Popen(command, stdout=out, stderr=err, env=env)

    def count(self) -> int:
        return self.out.read_bytes().count(b"\n")

    def ids(self) -> list[str]:
        data = self.out.read_bytes()
        complete = data[: data.rfind(b"\n") + 1]
        return [orjson.loads(line)["id"] for line in complete.splitlines() if line.strip()]

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def stable_port() -> int:
    """A free port below the ephemeral range (32768 on): a client reconnecting to a port nobody listens on
    (the node is dead) can be given that very port as its own and hold it, and the restarted node cannot bind."""
    for port in random.sample(range(20000, 32000), 200):
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise AssertionError("no free port between 20000 and 32000")


def receiving_node(workdir: Path, name: str, backbone: dict[str, Any], zmq: dict[str, Any]) -> ThreatBusProcess:
    config = {
        "logging": {"console": True, "console_verbosity": "INFO", "file": False},
        "node": {"name": name},
        "plugins": {"backbones": {"rabbitmq": backbone}, "apps": {"zmq": zmq}},
    }
    return ThreatBusProcess(config, workdir, name=name)


def kill_zmq_receiver_mid_stream(broker: Any, spawn_node: Any, workdir: Path, label: str) -> tuple[int, int, int]:
    """Node B, with a tail subscribed, is SIGKILLed at each of ``KILLS_AT`` and restarted: (lost, repeated, sent)."""
    workdir.mkdir(parents=True, exist_ok=True)
    queue_b = broker.queue(f"zrecv-{label}")
    zmq = {"host": "127.0.0.1", "manage": stable_port(), "pub": stable_port(), "sub": stable_port()}
    sender = spawn_node(f"zsend-{label}-{broker.id}", broker.config(broker.queue(f"zsend-{label}")))
    receiver = receiving_node(workdir, f"zrecv-{label}-{broker.id}", broker.config(queue_b), zmq)
    tail: TailProcess | None = None
    try:
        receiver.start()
        tail = TailProcess(workdir, zmq["manage"])
        receiver.wait_for_log("consumer: consuming queue")
        sender.start()
        intel = [indicator(f"10.7.{i // 250}.{i % 250}") for i in range(MESSAGES)]
        ids = [m.id for m in intel]
        sender.publish(intel)
        kills: list[int] = []
        for arrived in KILLS_AT:
            # Killed once the tail got that many: mid-stream as the subscriber sees it.
            wait_until(lambda a=arrived: tail.count() >= a, 60, interval=0.002, what=f"{arrived} at the tail")
            receiver.kill()  # SIGKILL: no stop, no last acks
            at_kill = len(tail.ids())
            kills.append(at_kill)
            assert at_kill < len(ids), "the kill came after the stream ended"
            doubt = len(in_doubt(read_slots(receiver.data_dir / "rabbitmq" / FILE_NAME)))
            print(f"killed: {at_kill} at the tail, {doubt} handed and not done")
            receiver.start()
        with contextlib.suppress(AssertionError):  # counted below
            wait_until(lambda: set(tail.ids()) >= set(ids), 90, interval=0.1, what="every message at the tail")
        # What comes late after the last one would be a repeat too: B's queue is empty and nothing is unacked.
        wait_until(lambda: broker.message_count(f"threatbus.{queue_b}") == 0, 30, what="B's queue to drain")
        assert receiver.stop() == 0
        assert sender.stop() == 0
        counts = Counter(tail.ids())
    finally:
        if tail is not None:
            tail.stop()
        receiver.kill()
    lost_at = [n for n, i in enumerate(ids) if counts[i] == 0]
    if lost_at:
        released = [line for line in receiver.log().splitlines() if "handover:" in line or "caught up" in line]
        print(f"lost messages number {lost_at}, kills at {kills}; the node let a subscriber go: {released}")
    lost = len(lost_at)
    repeated = sum(counts[i] - 1 for i in ids if counts[i] > 1)
    return lost, repeated, len(ids)


def test_a_zmq_subscriber_of_a_node_killed_mid_stream_loses_at_most_what_libzmq_had_not_written(
    broker, spawn_node, tmp_path
):
    # A message is done once the pub socket took its frame; libzmq's I/O thread writes it a moment later.
    # A SIGKILL in that moment loses those frames (0 in 25 of 27 runs, 4 and 1 in two: README, Limits);
    # reporting done only when libzmq released the frame (send tracking) would close it.
    runs = int(os.environ.get("TB_ZMQ_CRASH_RUNS", "1"))
    results = [kill_zmq_receiver_mid_stream(broker, spawn_node, tmp_path / str(run), str(run)) for run in range(runs)]
    for lost, repeated, sent in results:
        print(f"zmq subscriber, node killed {len(KILLS_AT)} times: sent {sent}, lost {lost}, repeated {repeated}")
    assert max(lost for lost, _, _ in results) <= UNWRITTEN_PER_KILL * len(KILLS_AT)
    assert max(repeated for _, repeated, _ in results) <= REPEATS_PER_KILL * len(KILLS_AT)
