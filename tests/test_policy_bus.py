"""Where policy filters apply inside one node: each app's filter, snapshots, removals, metrics, config errors."""

from __future__ import annotations

import queue
from datetime import timedelta

import pytest
from testbus import running_bus

import threatbus
from threatbus.bus import Bus
from threatbus.data import SnapshotEnvelope
from threatbus.errors import ConfigError
from threatbus.lifecycle import as_removal
from threatbus.node import Node
from threatbus.testing import (
    TLP1,
    assert_nothing_more,
    collect,
    get_within,
    indicator,
    intel_mix,
    settings_from,
    sighting,
    wait_until,
)
from threatbus_inmem import InMemoryBackbone


class ListeningApp:
    """An app that subscribes one queue with the subscribe the bus gives it, and answers snapshots from ``held``."""

    def __init__(self, topic: str = "stix2", snapshot: timedelta = timedelta(0), held=()):
        self.topic = topic
        self.snapshot_period = snapshot
        self.held = list(held)
        self.queue: queue.Queue = queue.Queue()

    @threatbus.app
    def run(self, config, publish_queue, subscribe, unsubscribe):
        self.publish_queue = publish_queue
        self.subscribe, self.unsubscribe = subscribe, unsubscribe
        subscribe(self.topic, self.queue, snapshot=self.snapshot_period)

    @threatbus.app
    def stop(self):
        pass

    @threatbus.app
    def snapshot(self, snapshot_request, result_queue):
        for item in self.held:
            result_queue.put(SnapshotEnvelope.wrap(snapshot_request, item))


def _sentinel():
    return indicator("10.9.9.9", object_marking_refs=[TLP1["white"]], confidence=100, x_opencti_detection=True)


def _names_until(source: queue.Queue, sentinel_id: str, names: dict[str, str]) -> set[str]:
    got = set()
    while True:
        message = get_within(source)
        if isinstance(message, SnapshotEnvelope):
            message = message.stix
        if message.payload["id"] == sentinel_id:
            return got
        got.add(names.get(message.payload["id"], message.payload["id"]))


APPS = {
    "sensor": ({"detection_only": True, "tlp": "amber"}, {"red", "red2", "amber_strict", "clear", "unmarked_noconf"}),
    "blocklist": ({"min_confidence": 80, "unmarked": "deny"}, {"green", "clear", "unmarked", "unmarked_noconf"}),
    "partner": ({"tlp": "green"}, {"red", "red2", "amber_strict", "amber"}),
    "archive": (None, set()),
}


def _config(extra=None):
    apps = {name: ({"filter": spec} if spec else {}) for name, (spec, _held) in APPS.items()}
    return {"apps": apps, **(extra or {})}


def test_each_app_gets_exactly_what_its_filter_lets_through():
    apps = {name: ListeningApp() for name in APPS}
    with running_bus(apps=apps, plugin_config=_config()) as bus:
        mix = intel_mix()
        names = {item.id: name for name, item in mix.items()}
        sentinel = _sentinel()
        for item in [*mix.values(), sentinel]:
            bus.publish_queue.put(item)
        for name, (_spec, held) in APPS.items():
            assert _names_until(apps[name].queue, sentinel.id, names) == set(mix) - held, name
        assert (
            bus.metrics.value("threatbus_filtered", plugin="sensor", reason="detection") == 2
        )  # clear, unmarked_noconf
        assert bus.metrics.value("threatbus_filtered", plugin="sensor", reason="tlp") == 3
        assert bus.metrics.value("threatbus_filtered", plugin="blocklist", rule="app") == 4
        assert bus.metrics.value("threatbus_filtered", plugin="archive") == 0
        assert b'threatbus_filtered_total{node="test-node",plugin="partner",reason="tlp",rule="app"} 4.0' in (
            bus.metrics.render()
        )


def test_sightings_reach_an_app_when_their_indicator_would():
    app = ListeningApp()
    with running_bus(apps={"partner": app}, plugin_config={"apps": {"partner": {"filter": {"tlp": "green"}}}}) as bus:
        mix = intel_mix()
        of_red, of_green = sighting(of=mix["red"]), sighting(of=mix["green"])
        bus.publish_queue.put(of_red)
        bus.publish_queue.put(of_green)
        assert get_within(app.queue) == of_green
        assert_nothing_more(app.queue)


def test_snapshots_obey_the_requesting_apps_filter():
    mix = intel_mix()
    answering = ListeningApp(held=list(mix.values()))
    asking = ListeningApp("stix2/indicator", snapshot=timedelta(days=1))
    config = {"apps": {"asking": {"filter": {"tlp": "amber", "min_confidence": 50}}}}
    with running_bus(apps={"answering": answering, "asking": asking}, plugin_config=config) as bus:
        names = {item.id: name for name, item in mix.items()}
        # Snapshot answers come first; the sentinel, published after them, arrives after them.
        expected = {"amber", "clear", "white", "unmarked_noconf"}
        envelopes = collect(asking.queue, len(expected))
        assert all(isinstance(e, SnapshotEnvelope) for e in envelopes)
        assert {names[e.stix.id] for e in envelopes} == expected
        sentinel = _sentinel()
        bus.publish_queue.put(sentinel)
        assert get_within(asking.queue) == sentinel


def test_a_removal_reaches_an_app_that_got_the_indicator_and_no_other():
    mix = intel_mix()
    app = ListeningApp("stix2/indicator")
    config = {"apps": {"sensor": {"filter": {"detection_only": True, "tlp": "amber"}}}}
    with running_bus(apps={"sensor": app}, plugin_config=config) as bus:
        amber, red = mix["amber"], mix["red"]
        bus.publish_queue.put(amber)
        assert get_within(app.queue) == amber
        # MISP turned to_ids off: the removal no longer carries the detection flag, and still arrives.
        removal = type(amber)(as_removal({**amber.payload, "x_opencti_detection": False}))
        bus.publish_queue.put(type(red)(as_removal(red.payload)))
        bus.publish_queue.put(removal)
        assert get_within(app.queue) == removal
        assert_nothing_more(app.queue)


def test_unsubscribe_through_the_filter_stops_delivery_and_overlapping_topics_deliver_once():
    app = ListeningApp("stix2")
    with running_bus(apps={"partner": app}, plugin_config={"apps": {"partner": {"filter": {"tlp": "red"}}}}) as bus:
        app.subscribe("stix2/indicator", app.queue)
        first = indicator()
        bus.publish_queue.put(first)
        assert get_within(app.queue) == first
        assert_nothing_more(app.queue)
        app.unsubscribe("stix2", app.queue)
        app.unsubscribe("stix2/indicator", app.queue)
        other = ListeningApp("stix2")
        other.queue = queue.Queue()
        bus.subscribe("stix2", other.queue)
        bus.publish_queue.put(indicator())
        get_within(other.queue)
        assert app.queue.empty()


@pytest.mark.parametrize(
    "plugins, key",
    [
        ({"apps": {"sensor": {"filter": {"tlp": "purple"}}}}, "plugins.apps.sensor.filter.tlp"),
        ({"apps": {"sensor": {"filter": {"min_confidence": -3}}}}, "plugins.apps.sensor.filter.min_confidence"),
        ({"apps": {"sensor": {"filter": "red"}}}, "plugins.apps.sensor.filter"),
        ({"backbones": {"inmem": {"export": {"filter": {"unmarked": 0}}}}}, "plugins.backbones.inmem.export.filter"),
        ({"backbones": {"inmem": {"import": {"filter": {"max_age": "x"}}}}}, "plugins.backbones.inmem.import.filter"),
    ],
)
def test_garbage_filter_values_are_config_errors_naming_the_key(plugins, key):
    sections = {"apps": {"sensor": {}}, "backbones": {"inmem": {}}}
    for kind, given in plugins.items():
        sections[kind].update(given)
    settings = settings_from({"plugins": sections, "logging": {}, "node": {"name": "n"}})
    bus = Bus(settings, apps={"sensor": ListeningApp()}, backbones={"inmem": InMemoryBackbone()}, node=Node.create("n"))
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        bus.configure()


def test_the_snapshot_hook_names_the_apps_own_queue_even_behind_its_filter():
    class Asking(ListeningApp):
        @threatbus.app
        def snapshot(self, snapshot_request, result_queue, local, requester):
            self.asked = (local, requester)

    asking = Asking("stix2/indicator", snapshot=timedelta(days=1))
    config = {"apps": {"asking": {"filter": {"tlp": "amber"}}}}
    with running_bus(apps={"asking": asking}, plugin_config=config):
        wait_until(lambda: getattr(asking, "asked", None), what="the app's own request to reach it")
        # The bus wraps the queue in the filter; the app must see its own queue to skip its own request.
        assert asking.asked == (True, asking.queue)
