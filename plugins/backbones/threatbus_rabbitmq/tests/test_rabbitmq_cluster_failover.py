"""Failover in a real 3-node RabbitMQ cluster (``scripts/rabbitmq-cluster``): nothing lost, nothing twice.

The cluster runs beside the shared broker (ports 5681-5683, its own names,
directories and Erlang cookie); this module starts it and stops it again.
Locally the test skips, with the reason, when the cluster cannot start; in CI
(``CI=true``) it fails instead.
"""

from __future__ import annotations

import os
import subprocess
import threading
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from threatbus.testing import indicator, unavailable, wait_until

pytestmark = [pytest.mark.rabbitmq, pytest.mark.e2e, pytest.mark.rabbitmq_cluster]

SCRIPT = Path(__file__).resolve().parents[4] / "scripts" / "rabbitmq-cluster"


def cluster(*args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def cluster_ports() -> Iterator[list[int]]:
    """The AMQP ports of the three cluster nodes; the cluster is up for this module's tests."""
    if os.geteuid() != 0 and not os.access("/usr/lib/rabbitmq/bin/rabbitmq-server", os.X_OK):
        unavailable("the RabbitMQ server scripts are not runnable here (scripts/rabbitmq-cluster needs them)")
    try:
        started = cluster("up")
    except (OSError, subprocess.SubprocessError) as err:
        unavailable(f"scripts/rabbitmq-cluster up failed: {err}")
    if started.returncode != 0:
        cluster("down", timeout=120)  # nodes that did start must not outlive the test
        unavailable(f"scripts/rabbitmq-cluster up failed:\n{started.stdout[-2000:]}\n{started.stderr[-2000:]}")
    try:
        yield [int(port) for port in cluster("ports").stdout.split()]
    finally:
        cluster("down", timeout=120)


def test_stopping_the_cluster_node_both_bus_nodes_use_loses_nothing_and_repeats_nothing(spawn_node, cluster_ports):
    # Names of its own: the cluster is not the shared broker (which this test neither needs nor touches).
    run = uuid.uuid4().hex[:12]
    section = {
        "hosts": [f"127.0.0.1:{port}" for port in cluster_ports],
        "exchange_name": f"tb-failover-{run}",
        "queue": {"type": "quorum"},
        "reconnect": {"initial": 0.2, "max": 1.0},
        "heartbeat": 10,
    }
    sender = spawn_node(f"fo-a-{run}", {**section, "queue": {"type": "quorum", "name_suffix": f"fo-a-{run}"}})
    receiver = spawn_node(f"fo-b-{run}", {**section, "queue": {"type": "quorum", "name_suffix": f"fo-b-{run}"}})
    sender.start()
    receiver.start()
    first_port = cluster_ports[0]
    assert f"connected to amqp://guest@127.0.0.1:{first_port}/" in sender.log()
    assert f"connected to amqp://guest@127.0.0.1:{first_port}/" in receiver.log()

    first = [indicator(f"10.41.{i // 250}.{i % 250}") for i in range(2000)]
    second = [indicator(f"10.42.{i // 250}.{i % 250}") for i in range(2000)]
    ids = [m.id for m in first + second]
    sender.publish(first)
    wait_until(lambda: len(receiver.received()) >= 500, 30, interval=0.01, what="the stream to flow")
    # Stop the broker node both bus nodes are connected to, while the stream flows on.
    stopper = threading.Thread(target=cluster, args=("ctl", "1", "stop_app"), name="stop-cluster-node-1")
    stopper.start()
    try:
        sender.publish(second)
        stopper.join(120)
        receiver.wait_received(set(ids), timeout=90)
    finally:
        stopper.join(120)
        cluster("ctl", "1", "start_app", timeout=120)
    counts = Counter(m.get("id") for m in receiver.received())
    lost = [i for i in ids if counts[i] == 0]
    repeated = {i: counts[i] for i in ids if counts[i] > 1}
    assert lost == [] and repeated == {}, f"lost {len(lost)}, delivered twice {len(repeated)}"
    for node in (sender, receiver):
        log = node.log()
        assert f"connection to amqp://guest@127.0.0.1:{first_port}/ lost" in log, f"{node.name} did not fail over"
        assert any(f"reconnected to amqp://guest@127.0.0.1:{p}/" in log for p in cluster_ports[1:]), node.name
        assert node.stop() == 0
