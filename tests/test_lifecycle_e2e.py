"""End to end: the intel lifecycle through a real ``threatbus`` process to every kind of sensor.

One node (inmem backbone) with the zmq, zeek and suricata apps. The sensors
are the stand-ins of the plugins' own tests: a ZeroMQ client written from
the protocol (``threatbus_zmq.client``), ``ZeekStandIn`` (Zeek's WebSocket
API; ``ZeekIntel`` folds the events it received into what Zeek would hold)
and ``FakeSuricata`` (Suricata's command socket; in datasets mode its
datasets are what Suricata would match).
"""

from __future__ import annotations

import shutil
import signal
import tempfile
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
import zmq

from threatbus.data import Indicator
from threatbus.lifecycle import REMOVE, as_removal
from threatbus.stix import timestamp
from threatbus.testing import ThreatBusProcess, free_port, indicator, wait_until
from threatbus_suricata.testing import FakeSuricata
from threatbus_zeek.testing import ZeekStandIn
from threatbus_zmq.client import ManageClient, Receiver, Sender, is_success

pytestmark = pytest.mark.e2e


class ZeekIntel:
    """What Zeek's Intel framework holds after the add/remove events the stand-in received."""

    def __init__(self, zeek: Any) -> None:
        self.zeek = zeek
        self.items: dict[tuple[str, str], set[str]] = {}

    def values(self) -> set[str]:
        while not self.zeek.received.empty():
            received = self.zeek.received.get_nowait()
            name = received.event.name
            args = [arg.to_py() for arg in received.event.args]
            adds = name.endswith(("::add_intel", "::add_intels"))
            for value, intel_type, source, *_ in args[0] if name.endswith("::add_intels") else [args]:
                sources = self.items.setdefault((value, intel_type), set())
                if adds:
                    sources.add(source)
                else:
                    sources.discard(source)
                    if not sources:
                        del self.items[(value, intel_type)]
        return {value for value, _ in self.items}


@dataclass
class Node:
    process: ThreatBusProcess
    config: dict[str, Any]
    ports: dict[str, int]
    zeek: Any
    suricata: Any
    zeek_intel: ZeekIntel
    socket_path: str
    rules_file: Path

    def client(self, topic: str = "stix2/indicator") -> Receiver:
        manage = ManageClient("127.0.0.1", self.ports["manage"], 5.0, zmq.Context.instance())
        reply = manage.subscribe(topic)
        manage.close()
        assert is_success(reply), reply
        return Receiver("127.0.0.1", reply["pub_port"], reply["topic"])

    def sender(self) -> Sender:
        sender = Sender("127.0.0.1", self.ports["sub"])
        sender.wait_ready()
        return sender

    def suricata_values(self) -> set[str]:
        return self.suricata.dataset("threatbus-ip")

    def metric(self, name: str) -> float:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.ports['http']}/metrics", timeout=5) as answer:
            text = answer.read().decode()
        prefixes = (name + "{", name + "_total{")  # counters carry _total in the text format
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(prefixes))

    def start(self) -> None:
        self.process = ThreatBusProcess(self.config, self.rules_file.parent, name=f"node-{free_port()}")
        self.process.start()


@pytest.fixture
def node(tmp_path: Path) -> Iterator[Node]:
    short = Path(tempfile.mkdtemp(prefix="tblc-"))  # unix socket paths are short
    socket_path = str(short / "suricata.socket")
    rules_file = tmp_path / "threatbus.rules"
    (tmp_path / "eve.json").touch()
    zeek = ZeekStandIn().start()
    suricata = FakeSuricata(socket_path, rules_file=rules_file)
    suricata.start()
    ports = {name: free_port() for name in ("manage", "pub", "sub", "http")}
    config = {
        "logging": {"console": True, "console_verbosity": "DEBUG"},
        "http": {"port": ports["http"]},
        "plugins": {
            "backbones": {"inmem": {}},
            "apps": {
                "zmq": {"host": "127.0.0.1", "manage": ports["manage"], "pub": ports["pub"], "sub": ports["sub"]},
                "zeek": {"host": "127.0.0.1", "port": zeek.port, "state_file": str(tmp_path / "zeek-state.jsonl")},
                "suricata": {
                    "rules_file": str(rules_file),
                    "socket": socket_path,
                    "eve": str(tmp_path / "eve.json"),
                    "mode": "datasets",
                    "reload_interval": 0.2,
                    "socket_timeout": 2,
                },
            },
        },
    }
    process = ThreatBusProcess(config, tmp_path, name="node")
    the_node = Node(process, config, ports, zeek, suricata, ZeekIntel(zeek), socket_path, rules_file)
    try:
        process.start()
        zeek.wait_for_client(timeout=20)
        yield the_node
    finally:
        the_node.process.kill()
        zeek.stop()
        the_node.suricata.close()
        shutil.rmtree(short, ignore_errors=True)
    assert "Traceback" not in the_node.process.log()


def expiring(value: str, seconds: float) -> Indicator:
    now = datetime.now(timezone.utc)
    return indicator(
        value, valid_from=timestamp(now - timedelta(hours=1)), valid_until=timestamp(now + timedelta(seconds=seconds))
    )


def received(client: Receiver, timeout: float = 10.0) -> Indicator:
    got = client.recv(timeout)
    assert got is not None, f"nothing reached the ZeroMQ client within {timeout}s"
    assert isinstance(got[1], Indicator)
    return got[1]


def until(ind: Indicator) -> float:
    return datetime.fromisoformat(ind.payload["valid_until"].replace("Z", "+00:00")).timestamp()


def now() -> float:
    return datetime.now(timezone.utc).timestamp()


def test_expiry_reaches_every_sensor_as_a_removal(node: Node) -> None:
    client = node.client()
    ind = expiring("198.51.100.1", 3)
    node.sender().send(ind)
    assert received(client) == ind
    wait_until(lambda: "198.51.100.1" in node.zeek_intel.values(), what="the item at Zeek")
    wait_until(lambda: "198.51.100.1" in node.suricata_values(), what="the dataset entry at Suricata")

    removal = received(client, timeout=10)
    late = now() - until(ind)
    assert removal.id == ind.id and removal.payload["x_threatbus_update"] == REMOVE
    assert 0 <= late < 1.0
    wait_until(lambda: "198.51.100.1" not in node.zeek_intel.values(), timeout=5, what="the removal at Zeek")
    wait_until(lambda: "198.51.100.1" not in node.suricata_values(), timeout=5, what="the removal at Suricata")
    assert client.recv(0.5) is None  # once
    assert node.metric("threatbus_expiry_removals") >= 3  # the zmq client, zeek and suricata


def test_a_revoked_version_and_a_remove_reach_every_sensor_as_removals(node: Node) -> None:
    client = node.client()
    sender = node.sender()
    revoked, removed = indicator("198.51.100.2"), indicator("198.51.100.3")
    sender.send(revoked)
    sender.send(removed)
    assert {received(client).id, received(client).id} == {revoked.id, removed.id}
    wait_until(lambda: {"198.51.100.2", "198.51.100.3"} <= node.zeek_intel.values(), what="both at Zeek")
    wait_until(lambda: {"198.51.100.2", "198.51.100.3"} <= node.suricata_values(), what="both at Suricata")

    later = timestamp(datetime.now(timezone.utc) + timedelta(seconds=1))
    sender.send(Indicator({**revoked.payload, "modified": later, "revoked": True}))  # no x_threatbus_update
    sender.send(Indicator(as_removal(removed.payload)))
    for _ in range(2):
        assert received(client).payload["x_threatbus_update"] == REMOVE
    wait_until(lambda: not {"198.51.100.2", "198.51.100.3"} & node.zeek_intel.values(), what="removed at Zeek")
    wait_until(lambda: not {"198.51.100.2", "198.51.100.3"} & node.suricata_values(), what="removed at Suricata")


def test_a_new_version_replaces_the_old_one_at_every_sensor(node: Node) -> None:
    client = node.client()
    sender = node.sender()
    first = indicator("198.51.100.4")
    sender.send(first)
    assert received(client) == first
    wait_until(lambda: "198.51.100.4" in node.zeek_intel.values(), what="the first version at Zeek")
    wait_until(lambda: "198.51.100.4" in node.suricata_values(), what="the first version at Suricata")
    later = timestamp(datetime.now(timezone.utc) + timedelta(seconds=1))
    second = Indicator({**first.payload, "pattern": "[ipv4-addr:value = '198.51.100.5']", "modified": later})
    sender.send(second)
    assert received(client) == second
    wait_until(lambda: node.zeek_intel.values() == {"198.51.100.5"}, what="the replacement at Zeek")
    wait_until(lambda: node.suricata_values() == {"198.51.100.5"}, what="the replacement at Suricata")
    sender.send(first)  # the old version again changes nothing
    assert received(client) == first  # (the bus forwards it; the sensors' apps ignore it)
    node.process.wait_for_log(f"indicator {first.id}: stale")
    assert node.zeek_intel.values() == {"198.51.100.5"} and node.suricata_values() == {"198.51.100.5"}


def test_sensors_away_while_intel_expired_are_reconciled_when_back(node: Node) -> None:
    client = node.client()
    ind, lasting = expiring("198.51.100.6", 2.5), indicator("198.51.100.7")
    sender = node.sender()
    sender.send(ind)
    sender.send(lasting)
    received(client), received(client)
    wait_until(lambda: {"198.51.100.6", "198.51.100.7"} <= node.zeek_intel.values(), what="both at Zeek")
    wait_until(lambda: {"198.51.100.6", "198.51.100.7"} <= node.suricata_values(), what="both at Suricata")
    node.zeek.stop()
    node.suricata.close()
    node.process.wait_for_log("connection to Zeek at")
    wait_until(lambda: received(client).id == ind.id, timeout=10, what="the expiry while the sensors are away")
    node.process.wait_for_log("reloading once Suricata is reachable", timeout=10)  # it missed the removal

    node.zeek.start()
    node.suricata = FakeSuricata(node.socket_path, rules_file=node.rules_file)
    node.suricata.start()
    node.zeek.wait_for_client(timeout=20)
    wait_until(lambda: node.zeek_intel.values() == {"198.51.100.7"}, what="Zeek reconciled")
    wait_until(lambda: node.suricata.reload_count() >= 1, timeout=70, what="Suricata reloaded")
    assert node.suricata_values() == {"198.51.100.7"}
    node.process.wait_for_log("reconciled Zeek: 1 added, 1 removed")
    node.process.wait_for_log("reconciled Suricata: 0 added, 0 replaced, 1 removed")


def test_a_node_restarted_between_delivery_and_expiry_still_expires_on_time(node: Node) -> None:
    ind = expiring("198.51.100.8", 8)
    node.sender().send(ind)
    wait_until(lambda: "198.51.100.8" in node.zeek_intel.values(), what="the item at Zeek")
    wait_until(lambda: "198.51.100.8" in node.suricata_values(), what="the entry at Suricata")
    assert node.process.stop(signal.SIGTERM) == 0
    assert now() < until(ind) - 2, "the restart must come before the expiry"
    node.start()
    node.zeek.wait_for_client(timeout=20)
    wait_until(lambda: "198.51.100.8" not in node.zeek_intel.values(), timeout=15, what="the expiry at Zeek")
    zeek_late = now() - until(ind)
    wait_until(lambda: "198.51.100.8" not in node.suricata_values(), timeout=5, what="the expiry at Suricata")
    suricata_late = now() - until(ind)
    assert -0.05 < zeek_late < 1.5 and -0.05 < suricata_late < 1.5, (zeek_late, suricata_late)


def test_bad_timestamps_are_rejected_with_a_reason_and_counted(node: Node) -> None:
    client = node.client()
    sender = node.sender()
    backwards = indicator("198.51.100.9", valid_from="2026-11-30T12:00:00Z", valid_until="2026-11-30T11:00:00Z")
    expired = indicator("198.51.100.10", valid_from="2020-01-01T00:00:00Z", valid_until="2020-01-02T00:00:00Z")
    fine = indicator("198.51.100.11")
    for message in (backwards, expired, fine):
        sender.send(message)
    assert received(client) == fine  # only the valid one, the bus kept serving
    node.process.wait_for_log(
        f"indicator {backwards.id}: 'valid_until' 2026-11-30T11:00:00Z is not later than 'valid_from' 2026-11-30T12:00:00Z"
    )
    node.process.wait_for_log(f"indicator {expired.id}: expired at 'valid_until' 2020-01-02T00:00:00Z")
    assert node.metric("threatbus_app_rejected") == 1
    assert node.metric("threatbus_expired_on_entry") == 1
    assert "198.51.100.9" not in node.zeek_intel.values() and "198.51.100.10" not in node.zeek_intel.values()
