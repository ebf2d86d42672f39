"""End to end: a real ``threatbus`` process with the inmem backbone, the zeek app and a probe app.

Zeek itself is the stand-in of conftest.py (Zeek cannot be installed here).
The probe app is installed for the child process only, through a
``*.dist-info`` directory on its PYTHONPATH: it publishes one indicator when
the test asks it to (by writing the indicator to a file) and writes every
sighting it receives to a file.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from zeekclient import brokertypes

from threatbus.testing import ThreatBusProcess, indicator, install_test_plugin, wait_until
from threatbus_zeek import INTEL_TOPIC, MATCH_TOPIC

PROBE = """
import os
import queue

import threatbus
from threatbus.data import TOPIC_SIGHTING, decode
from threatbus.worker import StoppableWorker


class _Worker(StoppableWorker):
    # Publishes the indicator in file "publish" once it appears; writes sightings to "out".

    def __init__(self, inbox, publish_queue, config):
        super().__init__(name="probe")
        self.inbox, self.publish_queue, self.config = inbox, publish_queue, config

    def run(self):
        published = False
        while not self.stopping:
            if not published and os.path.exists(self.config["publish"]):
                with open(self.config["publish"], "rb") as source:
                    self.publish_queue.put(decode(source.read()))
                published = True
            try:
                message = self.inbox.get(timeout=0.05)
            except queue.Empty:
                continue
            with open(self.config["out"], "ab") as out:
                out.write(message.encode() + NEWLINE)


NEWLINE = bytes([10])


class Probe:
    @threatbus.app
    def run(self, config, publish_queue, subscribe):
        inbox = queue.Queue()
        subscribe(TOPIC_SIGHTING, inbox)
        self.worker = _Worker(inbox, publish_queue, dict(config))
        self.worker.start()

    @threatbus.app
    def stop(self):
        self.worker.stop()
        self.worker.join(5)
"""


def install_probe(directory: Path) -> None:
    install_test_plugin(directory, "threatbus.app", "probe", "zeek_e2e_probe", PROBE, "Probe")


@pytest.mark.e2e
def test_threatbus_process_bridges_zeek(zeek, tmp_path):
    install_probe(tmp_path)
    sightings = tmp_path / "sightings.jsonl"
    ioc = indicator("6.6.6.6")
    config = {
        "logging": {"console": True, "console_verbosity": "DEBUG"},
        "plugins": {
            "backbones": {"inmem": {}},
            "apps": {
                "zeek": {"host": "127.0.0.1", "port": zeek.port},
                "probe": {"publish": str(tmp_path / "publish.json"), "out": str(sightings)},
            },
        },
    }
    pythonpath = os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")]))
    process = ThreatBusProcess(config, tmp_path, name="zeek-node", extra_env={"PYTHONPATH": pythonpath})
    process.start()
    try:
        client = zeek.wait_for_client(timeout=20)
        assert client.topics == [MATCH_TOPIC]
        (tmp_path / "publish.json").write_bytes(ioc.encode())
        received = zeek.next_event(timeout=20)
        assert received.topic == INTEL_TOPIC and received.canonical
        assert received.event.name == "ThreatBus::add_intel"
        assert [arg.to_py() for arg in received.event.args][:3] == ["6.6.6.6", "Intel::ADDR", ioc.id]

        zeek.publish(
            MATCH_TOPIC,
            "ThreatBus::intel_match",
            brokertypes.Real(1764000000.0),
            brokertypes.String(ioc.id),
            brokertypes.String("6.6.6.6"),
            brokertypes.Enum("Intel::ADDR"),
            brokertypes.Table({brokertypes.String("uid"): brokertypes.String("C1")}),
        )
        lines = wait_until(lambda: sightings.exists() and sightings.read_text().splitlines(), timeout=20)
        sighting = json.loads(lines[0])
        assert sighting["sighting_of_ref"] == ioc.id
        assert sighting["x_threatbus_source"] == "Zeek"
        assert sighting["x_threatbus_sighting_context"] == {"indicator_type": "ADDR", "uid": "C1"}

        zeek.restart()
        zeek.wait_for_client(timeout=20)
        process.wait_for_log("connection to Zeek at ws://127.0.0.1")
        wait_until(lambda: process.log().count("connected to Zeek at") == 2, what="the reconnect in the log")
    finally:
        code = process.stop()
    assert code == 0, process.log()
    assert "Traceback" not in process.log()
