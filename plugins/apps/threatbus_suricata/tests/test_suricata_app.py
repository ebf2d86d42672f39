"""The Suricata app on a running bus, against a stand-in Suricata.

Suricata cannot be installed on our machines: these tests drive the
stand-in unix socket of threatbus_suricata.testing, which follows Suricata's
documented command protocol (version handshake, newline-terminated JSON
commands and answers, Suricata's messages for rule reloads and
dataset-add/remove), and write EVE lines in the format Suricata's user
guide documents. Every rule the plugin writes is checked with suricataparser.
"""

from __future__ import annotations

import base64
import json
import threading
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from suricataparser import parse_file
from testbus import running_bus

from threatbus.data import SnapshotEnvelope
from threatbus.errors import ConfigError, PluginError
from threatbus.metrics import APP_RECEIVED, APP_REJECTED, DELIVERED
from threatbus.stix import new_indicator
from threatbus.testing import (
    Subscriber,
    TrackedReceipt,
    assert_live_sighting,
    assert_nothing_more,
    get_within,
    indicator,
    wait_until,
)
from threatbus_suricata import SuricataApp
from threatbus_suricata.detections import DetectionWorker

SID_MIN = 3_900_000_000


def bus_with(app: SuricataApp, config: dict[str, Any]) -> Any:
    return running_bus(apps={"suricata": app}, plugin_config={"apps": {"suricata": config}})


def rules(config: dict[str, Any]) -> list[Any]:
    path = Path(config["rules_file"])
    return parse_file(path) if path.exists() else []


def sid_of(rule: Any) -> int:
    return int(next(o.value for o in rule.options if o.name == "sid"))


def idle(app: SuricataApp) -> bool:
    worker = next(w for w in app.workers if isinstance(w, DetectionWorker))
    return worker.next_flush is None and app.inbox.empty()


def eve_alert(config: dict[str, Any], sid: int, **fields: Any) -> None:
    event = {
        "timestamp": "2026-11-24T20:00:01.000100+0000",
        "flow_id": 424242,
        "event_type": "alert",
        "src_ip": "10.1.1.1",
        "src_port": 40000,
        "dest_ip": "6.6.6.6",
        "dest_port": 80,
        "proto": "TCP",
        "app_proto": "http",
        "alert": {"action": "allowed", "gid": 1, "signature_id": sid, "rev": 1, "signature": "x", "severity": 2},
        **fields,
    }
    with open(config["eve"], "a") as out:
        out.write(json.dumps(event) + "\n")


def removal(ind: Any) -> Any:
    return new_indicator(ind.pattern, id=ind.id, x_threatbus_update="REMOVE")


def test_a_burst_of_indicators_causes_one_reload(app_config: dict[str, Any], suricata: Any) -> None:
    app_config["reload_interval"] = 1.5
    app = SuricataApp()
    with bus_with(app, app_config) as bus:
        # The first start writes the (empty) rules file and has Suricata load it.
        wait_until(lambda: suricata.reload_count() == 1, what="the reload of the new rules file")
        assert suricata.handshakes == ["0.2"]
        indicators = [indicator(f"10.9.{n // 250}.{n % 250}") for n in range(300)]
        for ind in indicators:
            bus.publish_queue.put(ind)
        wait_until(lambda: len(rules(app_config)) == 300, what="300 rules")
        wait_until(lambda: suricata.reload_count() == 2 and idle(app), what="one reload")
        assert suricata.reload_count() == 2
        assert suricata.names() == ["ruleset-reload-nonblocking"] * 2
        parsed = rules(app_config)
        assert all(r.action == "alert" for r in parsed)
        assert len({sid_of(r) for r in parsed}) == 300
        held = {app.store.entry(ind.id).sid for ind in indicators}  # type: ignore[union-attr]
        assert held == {sid_of(r) for r in parsed}
        assert bus.metrics.value(DELIVERED, plugin="suricata") == 300
        assert bus.metrics.value("threatbus_suricata_reloads") == 2


def test_removal_takes_the_rule_out(app_config: dict[str, Any], suricata: Any) -> None:
    app = SuricataApp()
    with bus_with(app, app_config) as bus:
        keep, drop = indicator("evil.com", "domain-name:value"), indicator("http://bad.org/x", "url:value")
        bus.publish_queue.put(keep)
        bus.publish_queue.put(drop)
        wait_until(lambda: len(rules(app_config)) == 2, what="two rules")
        # Suricata holds both (a reload between the two writes must not be taken for the last one).
        wait_until(lambda: suricata.held() == 2, what="Suricata to load both rules")
        reloads = suricata.reload_count()
        bus.publish_queue.put(removal(drop))
        wait_until(lambda: len(rules(app_config)) == 1, what="the removal")
        assert keep.id in rules(app_config)[0].raw
        wait_until(lambda: suricata.held() == 1, what="the reload after the removal")
        assert suricata.reload_count() == reloads + 1
        assert suricata.rule_sids == {sid_of(rules(app_config)[0])}


def test_alert_becomes_a_sighting_for_another_app(app_config: dict[str, Any], suricata: Any) -> None:
    app = SuricataApp()
    with bus_with(app, app_config) as bus:
        other_app = Subscriber(bus, "stix2/sighting")
        ind = indicator("6.6.6.6")
        bus.publish_queue.put(ind)
        wait_until(lambda: len(rules(app_config)) == 1, what="the rule")
        (rule,) = rules(app_config)
        eve_alert(app_config, 2_000_001)  # someone else's rule: no sighting
        eve_alert(app_config, sid_of(rule))
        payload = assert_live_sighting(get_within(other_app.queue), ind.id, "Suricata", "6.6.6.6")
        assert payload["x_threatbus_indicator"] == ind.payload
        assert payload["last_seen"] == "2026-11-24T20:00:01.000Z"
        context = payload["x_threatbus_sighting_context"]
        assert context["src_ip"] == "10.1.1.1" and context["dest_port"] == 80 and context["flow_id"] == 424242
        assert context["signature_id"] == sid_of(rule)
        # Broken lines are counted and skipped; the follower keeps going.
        with open(app_config["eve"], "a") as out:
            out.write("{not json\n[1, 2]\n")
        eve_alert(app_config, sid_of(rule), src_ip="10.2.2.2")
        assert get_within(other_app.queue).payload["x_threatbus_sighting_context"]["src_ip"] == "10.2.2.2"
        assert_nothing_more(other_app.queue)
        assert bus.metrics.value(APP_REJECTED, plugin="suricata") == 2
        assert bus.metrics.value(APP_RECEIVED, plugin="suricata") == 2


def test_restart_rebuilds_the_state_from_the_rules_file(app_config: dict[str, Any], suricata: Any) -> None:
    indicators = [indicator("6.6.6.6"), indicator("evil.com", "domain-name:value"), indicator("7.7.7.7")]
    first = SuricataApp()
    with bus_with(first, app_config) as bus:
        for ind in indicators:
            bus.publish_queue.put(ind)
        bus.publish_queue.put(removal(indicators[2]))
        wait_until(lambda: len(rules(app_config)) == 2 and idle(first), what="two rules")
    text = Path(app_config["rules_file"]).read_text()
    reloads = suricata.reload_count()

    second = SuricataApp()
    with bus_with(second, app_config) as bus:
        other_app = Subscriber(bus, "stix2/sighting")
        wait_until(lambda: idle(second), what="the start")
        assert len(second.store) == 2  # type: ignore[arg-type]
        assert Path(app_config["rules_file"]).read_text() == text
        assert suricata.reload_count() == reloads  # nothing changed: no reload
        sid = second.store.entry(indicators[1].id).sid  # type: ignore[union-attr]
        eve_alert(app_config, sid, dns={"query": [{"rrname": "evil.com"}]})
        sighting = get_within(other_app.queue)
        assert sighting.payload["sighting_of_ref"] == indicators[1].id
        assert sighting.payload["x_threatbus_indicator"] == indicators[1].payload


def test_datasets_mode_adds_and_removes_entries_without_reloads(app_config: dict[str, Any], suricata: Any) -> None:
    app_config["mode"] = "datasets"
    app = SuricataApp()
    with bus_with(app, app_config) as bus:
        other_app = Subscriber(bus, "stix2/sighting")
        wait_until(lambda: suricata.reload_count() == 1, what="the initial load of the static rules")
        ips = [indicator(f"192.0.2.{n}") for n in range(50)] + [indicator("2001:db8::5", "ipv6-addr:value")]
        domains = [indicator(f"bad{n}.example", "domain-name:value") for n in range(10)]
        for ind in ips + domains:
            bus.publish_queue.put(ind)
        wait_until(lambda: suricata.count("dataset-add") == 61, what="61 dataset-add commands")
        assert suricata.dataset("threatbus-ip") == {f"192.0.2.{n}" for n in range(50)} | {"2001:db8::5"}
        assert suricata.dataset("threatbus-domain") == {f"bad{n}.example" for n in range(10)}
        adds = [c for c in suricata.commands if c["command"] == "dataset-add"]
        domain_add = next(c for c in adds if c["arguments"]["setname"] == "threatbus-domain")
        assert domain_add["arguments"]["settype"] == "string"
        assert base64.b64decode(domain_add["arguments"]["datavalue"]).decode().startswith("bad")
        assert suricata.reload_count() == 1
        assert len(rules(app_config)) == 3  # static: ip.dst, ip.src, dns.query

        bus.publish_queue.put(removal(ips[0]))
        wait_until(lambda: suricata.count("dataset-remove") == 1, what="dataset-remove")
        assert "192.0.2.0" not in suricata.dataset("threatbus-ip")
        lst = Path(app_config["rules_file"]).with_name("threatbus-ip.lst")
        wait_until(lambda: "192.0.2.0\n" not in lst.read_text(), what="the dataset file update")
        assert "192.0.2.1\n" in lst.read_text()

        eve_alert(app_config, SID_MIN + 1, src_ip="192.0.2.7", dest_ip="10.0.0.1")  # the ip.src rule
        sighting = get_within(other_app.queue)
        assert sighting.payload["sighting_of_ref"] == ips[7].id
        assert sighting.payload["x_threatbus_indicator_value"] == "192.0.2.7"
        assert suricata.reload_count() == 1


def test_datasets_mode_reloads_instead_of_sending_many_commands(app_config: dict[str, Any], suricata: Any) -> None:
    app_config.update(mode="datasets", dataset_command_limit=5, reload_interval=1.0)
    app = SuricataApp()
    with bus_with(app, app_config) as bus:
        wait_until(lambda: suricata.reload_count() == 1, what="the initial load of the static rules")
        for n in range(20):
            bus.publish_queue.put(indicator(f"198.51.100.{n}"))
        wait_until(lambda: suricata.reload_count() == 2, what="one reload for the burst")
        assert suricata.dataset("threatbus-ip") == {f"198.51.100.{n}" for n in range(20)}  # read from the file
        assert suricata.count("dataset-add") == 0
        bus.publish_queue.put(indicator("198.51.100.99"))
        wait_until(lambda: suricata.count("dataset-add") == 1, what="a single change as a command")
        assert suricata.reload_count() == 2


def test_unreachable_suricata_gets_the_rules_once_it_is_up(
    app_config: dict[str, Any], short_dir: Path, start_suricata: Any
) -> None:
    app_config["socket"] = str(short_dir / "later.socket")
    app = SuricataApp()
    with bus_with(app, app_config) as bus:
        ind = indicator("6.6.6.6")
        bus.publish_queue.put(ind)
        wait_until(lambda: len(rules(app_config)) == 1, what="the rules file, written without Suricata")
        wait_until(lambda: bus.metrics.value("threatbus_suricata_socket_errors") >= 1, what="a failed reload")
        late = start_suricata(app_config["socket"], Path(app_config["rules_file"]))
        wait_until(lambda: late.reload_count() == 1, timeout=20, what="the reload once Suricata is up")
        assert late.handshakes == ["0.2"]


def test_a_restarted_suricata_is_reconnected_without_losing_a_change(
    app_config: dict[str, Any], suricata: Any, start_suricata: Any
) -> None:
    app = SuricataApp()
    with bus_with(app, app_config) as bus:
        wait_until(lambda: suricata.reload_count() == 1, what="the first reload")
        suricata.close()  # Suricata restarts: a new socket at the same path
        restarted = start_suricata(app_config["socket"], Path(app_config["rules_file"]))
        bus.publish_queue.put(indicator("6.6.6.6"))
        wait_until(lambda: restarted.reload_count() == 1, what="the reload on the new connection")
        assert bus.metrics.value("threatbus_suricata_socket_errors") == 0


def test_a_refused_reload_is_retried(app_config: dict[str, Any], suricata: Any) -> None:
    suricata.refuse_reloads = True  # "Reload already in progress"
    app = SuricataApp()
    with bus_with(app, app_config):
        wait_until(lambda: suricata.reload_count() >= 1, what="a refused reload")
        assert suricata.reloads == 0
        suricata.refuse_reloads = False
        wait_until(lambda: suricata.reloads == 1, timeout=15, what="the retried reload")


def test_a_foreign_rules_file_is_not_overwritten(app_config: dict[str, Any]) -> None:
    path = Path(app_config["rules_file"])
    path.write_text('alert ip any any -> any any (msg:"mine"; sid:1;)\n')
    with pytest.raises(PluginError, match="not written by Threat Bus"), bus_with(SuricataApp(), app_config):
        pass
    assert path.read_text() == 'alert ip any any -> any any (msg:"mine"; sid:1;)\n'


def test_snapshot_requests_are_answered_with_held_indicators(app_config: dict[str, Any], suricata: Any) -> None:
    app = SuricataApp()
    with bus_with(app, app_config) as bus:
        ind = indicator("6.6.6.6")
        bus.publish_queue.put(ind)
        wait_until(lambda: len(rules(app_config)) == 1, what="the rule")
        newcomer = Subscriber(bus, "stix2/indicator", snapshot=timedelta(days=1))
        envelope = get_within(newcomer.queue)
        assert isinstance(envelope, SnapshotEnvelope)
        assert envelope.snapshot_id in newcomer.snapshot_ids
        assert envelope.stix.payload == ind.payload


def test_unsupported_indicators_are_counted_not_fatal(app_config: dict[str, Any], suricata: Any) -> None:
    app = SuricataApp()
    with bus_with(app, app_config) as bus:
        bus.publish_queue.put(indicator("a@b.example", "email-addr:value"))
        bus.publish_queue.put(new_indicator('alert ip any any -> any any (msg:"no sid";)', pattern_type="suricata"))
        bus.publish_queue.put(indicator("6.6.6.6"))
        wait_until(lambda: len(rules(app_config)) == 1, what="the one mappable rule")
        wait_until(lambda: bus.metrics.value(APP_REJECTED, plugin="suricata") == 2, what="two rejected")


def test_config_errors_name_the_key(tmp_path: Path, app_config: dict[str, Any]) -> None:
    app_config["rules_file"] = str(tmp_path / "missing" / "threatbus.rules")
    with (
        pytest.raises(ConfigError, match=r"plugins\.apps\.suricata\.rules_file must be a file path in an existing"),
        bus_with(SuricataApp(), app_config),
    ):
        pass
    app_config["rules_file"] = str(tmp_path / "threatbus.rules")
    app_config["sid_min"], app_config["sid_max"] = 100, 200
    with pytest.raises(PluginError, match="sid_max"), bus_with(SuricataApp(), app_config):
        pass
    app_config["sid_max"] = 10**6
    app_config["mode"] = "magic"
    with pytest.raises(ConfigError, match="mode must be one of rules, datasets"), bus_with(SuricataApp(), app_config):
        pass


def test_an_indicator_is_acknowledged_once_the_rules_file_holds_it(
    app_config: dict[str, Any], suricata: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    app = SuricataApp()
    with bus_with(app, app_config):
        wait_until(lambda: suricata.reload_count() == 1, what="the first reload")
        store, sync = app.store, app.sync
        assert store is not None and sync is not None
        write, failing = store.write, threading.Event()
        failing.set()

        def write_unless_failing() -> None:
            if failing.is_set():
                raise OSError("disk full")
            write()

        monkeypatch.setattr(store, "write", write_unless_failing)
        mapped = TrackedReceipt()
        app.inbox.put_tracked(indicator("6.6.6.6"), mapped)
        wait_until(lambda: sync.write_errors >= 1, what="a failed write of the rules file")
        assert not mapped.delivered.is_set(), "acknowledged before the rules file held it"
        failing.clear()
        assert mapped.delivered.wait(15), "not acknowledged after the rules file was written"
        assert len(rules(app_config)) == 1
        wait_until(lambda: idle(app), what="nothing left to write")
        unmapped = TrackedReceipt()  # nothing for Suricata in it: acknowledged when taken
        app.inbox.put_tracked(indicator("a@b.example", "email-addr:value"), unmapped)
        assert unmapped.delivered.wait(5)
