"""A real ``threatbus`` process with the misp and zmq apps, both found through their entry points.

MISP itself cannot run here: the process talks to the stand-in of
fake_misp.py (MISP's documented REST API, which the process's unchanged
pymisp calls, and MISP's ZeroMQ format). An app subscribes over the zmq
plugin's protocol as the ecosystem's apps do.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest

from threatbus.stix import new_sighting
from threatbus.testing import ThreatBusProcess, free_port, wait_until


@pytest.mark.e2e
def test_threatbus_process_bridges_misp_and_a_zmq_app(tmp_path: Path, misp, fake, zmq_apps) -> None:
    old = misp.store(fake.attribute("6.6.6.6", timestamp=int(time.time()) - 600))
    zmq = {"host": "127.0.0.1", "manage": free_port(), "pub": free_port(), "sub": free_port()}
    config = {
        "logging": {"console": True, "console_verbosity": "DEBUG"},
        "plugins": {
            "backbones": {"inmem": {}},
            "apps": {
                "zmq": zmq,
                "misp": {
                    "api": {"host": misp.url, "ssl": False, "key": fake.API_KEY},
                    "zmq": {"host": "127.0.0.1", "port": misp.zmq_port},
                },
            },
        },
    }
    node = ThreatBusProcess(config, tmp_path)
    try:
        node.start()
        node.wait_for_log("misp app running")
        app = zmq_apps(zmq, topic="stix2", snapshot=1)
        _, snapshot = app.recv()  # from MISP's attribute search
        assert snapshot.id == f"indicator--{old['uuid']}"

        misp.wait_subscribed()
        new = fake.attribute("evil.example", "domain")
        misp.publish_raw(b"misp_json_attribute {broken")
        misp.publish("add", new)
        misp.publish("delete", new)
        _, added = app.recv()
        _, removed = app.recv()
        assert (added.id, added.pattern) == (f"indicator--{new['uuid']}", "[domain-name:value = 'evil.example']")
        assert removed.id == added.id and removed.is_removal
        node.wait_for_log("dropping invalid message on MISP's ZeroMQ topic misp_json_attribute")

        app.send(new_sighting(snapshot.id, source="Zeek", indicator=snapshot))
        wait_until(lambda: misp.sightings(), what="the sighting at the stand-in")
        (sighting,) = misp.sightings()
        assert (sighting["attribute_uuid"], sighting["type"], sighting["source"]) == (old["uuid"], "0", "Zeek")
        assert node.stop(signal.SIGTERM) == 0
    finally:
        node.kill()
    assert "Traceback" not in node.log()
