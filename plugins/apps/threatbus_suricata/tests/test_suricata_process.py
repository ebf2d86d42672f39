"""A real ``threatbus`` process with the Suricata app, found through its entry point.

Suricata cannot be installed here: the process talks to the stand-in
command socket of threatbus_suricata.testing (Suricata's documented protocol) and
follows an EVE file the test writes in Suricata's documented format.
"""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Any

import pytest
from suricataparser import parse_file

from threatbus.testing import ThreatBusProcess, indicator, wait_until
from threatbus_suricata.mapping import Settings
from threatbus_suricata.store import DetectionStore


@pytest.mark.e2e
def test_threatbus_process_loads_detections_reloads_suricata_and_reports_alerts(
    tmp_path: Path, app_config: dict[str, Any], suricata: Any
) -> None:
    # Detections a previous run left behind.
    store = DetectionStore(Path(app_config["rules_file"]), Settings(mode="rules"), 3_900_000_000, 3_999_999_999)
    store.load()
    ind = indicator("6.6.6.6")
    store.apply(ind)
    store.write()
    sid = store.entry(ind.id).sid  # type: ignore[union-attr]

    app_config["mode"] = "datasets"  # a changed mode: the file is rewritten and Suricata reloads
    config = {
        "logging": {"console": True, "console_verbosity": "DEBUG"},
        "plugins": {"backbones": {"inmem": {}}, "apps": {"suricata": app_config}},
    }
    node = ThreatBusProcess(config, tmp_path)
    try:
        node.start()
        node.wait_for_log("1 detections")
        wait_until(lambda: suricata.reload_count() == 1, what="the reload of the rewritten rules")
        assert suricata.dataset("threatbus-ip") == {"6.6.6.6"}
        event = {
            "timestamp": "2026-11-24T20:00:00.000000+0000",
            "event_type": "alert",
            "src_ip": "10.0.0.1",
            "dest_ip": "6.6.6.6",
            "proto": "UDP",
            "alert": {"signature_id": 3_900_000_000, "signature": "Threat Bus dataset threatbus-ip (ip.dst)"},
        }
        with open(app_config["eve"], "a") as out:
            out.write(json.dumps(event) + "\n")
        node.wait_for_log(f"sighting of {ind.id} (6.6.6.6) published")
        assert node.stop(signal.SIGTERM) == 0
    finally:
        node.kill()
    assert "Traceback" not in node.log()
    # The indicator's own rule gave way to the dataset entry.
    sids = {int(o.value) for rule in parse_file(app_config["rules_file"]) for o in rule.options if o.name == "sid"}
    assert sids == {3_900_000_000, 3_900_000_001, 3_900_000_002}
    assert sid not in sids
