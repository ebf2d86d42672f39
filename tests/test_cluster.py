"""The local cluster tool (threatbus_cluster, `threatbus cluster ...`) without a broker.

Most nodes here run the in-memory backbone and no app, so those tests need
neither RabbitMQ nor the zmq plugin. The last test runs three nodes on the
real RabbitMQ, each with a ZeroMQ app.
"""

import json
import os
import random
import re
import signal
import socket
import stat
import subprocess
import sys
import urllib.request
import uuid

import pika
import pytest
import zmq
from prometheus_client.parser import text_string_to_metric_families
from testbus import RABBITMQ_HOST, RABBITMQ_PORT, require_rabbitmq

import threatbus_cluster as cluster
from threatbus import config
from threatbus.testing import free_port, indicator, sighting, wait_until
from threatbus_cluster import BrokerSpec, Cluster, ClusterError, plan


def free_base(nodes):
    """A base port whose whole block of cluster ports is free right now."""
    for _ in range(200):
        base = random.randrange(20000, 60000, 10)
        ports = [base + cluster.PORTS_PER_NODE * i + k for i in range(nodes) for k in range(4)]
        try:
            for port in ports:
                with socket.socket() as sock:
                    sock.bind(("127.0.0.1", port))
        except OSError:
            continue
        return base
    raise AssertionError("no free block of ports")


def run_cli(*args, timeout=60):
    return subprocess.run(
        [sys.executable, "-m", "threatbus", "cluster", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def get_json(port, path="/health"):
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def port_free(port):
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


@pytest.fixture
def local(tmp_path):
    """A 3-node in-memory cluster spec in tmp_path; whatever runs at the end is stopped."""
    handle = Cluster(tmp_path / "cluster")
    spec = plan(3, free_base(3), prefix="unit", backbone="inmem", app=None)
    yield handle, spec
    if (handle.directory / cluster.MANIFEST).exists():
        handle.stop(timeout=10)


# ---- planning and config files -------------------------------------------


def test_plan_gives_each_node_its_own_name_and_ports():
    spec = plan(3)
    assert [n.name for n in spec.nodes] == ["node-1", "node-2", "node-3"]
    assert spec.nodes[0].ports == {"manage": 13370, "pub": 13371, "sub": 13372, "http": 13373}
    assert spec.nodes[2].ports == {"manage": 13390, "pub": 13391, "sub": 13392, "http": 13393}
    ports = [port for node in spec.nodes for port in node.ports.values()]
    assert len(set(ports)) == len(ports)


@pytest.mark.parametrize(("count", "base", "message"), [(0, 13370, "at least 1"), (3, 65520, "do not fit")])
def test_plan_rejects_impossible_clusters(count, base, message):
    with pytest.raises(ClusterError, match=message):
        plan(count, base)


def test_written_configs_are_valid_private_and_name_their_own_queue(tmp_path):
    broker = BrokerSpec(host="10.1.2.3", port=5671, username="tb", password="secret", vhost="site", exchange="ex-1")
    spec = plan(2, 30000, prefix="edge", broker=broker)
    handle = Cluster(tmp_path)
    handle.write(spec)
    queues = []
    for node in spec.nodes:
        path = handle.config_path(node.name)
        assert stat.S_IMODE(path.stat().st_mode) == 0o600  # holds the broker password
        settings, _ = config.load(path)
        config.validate(settings, config.core_validators())
        assert settings.node.name == node.name
        assert (settings.http.host, settings.http.port) == ("127.0.0.1", node.http)
        assert dict(settings.plugins.apps.zmq) == {
            "host": "127.0.0.1",
            "manage": node.manage,
            "pub": node.pub,
            "sub": node.sub,
        }
        rabbitmq = settings.plugins.backbones.rabbitmq
        assert (rabbitmq.host, rabbitmq.port, rabbitmq.username, rabbitmq.password) == (
            "10.1.2.3",
            5671,
            "tb",
            "secret",
        )
        assert (rabbitmq.vhost, rabbitmq.exchange_name) == ("site", "ex-1")
        queues.append(rabbitmq.queue.name_suffix)
    assert queues == ["edge-1", "edge-2"]
    assert handle.load() == spec  # the manifest round-trips


def test_commands_without_a_cluster_say_how_to_make_one(tmp_path):
    with pytest.raises(ClusterError, match="threatbus cluster up"):
        Cluster(tmp_path).status()
    result = run_cli("down", "--dir", str(tmp_path))
    assert result.returncode == 1
    assert "no cluster in" in result.stderr


def test_unknown_node_names_are_rejected(local):
    handle, spec = local
    handle.write(spec)
    with pytest.raises(ClusterError, match="no node 'unit-9'"):
        handle.start(["unit-9"])


# ---- processes -----------------------------------------------------------


@pytest.mark.e2e
def test_up_status_stop_start_down_from_the_command_line(tmp_path):
    base = free_base(3)
    directory = str(tmp_path / "c")
    common = ("--dir", directory)
    up = run_cli("up", "--nodes", "3", "--base-port", str(base), "--backbone", "inmem", "--app", "none", *common)
    try:
        assert up.returncode == 0, up.stderr
        assert up.stdout.count("healthy") == 3
        http = [base + 3, base + 13, base + 23]
        reports = [get_json(port) for port in http]
        assert [(status, report["node"]) for status, report in reports] == [
            (200, "node-1"),
            (200, "node-2"),
            (200, "node-3"),
        ]
        with urllib.request.urlopen(f"http://127.0.0.1:{http[1]}/metrics", timeout=5) as response:
            assert 'threatbus_node_info{instance="' in response.read().decode()
        assert run_cli("status", *common).returncode == 0

        # one node down: status says so and fails; the others keep running
        pid_2 = int((tmp_path / "c" / "node-2.pid").read_text())
        stop = run_cli("stop", "node-2", *common)
        assert (stop.returncode, stop.stdout.strip()) == (0, "node-2: stopped")
        assert not (tmp_path / "c" / "node-2.pid").exists()
        status = run_cli("status", *common)
        assert status.returncode == 1
        assert [line.split()[2] for line in status.stdout.splitlines()[2:5]] == ["healthy", "stopped", "healthy"]
        assert "[node-2] threatbus: stopped" in (tmp_path / "c" / "node-2.log").read_text()

        # started again from its config, with a new process
        start = run_cli("start", "node-2", *common)
        assert start.returncode == 0, start.stderr
        assert int((tmp_path / "c" / "node-2.pid").read_text()) != pid_2
        assert get_json(http[1])[0] == 200

        # a second `up` on a running cluster is refused
        again = run_cli("up", "--nodes", "3", "--base-port", str(base), "--backbone", "inmem", *common)
        assert again.returncode == 1
        assert "still running" in again.stderr
    finally:
        down = run_cli("down", *common)
    assert down.returncode == 0, down.stderr
    assert down.stdout.split("\n")[:3] == ["node-1: stopped", "node-2: stopped", "node-3: stopped"]
    assert not list((tmp_path / "c").glob("*.pid"))
    wait_until(lambda: all(port_free(port) for port in http), 5, what="ports released")
    for name in ("node-1", "node-2", "node-3"):
        assert f"[{name}] threatbus: stopped" in (tmp_path / "c" / f"{name}.log").read_text()


def test_a_node_that_fails_to_start_is_reported_and_the_others_are_stopped_again(local):
    handle, spec = local
    handle.write(spec)
    # node 2 asks for a plugin that is not installed: it exits at once
    path = handle.config_path("unit-2")
    path.write_text(path.read_text().replace("inmem: {}", "no-such-backbone: {}"))
    with pytest.raises(ClusterError, match=r"(?s)unit-2 exited during start-up:.*threatbus-no-such-backbone"):
        handle.start(timeout=20)
    assert [status.running for status in handle.status()] == [False, False, False]
    assert not list(handle.directory.glob("*.pid"))


def test_an_unhealthy_node_times_out_and_is_stopped(local, monkeypatch):
    handle, spec = local
    handle.write(spec)
    monkeypatch.setattr(cluster, "health", lambda port, timeout=2.0: (False, "connected=False"))
    with pytest.raises(ClusterError, match=r"unit-1 is not healthy after 1s \(connected=False\)"):
        handle.start(["unit-1"], timeout=1)
    assert handle.status(["unit-1"])[0].running is False


def test_ports_in_use_are_named_before_anything_starts(local):
    handle, spec = local
    taken = spec.nodes[1].http
    with socket.create_server(("127.0.0.1", taken)), pytest.raises(ClusterError, match=rf"{taken} \(unit-2 http\)"):
        handle.up(spec)
    assert not list(handle.directory.glob("*.pid"))


def test_stale_and_foreign_pid_files_count_as_not_running(local):
    handle, spec = local
    handle.write(spec)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    handle.pid_path("unit-1").write_text(f"{dead.pid}\n")
    handle.pid_path("unit-2").write_text(f"{os.getpid()}\n")  # alive, but not that node
    handle.pid_path("unit-3").write_text("garbage\n")
    assert [s.running for s in handle.status()] == [False, False, False]
    assert handle.stop() == {"unit-1": "not running", "unit-2": "not running", "unit-3": "not running"}
    assert not list(handle.directory.glob("*.pid"))


def test_a_node_ignoring_sigterm_is_killed_after_the_deadline(local):
    handle, spec = local
    handle.write(spec)
    config_path = handle.config_path("unit-1")
    stubborn = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import signal, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('ready', flush=True); time.sleep(60)",
            str(config_path),
        ],
        stdout=subprocess.PIPE,
    )
    try:
        assert stubborn.stdout.readline() == b"ready\n"
        handle.pid_path("unit-1").write_text(f"{stubborn.pid}\n")
        assert handle.status(["unit-1"])[0].running
        assert handle.stop(["unit-1"], timeout=0.5) == {"unit-1": "killed"}
        assert stubborn.wait(5) == -signal.SIGKILL
    finally:
        stubborn.kill()
        stubborn.wait()


def test_health_of_a_port_nobody_serves():
    healthy, detail = cluster.health(free_port())
    assert not healthy
    assert "not reachable" in detail


# ---- three nodes on the real RabbitMQ, an app on each ----------------------

P2P_TOPIC = re.compile(rb"[a-z]{32}")


class WireApp:
    """A ZeroMQ app written from WIRE.md, as suricata-threatbus and friends speak it.

    It subscribes at the manage endpoint, receives its p2p topic on the pub
    port and publishes on the sub port. Its publishing socket is an XPUB (a
    PUB that also sees subscriptions): it waits until the bus's SUB socket
    has subscribed, so no message is lost to ZeroMQ's slow joiner.
    """

    def __init__(self, context, manage_port, topic="stix2"):
        self.context = context
        self.received = {}  # id -> number of times received
        self.order = []
        self.subscribe(manage_port, topic)

    def subscribe(self, manage_port, topic):
        manage = self.context.socket(zmq.REQ)
        manage.setsockopt(zmq.LINGER, 0)
        manage.setsockopt(zmq.RCVTIMEO, 10_000)
        manage.connect(f"tcp://127.0.0.1:{manage_port}")
        manage.send_json({"action": "subscribe", "topic": topic, "snapshot": 0})
        reply = manage.recv_json()
        manage.close()
        assert reply["status"] == "success", reply
        self.topic = reply["topic"].encode()
        assert P2P_TOPIC.fullmatch(self.topic), reply
        self.sub = self.context.socket(zmq.SUB)
        self.sub.setsockopt(zmq.LINGER, 0)
        self.sub.connect(f"tcp://127.0.0.1:{reply['pub_port']}")
        self.sub.setsockopt(zmq.SUBSCRIBE, self.topic)
        self.pub = self.context.socket(zmq.XPUB)
        self.pub.setsockopt(zmq.LINGER, 5000)
        self.pub.connect(f"tcp://127.0.0.1:{reply['sub_port']}")
        if not self.pub.poll(10_000):
            raise AssertionError(f"the bus's sub socket on port {reply['sub_port']} never subscribed")
        assert self.pub.recv() == b"\x01"  # subscribed to everything

    def send(self, message):
        self.pub.send(f"{message.topic} ".encode() + message.encode())

    def send_raw(self, frame):
        self.pub.send(frame)

    def drain(self, timeout=0.0):
        """Read what arrived (waiting up to ``timeout`` for the first frame)."""
        while self.sub.poll(int(timeout * 1000)):
            timeout = 0
            frame = self.sub.recv()
            assert frame.startswith(self.topic), frame[:80]
            kind, _, body = frame[len(self.topic) :].partition(b" ")
            payload = json.loads(body)
            assert kind.decode() == payload["type"], frame[:120]
            self.received[payload["id"]] = self.received.get(payload["id"], 0) + 1
            self.order.append(payload)

    def wait_for(self, ids, timeout=30):
        ids = set(ids)
        wait_until(lambda: self.drain(0.05) or ids <= self.received.keys(), timeout, what=f"{len(ids)} messages")

    def close(self):
        self.sub.close(linger=0)
        self.pub.close(linger=0)


def metric(port, name, **labels):
    """Sum of the samples of ``name`` on the node whose /metrics is on ``port`` that carry ``labels``."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name and labels.items() <= sample.labels.items()
    )


@pytest.fixture
def broker_names():
    """Unique RabbitMQ names for one test; the exchanges and queues are deleted afterwards."""
    require_rabbitmq()
    run_id = uuid.uuid4().hex[:10]
    names = {"exchange": f"threatbus-e2e-{run_id}", "prefix": f"e2e{run_id}"}
    yield names
    connection = pika.BlockingConnection(pika.ConnectionParameters(RABBITMQ_HOST, RABBITMQ_PORT))
    channel = connection.channel()
    for index in (1, 2, 3):
        channel.queue_delete(f"threatbus.{names['prefix']}-{index}")
    for exchange in (names["exchange"], f"{names['exchange']}.durable"):
        channel.exchange_delete(exchange)
    connection.close()


def queue_length(name):
    connection = pika.BlockingConnection(pika.ConnectionParameters(RABBITMQ_HOST, RABBITMQ_PORT))
    try:
        return connection.channel().queue_declare(name, passive=True).method.message_count
    finally:
        connection.close()


@pytest.mark.rabbitmq
@pytest.mark.e2e
def test_three_nodes_share_intel_and_a_killed_node_catches_up(tmp_path, broker_names):
    base = free_base(3)
    directory = tmp_path / "cluster"
    common = ("--dir", str(directory))
    prefix = broker_names["prefix"]
    names = [f"{prefix}-{index}" for index in (1, 2, 3)]
    manage = [base + 10 * i for i in range(3)]
    http = [base + 10 * i + 3 for i in range(3)]
    up = run_cli(
        "up",
        "--nodes",
        "3",
        "--base-port",
        str(base),
        "--prefix",
        prefix,
        "--exchange",
        broker_names["exchange"],
        "--rabbitmq-host",
        RABBITMQ_HOST,
        "--rabbitmq-port",
        str(RABBITMQ_PORT),
        *common,
    )
    context = zmq.Context()
    apps = []
    try:
        assert up.returncode == 0, up.stderr
        assert up.stdout.count("healthy") == 3
        apps = [WireApp(context, port) for port in manage]
        wait_until(
            lambda: all(metric(port, "threatbus_subscribers", plugin="zmq") == 1 for port in http),
            10,
            what="one zmq subscriber per node",
        )

        # intel from node 1 reaches every app; a sighting from node 2 comes back to node 1
        intel = indicator("10.7.0.1")
        apps[0].send(intel)
        for app in apps:
            app.wait_for([intel.id])
        seen = sighting(intel, source="e2e-node-2")
        apps[1].send(seen)
        apps[0].wait_for([seen.id])
        returned = next(m for m in apps[0].order if m["id"] == seen.id)
        assert returned["sighting_of_ref"] == intel.id
        assert returned["x_threatbus_source"] == "e2e-node-2"

        # a batch from every node, and one invalid message on node 3
        batches = [[indicator(f"10.7.{i + 1}.{n}") for n in range(20)] for i in range(3)]
        for app, batch in zip(apps, batches, strict=True):
            for message in batch:
                app.send(message)
        apps[2].send_raw(b'stix2/indicator {"type": "indicator", "id": "indicator--not-a-uuid"}')
        everything = {intel.id, seen.id} | {m.id for batch in batches for m in batch}
        for app in apps:
            app.wait_for(everything)
            assert set(app.received) == everything
            assert set(app.received.values()) == {1}  # exactly once, the invalid one never

        # the metrics of every node agree with what was sent
        sent = [1 + 20, 1 + 20, 20]
        for port, count in zip(http, sent, strict=True):
            wait_until(
                lambda port=port, count=count: (
                    metric(port, "threatbus_backbone_published_total") == count
                    and metric(port, "threatbus_backbone_consumed_total") == len(everything)
                    and metric(port, "threatbus_delivered_total", plugin="zmq") == len(everything)
                ),
                20,
                what=f"the metrics of the node on {port} to settle",
            )
            assert metric(port, "threatbus_app_received_total", plugin="zmq") == count
            assert metric(port, "threatbus_dropped_total") == 0
            assert metric(port, "threatbus_backbone_connected") == 1
        assert [metric(port, "threatbus_app_rejected_total", plugin="zmq") for port in http] == [0, 0, 1]
        assert [metric(port, "threatbus_node_info", node=name) for port, name in zip(http, names, strict=True)] == [
            1,
            1,
            1,
        ]

        # node 2 dies hard; what is sent meanwhile waits in its durable queue
        handle = Cluster(directory)
        pid = handle.pid(names[1])
        os.kill(pid, signal.SIGKILL)
        wait_until(lambda: handle.pid(names[1]) is None, 10, what="node 2 to die")
        apps[1].close()
        meanwhile = [indicator(f"10.7.9.{n}") for n in range(15)]
        for message in meanwhile:
            apps[0].send(message)
        for app in (apps[0], apps[2]):
            app.wait_for({m.id for m in meanwhile})
        wait_until(
            lambda: metric(http[0], "threatbus_backbone_published_total") == sent[0] + len(meanwhile),
            20,
            what="node 1's publishes to be confirmed",
        )
        # Confirmed means routed into every bound queue. Besides these, the queue may hold
        # messages node 2 had consumed but not yet acknowledged when it died (acks are batched).
        queue_2 = f"threatbus.{names[1]}"
        backlog = queue_length(queue_2)
        assert len(meanwhile) <= backlog <= len(meanwhile) + 200  # 200: the prefetch

        # restarted, it consumes the backlog, and its app (subscribing again) gets new intel
        start = run_cli("start", names[1], *common)
        assert start.returncode == 0, start.stderr
        wait_until(
            lambda: metric(http[1], "threatbus_backbone_consumed_total") == backlog,
            20,
            what="node 2 to consume its backlog",
        )
        assert queue_length(queue_2) == 0
        assert f"({backlog} message(s) waiting)" in (directory / f"{names[1]}.log").read_text()
        apps[1] = WireApp(context, manage[1])
        after = indicator("10.7.10.1")
        apps[2].send(after)
        for app in apps:
            app.wait_for([after.id])
        assert metric(http[1], "threatbus_backbone_consumed_total") == backlog + 1
        # (The backlog itself reaches no app: the node consumes it before any ZeroMQ app
        # can subscribe again, and ZeroMQ subscriptions do not outlive a node.)
    finally:
        for app in apps:
            app.close()
        context.term()
        down = run_cli("down", *common)
    assert down.returncode == 0, down.stderr
    assert down.stdout.split("\n")[:3] == [f"{name}: stopped" for name in names]
