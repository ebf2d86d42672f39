"""A real medallion TAXII 2.1 server and STIX feeds for it, for the TAXII plugin tests.

medallion (the OASIS TAXII 2.1 reference server, from PyPI) runs as a
subprocess on its memory backend, loaded from a data file each test
generates; tests add objects later through its TAXII API, as a feed would.
"""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import requests
from taxii2client.v21 import Collection

from threatbus.stix import timestamp
from threatbus.testing import free_port, indicator, terminate, wait_until

API_ROOT = "api1"
USER, PASSWORD = "feeder", "s3cret-feed"
FEED = "91a7b528-80eb-42ed-a74d-c6fbd5a26116"  # indicators only
MIXED = "52892447-4d7e-4f70-b94d-d7f22742ff63"  # indicators, sightings, other types, invalid intel
UNREADABLE = "64993447-4d7e-4f70-b94d-d7f22742ff63"
MEDIA_TYPE_STIX = "application/stix+json;version=2.1"


def stix_indicator(value: str, **properties: Any) -> dict[str, Any]:
    """A fresh indicator of an IPv4 address, as a TAXII server holds it (plain JSON)."""
    return indicator(value, **properties).payload


def stix_object(kind: str, **properties: Any) -> dict[str, Any]:
    now = timestamp()
    return {
        "type": kind,
        "spec_version": "2.1",
        "id": f"{kind}--{uuid.uuid4()}",
        "created": now,
        "modified": now,
        **properties,
    }


def _collection(
    collection_id: str, title: str, objects: list[dict[str, Any]], *, can_read: bool = True
) -> dict[str, Any]:
    start = datetime.now(timezone.utc) - timedelta(days=1)
    manifest = [
        {
            "id": obj["id"],
            # One second apart, microseconds as medallion writes them.
            "date_added": (start + timedelta(seconds=i)).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
            "version": obj.get("modified", obj.get("created")),
            "media_type": MEDIA_TYPE_STIX,
        }
        for i, obj in enumerate(objects)
    ]
    return {
        "id": collection_id,
        "title": title,
        "can_read": can_read,
        "can_write": True,
        "media_types": [MEDIA_TYPE_STIX],
        "objects": objects,
        "manifest": manifest,
    }


@dataclass
class Medallion:
    """A running medallion server; ``add`` posts objects to a collection through TAXII."""

    url: str  # the API root
    process: subprocess.Popen[bytes]
    log_path: Path
    feeds: dict[str, list[dict[str, Any]]] = field(default_factory=dict)

    @property
    def discovery_url(self) -> str:
        return self.url.rsplit(API_ROOT, 1)[0] + "taxii2/"

    def collection(self, collection_id: str) -> Collection:
        return Collection(f"{self.url}collections/{collection_id}/", user=USER, password=PASSWORD)

    def add(self, collection_id: str, objects: list[dict[str, Any]]) -> None:
        collection = self.collection(collection_id)
        status = collection.add_objects(
            json.dumps({"objects": objects}), wait_for_completion=True, poll_interval=0.1, timeout=10
        )
        assert status.success_count == len(objects), status._raw
        collection.close()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def start_medallion(tmp_path: Path, feeds: dict[str, list[dict[str, Any]]]) -> Medallion:
    data = {
        "/discovery": {
            "title": "medallion for Threat Bus tests",
            "default": f"/{API_ROOT}/",
            "api_roots": [f"/{API_ROOT}/"],
        },
        API_ROOT: {
            "information": {
                "title": "test feeds",
                "versions": ["application/taxii+json;version=2.1"],
                "max_content_length": 10_000_000,
            },
            "status": [],
            "collections": [
                _collection(FEED, "feed", feeds[FEED]),
                _collection(MIXED, "mixed", feeds[MIXED]),
                _collection(UNREADABLE, "write-only", [], can_read=False),
            ],
        },
    }
    data_file = tmp_path / "medallion-data.json"
    data_file.write_text(json.dumps(data))
    config = {
        "backend": {
            "module": "medallion.backends.memory_backend",
            "module_class": "MemoryBackend",
            "filename": str(data_file),
        },
        "users": {USER: PASSWORD},
        "taxii": {"max_page_size": 100},
    }
    config_file = tmp_path / "medallion-config.json"
    config_file.write_text(json.dumps(config))
    port = free_port()
    log_path = tmp_path / "medallion.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "medallion.scripts.run",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                str(config_file),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    server = Medallion(f"http://127.0.0.1:{port}/{API_ROOT}/", process, log_path, feeds)

    def up() -> bool:
        if process.poll() is not None:
            raise AssertionError(f"medallion exited with {process.returncode}:\n{server.log()}")
        try:
            answer = requests.get(
                server.url, auth=(USER, PASSWORD), headers={"Accept": "application/taxii+json;version=2.1"}, timeout=1
            )
        except requests.ConnectionError:
            return False
        return answer.status_code == 200

    wait_until(up, timeout=30, what="medallion to answer")
    return server


def default_feeds() -> dict[str, list[dict[str, Any]]]:
    """FEED: 50 valid indicators. MIXED: 5 valid indicators, 2 sightings, 3 invalid indicators, 4 other objects."""
    feed = [stix_indicator(f"10.0.{i // 250}.{i % 250 + 1}") for i in range(50)]
    valid = [stix_indicator(f"192.0.2.{i + 1}") for i in range(5)]
    sightings = [stix_object("sighting", sighting_of_ref=valid[i]["id"], count=1) for i in range(2)]
    invalid = [
        stix_indicator("x", pattern="[ipv4-addr:value = "),  # not a pattern
        stix_indicator("x", valid_from="yesterday"),  # not a timestamp
        stix_indicator("x", spec_version="2.0"),  # not STIX 2.1
    ]
    others = [
        stix_object("identity", name="ACME", identity_class="organization"),
        stix_object("malware", name="evil", is_family=False),
        stix_object("attack-pattern", name="phishing"),
        stix_object("relationship", relationship_type="indicates", source_ref=valid[0]["id"], target_ref="malware--x"),
    ]
    mixed = [valid[0], others[0], invalid[0], valid[1], sightings[0], others[1], invalid[1], valid[2]]
    mixed += [others[2], valid[3], invalid[2], sightings[1], others[3], valid[4]]
    return {FEED: feed, MIXED: mixed}


def stop_medallion(server: Medallion) -> None:
    terminate(server.process)
