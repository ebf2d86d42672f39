"""The bus lifecycle and routing, driven by plugin objects registered in-process."""

import queue
from datetime import timedelta

import pytest
from testbus import running_bus

import threatbus
from threatbus.bus import Bus
from threatbus.config import option
from threatbus.data import SnapshotEnvelope, SnapshotRequest, SnapshotType
from threatbus.errors import ConfigError, PluginError
from threatbus.testing import (
    Subscriber,
    assert_nothing_more,
    collect,
    get_within,
    indicator,
    settings_from,
    sighting,
    wait_until,
)
from threatbus_inmem import InMemoryBackbone


class RecordingApp:
    """An app plugin that records its hook calls and answers snapshots from `held`."""

    def __init__(self, held=(), fail_in=None, log=None):
        self.held = list(held)
        self.fail_in = fail_in
        self.log = log if log is not None else []
        self.config = None
        self.requests = []

    @threatbus.app
    def config_validators(self):
        return [option("plugins.apps.recording.greeting", str, default="hello")]

    @threatbus.app
    def run(self, config, publish_queue, subscribe, unsubscribe):
        self.log.append(("run", id(self)))
        self.config = config
        self.publish_queue = publish_queue
        self.subscribe, self.unsubscribe = subscribe, unsubscribe
        if self.fail_in == "run":
            raise RuntimeError("cannot start")

    @threatbus.app
    def stop(self):
        self.log.append(("stop", id(self)))
        if self.fail_in == "stop":
            raise RuntimeError("cannot stop")

    @threatbus.app
    def snapshot(self, snapshot_request, result_queue):
        self.requests.append(snapshot_request)
        for item in self.held:
            result_queue.put(SnapshotEnvelope.wrap(snapshot_request, item))


def test_run_gets_its_validated_config_section_with_defaults():
    app = RecordingApp()
    with running_bus(apps={"recording": app}, plugin_config={"apps": {"recording": {"extra": 1}}}):
        assert app.config.greeting == "hello"
        assert app.config.extra == 1


def test_published_message_reaches_subscribers_of_its_topic():
    app = RecordingApp()
    with running_bus(apps={"recording": app}) as bus:
        indicators = Subscriber(bus, "stix2/indicator")
        sightings = Subscriber(bus, "stix2/sighting")
        ind, sight = indicator(), sighting()
        app.publish_queue.put(ind)
        app.publish_queue.put(sight)
        assert get_within(indicators.queue) == ind
        assert get_within(sightings.queue) == sight
        assert_nothing_more(indicators.queue)


def test_unsubscribe_stops_delivery():
    app = RecordingApp()
    with running_bus(apps={"recording": app}) as bus:
        sub = Subscriber(bus, "stix2")
        bus.unsubscribe("stix2", sub.queue)
        marker = Subscriber(bus, "stix2")
        app.publish_queue.put(indicator())
        get_within(marker.queue)
        assert sub.queue.empty()


def test_snapshot_request_reaches_other_apps_and_envelopes_only_the_requester():
    held = [indicator("1.1.1.1"), indicator("2.2.2.2")]
    answering = RecordingApp(held=held)
    with running_bus(apps={"answering": answering}) as bus:
        bystander = Subscriber(bus, "stix2/indicator")
        requester = Subscriber(bus, "stix2/indicator", snapshot=timedelta(days=3))
        assert len(requester.snapshot_ids) == 1
        envelopes = collect(requester.queue, 2)
        assert all(isinstance(e, SnapshotEnvelope) for e in envelopes)
        assert [e.stix for e in envelopes] == held
        assert {e.snapshot_id for e in envelopes} == set(requester.snapshot_ids)
        assert answering.requests[0].snapshot == timedelta(days=3)
        assert_nothing_more(bystander.queue)


def test_snapshot_hook_names_the_local_requester_and_not_a_remote_one():
    class Asked(RecordingApp):
        @threatbus.app
        def snapshot(self, snapshot_request, result_queue, local, requester):
            self.requests.append((snapshot_request.snapshot_id, local, requester))

    asked = Asked()
    with running_bus(apps={"asked": asked}) as bus:
        requester = Subscriber(bus, "stix2/indicator", snapshot=timedelta(days=1))
        wait_until(lambda: len(asked.requests) == 1, what="the local request reaches the app")
        assert asked.requests[0] == (requester.snapshot_ids[0], True, requester.queue)
        # A request published by another node: nobody here made it.
        remote = SnapshotRequest.create(SnapshotType.INDICATOR, timedelta(days=1))
        bus.publish_queue.put(remote)
        wait_until(lambda: len(asked.requests) == 2, what="the remote request reaches the app")
        assert asked.requests[1] == (remote.snapshot_id, False, None)


def test_snapshot_on_stix2_prefix_asks_for_indicators_and_sightings():
    answering = RecordingApp()
    with running_bus(apps={"answering": answering}) as bus:
        requester = Subscriber(bus, "stix2", snapshot=timedelta(hours=1))
        assert len(requester.snapshot_ids) == 2

        def both_asked():
            return {int(r.snapshot_type) for r in answering.requests} == {1, 2}

        wait_until(both_asked, what="both snapshot types requested")


def test_redelivered_snapshot_request_is_answered_once():
    answering = RecordingApp(held=[indicator()])
    with running_bus(apps={"answering": answering}) as bus:
        requester = Subscriber(bus, "stix2/indicator", snapshot=timedelta(days=1))
        get_within(requester.queue)
        request = answering.requests[0]
        bus.publish_queue.put(SnapshotRequest(dict(request.payload)))
        marker = Subscriber(bus, "stix2/indicator")
        bus.publish_queue.put(indicator())
        get_within(marker.queue)
        assert len(answering.requests) == 1
        assert requester.queue.get(timeout=1).type_name == "indicator"


def test_one_failing_snapshot_answer_does_not_silence_the_others():
    class Broken(RecordingApp):
        @threatbus.app
        def snapshot(self, snapshot_request, result_queue):
            raise RuntimeError("boom")

    good = RecordingApp(held=[indicator()])
    with running_bus(apps={"broken": Broken(), "good": good}) as bus:
        requester = Subscriber(bus, "stix2/indicator", snapshot=timedelta(days=1))
        assert isinstance(get_within(requester.queue), SnapshotEnvelope)


def test_failing_start_stops_what_already_started():
    log = []
    first, second = RecordingApp(log=log), RecordingApp(fail_in="run", log=log)
    backbone = InMemoryBackbone()
    settings = settings_from({"plugins": {"apps": {"a": {}, "b": {}}, "backbones": {"inmem": {}}}})
    bus = Bus(settings, apps={"a": first, "b": second}, backbones={"inmem": backbone})
    bus.configure()
    with pytest.raises(PluginError, match="failed in run: cannot start"):
        bus.start()
    assert sorted(log) == sorted([("run", id(first)), ("run", id(second)), ("stop", id(first)), ("stop", id(second))])
    assert not backbone.worker.is_alive()
    assert not bus.snapshots.is_alive()


def test_one_failing_stop_does_not_keep_others_running(caplog):
    log = []
    apps = {"a": RecordingApp(fail_in="stop", log=log), "b": RecordingApp(log=log)}
    with running_bus(apps=apps) as bus:
        backbone = bus.backbones.get_plugin("inmem")
    assert [entry[0] for entry in log].count("stop") == 2
    assert not backbone.worker.is_alive()
    assert "failed to stop cleanly" in caplog.text


def test_exactly_one_backbone():
    settings = settings_from({"plugins": {"apps": {}, "backbones": {}}})
    with pytest.raises(ConfigError, match="exactly one backbone"):
        Bus(settings, apps={}, backbones={}).configure()
    with pytest.raises(ConfigError, match="found: a, b"):
        Bus(settings, apps={}, backbones={"a": InMemoryBackbone(), "b": InMemoryBackbone()}).configure()


def test_plugin_validators_reject_bad_values():
    settings = settings_from({"plugins": {"apps": {"recording": {"greeting": 42}}, "backbones": {"inmem": {}}}})
    bus = Bus(settings, apps={"recording": RecordingApp()}, backbones={"inmem": InMemoryBackbone()})
    with pytest.raises(ConfigError, match="plugins.apps.recording.greeting must be a string, got 42"):
        bus.configure()


def test_plugin_with_unknown_hook_is_refused():
    class Typo:
        @threatbus.app
        def runn(self):
            pass

    settings = settings_from({"plugins": {"apps": {}, "backbones": {"inmem": {}}}})
    with pytest.raises(PluginError, match="runn"):
        Bus(settings, apps={"typo": Typo()}, backbones={"inmem": InMemoryBackbone()})


def test_metrics_show_delivery_and_queue_depth():
    app = RecordingApp()
    with running_bus(apps={"recording": app}) as bus:
        sub = Subscriber(bus, "stix2")
        for _ in range(3):
            app.publish_queue.put(indicator())
        collect(sub.queue, 3)
        assert bus.metrics.value("threatbus_delivered") >= 3
        text = bus.metrics.render().decode()
        assert 'threatbus_queue_depth{node="test-node",queue="publish"}' in text


def test_stop_delivers_everything_already_published():
    app = RecordingApp()
    sink = queue.Queue()
    with running_bus(apps={"recording": app}) as bus:
        bus.subscribe("stix2", sink)
        for _ in range(500):
            app.publish_queue.put(indicator())
    assert sink.qsize() == 500


def test_config_error_raised_in_run_stays_a_config_error():
    class NeedsKey(RecordingApp):
        @threatbus.app
        def run(self, config):
            raise ConfigError("plugins.apps.needskey.key_file: cannot read /nonexistent")

    settings = settings_from({"plugins": {"apps": {"needskey": {}}, "backbones": {"inmem": {}}}})
    bus = Bus(settings, apps={"needskey": NeedsKey()}, backbones={"inmem": InMemoryBackbone()})
    bus.configure()
    with pytest.raises(ConfigError, match="key_file"):
        bus.start()
