"""TAXII out: the bus's current intel as a read-only TAXII 2.1 collection, read with taxii2-client."""

from __future__ import annotations

import queue
import shutil
import socket
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
import requests
from taxii2client.v21 import ApiRoot, Collection, Server, as_pages
from testbus import running_bus
from threatbus_taxii import TaxiiApp
from threatbus_taxii.intel import ServedIntel
from threatbus_taxii.plugin import SERVE_REFUSED, SERVED
from threatbus_taxii.settings import DEFAULT_COLLECTION_ID

import threatbus
from threatbus.bus import Bus
from threatbus.config import section, validate
from threatbus.data import Indicator, SnapshotEnvelope, SnapshotRequest, SnapshotType
from threatbus.errors import PluginError
from threatbus.metrics import FILTERED, Metrics
from threatbus.node import Node
from threatbus.stix import timestamp
from threatbus.testing import TrackedReceipt, collect, get_within, indicator, settings_from, unavailable, wait_until

READER, READER_PASSWORD = "reader", "let-me-read"
TAXII_JSON = "application/taxii+json;version=2.1"


@contextmanager
def serving(filter: dict[str, Any] | None = None, **serve: Any) -> Iterator[tuple[Bus, TaxiiApp, str]]:
    """A bus with the TAXII app serving on a free port; yields the bus, the app and the API root URL."""
    app = TaxiiApp()
    config: dict[str, Any] = {"serve": {"enabled": True, "port": 0, "users": {READER: READER_PASSWORD}, **serve}}
    if filter is not None:
        config["filter"] = filter
    with running_bus(apps={"taxii": app}, plugin_config={"apps": {"taxii": config}}) as bus:
        assert app.server is not None
        yield bus, app, f"{app.server.url}threatbus/"


def collection(root: str, user: str | None = READER, password: str | None = READER_PASSWORD) -> Collection:
    return Collection(f"{root}collections/{DEFAULT_COLLECTION_ID}/", user=user, password=password)


def served_ids(root: str) -> set[str]:
    return {obj["id"] for obj in collection(root).get_objects().get("objects", [])}


def version(payload: dict[str, Any], **changes: Any) -> Indicator:
    """A later version of an indicator."""
    later = (datetime.now(timezone.utc) + timedelta(seconds=1)).replace(microsecond=0)
    return Indicator({**payload, "modified": timestamp(later), **changes})


def test_indicators_on_the_bus_are_served_and_removals_disappear():
    with serving() as (bus, _, root):
        first, second, third = indicator("6.6.6.6"), indicator("7.7.7.7"), indicator("8.8.8.8")
        for message in (first, second, third):
            bus.publish_queue.put(message)
        wait_until(lambda: served_ids(root) == {first.id, second.id, third.id}, what="three served indicators")

        bus.publish_queue.put(version(first.payload, x_threatbus_update="REMOVE"))
        bus.publish_queue.put(version(second.payload, revoked=True))
        wait_until(lambda: served_ids(root) == {third.id}, what="removal and revocation applied")

        # A newer version replaces the served one; an older one arriving late is ignored.
        newer = version(third.payload, confidence=90)
        bus.publish_queue.put(newer)
        wait_until(lambda: collection(root).get_object(third.id)["objects"][0].get("confidence") == 90)
        bus.publish_queue.put(Indicator({**third.payload, "confidence": 1}))
        bus.publish_queue.put(indicator("9.9.9.9"))  # a marker: delivered after the stale version
        wait_until(lambda: len(served_ids(root)) == 2)
        assert collection(root).get_object(third.id)["objects"][0]["confidence"] == 90
        # The versions endpoint lists the served version; an object no longer served is not found.
        objects = f"{root}collections/{DEFAULT_COLLECTION_ID}/objects/"
        assert _get(f"{objects}{third.id}/versions/").json()["versions"] == [newer.payload["modified"]]
        assert _get(f"{objects}{first.id}/versions/").status_code == 404


def test_expired_indicators_are_not_served():
    clock = [datetime.now(timezone.utc)]
    intel = ServedIntel(clock=lambda: clock[0])
    soon = timestamp(clock[0] + timedelta(minutes=5))
    intel.apply(indicator("6.6.6.6", valid_until=soon).payload)
    intel.apply(indicator("7.7.7.7").payload)
    intel.apply(indicator("8.8.8.8", valid_until=timestamp(clock[0] - timedelta(minutes=5))).payload)
    assert len(intel.served()) == 2
    clock[0] += timedelta(minutes=6)
    assert [s.payload["pattern"] for s in intel.served()] == ["[ipv4-addr:value = '7.7.7.7']"]


def test_discovery_api_root_and_collection_metadata():
    with serving() as (_, _, root):
        server = Server(root.replace("threatbus/", "taxii2/"), user=READER, password=READER_PASSWORD)
        assert [r.url for r in server.api_roots] == [root]
        api_root = ApiRoot(root, user=READER, password=READER_PASSWORD)
        (served,) = api_root.collections
        assert (served.id, served.title, served.can_read, served.can_write) == (
            DEFAULT_COLLECTION_ID,
            "Threat Bus intel",
            True,
            False,
        )


def test_paging_and_added_after_give_every_indicator_once():
    with serving(max_page_size=10) as (bus, app, root):
        sent = [indicator(f"10.1.0.{i}") for i in range(25)]
        for message in sent:
            bus.publish_queue.put(message)
        wait_until(lambda: len(app.intel.served()) == 25)
        pages = list(as_pages(collection(root).get_objects, per_request=10))
        assert [len(p["objects"]) for p in pages] == [10, 10, 5]
        assert [o["id"] for p in pages for o in p["objects"]] == [m.id for m in sent]

        # A client's position: the last date added it saw. Only what came later is new.
        manifest = [m for p in as_pages(collection(root).get_manifest, per_request=10) for m in p["objects"]]
        assert [m["id"] for m in manifest] == [m.id for m in sent]
        position = manifest[-1]["date_added"]
        last_page = _get(
            f"{root}collections/{DEFAULT_COLLECTION_ID}/objects/", params={"added_after": manifest[19]["date_added"]}
        )
        assert last_page.headers["X-TAXII-Date-Added-Last"] == position
        later = indicator("10.2.0.1")
        bus.publish_queue.put(later)
        wait_until(lambda: len(app.intel.served()) == 26)
        assert [o["id"] for o in collection(root).get_objects(added_after=position)["objects"]] == [later.id]

        manifest = collection(root).get_manifest(added_after=position)["objects"]
        assert [(m["id"], m["version"]) for m in manifest] == [(later.id, later.payload["modified"])]


def test_credentials_are_checked_and_refusals_counted():
    with serving() as (bus, app, root):
        bus.publish_queue.put(indicator())
        wait_until(lambda: app.intel.served())
        for user, password in ((None, None), (READER, "wrong"), ("nobody", READER_PASSWORD)):
            with pytest.raises(requests.HTTPError, match="401"):
                collection(root, user, password).get_objects()
        assert app.gate is not None and app.gate.refused == 3
        assert len(collection(root).get_objects()["objects"]) == 1


def test_without_users_anyone_may_read():
    with serving(users={}) as (bus, app, root):
        bus.publish_queue.put(indicator())
        wait_until(lambda: app.intel.served())
        assert len(collection(root, None, None).get_objects()["objects"]) == 1


def test_the_collection_is_read_only_and_garbage_requests_get_taxii_errors():
    with serving() as (bus, app, root):
        bus.publish_queue.put(indicator())
        wait_until(lambda: app.intel.served())
        objects = f"{root}collections/{DEFAULT_COLLECTION_ID}/objects/"
        posted = requests.post(
            objects,
            data=b'{"objects": []}',
            auth=(READER, READER_PASSWORD),
            headers={"Accept": TAXII_JSON, "Content-Type": TAXII_JSON},
            timeout=5,
        )
        assert posted.status_code == 403
        assert _get(objects, params={"added_after": "yesterday"}).status_code == 400
        assert _get(objects, params={"next": "garbage"}).status_code == 400
        assert _get(objects, params={"limit": "-1"}).status_code == 400
        assert _get(objects, accept="text/html").status_code == 406
        assert _get(f"{objects}indicator--00000000-0000-4000-8000-000000000000/").status_code == 404
        assert _get(f"{root}collections/nope/objects/").status_code == 404
        assert _get(root.replace("threatbus/", "other/")).status_code == 404
        # Still serving after all that.
        assert _get(objects).json()["objects"][0]["type"] == "indicator"


def test_metrics_count_served_intel_and_refusals():
    with serving() as (bus, app, root):
        bus.publish_queue.put(indicator())
        wait_until(lambda: app.intel.served())
        requests.get(root, timeout=5)
        assert bus.metrics.value(SERVED, plugin="taxii") == 1
        assert bus.metrics.value(SERVE_REFUSED, plugin="taxii") == 1


def test_a_port_in_use_is_a_plugin_error():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(PluginError, match=f"cannot serve TAXII on 127.0.0.1:{port}"), serving(port=port):
            pass


def _get(url: str, params: dict[str, str] | None = None, accept: str = TAXII_JSON) -> requests.Response:
    return requests.get(url, params=params, auth=(READER, READER_PASSWORD), headers={"Accept": accept}, timeout=5)


def _self_signed(directory: Path) -> tuple[Path, Path]:
    if shutil.which("openssl") is None:
        unavailable("openssl is needed to make a test certificate")
    cert, key = directory / "server.pem", directory / "server.key"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        check=True,
        capture_output=True,
        timeout=60,
    )  # fmt: skip
    return cert, key


def test_tls_serving_with_a_certificate_and_garbage_connections(tmp_path, monkeypatch):
    # requests prefers these to a client's own CA file; taxii2-client offers no way around that.
    monkeypatch.delenv("REQUESTS_CA_BUNDLE", raising=False)
    monkeypatch.delenv("CURL_CA_BUNDLE", raising=False)
    cert, key = _self_signed(tmp_path)
    with serving(tls={"cert_file": str(cert), "key_file": str(key)}) as (bus, app, root):
        assert root.startswith("https://127.0.0.1:")
        bus.publish_queue.put(indicator())
        wait_until(lambda: app.intel.served())
        # Plain HTTP and raw garbage on the TLS port, and a client that says nothing: dropped, serving goes on.
        with pytest.raises(requests.ConnectionError):
            requests.get(root.replace("https://", "http://"), timeout=5)
        with socket.create_connection(("127.0.0.1", app.server.port)) as raw:
            raw.sendall(b"\x00\xff garbage \r\n\r\n")
        with pytest.raises(requests.exceptions.SSLError):
            requests.get(root, timeout=5)  # the self-signed certificate is not trusted
        trusted = Collection(
            f"{root}collections/{DEFAULT_COLLECTION_ID}/", user=READER, password=READER_PASSWORD, verify=str(cert)
        )
        assert len(trusted.get_objects()["objects"]) == 1


def test_garbage_on_the_plain_port_is_answered_or_dropped_and_serving_goes_on():
    with serving() as (bus, app, root):
        bus.publish_queue.put(indicator())
        wait_until(lambda: app.intel.served())
        for junk in (
            b"\x00\xff\xfe garbage\r\n\r\n",
            b"GET /" + b"a" * 70000 + b" HTTP/1.1\r\n\r\n",
            b"BREW / HTCPCP/1.0\r\n\r\n",
        ):
            with socket.create_connection(("127.0.0.1", app.server.port)) as raw:
                raw.sendall(junk)
                raw.settimeout(5)
                raw.recv(1024)  # an error answer or the connection closed
        assert len(collection(root).get_objects()["objects"]) == 1


@pytest.mark.filterwarnings("ignore::urllib3.exceptions.InsecureRequestWarning")
def test_a_poller_reads_a_served_collection_over_tls_with_its_ca_file(tmp_path):
    """TAXII out of one app into TAXII in of another; tls.ca_file wins over REQUESTS_CA_BUNDLE."""
    cert, key = _self_signed(tmp_path)
    with serving(tls={"cert_file": str(cert), "key_file": str(key)}) as (bus, app, root):
        sent = [indicator(f"10.3.0.{i}") for i in range(3)]
        for message in sent:
            bus.publish_queue.put(message)
        wait_until(lambda: len(app.intel.served()) == 3)
        for name, tls in (("ca", {"ca_file": str(cert)}), ("unverified", {"verify": False})):
            reader = TaxiiApp()
            config = {
                "url": root,
                "username": READER,
                "password": READER_PASSWORD,
                "tls": tls,
                "poll_interval": 30,
                "state_dir": str(tmp_path / name),
            }
            settings = settings_from({"plugins": {"apps": {"taxii": config}}})
            validate(settings, reader.config_validators())
            published: queue.SimpleQueue[Any] = queue.SimpleQueue()
            reader.run(
                config=section(settings, "apps", "taxii"),
                publish_queue=published,
                subscribe=lambda *a, **k: [],
                unsubscribe=lambda *a: None,
                node=Node.create("reader"),
                metrics=Metrics("reader"),
                backlog=lambda: 0,
            )
            try:
                assert [m.id for m in collect(published, 3)] == [m.id for m in sent]
            finally:
                reader.stop()


def test_served_intel_pages_by_date_added_across_replacements_removals_and_compaction():
    intel = ServedIntel()
    sent = [indicator(f"10.4.{i // 256}.{i % 256}") for i in range(3000)]
    for message in sent:
        intel.apply(message.payload)
    # Replace the first 1000 (they move to the end), remove the next 1900: the log compacts meanwhile.
    replaced = [version(m.payload, confidence=50) for m in sent[:1000]]
    for message in replaced:
        intel.apply(message.payload)
    for message in sent[1000:2900]:
        intel.apply(version(message.payload, x_threatbus_update="REMOVE").payload)
    assert len(intel._log) < 2000  # compacted: the log held 4000 versions, 1100 of them live
    expected = [m.id for m in sent[2900:]] + [m.id for m in replaced]
    assert [s.payload["id"] for s in intel.served()] == expected

    pages, after = [], None
    while True:
        page, more = intel.page(after, 700)
        pages.append(page)
        after = page[-1].date_added
        if not more:
            break
    assert [len(p) for p in pages] == [700, 400]
    assert [s.payload["id"] for p in pages for s in p] == expected
    assert all(s.payload.get("confidence") == 50 for s in pages[-1])


class IntelSource:
    """Another app on the bus that answers indicator snapshots with one indicator."""

    def __init__(self, answer: Indicator) -> None:
        self.answer = answer
        self.requests: queue.Queue[SnapshotRequest] = queue.Queue()

    @threatbus.app
    def snapshot(self, snapshot_request: SnapshotRequest, result_queue: Any) -> None:
        self.requests.put(snapshot_request)
        if snapshot_request.snapshot_type is SnapshotType.INDICATOR:
            result_queue.put(SnapshotEnvelope.wrap(snapshot_request, self.answer))


def test_serve_snapshot_fills_the_collection_with_recent_intel_at_start():
    old = indicator("evil.example.com", "domain-name:value")
    source = IntelSource(old)
    app = TaxiiApp()
    config = {"serve": {"enabled": True, "port": 0, "snapshot": 7}}
    with running_bus(apps={"taxii": app, "source": source}, plugin_config={"apps": {"taxii": config}}):
        request = get_within(source.requests)
        assert (request.snapshot_type, request.snapshot.days) == (SnapshotType.INDICATOR, 7)
        wait_until(lambda: [s.payload["id"] for s in app.intel.served()] == [old.id], what="the snapshot answer served")


def test_the_apps_policy_filter_decides_what_is_served():
    red = ["marking-definition--5e57c739-391a-4eb3-b6be-7d15ca92d5ed"]
    green = ["marking-definition--bab4a63c-aed9-4cf5-a766-dfca5abac2bb"]
    with serving(filter={"tlp": "amber", "min_confidence": 50}) as (bus, _, root):
        shared = indicator("6.6.6.6", object_marking_refs=green, confidence=80)
        secret = indicator("7.7.7.7", object_marking_refs=red, confidence=80)
        doubtful = indicator("8.8.8.8", object_marking_refs=green, confidence=10)
        for message in (secret, doubtful, shared):
            bus.publish_queue.put(message)
        wait_until(lambda: served_ids(root) == {shared.id}, what="only the shared indicator served")
        assert bus.metrics.value(FILTERED, plugin="taxii", reason="tlp") == 1
        assert bus.metrics.value(FILTERED, plugin="taxii", reason="confidence") == 1
        # Its removal passes the filter like the indicator did, though a removal may carry less.
        bus.publish_queue.put(version(shared.payload, x_threatbus_update="REMOVE", confidence=0))
        wait_until(lambda: served_ids(root) == set(), what="the removal applied")


class ServedWhenDone(TrackedReceipt):
    """A receipt that notes, when its app acknowledges it, which indicators the app serves."""

    def __init__(self, app: TaxiiApp) -> None:
        super().__init__()
        self.app = app
        self.served_then: set[str] | None = None

    def on_done(self) -> None:
        self.served_then = {entry.payload["id"] for entry in self.app.intel.served()}
        super().on_done()


def test_an_indicator_is_acknowledged_once_it_is_served():
    with serving() as (_bus, app, root):
        messages = [indicator(f"10.3.0.{n}") for n in range(600)]  # more than one acknowledgement's worth
        receipts = [ServedWhenDone(app) for _ in messages]
        for message, receipt in zip(messages, receipts, strict=True):
            app.intel_queue.put_tracked(message, receipt)
        for message, receipt in zip(messages, receipts, strict=True):
            assert receipt.delivered.wait(10)
            assert receipt.served_then is not None and message.id in receipt.served_then
        assert len(served_ids(root)) == 600
