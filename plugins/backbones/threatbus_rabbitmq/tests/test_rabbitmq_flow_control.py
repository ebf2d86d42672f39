"""The broker's flow control and outages, as an operator sees them: logs, /health, metrics.

A memory alarm (``set_vm_memory_high_watermark`` near 0) blocks every
publisher on the shared broker, and ``stop_app`` closes every connection,
so these tests are ``broker_disruptive``: they hold the rabbitmqctl lock and
always restore the broker before they end.
"""

from __future__ import annotations

import json
import re
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from testbus import running_bus

from threatbus.bus import Bus
from threatbus.observability import ObservabilityServer
from threatbus.testing import Subscriber, collect, indicator, wait_until
from threatbus_rabbitmq import RabbitMQBackbone
from threatbus_rabbitmq.plugin import BLOCKED

pytestmark = [pytest.mark.rabbitmq, pytest.mark.broker_disruptive]


@contextmanager
def node(broker: Any, label: str) -> Iterator[tuple[Bus, RabbitMQBackbone]]:
    backbone = RabbitMQBackbone()
    config = broker.plugin_config(broker.queue(label))
    with running_bus(backbones={"rabbitmq": backbone}, plugin_config=config, node_name=f"{label}-{broker.id}") as bus:
        wait_until(lambda: bus.health()["connected"], 20, what=f"{label} to connect")
        yield bus, backbone


@contextmanager
def health_endpoint(bus: Bus) -> Iterator[str]:
    server = ObservabilityServer(bus.metrics, bus.health, bus.node, port=0)
    server.start()
    try:
        yield f"{server.url}/health"
    finally:
        server.stop()
        server.join(5)


def get_health(url: str) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


@contextmanager
def memory_alarm(ctl: Any) -> Iterator[None]:
    """A memory alarm on the broker: it blocks every connection that publishes; restored however the test ends."""
    current = ctl.run("eval", "vm_memory_monitor:get_vm_memory_high_watermark().").strip()
    absolute = re.fullmatch(r"\{absolute,\s*(\d+)\}", current)
    restore = ["absolute", absolute.group(1)] if absolute else [current]
    float(restore[-1])  # refuse to go on if the current value cannot be put back
    ctl.run("set_vm_memory_high_watermark", "0.000001")
    try:
        yield
    finally:
        ctl.run("set_vm_memory_high_watermark", *restore)


def ours(caplog: Any, text: str) -> list[str]:
    return [
        r.getMessage() for r in caplog.records if r.name.startswith("threatbus_rabbitmq") and text in r.getMessage()
    ]


def test_a_memory_alarm_is_logged_once_shown_in_health_and_metrics_and_cleared(broker, ctl, caplog):
    with node(broker, "blocked") as (bus, _backbone), health_endpoint(bus) as url:
        subscriber = Subscriber(bus)
        assert get_health(url)[0] == 200
        held = [indicator(f"10.8.0.{i}") for i in range(3)]
        with memory_alarm(ctl):
            for message in held:  # publishing while the alarm is on is what gets a connection blocked
                bus.publish_queue.put(message)
            wait_until(lambda: bus.health()["blocked"], 20, what="the backbone to report the block")
            status, report = get_health(url)
            assert status == 503 and report["status"] == "unavailable"
            assert report["backbone"]["blocked"] is True and report["backbone"]["connected"] is True
            assert "memory" in report["backbone"]["blocked_reason"]
            assert bus.metrics.value(BLOCKED, backbone="rabbitmq") == 1
            assert subscriber.queue.empty()
        wait_until(lambda: not bus.health()["blocked"], 20, what="the block to clear")
        assert [m.id for m in collect(subscriber.queue, 3)] == [m.id for m in held]  # nothing lost meanwhile
        assert get_health(url)[0] == 200
        assert bus.metrics.value(BLOCKED, backbone="rabbitmq") == 0
    blocked_lines = ours(caplog, "blocks this connection")
    assert len(blocked_lines) == 1, blocked_lines  # once, however long it lasts
    assert "low on memory" in blocked_lines[0]
    assert len(ours(caplog, "unblocked this connection")) == 1


def test_a_broker_outage_is_one_line_per_failed_attempt_and_no_pika_errors(broker, ctl, spawn_node):
    # A real node process: its logging is set up as the `threatbus` command does it (console at DEBUG here).
    node = spawn_node("outage", broker.config(broker.queue("outage")))
    node.start()
    sent = indicator("10.8.1.1")

    def failed_attempts() -> list[str]:
        return [line for line in node.log().splitlines() if "cannot connect to RabbitMQ" in line]

    def while_down() -> None:
        wait_until(lambda: len(failed_attempts()) >= 4, 60, what="4 failed connection attempts")

    ctl.restart_app(while_down)
    node.publish([sent])
    node.wait_received({sent.id})
    lines = node.log().splitlines()
    assert [line for line in lines if re.search(r"\] pika[.:]", line)] == []  # pika's own loggers say nothing
    assert "Traceback" not in node.log()
    errors = [line for line in lines if re.search(r" (ERROR|CRITICAL) ", line)]
    # The first failed attempt of each connection (publisher, consumer) is an error; the retries are warnings,
    # and so is losing a connection that was up.
    assert len(errors) <= 2, "\n".join(errors)
    assert all("attempt 1)" in line for line in errors), "\n".join(errors)
    lost = [line for line in lines if "lost: 320 CONNECTION_FORCED" in line]
    assert len(lost) == 2 and all(" WARNING " in line for line in lost), "\n".join(lost)
    for role in ("publisher", "consumer"):
        numbers = [
            int(re.search(r"\(attempt (\d+)\)", line).group(1)) for line in failed_attempts() if f" {role}: " in line
        ]
        assert numbers == list(range(1, len(numbers) + 1)), failed_attempts()  # exactly one line per attempt
