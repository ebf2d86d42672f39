"""The per-node metrics and health endpoints (threatbus.observability) and their place in the bus."""

import json
import logging
import signal
import socket
import struct
import time
import urllib.error
import urllib.request

import pytest
from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.parser import text_string_to_metric_families
from testbus import running_bus

import threatbus
from threatbus import config
from threatbus.bus import Bus
from threatbus.errors import ConfigError, ThreatBusError
from threatbus.metrics import BACKBONE_CONNECTED, DELIVERED
from threatbus.node import Node
from threatbus.observability import NODE_INFO
from threatbus.testing import Subscriber, ThreatBusProcess, free_port, get_within, indicator, settings_from, wait_until
from threatbus_inmem import InMemoryBackbone


class SwitchableBackbone:
    """A backbone whose health report the test sets; counts what it was given."""

    def __init__(self):
        self.report = {"connected": True}
        self.started = False

    @threatbus.backbone
    def config_validators(self):
        return []

    @threatbus.backbone
    def run(self, config, publish_queue, node, metrics):
        self.started = True
        metrics.gauge(BACKBONE_CONNECTED, "1 up, 0 down", lambda: 1 if self.report.get("connected") else 0)

    @threatbus.backbone
    def stop(self):
        self.started = False

    @threatbus.backbone
    def subscribe(self, topic, queue):
        pass

    @threatbus.backbone
    def unsubscribe(self, topic, queue):
        pass

    @threatbus.backbone
    def health(self):
        if isinstance(self.report, Exception):
            raise self.report
        return self.report


def make_bus(backbone, http, node_name="web-node", name="test"):
    # A real plugin goes by its own name: its validators fill in the defaults of its section only.
    settings = settings_from(
        {"plugins": {"apps": {}, "backbones": {name: {}}}, "logging": {}, "node": {"name": node_name}, "http": http}
    )
    bus = Bus(settings, apps={}, backbones={name: backbone}, node=Node.create(node_name))
    bus.configure()
    return bus


@pytest.fixture
def started():
    buses = []

    def start(backbone, http=None, node_name="web-node", name="test"):
        bus = make_bus(backbone, {"port": 0} if http is None else http, node_name, name)
        bus.start()
        buses.append(bus)
        return bus

    yield start
    for bus in buses:
        bus.stop()


def get(url, method="GET"):
    """(status, headers, body) of one request; HTTP errors are answers too."""
    request = urllib.request.Request(url, method=method)
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, response.headers, response.read()
    except urllib.error.HTTPError as err:
        return err.code, err.headers, err.read()


def samples(body):
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(body.decode())
        for sample in family.samples
    }


def test_health_is_200_with_node_and_backbone_report_while_connected(started):
    backbone = SwitchableBackbone()
    backbone.report = {"connected": True, "broker": "fake"}
    bus = started(backbone, node_name="edge-7")
    status, headers, body = get(bus.http.url + "/health")
    assert status == 200
    assert headers["Content-Type"] == "application/json"
    report = json.loads(body)
    assert report["node"] == "edge-7"
    assert report["instance"] == bus.node.instance
    assert report["status"] == "ok"
    assert report["backbone"] == {"connected": True, "broker": "fake"}


def test_health_is_503_while_the_backbone_is_down_and_200_again_after(started):
    backbone = SwitchableBackbone()
    bus = started(backbone)
    backbone.report = {"connected": False, "error": "connection refused"}
    status, _, body = get(bus.http.url + "/health")
    assert status == 503
    assert json.loads(body)["status"] == "unavailable"
    assert json.loads(body)["backbone"]["error"] == "connection refused"
    backbone.report = {"connected": True}
    assert get(bus.http.url + "/health")[0] == 200


def test_health_is_503_when_the_backbone_cannot_report(started):
    backbone = SwitchableBackbone()
    bus = started(backbone)
    backbone.report = RuntimeError("broken plugin")
    status, _, body = get(bus.http.url + "/health")
    assert status == 503
    assert json.loads(body)["backbone"] == {"connected": False, "error": "broken plugin"}
    # and the server keeps serving
    backbone.report = {"connected": True}
    assert get(bus.http.url + "/health")[0] == 200


def test_metrics_are_prometheus_text_with_the_node_label(started):
    bus = started(SwitchableBackbone(), node_name="metrics-node")
    status, headers, body = get(bus.http.url + "/metrics")
    assert status == 200
    assert headers["Content-Type"] == CONTENT_TYPE_LATEST
    values = samples(body)
    assert values[(BACKBONE_CONNECTED, (("node", "metrics-node"),))] == 1
    info = [key for key in values if key[0] == NODE_INFO]
    assert info == [
        (
            NODE_INFO,
            (("instance", bus.node.instance), ("node", "metrics-node"), ("version", threatbus.__version__)),
        )
    ]


def test_metrics_follow_the_messages_the_bus_delivers(started):
    bus = started(InMemoryBackbone(), node_name="counting", name="inmem")
    subscriber = Subscriber(bus, "stix2")
    for n in range(3):
        bus.publish_queue.put(indicator(f"10.0.0.{n}"))
    for _ in range(3):
        get_within(subscriber.queue)
    key = (DELIVERED + "_total", (("node", "counting"), ("plugin", "inmem")))
    # The counter is read when scraped: it equals what the bus counted.
    assert samples(get(bus.http.url + "/metrics")[2])[key] == 3 == bus.metrics.value(DELIVERED)


def test_a_failing_metric_read_out_gives_500_and_the_server_keeps_serving(started):
    bus = started(SwitchableBackbone())

    def broken():
        raise ValueError("read-out failed")

    bus.metrics.counter("threatbus_broken", "a read-out that raises", broken)
    status, _, body = get(bus.http.url + "/metrics")
    assert status == 500
    assert b"read-out failed" in body
    assert get(bus.http.url + "/health")[0] == 200


def test_unknown_paths_are_404_and_head_has_no_body(started):
    bus = started(SwitchableBackbone())
    assert get(bus.http.url + "/admin")[0] == 404
    status, headers, body = get(bus.http.url + "/health", method="HEAD")
    assert (status, body) == (200, b"")
    assert int(headers["Content-Length"]) > 0
    assert get(bus.http.url + "/metrics/?x=1")[0] == 200


def test_endpoints_are_off_by_default():
    with running_bus() as bus:
        assert bus.http is None
    settings = settings_from({})
    config.validate(settings, config.core_validators())
    assert settings.http.host == "127.0.0.1"
    assert settings.http.port is None


def test_the_configured_address_is_used_and_released_on_stop():
    port = free_port()
    bus = make_bus(SwitchableBackbone(), {"host": "127.0.0.1", "port": port})
    bus.start()
    try:
        assert bus.http.url == f"http://127.0.0.1:{port}"
        assert get(f"http://127.0.0.1:{port}/health")[0] == 200
        worker = bus.http
    finally:
        began = time.monotonic()
        bus.stop()
    assert time.monotonic() - began < 3
    assert not worker.is_alive()
    assert bus.http is None
    with socket.create_server(("127.0.0.1", port)):  # the port is free again
        pass


def test_a_port_in_use_fails_the_start_before_any_plugin_runs():
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        backbone = SwitchableBackbone()
        bus = make_bus(backbone, {"port": port})
        with pytest.raises(ThreatBusError, match=rf"127\.0\.0\.1 port {port}: .*http\.port"):
            bus.start()
        assert not backbone.started


@pytest.mark.parametrize(
    "http, message",
    [
        ({"port": 70000}, "http.port must be a TCP port"),
        ({"port": "9100"}, "http.port must be a TCP port"),
        ({"port": True}, "http.port must be a TCP port"),
        ({"host": ""}, "http.host must be a host name"),
        ("9100", "http must be a mapping"),
    ],
)
def test_bad_http_config_is_rejected_with_the_key(http, message):
    with pytest.raises(ConfigError, match=message):
        make_bus(SwitchableBackbone(), http)


def test_an_empty_http_section_means_defaults(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("http:\nplugins:\n  backbones:\n    inmem:\n")
    settings, _ = config.load(path)
    config.validate(settings, config.core_validators())
    assert (settings.http.host, settings.http.port) == ("127.0.0.1", None)


@pytest.mark.e2e
def test_a_threatbus_process_serves_both_endpoints_and_stops_on_sigterm(tmp_path):
    port = free_port()
    node = ThreatBusProcess(
        {
            "node": {"name": "proc-node"},
            "http": {"port": port},
            "logging": {"console": True, "console_verbosity": "DEBUG"},
            "plugins": {"backbones": {"inmem": {}}},
        },
        tmp_path,
    ).start()
    try:
        health = wait_until(lambda: get(f"http://127.0.0.1:{port}/health"), what="health endpoint")
        assert health[0] == 200
        assert json.loads(health[2])["node"] == "proc-node"
        status, headers, body = get(f"http://127.0.0.1:{port}/metrics")
        assert status == 200
        assert headers["Content-Type"] == CONTENT_TYPE_LATEST
        assert 'node="proc-node"' in body.decode()
        # the node name is in every log line, and the endpoints are announced
        assert f"[proc-node] threatbus.observability: metrics on http://127.0.0.1:{port}/metrics" in node.log()
    finally:
        code = node.stop(signal.SIGTERM)
    assert code == 0
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=1).close()


def test_clients_hanging_up_early_are_no_errors(caplog, capsys):
    bus = make_bus(SwitchableBackbone(), {"port": 0})
    bus.start()
    try:
        for n in range(2000):  # a large answer, so that the hang-up hits the write
            bus.metrics.gauge("threatbus_padding", "x" * 50, lambda: 1, n=str(n))
        for _ in range(5):
            client = socket.create_connection(("127.0.0.1", bus.http.port))
            client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # RST on close
            client.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
            client.close()
        assert get(bus.http.url + "/health")[0] == 200
    finally:
        bus.stop()  # joins the request threads
    errors = [r for r in caplog.records if r.name == "threatbus.observability" and r.levelno >= logging.WARNING]
    assert errors == []
    assert "Traceback" not in capsys.readouterr().err  # socketserver's default handle_error prints one
