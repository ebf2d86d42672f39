"""Snapshots from the bus's intel log over ZeroMQ, and the snapshotend marker (our addition)."""

from __future__ import annotations

import orjson
import pytest

from threatbus.testing import indicator, sighting
from threatbus_zmq.client import Receiver, is_success
from threatbus_zmq.wire import split_pub_frame


def publish_and_see(bus, messages, arrive=None) -> None:
    """Publish through the sub socket and wait until a listener got them (they are in the log then)."""
    listener = bus.fake_app("stix2")
    sender = bus.sender()
    for message in messages:
        sender.send(message)
    listener.recv_many(len(messages) if arrive is None else arrive)
    sender.close(linger=1)


def subscribe_raw(bus, topic, days, snapshot_end=True):
    manage = bus.manage_client()
    reply = manage.subscribe(topic, days, snapshot_end=snapshot_end)
    assert is_success(reply), reply
    receiver = Receiver(bus.host, reply["pub_port"], reply["topic"], bus.context)
    return manage, receiver


def frames_until_end(receiver, ends=1, timeout=15.0):
    got, markers = [], []
    while len(markers) < ends:
        frame = receiver.recv_frame(timeout)
        assert frame is not None, f"no end marker within {timeout}s; got {got}"
        _p2p, kind, body = split_pub_frame(frame)
        (markers if kind == "snapshotend" else got).append((kind, orjson.loads(body)))
    return got, markers


def test_a_new_subscriber_gets_the_log_once_then_the_end_marker(our_bus):
    iocs = [indicator(f"203.0.113.{n}") for n in range(5)]
    publish_and_see(our_bus, [*iocs, sighting(iocs[0])])
    manage, receiver = subscribe_raw(our_bus, "stix2/indicator", 1)
    try:
        got, markers = frames_until_end(receiver)
        assert sorted(body["id"] for _, body in got) == sorted(i.id for i in iocs)
        assert {kind for kind, _ in got} == {"indicator"}
        [(_, end)] = markers
        assert end["snapshot_type"] == 1 and end["count"] == 5 and len(end["snapshot_id"]) == 32
        assert receiver.recv_frame(0.5) is None
    finally:
        receiver.close()
        manage.close()


def test_a_prefix_subscription_gets_one_marker_per_kind(our_bus):
    ioc = indicator("203.0.113.99")
    publish_and_see(our_bus, [ioc, sighting(ioc), sighting(ioc)])
    manage, receiver = subscribe_raw(our_bus, "stix2", 1)
    try:
        got, markers = frames_until_end(receiver, ends=2)
        counts = {end["snapshot_type"]: end["count"] for _, end in markers}
        assert counts == {1: 1, 2: 2}
        assert len(got) == 3
    finally:
        receiver.close()
        manage.close()


def test_without_asking_there_is_no_marker(our_bus):
    publish_and_see(our_bus, [indicator("203.0.113.7")])
    manage, receiver = subscribe_raw(our_bus, "stix2/indicator", 1, snapshot_end=False)
    try:
        frame = receiver.recv_frame(10)
        assert frame is not None and split_pub_frame(frame)[1] == "indicator"
        assert receiver.recv_frame(0.7) is None
    finally:
        receiver.close()
        manage.close()


def test_snapshot_end_that_is_not_true_is_ignored_like_the_original_would(our_bus):
    manage = our_bus.manage_client()
    reply = manage.request({"action": "subscribe", "topic": "stix2", "snapshot": 1, "snapshot_end": "yes"})
    assert is_success(reply)
    receiver = Receiver(our_bus.host, reply["pub_port"], reply["topic"], our_bus.context)
    try:
        assert receiver.recv_frame(0.7) is None
    finally:
        receiver.close()
        manage.close()


@pytest.mark.parametrize("kind", ["inprocess", "process"])
def test_the_log_answer_passes_the_app_and_client_filters_and_still_ends(configured_bus, kind):
    from threatbus.testing import intel_mix

    with configured_bus(kind, filter={"min_confidence": 50}) as target:
        mix = intel_mix()
        publish_and_see(target, list(mix.values()), arrive=7)  # the app's filter holds back 2 of 9
        manage = target.manage_client()
        reply = manage.subscribe("stix2/indicator", 1, {"tlp": "green"}, snapshot_end=True)
        assert is_success(reply), reply
        receiver = Receiver(target.host, reply["pub_port"], reply["topic"], target.context)
        try:
            got, markers = frames_until_end(receiver)
            names = {item.id: name for name, item in mix.items()}
            assert {names[body["id"]] for _, body in got} == {"clear", "white", "unmarked_noconf"}
            assert len(markers) == 1
        finally:
            receiver.close()
            manage.close()
