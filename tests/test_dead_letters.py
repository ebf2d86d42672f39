"""The in-memory backbone's dead letters and the `threatbus dlq` command that reaches them over HTTP."""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
import yaml

from threatbus import cli
from threatbus.bus import Bus
from threatbus.deadletters import DEAD_LETTERED, DEAD_LETTERS, DEAD_LETTERS_REPLAYED, UNDELIVERED
from threatbus.node import Node
from threatbus.testing import ThreatBusProcess, collect, free_port, indicator, settings_from, wait_until
from threatbus_inmem import InMemoryBackbone


def config_data(port: int | None, max_items: int = 1000) -> dict:
    return {
        "logging": {"console": True, "console_verbosity": "INFO", "file": False},
        "node": {"name": "dlq-node"},
        "http": {"host": "127.0.0.1", "port": port},
        "plugins": {"backbones": {"inmem": {"dead_letters": {"max_items": max_items}}}, "apps": {}},
    }


@pytest.fixture
def node(tmp_path):
    """An in-process node with its HTTP endpoint on a free port, and its config file for the CLI."""
    port = free_port()
    data = config_data(port)
    path = tmp_path / "node.yaml"
    path.write_text(yaml.safe_dump(data))
    bus = Bus(settings_from(data), apps={}, backbones={"inmem": InMemoryBackbone()}, node=Node.create("dlq-node"))
    bus.configure()
    bus.start()
    try:
        yield bus, path
    finally:
        bus.stop()


def dlq(path: Path, *args: str, capsys) -> tuple[int, str, str]:
    code = cli.main(["dlq", *args, "-c", str(path)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_messages_an_app_could_not_take_are_dead_lettered_and_can_be_replayed(node, capsys):
    bus, path = node
    slow: queue.Queue = queue.Queue(maxsize=1)  # an app that takes one message and then nothing
    fine: queue.Queue = queue.Queue()
    bus.subscribe("stix2/indicator", slow)
    bus.subscribe("stix2/indicator", fine)
    sent = [indicator(f"10.0.0.{i}") for i in range(3)]
    for message in sent:
        bus.publish_queue.put(message)
    assert collect(fine, 3) == sent  # the valid messages around the drops are delivered
    store = bus.dead_letters()
    wait_until(lambda: len(store) == 2, 5, what="two dead letters")
    assert bus.metrics.value(DEAD_LETTERED, reason=UNDELIVERED) == 2
    assert bus.metrics.value(DEAD_LETTERS) == 2

    code, out, _err = dlq(path, "list", capsys=capsys)
    assert code == 0
    letters = store.list()
    assert [letter.body for letter in letters] == [m.encode() for m in sent[1:]]
    for letter in letters:
        assert letter.id in out and UNDELIVERED in out
    assert out.rstrip().endswith("2 dead letter(s)")

    code, out, _err = dlq(path, "show", letters[0].id, capsys=capsys)
    assert code == 0
    assert f"reason: {UNDELIVERED}" in out and "subscriber queue(s) full" in out
    assert sent[1].id in out and "node: dlq-node" in out

    assert slow.get_nowait() == sent[0]  # the app catches up
    code, out, _err = dlq(path, "replay", letters[0].id, capsys=capsys)
    assert (code, out) == (0, "replayed 1 dead letter(s)\n")
    assert slow.get(timeout=5) == sent[1]
    assert fine.get(timeout=5) == sent[1]  # replay sends it to the bus again: every subscriber
    assert [letter.id for letter in store.list()] == [letters[1].id]
    assert bus.metrics.value(DEAD_LETTERS_REPLAYED) == 1

    code, _out, err = dlq(path, "replay", "nosuchid", capsys=capsys)
    assert code == 1 and "not found: nosuchid" in err
    code, out, _err = dlq(path, "purge", capsys=capsys)
    assert (code, out) == (0, "purged 1 dead letter(s)\n")
    code, out, _err = dlq(path, "list", capsys=capsys)
    assert out.rstrip().endswith("0 dead letter(s)")


def test_the_in_memory_dlq_is_bounded(tmp_path):
    data = config_data(None, max_items=3)
    bus = Bus(settings_from(data), apps={}, backbones={"inmem": InMemoryBackbone()}, node=Node.create("dlq-node"))
    bus.configure()
    bus.start()
    try:
        full: queue.Queue = queue.Queue(maxsize=1)
        full.put(None)
        bus.subscribe("stix2", full)
        sent = [indicator(f"10.0.1.{i}") for i in range(10)]
        for message in sent:
            bus.publish_queue.put(message)
        store = bus.dead_letters()
        wait_until(lambda: store.evicted == 7, 5, what="evictions")
        assert [letter.body for letter in store.list()] == [m.encode() for m in sent[7:]]
    finally:
        bus.stop()


def test_replay_needs_ids_or_all(node, capsys):
    _bus, path = node
    code, _out, err = dlq(path, "replay", capsys=capsys)
    assert code == 1 and "replay needs either --all or one or more IDs" in err


def test_http_dlq_endpoints_refuse_garbage(node):
    bus, _path = node
    url = bus.http.url
    request = urllib.request.Request(f"{url}/dlq/replay", data=b"[not json", method="POST")
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=5)
    assert refused.value.code == 400
    request = urllib.request.Request(f"{url}/dlq/replay", data=json.dumps({"ids": [1]}).encode(), method="POST")
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=5)
    assert refused.value.code == 400
    with urllib.request.urlopen(f"{url}/health", timeout=5) as health:  # and the node keeps serving
        assert json.loads(health.read())["backbone"]["dead_letters"] == 0


def test_dlq_without_http_endpoint_says_so(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(config_data(None)))
    code, _out, err = dlq(path, "list", capsys=capsys)
    assert code == 2
    lines = [line for line in err.splitlines() if line.startswith("threatbus:")]
    assert len(lines) == 1 and "http.port is not configured" in lines[0], err


def test_dlq_of_a_node_that_is_not_running(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(config_data(free_port())))
    code, _out, err = dlq(path, "list", capsys=capsys)
    assert code == 1 and "cannot reach the node at http://127.0.0.1:" in err


@pytest.mark.e2e
def test_dlq_command_against_a_real_node(tmp_path):
    data = config_data(free_port())
    node = ThreatBusProcess(data, tmp_path, name="dlq-node")
    node.start()
    try:

        def threatbus(*args: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                [sys.executable, "-m", "threatbus", "dlq", *args, "-c", str(node.config_path)],
                capture_output=True,
                text=True,
                timeout=60,
                env=os.environ,
            )

        listed = threatbus("list")
        assert listed.returncode == 0, listed.stderr
        assert listed.stdout.rstrip().endswith("0 dead letter(s)")
        shown = threatbus("show", "0123")
        assert shown.returncode == 1 and "no dead letter with id '0123'" in shown.stderr
        assert "Traceback" not in shown.stderr
    finally:
        node.stop()
