"""End to end: a real ``threatbus`` process polls medallion and serves what it polled over TAXII.

TAXII in and out together: medallion's feed → the node's poller → the bus
(in-memory backbone) → the node's served collection → taxii2-client.
"""

from __future__ import annotations

import signal
import urllib.request
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from taxii2client.v21 import Collection
from threatbus_taxii.settings import DEFAULT_COLLECTION_ID
from threatbus_taxii_medallion import FEED, MIXED, PASSWORD, USER

from threatbus.stix import timestamp
from threatbus.testing import ThreatBusProcess, free_port, wait_until

READER, READER_PASSWORD = "reader", "read-it"


def served(port: int) -> dict[str, dict[str, Any]]:
    url = f"http://127.0.0.1:{port}/threatbus/collections/{DEFAULT_COLLECTION_ID}/"
    with Collection(url, user=READER, password=READER_PASSWORD) as collection:
        objects = [o for page in _pages(collection) for o in page]
    return {o["id"]: o for o in objects}


def _pages(collection: Collection) -> Any:
    envelope = collection.get_objects()
    yield envelope.get("objects", [])
    while envelope.get("more"):
        envelope = collection.get_objects(next=envelope["next"])
        yield envelope.get("objects", [])


def metric(http_port: int, name: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/metrics", timeout=5) as response:
        text = response.read().decode()
    # Prometheus names counters <name>_total.
    prefixes = (name + "{", name + "_total{")
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(prefixes))


@pytest.mark.e2e
def test_threatbus_process_polls_medallion_and_serves_the_intel(tmp_path: Path, medallion: Any) -> None:
    serve_port, http_port = free_port(), free_port()
    config = {
        "logging": {"console": True, "console_verbosity": "DEBUG"},
        "http": {"port": http_port},
        "plugins": {
            "backbones": {"inmem": {}},
            "apps": {
                "taxii": {
                    "url": medallion.url,
                    "collections": [FEED, MIXED],
                    "username": USER,
                    "password": PASSWORD,
                    "poll_interval": 0.5,
                    "page_size": 20,
                    "state_dir": str(tmp_path / "state"),
                    "serve": {"enabled": True, "port": serve_port, "users": {READER: READER_PASSWORD}},
                }
            },
        },
    }
    feed = medallion.feeds[FEED]
    node = ThreatBusProcess(config, tmp_path)
    try:
        node.start()
        # 50 from the feed, 5 valid indicators from the mixed collection.
        wait_until(lambda: len(served(serve_port)) == 55, timeout=30, what="55 served indicators")
        assert metric(http_port, "threatbus_app_received") == 57  # + 2 sightings
        assert metric(http_port, "threatbus_app_rejected") == 3
        assert metric(http_port, "threatbus_taxii_skipped") == 4
        assert metric(http_port, "threatbus_taxii_served") == 55

        # The feed withdraws one indicator: a later version with REMOVE.
        withdrawn = feed[7]
        later = timestamp(datetime.now(timezone.utc) + timedelta(seconds=1))
        medallion.add(FEED, [{**withdrawn, "modified": later, "x_threatbus_update": "REMOVE"}])
        wait_until(lambda: withdrawn["id"] not in served(serve_port), timeout=30, what="the removal")
        assert len(served(serve_port)) == 54
        assert node.stop(signal.SIGTERM) == 0
    finally:
        node.kill()
    assert "Traceback" not in node.log()

    # Restarted: nothing is polled again (the positions are on disk).
    again = ThreatBusProcess(config, tmp_path, name="again")
    try:
        again.start()
        again.wait_for_log("nothing new after", timeout=30)
        assert metric(http_port, "threatbus_app_received") == 0
        assert again.stop(signal.SIGTERM) == 0
    finally:
        again.kill()
    assert "Traceback" not in again.log()
