"""The Zeek app on a running bus, against the stand-in for Zeek's WebSocket API.

Zeek cannot be installed on our machines: ``ZeekStandIn`` (threatbus_zeek.testing)
follows the documented JSON API v1 of Zeek's WebSocket API and checks what
the plugin sends with zeek-client's implementation of Broker's data model.
"""

from __future__ import annotations

import json
import logging
import queue
import ssl
import time

import pytest
from testbus import running_bus
from zeekclient import brokertypes

import threatbus
from threatbus.data import Indicator, SnapshotEnvelope, SnapshotRequest, SnapshotType
from threatbus.errors import ConfigError, PluginError
from threatbus.metrics import APP_RECEIVED, APP_REJECTED, DELIVERED, DROPPED, QUEUE_DEPTH, SUBSCRIBERS
from threatbus.testing import (
    Subscriber,
    TrackedReceipt,
    assert_live_sighting,
    assert_nothing_more,
    get_within,
    indicator,
    wait_until,
)
from threatbus_zeek import INTEL_TOPIC, MATCH_TOPIC, ZeekApp
from threatbus_zeek.plugin import CONNECTS, SKIPPED, ZEEK_ERRORS


def connected(bus, value=1):
    return lambda: bus.metrics.value(SUBSCRIBERS, plugin="zeek") == value


def intel_args(received):
    """The arguments of an intel event the stand-in received, as Python values."""
    assert received.topic == INTEL_TOPIC
    assert received.canonical, f"not Broker's canonical encoding: {received.raw}"
    assert received.event is not None, f"not a Zeek event: {received.raw}"
    return received.event.name, [arg.to_py() for arg in received.event.args]


def intel_items(zeek, count):
    """(event name, arguments) per intel item received, the records of add_intels batches unpacked."""
    items = []
    while len(items) < count:
        name, args = intel_args(zeek.next_event())
        if name.endswith("::add_intels"):
            items.extend((name.replace("add_intels", "add_intel"), record) for record in args[0])
        else:
            items.append((name, args))
    return items


def match_event(zeek, indicator_id, value="6.6.6.6", intel_type="Intel::ADDR", context=None):
    context = context or {"uid": "CHhAvVGS1DHFjwGM9", "orig_h": "10.0.0.1", "resp_h": value, "where": "Conn::IN_RESP"}
    table = brokertypes.Table({brokertypes.String(k): brokertypes.String(v) for k, v in context.items()})
    return zeek.publish(
        MATCH_TOPIC,
        "ThreatBus::intel_match",
        brokertypes.Real(1764000000.25),
        brokertypes.String(indicator_id),
        brokertypes.String(value),
        brokertypes.Enum(intel_type),
        table,
    )


def test_handshake_subscribes_to_matches(zeek, zeek_config):
    with running_bus(apps={"zeek": ZeekApp()}, plugin_config=zeek_config) as bus:
        client = zeek.wait_for_client()
        assert client.topics == [MATCH_TOPIC]
        assert client.headers.get("X-Application-Name") == "threatbus"
        wait_until(connected(bus), what="the zeek app to report the connection")
        assert bus.metrics.value(CONNECTS, plugin="zeek") == 1


def test_indicators_become_intel_events(zeek, zeek_config, caplog):
    caplog.set_level(logging.DEBUG, logger="threatbus_zeek")
    with running_bus(apps={"zeek": ZeekApp()}, plugin_config=zeek_config) as bus:
        zeek.wait_for_client()
        added = indicator("6.6.6.6", name="C2 server")
        mac = indicator("aa:bb:cc:dd:ee:ff", "mac-addr:value")
        removed = indicator("evil.example.com", "domain-name:value", x_threatbus_update="REMOVE")
        url = indicator("http://evil.example.com/payload", "url:value")
        for message in (added, mac, removed, url):
            bus.publish_queue.put(message)

        assert intel_args(zeek.next_event()) == (
            "ThreatBus::add_intel",
            ["6.6.6.6", "Intel::ADDR", added.id, "C2 server"],
        )
        assert intel_args(zeek.next_event()) == (
            "ThreatBus::remove_intel",
            ["evil.example.com", "Intel::DOMAIN", removed.id],
        )
        assert intel_args(zeek.next_event()) == (
            "ThreatBus::add_intel",
            ["evil.example.com/payload", "Intel::URL", url.id, ""],
        )
        assert_nothing_more(zeek.received)
        assert bus.metrics.value(SKIPPED, plugin="zeek") == 1
        assert bus.metrics.value(DELIVERED, plugin="zeek") == 3
        assert zeek.errors_sent == []
    assert f"skipping indicator {mac.id} for Zeek: Zeek's Intel framework has no type for mac-addr:value" in caplog.text


def test_a_mapping_bug_costs_one_indicator_not_the_connection(zeek, zeek_config, monkeypatch, caplog):
    from threatbus_zeek import state

    real = state.to_zeek_intel
    broken = indicator("6.6.6.6")

    def to_zeek_intel(message):
        if message.id == broken.id:
            raise RuntimeError("simulated bug")
        return real(message)

    monkeypatch.setattr(state, "to_zeek_intel", to_zeek_intel)
    with running_bus(apps={"zeek": ZeekApp()}, plugin_config=zeek_config) as bus:
        zeek.wait_for_client()
        fine = indicator("7.7.7.7")
        bus.publish_queue.put(broken)
        bus.publish_queue.put(fine)
        assert intel_args(zeek.next_event())[1][2] == fine.id
        assert bus.metrics.value(CONNECTS, plugin="zeek") == 1
        assert bus.metrics.value(SKIPPED, plugin="zeek") == 1
    assert f"cannot map indicator {broken.id} for Zeek; skipped" in caplog.text


def test_module_namespace_names_the_events(zeek, zeek_config):
    zeek_config["apps"]["zeek"]["module_namespace"] = "Tenzir"
    with running_bus(apps={"zeek": ZeekApp()}, plugin_config=zeek_config) as bus:
        zeek.wait_for_client()
        bus.publish_queue.put(indicator("6.6.6.6"))
        assert intel_args(zeek.next_event())[0] == "Tenzir::add_intel"


def test_reconnects_after_zeek_restarts_and_keeps_what_came_meanwhile(zeek, zeek_config, caplog):
    with running_bus(apps={"zeek": ZeekApp()}, plugin_config=zeek_config) as bus:
        zeek.wait_for_client()
        wait_until(connected(bus))
        zeek.stop()
        wait_until(connected(bus, 0), what="the zeek app to notice that Zeek went away")
        while_down = indicator("7.7.7.7")
        bus.publish_queue.put(while_down)

        zeek.start()
        zeek.wait_for_client(timeout=15)
        assert intel_args(zeek.next_event())[1][:3] == ["7.7.7.7", "Intel::ADDR", while_down.id]
        wait_until(connected(bus))
        assert bus.metrics.value(CONNECTS, plugin="zeek") == 2

        after = indicator("8.8.8.8")
        bus.publish_queue.put(after)
        assert intel_args(zeek.next_event())[1][2] == after.id
    assert "connection to Zeek at ws://127.0.0.1" in caplog.text


def test_queue_size_bounds_what_waits_for_zeek(zeek, zeek_config):
    zeek_config["apps"]["zeek"]["queue_size"] = 2
    zeek.stop()
    with running_bus(apps={"zeek": ZeekApp()}, plugin_config=zeek_config) as bus:
        iocs = [indicator(f"10.0.0.{n}") for n in range(5)]
        for ioc in iocs:
            bus.publish_queue.put(ioc)
        wait_until(lambda: bus.metrics.value(DROPPED) == 3, what="the backbone to drop what does not fit")
        assert bus.metrics.value(QUEUE_DEPTH, queue="zeek") == 2
        zeek.start()
        zeek.wait_for_client(timeout=15)
        assert [args[2] for _, args in intel_items(zeek, 2)] == [iocs[0].id, iocs[1].id]
        assert_nothing_more(zeek.received)
        assert bus.metrics.value(QUEUE_DEPTH, queue="zeek") == 0


@pytest.mark.parametrize("batch_size", [500, 2, 1])
def test_queued_additions_travel_in_batches_and_a_removal_keeps_its_place(zeek, zeek_config, batch_size):
    zeek_config["apps"]["zeek"]["batch_size"] = batch_size
    zeek.stop()  # everything waits in the queue: the app sends it in as few events as allowed
    with running_bus(apps={"zeek": ZeekApp()}, plugin_config=zeek_config) as bus:
        iocs = [indicator(f"10.0.1.{n}") for n in range(5)]
        gone = indicator("10.0.1.1", id=iocs[1].id, modified="2099-01-01T00:00:00.000Z", x_threatbus_update="REMOVE")
        later = indicator("10.0.1.9")
        for message in [*iocs, gone, later]:
            bus.publish_queue.put(message)
        wait_until(lambda: bus.metrics.value(QUEUE_DEPTH, queue="zeek") == 7, what="the queue to fill")
        zeek.start()
        zeek.wait_for_client(timeout=15)
        items = intel_items(zeek, 7)
        assert [(name.split("::")[1], args[2]) for name, args in items] == [
            *[("add_intel", ioc.id) for ioc in iocs],
            ("remove_intel", iocs[1].id),
            ("add_intel", later.id),
        ]
        wait_until(lambda: zeek.held() == 5, what="the stand-in to hold what was added and not removed")
        assert ("10.0.1.1", "Intel::ADDR") not in zeek.intel
        wait_until(lambda: bus.metrics.value(DELIVERED, plugin="zeek") == 7, what="7 indicators counted as sent")
        # 500: the adds, the removal, the add; 2: three events of adds, ...; 1: one event per indicator.
        assert zeek.received_count == {500: 3, 2: 5, 1: 7}[batch_size]


class IntelSource:
    """Another app on the bus that answers indicator snapshots with one indicator."""

    def __init__(self, answer: Indicator) -> None:
        self.answer = answer
        self.requests: queue.Queue[SnapshotRequest] = queue.Queue()

    @threatbus.app
    def snapshot(self, snapshot_request, result_queue):
        self.requests.put(snapshot_request)
        if snapshot_request.snapshot_type is SnapshotType.INDICATOR:
            result_queue.put(SnapshotEnvelope.wrap(snapshot_request, self.answer))


def test_snapshot_is_requested_on_every_connect(zeek, zeek_config):
    zeek_config["apps"]["zeek"]["snapshot"] = 7
    old = indicator("evil.example.com", "domain-name:value")
    source = IntelSource(old)
    with running_bus(apps={"zeek": ZeekApp(), "source": source}, plugin_config=zeek_config):
        zeek.wait_for_client()
        request = get_within(source.requests)
        assert (request.snapshot_type, request.snapshot.days) == (SnapshotType.INDICATOR, 7)
        assert intel_args(zeek.next_event())[1] == ["evil.example.com", "Intel::DOMAIN", old.id, ""]

        zeek.restart()  # a restarted Zeek forgot its intel: the plugin asks again
        zeek.wait_for_client(timeout=15)
        assert get_within(source.requests).snapshot_id != request.snapshot_id
        assert intel_args(zeek.next_event())[1][2] == old.id


def test_intel_match_reaches_other_apps_as_sighting(zeek, zeek_config):
    with running_bus(apps={"zeek": ZeekApp()}, plugin_config=zeek_config) as bus:
        other_app = Subscriber(bus, "stix2/sighting")
        zeek.wait_for_client()
        ioc = indicator("6.6.6.6")
        assert match_event(zeek, ioc.id) == 1

        payload = assert_live_sighting(get_within(other_app.queue), ioc.id, "Zeek", "6.6.6.6")
        assert payload["last_seen"] == "2025-11-24T16:00:00.250Z"
        assert payload["x_threatbus_sighting_context"] == {
            "indicator_type": "ADDR",
            "uid": "CHhAvVGS1DHFjwGM9",
            "where": "Conn::IN_RESP",
            "endpoints": {"orig_h": "10.0.0.1", "resp_h": "6.6.6.6"},
        }
        wait_until(lambda: bus.metrics.value(APP_RECEIVED, plugin="zeek") == 1)


def test_bad_input_from_zeek_is_counted_dropped_and_survived(zeek, zeek_config, caplog):
    with running_bus(apps={"zeek": ZeekApp()}, plugin_config=zeek_config) as bus:
        other_app = Subscriber(bus, "stix2/sighting")
        zeek.wait_for_client()
        zeek.send_raw("this is not JSON")
        zeek.send_raw(json.dumps({"type": "data-message", "topic": MATCH_TOPIC, "@data-type": "count", "data": -1}))
        match_event(zeek, "not-an-indicator-id")
        zeek.send_raw(json.dumps({"type": "error", "code": "deserialization_failed", "context": "input #3"}))
        zeek.publish(MATCH_TOPIC, "Other::event", brokertypes.Count(1))
        zeek.send_raw(json.dumps({"type": "data-message", "topic": MATCH_TOPIC, "@data-type": "count", "data": 1}))
        ioc = indicator("6.6.6.6")
        match_event(zeek, ioc.id)

        assert get_within(other_app.queue).sighting_of_ref == ioc.id
        assert_nothing_more(other_app.queue)
        assert bus.metrics.value(APP_REJECTED, plugin="zeek") == 3
        assert bus.metrics.value(ZEEK_ERRORS, plugin="zeek") == 1
        assert bus.metrics.value(APP_RECEIVED, plugin="zeek") == 1
        assert bus.metrics.value(CONNECTS, plugin="zeek") == 1
    assert "dropping malformed message from Zeek: not valid JSON" in caplog.text
    assert "dropping invalid intel match from Zeek: intel_match: source must be a STIX indicator id" in caplog.text
    assert "Zeek reported an error: deserialization_failed: input #3" in caplog.text


def test_refused_handshake_is_retried(zeek, zeek_config, caplog):
    zeek.refuse_handshake = True
    with running_bus(apps={"zeek": ZeekApp()}, plugin_config=zeek_config) as bus:
        wait_until(lambda: "handshake refused: deserialization_failed" in caplog.text, what="a refused handshake")
        assert bus.metrics.value(SUBSCRIBERS, plugin="zeek") == 0
        zeek.refuse_handshake = False
        zeek.wait_for_client(timeout=15)
        wait_until(connected(bus))


def test_stop_is_prompt_while_zeek_is_away(zeek, zeek_config):
    zeek.stop()
    with running_bus(apps={"zeek": ZeekApp()}, plugin_config=zeek_config) as bus:
        wait_until(lambda: bus.metrics.value(SUBSCRIBERS, plugin="zeek") == 0)
        started = time.monotonic()
    assert time.monotonic() - started < 3


def test_tls_with_the_servers_ca(make_zeek, tls_files):
    zeek = make_zeek(ssl_context=tls_files.server_context())
    config = {"apps": {"zeek": {"port": zeek.port, "tls": {"enabled": True, "ca_file": str(tls_files.cert)}}}}
    with running_bus(apps={"zeek": ZeekApp()}, plugin_config=config) as bus:
        zeek.wait_for_client()
        bus.publish_queue.put(indicator("6.6.6.6"))
        assert intel_args(zeek.next_event())[0] == "ThreatBus::add_intel"


def test_tls_verification_fails_without_the_ca_unless_skipped(make_zeek, tls_files, caplog):
    zeek = make_zeek(ssl_context=tls_files.server_context())
    config = {"apps": {"zeek": {"port": zeek.port, "tls": {"enabled": True}}}}
    with running_bus(apps={"zeek": ZeekApp()}, plugin_config=config) as bus:
        wait_until(lambda: "CERTIFICATE_VERIFY_FAILED" in caplog.text, what="a failed certificate check")
        assert bus.metrics.value(SUBSCRIBERS, plugin="zeek") == 0
    config["apps"]["zeek"]["tls"]["skip_verify"] = True
    with running_bus(apps={"zeek": ZeekApp()}, plugin_config=config):
        zeek.wait_for_client()


def test_anonymous_tls_as_brokers_default(make_zeek):
    """Zeek 5.x to 7.x without certificates: Broker encrypts with anonymous ECDH ciphers."""
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.set_ciphers("AECDH-AES256-SHA@SECLEVEL=0")
    zeek = make_zeek(ssl_context=server)
    config = {"apps": {"zeek": {"port": zeek.port, "tls": {"anonymous": True}}}}
    with running_bus(apps={"zeek": ZeekApp()}, plugin_config=config) as bus:
        client = zeek.wait_for_client()
        assert client.connection.socket.cipher()[0] == "AECDH-AES256-SHA"
        bus.publish_queue.put(indicator("6.6.6.6"))
        assert intel_args(zeek.next_event())[0] == "ThreatBus::add_intel"


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ({"port": 70000}, "plugins.apps.zeek.port must be a TCP port"),
        ({"host": ""}, "plugins.apps.zeek.host must be a host name or address"),
        ({"module_namespace": "Threat Bus"}, "plugins.apps.zeek.module_namespace must be a Zeek module name"),
        ({"snapshot": -1}, "plugins.apps.zeek.snapshot must be a number of days"),
        ({"queue_size": -5}, "plugins.apps.zeek.queue_size must be a number of indicators"),
        ({"batch_size": 0}, "plugins.apps.zeek.batch_size must be a number of intel items from 1 to 10000"),
        ({"batch_size": 10_001}, "plugins.apps.zeek.batch_size must be a number of intel items"),
        ({"tls": {"enabled": "yes"}}, "plugins.apps.zeek.tls.enabled must be true or false"),
    ],
)
def test_bad_config_is_refused(section, message):
    with (
        pytest.raises(ConfigError, match=message),
        running_bus(apps={"zeek": ZeekApp()}, plugin_config={"apps": {"zeek": section}}),
    ):
        pass


def test_unreadable_tls_files_stop_the_start(tmp_path):
    config = {"apps": {"zeek": {"tls": {"enabled": True, "ca_file": str(tmp_path / "missing.pem")}}}}
    with (
        pytest.raises(PluginError, match="plugins.apps.zeek.tls: cannot load certificates"),
        running_bus(apps={"zeek": ZeekApp()}, plugin_config=config),
    ):
        pass


def test_snapshot_requests_get_no_answer_from_zeek():
    results: queue.Queue = queue.Queue()
    ZeekApp().snapshot(
        snapshot_request=SnapshotRequest.create(SnapshotType.SIGHTING, __import__("datetime").timedelta(days=1)),
        result_queue=results,
    )
    assert results.empty()


def test_messages_are_acknowledged_once_sent_to_zeek(zeek, zeek_config):
    zeek_config["apps"]["zeek"]["batch_size"] = 2
    zeek.stop()
    app = ZeekApp()
    with running_bus(apps={"zeek": app}, plugin_config=zeek_config) as bus:
        sent = [indicator(f"10.0.2.{n}") for n in range(3)]
        unmapped = indicator(pattern="[ipv4-addr:value = '10.0.2.8' AND ipv4-addr:value = '10.0.2.9']")
        messages = [sent[0], unmapped, *sent[1:]]
        receipts = [TrackedReceipt() for _ in messages]
        for message, receipt in zip(messages, receipts, strict=True):
            app.intel_queue.put_tracked(message, receipt)
        wait_until(lambda: bus.metrics.value(QUEUE_DEPTH, queue="zeek") == 4, what="the queue to fill")
        assert not any(r.delivered.is_set() for r in receipts), "acknowledged while Zeek was away"
        zeek.start()
        zeek.wait_for_client(timeout=15)
        assert [args[2] for _, args in intel_items(zeek, 3)] == [m.id for m in sent]
        for receipt in receipts:  # the unmapped one too: nothing to send, done with the event after it
            assert receipt.delivered.wait(5)
        assert bus.metrics.value(SKIPPED, plugin="zeek") == 1
