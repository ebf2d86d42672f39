"""The misp app in-process (registered with pluggy by ``running_bus``) against the stand-in MISP.

MISP itself cannot run here: ``fake_misp.py`` follows MISP's documented
REST API (the endpoints pymisp calls, unchanged pymisp on our side) and its
ZeroMQ format. Intel reaches an app of the zmq plugin, subscribed over the
ZeroMQ protocol like suricata-threatbus or vast-threatbus.
"""

from __future__ import annotations

import logging
import queue
import time
from datetime import timedelta

import pytest
from testbus import running_bus
from threatbus_misp import MispApp
from threatbus_misp import settings as misp_settings
from threatbus_misp.plugin import API_ERRORS, CONNECTED, IGNORED, SIGHTINGS_REFUSED, SNAPSHOT_INDICATORS, UNMAPPABLE

from threatbus.bus import Bus
from threatbus.data import Indicator
from threatbus.metrics import APP_RECEIVED, APP_REJECTED, DELIVERED
from threatbus.stix import new_sighting
from threatbus.testing import TrackedReceipt, free_port, indicator, wait_until
from threatbus_zmq import ZmqApp


def metric(bus: Bus, name: str, **labels: str) -> float:
    return bus.metrics.value(name, **labels)


def test_add_edit_delete_become_indicators_and_removals(misp, fake, bus_with_misp, zmq_apps):
    with bus_with_misp(misp) as (bus, zmq):
        app = zmq_apps(zmq)
        misp.wait_subscribed()
        v4 = fake.attribute("6.6.6.6", "ip-dst")
        v6 = fake.attribute("2001:db8::6", "ip-src")
        quiet = fake.attribute("7.7.7.7", "ip-dst", to_ids=False)

        misp.publish("add", v4)
        misp.publish("add", quiet)  # no to_ids: not intel for detection
        misp.publish("add", v6)
        kind, first = app.recv()
        assert kind == "indicator" and first.id == f"indicator--{v4['uuid']}"
        assert first.pattern == "[ipv4-addr:value = '6.6.6.6']" and not first.is_removal
        _, second = app.recv()
        assert second.id == f"indicator--{v6['uuid']}"
        assert second.pattern == "[ipv6-addr:value = '2001:db8::6']"

        misp.publish("edit", {**v4, "to_ids": False})  # to_ids cleared: a removal
        _, removal = app.recv()
        assert removal.id == first.id and removal.is_removal
        assert removal.pattern == first.pattern

        misp.publish("edit", {**v6, "comment": "still bad"})  # still to_ids: a new version
        _, edit = app.recv()
        assert edit.id == second.id and edit.payload["x_threatbus_update"] == "EDIT"
        assert edit.payload["description"] == "still bad"

        misp.publish("delete", v6)
        _, deleted = app.recv()
        assert deleted.id == second.id and deleted.is_removal
        assert deleted.payload["modified"] >= second.payload["modified"]
        app.assert_nothing()
        assert metric(bus, APP_RECEIVED, plugin="misp") == 5
        assert metric(bus, IGNORED, plugin="misp") == 1
        assert metric(bus, CONNECTED, link="zmq") == 1


def test_garbage_on_the_feed_is_logged_counted_and_skipped(misp, fake, bus_with_misp, zmq_apps, caplog):
    garbage = [
        b"misp_json_attribute {not json",
        b"misp_json_attribute [1, 2, 3]",
        b'misp_json_attribute {"action": "add"}',
        b'misp_json_attribute {"action": "add", "Attribute": {"uuid": "nope", "type": "ip-dst", "value": "1.1.1.1"}}',
        b"misp_json_attribute \xff\xfe\x00",
    ]
    with bus_with_misp(misp) as (bus, zmq):
        app = zmq_apps(zmq)
        misp.wait_subscribed()
        before, after = fake.attribute("1.1.1.1"), fake.attribute("2.2.2.2")
        with caplog.at_level(logging.WARNING, logger="threatbus_misp"):
            misp.publish("add", before)
            for frame in garbage:
                misp.publish_raw(frame)
            misp.publish("add", after)
            ids = [app.recv()[1].id for _ in range(2)]
        assert ids == [f"indicator--{before['uuid']}", f"indicator--{after['uuid']}"]
        wait_until(lambda: metric(bus, APP_REJECTED, plugin="misp") == len(garbage), what="garbage counted")
        assert metric(bus, APP_RECEIVED, plugin="misp") == 2
        assert sum("dropping invalid message on MISP's ZeroMQ topic" in r.message for r in caplog.records) == 5
        app.assert_nothing()


def test_filter_passes_attributes_matching_any_entry(misp, fake, bus_with_misp, zmq_apps):
    other_org = {"id": "99", "name": "Other", "uuid": "9d3a1c52-0000-4000-8000-000000000099"}
    entries = [{"orgs": ["CIRCL"], "types": ["domain"]}, {"tags": ["tlp:red"]}]
    with bus_with_misp(misp, filter=entries) as (bus, zmq):
        app = zmq_apps(zmq)
        misp.wait_subscribed()
        circl_domain = fake.attribute("evil.example", "domain")
        circl_ip = fake.attribute("3.3.3.3", "ip-dst")
        other_red = fake.attribute("4.4.4.4", "ip-dst", tags=("tlp:red",))
        other_domain = fake.attribute("bad.example", "domain")
        misp.publish("add", circl_domain)
        misp.publish("add", circl_ip)
        misp.publish("add", other_red, org=other_org)
        misp.publish("add", other_domain, org=other_org)
        received = [app.recv()[1] for _ in range(2)]
        assert [i.id for i in received] == [f"indicator--{circl_domain['uuid']}", f"indicator--{other_red['uuid']}"]
        assert received[1].payload["object_marking_refs"] == [
            "marking-definition--5e57c739-391a-4eb3-b6be-7d15ca92d5ed"
        ]
        app.assert_nothing()
        wait_until(lambda: metric(bus, IGNORED, plugin="misp") == 2, what="filtered attributes counted")


def test_unmappable_attributes_are_skipped_and_counted(misp, fake, bus_with_misp, zmq_apps):
    with bus_with_misp(misp) as (bus, zmq):
        app = zmq_apps(zmq)
        misp.wait_subscribed()
        misp.publish("add", fake.attribute("just words", "text"))
        misp.publish("add", fake.attribute("zz", "md5"))
        composite = fake.attribute("evil.exe|d41d8cd98f00b204e9800998ecf8427e", "filename|md5")
        misp.publish("add", composite)
        _, got = app.recv()
        assert got.id == f"indicator--{composite['uuid']}"
        assert got.pattern == "[file:name = 'evil.exe' AND file:hashes.MD5 = 'd41d8cd98f00b204e9800998ecf8427e']"
        assert metric(bus, UNMAPPABLE, plugin="misp") == 2


def test_a_sighting_on_the_bus_reaches_misp_with_the_attribute_uuid(misp, fake, bus_with_misp, zmq_apps):
    known = misp.store(fake.attribute("6.6.6.6"))
    with bus_with_misp(misp) as (bus, zmq):
        app = zmq_apps(zmq, topic="stix2/sighting")
        foreign = indicator("8.8.8.8")  # from another source: not reported to MISP
        app.send(new_sighting(foreign.id, source="Zeek", indicator=foreign))
        misp_indicator = Indicator(
            {
                **indicator("6.6.6.6").payload,
                "id": f"indicator--{known['uuid']}",
                "external_references": [{"source_name": "misp", "external_id": known["uuid"]}],
            }
        )
        app.send(new_sighting(misp_indicator.id, source="Zeek", indicator=misp_indicator))
        app.send(new_sighting(f"indicator--{known['uuid']}", source="VAST"))  # no embedded indicator
        wait_until(lambda: len(misp.sightings()) == 2, what="two sightings at the stand-in")
        sightings = misp.sightings()
        assert [(s["attribute_uuid"], s["type"], s["source"]) for s in sightings] == [
            (known["uuid"], "0", "Zeek"),
            (known["uuid"], "0", "VAST"),
        ]
        wait_until(lambda: metric(bus, DELIVERED, plugin="misp") == 2, what="sightings counted")
        assert metric(bus, CONNECTED, link="api") == 1


def test_sightings_are_retried_with_backoff_and_refusals_counted(misp, fake, bus_with_misp, zmq_apps):
    known = misp.store(fake.attribute("6.6.6.6"))
    with bus_with_misp(misp) as (bus, zmq):
        app = zmq_apps(zmq, topic="stix2/sighting")
        misp.fail_next(2, status=500)
        unknown = "indicator--0b0a5b1a-6b74-4a5e-8d3b-0e2d2b6a1f11"
        app.send(new_sighting(f"indicator--{known['uuid']}", source="Zeek"))
        app.send(new_sighting(unknown, source="Zeek"))
        app.send(new_sighting(f"indicator--{known['uuid']}", source="Suricata"))
        wait_until(lambda: len(misp.sightings()) == 2, timeout=20, what="sightings after MISP recovered")
        assert [s["source"] for s in misp.sightings()] == ["Zeek", "Suricata"]  # order kept
        assert metric(bus, API_ERRORS, plugin="misp") == 2
        assert metric(bus, SIGHTINGS_REFUSED, plugin="misp") == 1


def test_a_snapshot_is_answered_from_misps_attribute_search(misp, fake, bus_with_misp, zmq_apps):
    now = int(time.time())
    recent = misp.store(fake.attribute("6.6.6.6", timestamp=now - 3600))
    misp.store(fake.attribute("7.7.7.7", timestamp=now - 10 * 86400))  # older than the snapshot
    misp.store(fake.attribute("8.8.8.8", to_ids=False))
    filtered = misp.store(fake.attribute("9.9.9.9", "ip-src"))
    with bus_with_misp(misp, filter=[{"types": ["ip-dst"]}]) as (bus, zmq):
        app = zmq_apps(zmq, snapshot=2)
        kind, got = app.recv()
        assert kind == "indicator" and got.id == f"indicator--{recent['uuid']}"
        app.assert_nothing()
        assert filtered["uuid"] not in got.id
        (query,) = misp.recorded.searches
        assert query["to_ids"] == 1
        assert abs(query["timestamp"] - (now - timedelta(days=2).total_seconds())) < 60
        assert metric(bus, SNAPSHOT_INDICATORS, plugin="misp") == 1


def test_without_misp_reachable_the_feed_still_works_and_sightings_wait(misp, fake, zmq_apps):
    """The API down (wrong port): indicators still flow; sightings wait and are counted as dropped at stop."""
    app_object = MispApp()
    zmq = {"host": "127.0.0.1", "manage": free_port(), "pub": free_port(), "sub": free_port()}
    config = {
        "api": {"host": "http://127.0.0.1:9", "key": fake.API_KEY},  # discard port: nothing listens
        "zmq": {"host": "127.0.0.1", "port": misp.zmq_port},
    }
    with running_bus(apps={"zmq": ZmqApp(), "misp": app_object}, plugin_config={"apps": {"zmq": zmq, "misp": config}}):
        client = zmq_apps(zmq, topic="stix2")
        misp.wait_subscribed()
        client.send(new_sighting("indicator--0b0a5b1a-6b74-4a5e-8d3b-0e2d2b6a1f11", source="Zeek"))
        attr = fake.attribute("5.5.5.5")
        misp.publish("add", attr)
        seen = []
        while not any(m.id == f"indicator--{attr['uuid']}" for m in seen):
            seen.append(client.recv()[1])
        wait_until(lambda: app_object.counters.api_errors >= 1, what="a failed API call")
    assert app_object.counters.sightings_dropped == 1


class FakeKafkaMessage:
    """What confluent_kafka.Consumer.poll returns: topic(), value(), error()."""

    def __init__(self, topic: str, value: bytes | None, error: str | None = None) -> None:
        self._topic, self._value, self._error = topic, value, error

    def topic(self) -> str:
        return self._topic

    def value(self) -> bytes | None:
        return self._value

    def error(self) -> str | None:
        return self._error


class FakeConsumer:
    """Stands for confluent_kafka.Consumer (no Kafka broker here): hands out what the test queued."""

    def __init__(self, config: dict) -> None:
        self.config = config
        self.topics: list[str] = []
        self.messages: queue.Queue[FakeKafkaMessage] = queue.Queue()
        self.closed = False

    def subscribe(self, topics: list[str]) -> None:
        self.topics = topics

    def poll(self, timeout: float) -> FakeKafkaMessage | None:
        try:
            return self.messages.get(timeout=timeout)
        except queue.Empty:
            return None

    def close(self) -> None:
        self.closed = True


def test_kafka_feed_publishes_indicators_and_skips_garbage(misp, fake, zmq_apps, monkeypatch):
    monkeypatch.setattr(misp_settings, "kafka_available", lambda: True)
    consumers: list[FakeConsumer] = []

    def make_consumer(config: dict) -> FakeConsumer:
        consumers.append(FakeConsumer(config))
        return consumers[-1]

    app_object = MispApp(kafka_consumer_factory=make_consumer)
    zmq = {"host": "127.0.0.1", "manage": free_port(), "pub": free_port(), "sub": free_port()}
    kafka = {"topics": ["misp_attribute"], "poll_interval": 0.2, "config": {"group.id": "threatbus"}}
    config = {"apps": {"zmq": zmq, "misp": {"kafka": kafka}}}
    with running_bus(apps={"zmq": ZmqApp(), "misp": app_object}, plugin_config=config) as bus:
        client = zmq_apps(zmq)
        consumer = wait_until(lambda: consumers and consumers[0], what="the Kafka consumer")
        assert consumer.config == {"group.id": "threatbus"} and consumer.topics == ["misp_attribute"]
        attr = fake.attribute("evil.example", "domain")
        body = fake.notification("add", attr).partition(b" ")[2]
        consumer.messages.put(FakeKafkaMessage("misp_attribute", b"{garbage"))
        consumer.messages.put(FakeKafkaMessage("misp_attribute", None, error="broker down"))
        consumer.messages.put(FakeKafkaMessage("misp_attribute", body))
        _, got = client.recv()
        assert got.id == f"indicator--{attr['uuid']}"
        assert metric(bus, APP_REJECTED, plugin="misp") == 1
        assert metric(bus, CONNECTED, link="kafka") == 1
        assert app_object.feed_status.errors == 1
    assert consumer.closed


def test_misp_coming_late_and_restarting_is_reconnected(fake, zmq_apps):
    """MISP is down when the bus starts, comes up, restarts: feed and API reconnect, nothing is lost."""
    http_port, zmq_port = free_port(), free_port()
    app_object = MispApp()
    zmq = {"host": "127.0.0.1", "manage": free_port(), "pub": free_port(), "sub": free_port()}
    config = {
        "api": {"host": f"http://127.0.0.1:{http_port}", "key": fake.API_KEY},
        "zmq": {"host": "127.0.0.1", "port": zmq_port},
    }
    known = fake.attribute("6.6.6.6")
    with running_bus(
        apps={"zmq": ZmqApp(), "misp": app_object}, plugin_config={"apps": {"zmq": zmq, "misp": config}}
    ) as bus:
        client = zmq_apps(zmq, topic="stix2/indicator")
        sightings = zmq_apps(zmq, topic="stix2/sighting")
        sightings.send(new_sighting(f"indicator--{known['uuid']}", source="Zeek"))
        wait_until(lambda: app_object.counters.api_errors >= 1, what="a failed API call while MISP is down")
        assert metric(bus, CONNECTED, link="api") == 0 and metric(bus, CONNECTED, link="zmq") == 0

        first = fake.FakeMisp(http_port, zmq_port)
        first.store(known)
        first.start()
        try:
            first.wait_subscribed()
            wait_until(lambda: first.sightings(), timeout=20, what="the waiting sighting at MISP")
            attr = fake.attribute("evil.example", "domain")
            first.publish("add", attr)
            assert client.recv()[1].id == f"indicator--{attr['uuid']}"
        finally:
            first.close()
        wait_until(lambda: metric(bus, CONNECTED, link="zmq") == 0, what="the feed seen as lost")

        second = fake.FakeMisp(http_port, zmq_port)
        second.start()
        try:
            second.wait_subscribed()
            attr = fake.attribute("bad.example", "domain")
            second.publish("add", attr)
            assert client.recv()[1].id == f"indicator--{attr['uuid']}"
            assert metric(bus, "threatbus_misp_feed_connects", plugin="misp") == 2
        finally:
            second.close()


def test_real_kafka_client_without_brokers_logs_counts_and_stops(caplog):
    """confluent-kafka itself (no Kafka broker here): unreachable brokers are reported, not fatal."""
    pytest.importorskip("confluent_kafka")
    app_object = MispApp()
    kafka = {
        "topics": ["misp_attribute"],
        "config": {"bootstrap.servers": f"127.0.0.1:{free_port()}", "group.id": "tb"},
    }
    with (
        caplog.at_level(logging.WARNING, logger="threatbus_misp"),
        running_bus(apps={"misp": app_object}, plugin_config={"apps": {"misp": {"kafka": kafka}}}) as bus,
    ):
        wait_until(lambda: "Kafka brokers are unreachable" in caplog.text, timeout=20, what="the brokers reported down")
        assert metric(bus, CONNECTED, link="kafka") == 0
        assert app_object.feed_status.errors >= 1


def test_bad_kafka_config_is_retried_and_logged(caplog):
    pytest.importorskip("confluent_kafka")
    app_object = MispApp()
    kafka = {"topics": ["misp_attribute"], "config": {"no.such.property": "x", "group.id": "tb"}}
    with (
        caplog.at_level(logging.ERROR, logger="threatbus_misp"),
        running_bus(apps={"misp": app_object}, plugin_config={"apps": {"misp": {"kafka": kafka}}}),
    ):
        wait_until(lambda: "No such configuration property" in caplog.text, what="the consumer error logged")
        assert app_object.feed_status.errors >= 1 and not app_object.feed_status.connected


def test_detection_only_policy_of_an_app_lets_misp_intel_and_its_removals_through(misp, fake, zmq_apps):
    """The zmq app's policy filter (threatbus.policy) sees MISP's to_ids as x_misp_to_ids."""
    zmq = {"host": "127.0.0.1", "manage": free_port(), "pub": free_port(), "sub": free_port()}
    zmq["filter"] = {"detection_only": True}
    config = {
        "zmq": zmq,
        "misp": {"api": {"host": misp.url, "key": fake.API_KEY}, "zmq": {"host": "127.0.0.1", "port": misp.zmq_port}},
    }
    with running_bus(apps={"zmq": ZmqApp(), "misp": MispApp()}, plugin_config={"apps": config}):
        client = zmq_apps(zmq)
        misp.wait_subscribed()
        attr = fake.attribute("6.6.6.6")
        misp.publish("add", attr)
        misp.publish("edit", {**attr, "to_ids": False})
        _, added = client.recv()
        _, removed = client.recv()
        assert added.payload["x_misp_to_ids"] is True and not added.is_removal
        assert removed.id == added.id and removed.is_removal and removed.payload["x_misp_to_ids"] is False


def test_a_sighting_is_acknowledged_once_misp_took_it(misp, fake, bus_with_misp):
    known = misp.store(fake.attribute("6.6.6.6"))
    app = MispApp()
    with bus_with_misp(misp, app=app) as (bus, _zmq):
        misp.fail_next(1, status=500)
        reported, foreign = TrackedReceipt(), TrackedReceipt()
        app.sighting_inbox.put_tracked(new_sighting(f"indicator--{known['uuid']}", source="Zeek"), reported)
        other = indicator("8.8.8.8")  # nothing for MISP: done with the sighting before it
        app.sighting_inbox.put_tracked(new_sighting(other.id, source="Zeek", indicator=other), foreign)
        wait_until(lambda: metric(bus, API_ERRORS, plugin="misp") == 1, what="a failed report")
        assert not reported.delivered.is_set() and not foreign.delivered.is_set()
        assert reported.delivered.wait(15) and foreign.delivered.wait(5)
        assert len(misp.sightings()) == 1
