"""Config validation and start-up failures of the zmq plugin."""

from __future__ import annotations

import queue
import socket
import threading

import pytest
from testbus import running_bus

from threatbus.errors import ConfigError, PluginError
from threatbus.metrics import DELIVERED, Metrics
from threatbus.node import Node
from threatbus.testing import free_port, indicator, wait_until
from threatbus_zmq import ZmqApp
from threatbus_zmq.wire import is_p2p_topic, new_p2p_topic


def config(**zmq):
    return {"apps": {"zmq": {"manage": free_port(), "pub": free_port(), "sub": free_port(), **zmq}}}


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("manage", "abc", "plugins.apps.zmq.manage must be a TCP port"),
        ("pub", 70000, "plugins.apps.zmq.pub must be a TCP port"),
        ("heartbeat_timeout", -1, "plugins.apps.zmq.heartbeat_timeout must be a number of seconds"),
        ("buffer_size", 0, "plugins.apps.zmq.buffer_size must be a positive number"),
        ("host", "", "plugins.apps.zmq.host must be a host name"),
    ],
)
def test_invalid_config_names_the_key(key, value, message):
    with (
        pytest.raises(ConfigError, match=message),
        running_bus(apps={"zmq": ZmqApp()}, plugin_config=config(**{key: value})),
    ):
        pass


def test_same_port_twice_is_refused():
    port = free_port()
    settings = config(manage=port, pub=port)
    with (
        pytest.raises(PluginError, match="three different ports"),
        running_bus({"zmq": ZmqApp()}, plugin_config=settings),
    ):
        pass


def test_a_port_in_use_fails_the_start_with_the_endpoint_named():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        expected = f"cannot bind the sub socket to tcp://127.0.0.1:{port}"
        with pytest.raises(PluginError, match=expected), running_bus({"zmq": ZmqApp()}, plugin_config=config(sub=port)):
            pass


def test_defaults_apply(inprocess_bus):
    section = inprocess_bus.bus.settings.get("plugins.apps.zmq")
    assert section["heartbeat_timeout"] == 120 and section["buffer_size"] == 10_000
    assert section["max_subscribers"] == 1000 and section["send_hwm"] == 1000


def test_subscriber_limit_gets_an_error_reply(configured_bus):
    with configured_bus("inprocess", max_subscribers=2) as bus:
        manage = bus.manage_client()
        assert manage.subscribe("stix2")["status"] == "success"
        assert manage.subscribe("stix2")["status"] == "success"
        reply = manage.subscribe("stix2")
        assert reply["status"] == "error" and "limit" in reply["reason"]
        manage.close()


def test_ipv6_host(configured_bus):
    if not socket.has_ipv6:
        pytest.skip("no IPv6 on this machine")
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        pytest.skip("::1 not configured on this machine")
    with configured_bus("inprocess") as v4:  # ports from a v4 bus, reused below on ::1
        ports = (v4.manage, v4.pub, v4.sub)
    app = ZmqApp()
    plugin_config = {"apps": {"zmq": {"host": "::1", "manage": ports[0], "pub": ports[1], "sub": ports[2]}}}
    with running_bus(apps={"zmq": app}, plugin_config=plugin_config) as bus:
        from threatbus_zmq.client import ManageClient

        manage = ManageClient("::1", ports[0], 5)
        assert manage.subscribe("stix2")["status"] == "success"
        manage.close()
        assert bus.metrics.value(DELIVERED, plugin="zmq") == 0


def test_p2p_topics_are_32_lowercase_letters_and_distinct():
    topics = {new_p2p_topic() for _ in range(1000)}
    assert len(topics) == 1000 and all(is_p2p_topic(t) for t in topics)
    assert not is_p2p_topic("A" * 32) and not is_p2p_topic("a" * 31) and not is_p2p_topic(42)


def test_delivered_counts_frames_sent(inprocess_bus):
    consumers = [inprocess_bus.fake_app("stix2/indicator") for _ in range(3)]
    consumers[0].send(indicator())
    for consumer in consumers:
        consumer.recv()
    # The publisher counts a frame once its send returned: an app may have it a moment before.
    wait_until(lambda: inprocess_bus.metric(DELIVERED, plugin="zmq") == 3, 5, what="three frames counted")


def test_a_run_that_fails_before_starting_its_workers_still_stops():
    # A metric clash fails run() after the sockets and workers exist but before
    # the workers start; stop() must close their sockets, or context.term() hangs.
    metrics = Metrics("test-node")
    metrics.gauge(DELIVERED, "a gauge where the plugin wants a counter", lambda: 0)
    app = ZmqApp()
    section = config()["apps"]["zmq"]
    section.update(host="127.0.0.1", heartbeat_timeout=120, buffer_size=10, send_hwm=10, max_subscribers=10)
    with pytest.raises(ValueError, match=DELIVERED):
        app.run(
            config=section,
            publish_queue=queue.SimpleQueue(),
            subscribe=lambda **_: [],
            unsubscribe=lambda **_: None,
            node=Node.create("test-node"),
            metrics=metrics,
            backlog=lambda: 0,
        )
    # A daemon thread only so that this test reports the hang instead of hanging itself.
    stopper = threading.Thread(target=app.stop, daemon=True)
    stopper.start()
    stopper.join(10)
    assert not stopper.is_alive(), "ZmqApp.stop hangs on workers that never started"
