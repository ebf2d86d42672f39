"""The local cluster tool (threatbus.cluster, `threatbus cluster ...`) without a broker.

The nodes here run the in-memory backbone and no app, so these tests need
neither RabbitMQ nor the zmq plugin; the cluster on the real RabbitMQ is in
test_cluster_rabbitmq.py.
"""

import json
import os
import random
import signal
import socket
import stat
import subprocess
import sys
import urllib.request

import pytest

from threatbus import cluster, config
from threatbus.cluster import BrokerSpec, Cluster, ClusterError, plan
from threatbus.testing import free_port, wait_until


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
