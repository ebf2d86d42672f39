"""Throughput and latency of one node (inmem backbone) from one ZeroMQ app to another.

Not collected by pytest (no test_ prefix): run it by hand,
  .venv/bin/python plugins/apps/threatbus_zmq/tests/perf_zmq_throughput.py [COUNT [CONSUMERS]]
It starts a real threatbus process on free ports, one consumer app and one
producer app (both with this package's client), and prints msgs/s and
latency percentiles.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

import zmq

from threatbus.testing import ThreatBusProcess, free_port, indicator
from threatbus_zmq.client import ManageClient, Receiver, Sender
from threatbus_zmq.wire import outbound_frame


def main(count: int = 50_000, consumers: int = 1) -> None:
    ports = {"manage": free_port(), "pub": free_port(), "sub": free_port()}
    config = {
        "logging": {"console": True, "console_verbosity": "INFO", "file": False},
        "plugins": {"backbones": {"inmem": {}}, "apps": {"zmq": {"host": "127.0.0.1", **ports}}},
    }
    with tempfile.TemporaryDirectory() as tmp:
        node = ThreatBusProcess(config, Path(tmp)).start(ready_line="is running")
        context = zmq.Context()
        try:
            manage = ManageClient("127.0.0.1", ports["manage"], 5, context)
            reply = manage.subscribe("stix2/indicator")
            receiver = Receiver("127.0.0.1", ports["pub"], reply["topic"], context)
            # Further consumers (CONSUMERS - 1) are read in step with the first one below.
            extra = []
            for _ in range(consumers - 1):
                other = manage.subscribe("stix2/indicator")
                extra.append(Receiver("127.0.0.1", ports["pub"], other["topic"], context))
            sender = Sender("127.0.0.1", ports["sub"], context)
            sender.wait_ready()

            frames = [
                outbound_frame("stix2/indicator", indicator(f"10.{i // 65536 % 256}.{i // 256 % 256}.{i % 256}"))
                for i in range(count)
            ]
            start = time.perf_counter()
            received = 0
            sent = 0
            while received < count:
                while sent < count and sent - received < 20_000:
                    sender.send_frame(frames[sent])
                    sent += 1
                while received < sent and receiver.recv_frame(0 if sent < count else 5) is not None:
                    received += 1
                    for other in extra:
                        assert other.recv_frame(5) is not None
            elapsed = time.perf_counter() - start
            print(
                f"throughput: {count} indicators to {consumers} consumer(s) in {elapsed:.2f}s = "
                f"{count / elapsed:,.0f} msgs/s in, {count * consumers / elapsed:,.0f} frames/s out"
            )
            for other in extra:
                other.close()

            latencies = []
            for i in range(500):
                frame = outbound_frame("stix2/indicator", indicator(f"172.16.{i // 256}.{i % 256}"))
                t0 = time.perf_counter()
                sender.send_frame(frame)
                assert receiver.recv_frame(5) is not None
                latencies.append((time.perf_counter() - t0) * 1000)
            latencies.sort()
            print(
                f"latency (one at a time, 500 samples): median {statistics.median(latencies):.2f} ms, "
                f"p99 {latencies[int(len(latencies) * 0.99)]:.2f} ms, max {latencies[-1]:.2f} ms"
            )
            manage.unsubscribe(reply["topic"])
            receiver.close()
            sender.close(1)
            manage.close()
        finally:
            context.destroy(linger=0)
            node.stop()


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 50_000, int(sys.argv[2]) if len(sys.argv) > 2 else 1)
