"""TAXII in: the plugin polls a real medallion server (see conftest) and publishes its intel."""

from __future__ import annotations

import base64
import json
import queue
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any

import pytest
from threatbus_taxii import TaxiiApp
from threatbus_taxii.plugin import POLL_ERRORS, POLL_OK, SKIPPED
from threatbus_taxii.positions import PositionStore
from threatbus_taxii_medallion import (
    API_ROOT,
    FEED,
    MIXED,
    PASSWORD,
    UNREADABLE,
    USER,
    Medallion,
    stix_indicator,
    stix_object,
)

from threatbus.config import section, validate
from threatbus.data import Indicator, Message, Sighting
from threatbus.errors import ConfigError, PluginError
from threatbus.metrics import APP_RECEIVED, APP_REJECTED, Metrics
from threatbus.node import Node
from threatbus.testing import assert_nothing_more, collect, settings_from, wait_until
from threatbus.worker import StoppableWorker


def validated(config: dict[str, Any]) -> Any:
    """The plugin's section after its validators, as the bus hands it to ``run``."""
    settings = settings_from({"plugins": {"apps": {"taxii": config}}})
    validate(settings, TaxiiApp().config_validators())
    return section(settings, "apps", "taxii")


@contextmanager
def polling(config: dict[str, Any]) -> Iterator[tuple[TaxiiApp, queue.SimpleQueue[Message], Metrics]]:
    """The plugin started with ``config``, publishing into a queue of the test."""
    app = TaxiiApp()
    published: queue.SimpleQueue[Message] = queue.SimpleQueue()
    metrics = Metrics("test-node")
    app.run(
        config=validated(config),
        publish_queue=published,
        subscribe=lambda *args, **kwargs: [],
        unsubscribe=lambda *args: None,
        node=Node.create("test-node"),
        metrics=metrics,
        backlog=lambda: 0,
    )
    try:
        yield app, published, metrics
    finally:
        app.stop()
        assert all(not worker.is_alive() for worker in app.workers)


def poll_config(medallion: Medallion, tmp_path: Path, **overrides: Any) -> dict[str, Any]:
    config = {
        "url": medallion.url,
        "collections": [FEED],
        "username": USER,
        "password": PASSWORD,
        "poll_interval": 0.2,
        "page_size": 20,
        "state_dir": str(tmp_path / "state"),
    }
    config.update(overrides)
    return config


def ids(messages: list[Message]) -> list[str]:
    return [m.payload["id"] for m in messages]


def test_50_indicators_then_10_added_later_arrive_once_and_a_restart_repeats_nothing(medallion, tmp_path):
    feed = medallion.feeds[FEED]
    config = poll_config(medallion, tmp_path)
    with polling(config) as (app, published, metrics):
        first = collect(published, 50, timeout=20)
        assert ids(first) == [i["id"] for i in feed]  # in the feed's order, across 3 pages of 20
        assert all(isinstance(m, Indicator) for m in first)
        polls = app.stats.polls
        wait_until(lambda: app.stats.polls >= polls + 2, what="two more polls")
        assert_nothing_more(published, within=0.1)

        later = [stix_indicator(f"198.51.100.{i + 1}") for i in range(10)]
        medallion.add(FEED, later)
        assert ids(collect(published, 10, timeout=20)) == [i["id"] for i in later]
        polls = app.stats.polls
        wait_until(lambda: app.stats.polls >= polls + 2, what="two more polls")
        assert_nothing_more(published, within=0.1)
        assert metrics.value(APP_RECEIVED, plugin="taxii") == 60
        assert metrics.value(POLL_OK, plugin="taxii") == 1

    stored = json.loads((tmp_path / "state" / "positions.json").read_text())
    assert list(stored["collections"]) == [f"{medallion.url}collections/{FEED}/"]

    # A new plugin on the same state directory: nothing is published again, new objects are.
    with polling(config) as (app, published, _):
        wait_until(lambda: app.stats.polls >= 2, what="two polls after the restart")
        assert_nothing_more(published, within=0.1)
        newest = [stix_indicator("203.0.113.7")]
        medallion.add(FEED, newest)
        assert ids(collect(published, 1, timeout=20)) == [newest[0]["id"]]
        assert_nothing_more(published, within=0.3)


def test_a_restart_during_paging_resumes_after_the_last_page_read(medallion, tmp_path):
    """The position is saved after every page, not only at the end of a poll."""
    config = poll_config(medallion, tmp_path, page_size=20)
    store = PositionStore(tmp_path / "state")
    store.load()
    key = f"{medallion.url}collections/{FEED}/"
    # As if a plugin had read the first page of 20 and was killed: the 20th object's date added.
    manifest = medallion.collection(FEED).get_manifest()["objects"]
    store.set(key, manifest[19]["date_added"])
    with polling(config) as (_, published, _):
        rest = collect(published, 30, timeout=20)
        assert ids(rest) == [i["id"] for i in medallion.feeds[FEED][20:]]
        assert_nothing_more(published, within=0.3)


def test_other_stix_types_are_skipped_and_invalid_intel_dropped_around_the_valid(medallion, tmp_path, caplog):
    mixed = medallion.feeds[MIXED]
    with polling(poll_config(medallion, tmp_path, collections=[MIXED], page_size=3)) as (app, published, metrics):
        got = collect(published, 7, timeout=20)
        wanted = [
            o["id"]
            for o in mixed
            if o["type"] == "sighting" or (o["type"] == "indicator" and "192.0.2." in o["pattern"])
        ]
        assert ids(got) == wanted
        assert sum(isinstance(m, Sighting) for m in got) == 2
        wait_until(lambda: app.stats.polls >= 1)
        assert_nothing_more(published, within=0.2)
        assert metrics.value(SKIPPED, plugin="taxii") == 4
        assert dict(app.stats.skipped_types) == {"identity": 1, "malware": 1, "attack-pattern": 1, "relationship": 1}
        assert metrics.value(APP_REJECTED, plugin="taxii") == 3
        assert metrics.value(APP_RECEIVED, plugin="taxii") == 7
    assert "dropping invalid indicator" in caplog.text


def test_without_collections_every_readable_collection_is_polled(medallion, tmp_path):
    with polling(poll_config(medallion, tmp_path, collections=[])) as (app, published, _):
        got = collect(published, 57, timeout=20)
        assert len(set(ids(got))) == 57
        assert {c.id for c in app.poller._collections} == {FEED, MIXED}  # not the unreadable one


def test_a_discovery_url_finds_the_api_root(medallion, tmp_path):
    with polling(poll_config(medallion, tmp_path, url=medallion.discovery_url)) as (_, published, _):
        assert len(collect(published, 50, timeout=20)) == 50


def test_api_key_in_a_header(medallion, tmp_path):
    # medallion knows basic auth only: the key is the whole Authorization value.
    key = "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    config = poll_config(medallion, tmp_path, username="", password="", api_key=key, api_key_header="Authorization")
    with polling(config) as (_, published, _):
        assert len(collect(published, 50, timeout=20)) == 50


def test_wrong_credentials_publish_nothing_count_errors_and_back_off(medallion, tmp_path, caplog):
    with polling(poll_config(medallion, tmp_path, password="wrong")) as (app, published, metrics):
        wait_until(lambda: metrics.value(POLL_ERRORS, plugin="taxii") >= 2, timeout=20, what="two failed polls")
        assert metrics.value(POLL_OK, plugin="taxii") == 0
        assert_nothing_more(published, within=0.1)
        assert app.stats.polls == 0
    assert "401" in caplog.text and "retrying in" in caplog.text


def test_an_unreachable_server_is_retried_with_backoff(medallion, tmp_path):
    dead = medallion.url.replace(medallion.url.split("/")[2], "127.0.0.1:9")  # nothing listens on port 9
    with polling(poll_config(medallion, tmp_path, url=dead)) as (app, _, _):
        wait_until(lambda: app.stats.errors >= 2, timeout=20, what="two failed polls")
        assert not app.stats.healthy
    # stop() returned promptly although the poller was backing off (asserted in `polling`).


def test_unknown_and_unreadable_collections_are_logged_and_not_polled(medallion, tmp_path, caplog):
    config = poll_config(medallion, tmp_path, collections=["no-such-collection", UNREADABLE, FEED])
    with polling(config) as (app, published, _):
        assert len(collect(published, 50, timeout=20)) == 50
        wait_until(lambda: app.stats.polls >= 3, what="three polls")
    errors = [r for r in caplog.records if r.levelname == "ERROR" and "no-such-collection" in r.getMessage()]
    assert len(errors) == 1  # looked up again every poll, logged loudly once
    assert f"TAXII collection no-such-collection at {medallion.url} is not found" in caplog.text
    assert f"TAXII collection {UNREADABLE} at {medallion.url} is not readable" in caplog.text


def test_a_corrupt_position_file_stops_the_start_with_a_clear_error(medallion, tmp_path):
    state = tmp_path / "state"
    state.mkdir()
    (state / "positions.json").write_text("{not json")
    with (
        pytest.raises(PluginError, match="positions.json.*fix or remove the file"),
        polling(poll_config(medallion, tmp_path)),
    ):
        pass


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"url": "ftp://example.org/"}, "plugins.apps.taxii.url must be an http(s) URL"),
        ({"url": "https://x/api1/", "username": "u"}, "plugins.apps.taxii.password is required"),
        ({"url": "https://x/api1/", "api_key": "k", "username": "u", "password": "p"}, "cannot be combined"),
        ({"poll_interval": 0}, "plugins.apps.taxii.poll_interval must be a number of seconds > 0"),
        ({"collections": "abc"}, "plugins.apps.taxii.collections must be a list"),
        ({"tls": {"verify": "no"}}, "plugins.apps.taxii.tls.verify must be true or false"),
        ({"serve": {"port": 70000}}, "plugins.apps.taxii.serve.port must be a TCP port"),
        ({"serve": {"users": {"reader": 5}}}, "plugins.apps.taxii.serve.users must be a mapping"),
    ],
)
def test_bad_config_names_the_key(config, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        validated(config)


def test_the_api_root_constant_matches_the_server(medallion):
    assert medallion.url.endswith(f"/{API_ROOT}/")
    assert stix_object("identity")["type"] == "identity"


class GarbageServer(StoppableWorker):
    """An HTTP server that answers every request with ``responses[path]`` (status, content type, body)."""

    def __init__(self, responses: dict[str, tuple[int, str, bytes]]) -> None:
        super().__init__(name="garbage-taxii")
        self.responses = responses

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                status, content_type, body = responses.get(self.path.split("?")[0], (404, "text/plain", b"no"))
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = HTTPServer(("127.0.0.1", 0), Handler)
        self.server.timeout = 0.2
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/api1/"

    def run(self) -> None:
        try:
            while not self.stopping:
                self.server.handle_request()
        finally:
            self.server.server_close()


TAXII = "application/taxii+json;version=2.1"
COLLECTION = "8f5b5c38-6b7d-4d1b-9d43-3f1e4a3f6a11"


@pytest.mark.parametrize(
    ("objects_answer", "problem"),
    [
        ((200, "text/html", b"<html>maintenance</html>"), "Unexpected Response"),
        ((200, TAXII, b"{not json"), "Invalid JSON"),
        ((200, TAXII, b'{"objects": {"type": "indicator"}}'), "'objects' is not a list"),
        ((500, TAXII, b'{"title": "boom"}'), "500 Server Error"),
    ],
)
def test_garbage_from_the_server_fails_the_poll_and_is_retried(tmp_path, caplog, objects_answer, problem):
    root = {"title": "garbage", "versions": [TAXII], "max_content_length": 1000}
    collections = {"collections": [{"id": COLLECTION, "title": "c", "can_read": True, "can_write": False}]}
    server = GarbageServer(
        {
            "/api1/": (200, TAXII, json.dumps(root).encode()),
            "/api1/collections/": (200, TAXII, json.dumps(collections).encode()),
            f"/api1/collections/{COLLECTION}/objects/": objects_answer,
        }
    )
    server.start()
    try:
        config = {"url": server.url, "poll_interval": 0.2, "state_dir": str(tmp_path / "state")}
        with polling(config) as (app, published, metrics):
            wait_until(lambda: app.stats.errors >= 2, timeout=20, what="two failed polls")
            assert metrics.value(POLL_OK, plugin="taxii") == 0
            assert_nothing_more(published, within=0.1)
    finally:
        server.stop()
        server.join(5)
    assert problem in caplog.text


def test_non_objects_in_a_page_are_rejected_and_the_rest_published(tmp_path):
    good = stix_indicator("192.0.2.99")
    page = {"more": False, "objects": ["a string", 42, None, good]}
    collections = {"collections": [{"id": COLLECTION, "title": "c", "can_read": True, "can_write": False}]}
    server = GarbageServer(
        {
            "/api1/": (200, TAXII, json.dumps({"title": "g", "versions": [TAXII]}).encode()),
            "/api1/collections/": (200, TAXII, json.dumps(collections).encode()),
            f"/api1/collections/{COLLECTION}/objects/": (200, TAXII, json.dumps(page).encode()),
        }
    )
    server.start()
    try:
        config = {"url": server.url, "poll_interval": 60, "state_dir": str(tmp_path / "state")}
        with polling(config) as (app, published, metrics):
            assert ids(collect(published, 1)) == [good["id"]]
            wait_until(lambda: app.stats.polls == 1)
            assert metrics.value(APP_REJECTED, plugin="taxii") == 3
    finally:
        server.stop()
        server.join(5)


def test_a_server_that_pages_without_progress_cannot_hold_the_poller(tmp_path, caplog):
    good = stix_indicator("192.0.2.98")
    endless = {"more": True, "next": "same-token", "objects": [good]}
    collections = {"collections": [{"id": COLLECTION, "title": "c", "can_read": True, "can_write": False}]}
    server = GarbageServer(
        {
            "/api1/": (200, TAXII, json.dumps({"title": "g", "versions": [TAXII]}).encode()),
            "/api1/collections/": (200, TAXII, json.dumps(collections).encode()),
            f"/api1/collections/{COLLECTION}/objects/": (200, TAXII, json.dumps(endless).encode()),
        }
    )
    server.start()
    try:
        config = {"url": server.url, "poll_interval": 60, "state_dir": str(tmp_path / "state")}
        with polling(config) as (app, published, _):
            wait_until(lambda: app.stats.polls == 1, what="the poll to end")
            # The first page and the repeated second one; then the poller gives up until the next poll.
            assert ids(collect(published, 2)) == [good["id"]] * 2
            assert_nothing_more(published, within=0.2)
    finally:
        server.stop()
        server.join(5)
    assert "says 'more' but gives no way on" in caplog.text
    assert "no usable X-TAXII-Date-Added-Last" in caplog.text
