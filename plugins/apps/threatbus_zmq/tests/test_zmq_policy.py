"""Policy filters through the ZeroMQ app: the app's filter and each client's own, in-process and as a process."""

from __future__ import annotations

import pytest

from threatbus.testing import TLP1, indicator, intel_mix
from threatbus_zmq.client import Receiver, is_success

# Confidences in intel_mix: green 30 and unmarked 10 are below 50.
APP_FILTER = {"min_confidence": 50}
AFTER_APP = {"red", "red2", "amber_strict", "amber", "clear", "white", "unmarked_noconf"}
CLIENTS = {
    "all": (None, AFTER_APP),
    "green": ({"tlp": "green"}, {"clear", "white", "unmarked_noconf"}),
    "sensor": ({"detection_only": True, "unmarked": "deny"}, {"red", "red2", "amber_strict", "amber", "white"}),
}


def _sentinel():
    # Passes every filter above: once a client has it, everything sent before it has arrived or was held back.
    return indicator("10.9.9.9", object_marking_refs=[TLP1["white"]], confidence=100, x_opencti_detection=True)


def _received_until(receiver: Receiver, sentinel_id: str, names: dict[str, str]) -> set[str]:
    got: set[str] = set()
    while True:
        item = receiver.recv(10.0)
        assert item is not None, f"the sentinel did not arrive; got {sorted(got)}"
        _kind, message = item
        if message.payload["id"] == sentinel_id:
            return got
        got.add(names[message.payload["id"]])


@pytest.mark.parametrize("kind", ["inprocess", "process"])
def test_each_client_gets_what_the_app_and_its_own_filter_let_through(configured_bus, kind):
    with configured_bus(kind, filter=APP_FILTER) as target:
        receivers = {}
        for name, (client_filter, _expected) in CLIENTS.items():
            manage = target.manage_client()
            reply = manage.subscribe("stix2/indicator", 0, client_filter)
            assert is_success(reply), reply
            receivers[name] = Receiver(target.host, reply["pub_port"], reply["topic"], target.context)
            manage.close()
        mix = intel_mix()
        names = {item.id: name for name, item in mix.items()}
        sentinel = _sentinel()
        sender = target.sender()
        try:
            for item in [*mix.values(), sentinel]:
                sender.send(item)
            for name, (_filter, expected) in CLIENTS.items():
                assert _received_until(receivers[name], sentinel.id, names) == expected, name
        finally:
            sender.close(linger=1)
            for receiver in receivers.values():
                receiver.close()
        if target.bus is not None:
            held = target.metric("threatbus_filtered", plugin="zmq", rule="app", reason="confidence")
            assert held == 2 * len(CLIENTS)  # the app's filter sits in front of each client's queue
            assert target.metric("threatbus_filtered", plugin="zmq", rule="client", reason="tlp") == 4
            assert target.metric("threatbus_filtered", plugin="zmq", rule="client", reason="unmarked") == 1
            assert target.metric("threatbus_filtered", plugin="zmq", rule="client", reason="detection") == 1


@pytest.mark.parametrize(
    "bad",
    [{"tlp": "purple"}, {"min_confidence": "high"}, "amber", {"nope": 1}, {"labels": {"include": [1]}}],
)
def test_a_garbage_client_filter_gets_an_error_reply_and_the_bus_keeps_serving(inprocess_bus, bad):
    manage = inprocess_bus.manage_client()
    reply = manage.subscribe("stix2", 0, bad)
    assert reply["status"] == "error" and reply["reason"].startswith("filter"), reply
    assert is_success(manage.subscribe("stix2", 0, {"tlp": "amber"}))
    assert is_success(manage.subscribe("stix2"))  # old clients: no filter key at all
    manage.close()


@pytest.mark.parametrize("kind", ["inprocess", "process"])
def test_snapshot_answers_obey_the_app_and_client_filters(configured_bus, kind):
    from threatbus.data import SnapshotEnvelope

    with configured_bus(kind, filter=APP_FILTER) as target:
        answerer = target.fake_app("stix2/indicator")
        manage = target.manage_client()
        reply = manage.subscribe("stix2/indicator", 1, CLIENTS["sensor"][0])
        assert is_success(reply), reply
        requester = Receiver(target.host, reply["pub_port"], reply["topic"], target.context)
        manage.close()
        try:
            kind_name, request = answerer.recv()
            assert kind_name == "snapshotrequest"
            mix = intel_mix()
            names = {item.id: name for name, item in mix.items()}
            end = _sentinel()
            for item in [*mix.values(), end]:
                answerer.send(SnapshotEnvelope.wrap(request, item))
            assert _received_until(requester, end.id, names) == CLIENTS["sensor"][1]
        finally:
            requester.close()
