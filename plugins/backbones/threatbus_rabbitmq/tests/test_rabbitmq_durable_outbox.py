"""The durable outbox end to end: accepted while the broker is down, the node SIGKILLed, nothing lost.

Real node processes and the real broker, stopped with ``rabbitmqctl stop_app``
(so the test is ``broker_disruptive``) and always started again.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections import Counter
from typing import Any

import pytest
import yaml

from threatbus.testing import free_port, indicator, wait_until

pytestmark = [pytest.mark.rabbitmq, pytest.mark.e2e, pytest.mark.broker_disruptive]


def with_http(node: Any) -> int:
    """Turn on the node's /health and /metrics (before its first start); returns the port."""
    config = yaml.safe_load(node.config_path.read_text())
    port = free_port()
    config["http"] = {"host": "127.0.0.1", "port": port}
    node.config_path.write_text(yaml.safe_dump(config))
    return port


def health(port: int) -> dict[str, Any]:
    """The backbone's part of the node's /health."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as reply:
            return json.loads(reply.read())["backbone"]
    except urllib.error.HTTPError as err:  # 503 while the broker is away: the body still tells
        return json.loads(err.read())["backbone"]


def metric(port: int, name: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        for line in reply.read().decode().splitlines():
            if line.startswith(name):
                return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no metric {name}")


def outage_kill_restart(broker: Any, ctl: Any, spawn_node: Any, state: str) -> tuple[Any, list[str], list[str]]:
    """A publishes 1000 while the broker is down, is SIGKILLed, restarted, publishes 10 more; the broker returns."""
    sender = spawn_node(f"obx-a-{state}-{broker.id}", broker.config(broker.queue(f"obx-a-{state}"), state=state))
    receiver = spawn_node(f"obx-b-{state}-{broker.id}", broker.config(broker.queue(f"obx-b-{state}"), state=state))
    port = with_http(sender)
    sender.start()
    receiver.start()
    intel = [indicator(f"10.31.{i // 250}.{i % 250}") for i in range(1000)]
    newer = [indicator(f"10.32.0.{i}") for i in range(10)]

    def while_down() -> None:
        wait_until(lambda: not health(port)["connected"], 30, what="node a to notice the outage")
        sender.publish(intel)
        wait_until(lambda: health(port)["outbox"] == len(intel), 30, what="1000 messages accepted by node a")
        if state == "disk":
            assert health(port)["outbox_bytes"] > 1000 * 300
            assert metric(port, "threatbus_backbone_outbox_bytes") == health(port)["outbox_bytes"]
        sender.kill()  # SIGKILL
        sender.inbox.write_bytes(b"")  # the test app reads its inbox from the start: it was all handed over
        sender.start(ready_line="is running")
        sender.publish(newer)
        wait_until(lambda: health(port)["outbox"] == len(newer) + (len(intel) if state == "disk" else 0), 30)

    ctl.restart_app(while_down)
    expected = [m.id for m in (intel if state == "disk" else []) + newer]
    receiver.wait_received(set(expected), timeout=60)
    wait_until(lambda: health(port)["outbox"] == 0, 30, what="node a's outbox to empty")
    assert sender.stop() == 0
    assert receiver.stop() == 0
    return sender, [m.get("id") for m in receiver.received()], [m.id for m in intel + newer]


def test_what_a_node_accepted_survives_its_sigkill_during_an_outage_and_is_sent_first_in_order(broker, ctl, spawn_node):
    sender, got, ids = outage_kill_restart(broker, ctl, spawn_node, "disk")
    counts = Counter(got)
    lost = [i for i in ids if counts[i] == 0]
    repeated = [i for i in ids if counts[i] > 1]
    assert lost == [] and repeated == [], f"lost {len(lost)}, delivered twice {len(repeated)}"
    assert got == ids, "the 1000 held across the kill come first, in order, then the 10 newer ones"
    assert "outbox: 1000 message(s)" in sender.log() and "sending them first" in sender.log()


def test_without_the_outbox_on_disk_a_sigkill_during_an_outage_loses_what_was_accepted(broker, ctl, spawn_node):
    # The fault the durable outbox removes (state: memory keeps it in memory only).
    _sender, got, ids = outage_kill_restart(broker, ctl, spawn_node, "memory")
    assert Counter(got) == Counter(ids[1000:])
