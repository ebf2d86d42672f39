"""The wire protocol (WIRE.md) against an in-process bus and a real threatbus process."""

from __future__ import annotations

import socket
from datetime import timedelta

import orjson
import pytest

from threatbus.data import Indicator, Sighting, SnapshotEnvelope, SnapshotRequest, SnapshotType
from threatbus.metrics import APP_RECEIVED, APP_REJECTED, SUBSCRIBERS
from threatbus.stix import new_indicator
from threatbus.testing import Subscriber, get_within, indicator, sighting, wait_until
from threatbus_zmq.client import Receiver, is_success


def same(bus, message):
    """What must arrive unchanged: the whole object on our bus; the original
    re-serialises STIX with the stix2 library (timestamps lose trailing zeros),
    so only ids are compared there."""
    return message.payload if bus.ours else message.payload["id"]


def test_subscribe_reply_carries_a_secret_p2p_topic_and_the_ports(bus):
    manage = bus.manage_client()
    replies = [manage.subscribe("stix2/indicator"), manage.subscribe(["stix2/indicator", "stix2/sighting"], 0)]
    for reply in replies:
        assert reply["status"] == "success"
        assert len(reply["topic"]) == 32 and reply["topic"].isalpha() and reply["topic"].islower()
        assert reply["pub_port"] == bus.pub and reply["sub_port"] == bus.sub
    assert replies[0]["topic"] != replies[1]["topic"]
    manage.close()


def test_heartbeat_and_unsubscribe_replies(bus):
    manage = bus.manage_client()
    p2p = manage.subscribe("stix2")["topic"]
    assert manage.heartbeat(p2p)["status"] == "success"
    assert manage.heartbeat("x" * 32)["status"] == "error"
    assert manage.unsubscribe(p2p)["status"] == "success"
    assert manage.unsubscribe(p2p)["status"] == "error"
    assert manage.heartbeat(p2p)["status"] == "error"
    manage.close()


def test_unknown_and_malformed_manage_requests_get_replies_and_the_socket_keeps_serving(bus):
    manage = bus.manage_client()
    assert manage.request({"action": "dance", "topic": "stix2"})["status"] == "unknown request"
    assert manage.request(b"this is not json")["status"] == "error"
    assert manage.request(b"[1, 2, 3]")["status"] == "error"
    if bus.ours:
        assert manage.request(b"\xff\xfe\x00garbage")["status"] == "error"
        assert manage.request({"action": "subscribe", "topic": 42})["status"] == "error"
        assert manage.request({"action": "subscribe", "topic": []})["status"] == "error"
        assert manage.request({"action": "subscribe", "topic": "stix2", "snapshot": "soon"})["status"] == "error"
        assert manage.request({"action": "subscribe", "topic": "stix2", "snapshot": -1})["status"] == "error"
        sock = manage._req()
        sock.send_multipart([b'{"action": "heartbeat"}', b"second frame"])
        assert orjson.loads(sock.recv())["status"] == "error"
    assert is_success(manage.subscribe("stix2"))
    if bus.bus is not None:
        assert bus.metric(APP_REJECTED, plugin="zmq", endpoint="manage") == 9
    manage.close()


def test_indicator_and_sighting_round_trip_between_two_apps(bus):
    indicators_only = bus.fake_app("stix2/indicator")
    sightings_only = bus.fake_app("stix2/sighting")
    both = bus.fake_app(["stix2/indicator", "stix2/sighting"])
    producer = bus.fake_app("stix2/sighting")
    ioc = indicator("6.6.6.6")
    seen = sighting(ioc, source="test")
    producer.send(ioc)
    producer.send(seen)

    kind, got = indicators_only.recv()
    assert (kind, same(bus, got)) == ("indicator", same(bus, ioc))
    kind, got = sightings_only.recv()
    assert (kind, same(bus, got)) == ("sighting", same(bus, seen))
    received = [(k, same(bus, m)) for k, m in both.recv_many(2)]
    assert received == [("indicator", same(bus, ioc)), ("sighting", same(bus, seen))]
    kind, got = producer.recv()
    assert (kind, same(bus, got)) == ("sighting", same(bus, seen))  # a producer's own subscription sees it too
    indicators_only.assert_nothing()
    sightings_only.assert_nothing()
    if bus.bus is not None:
        assert bus.metric(APP_RECEIVED, plugin="zmq") == 2


def test_snapshot_request_goes_to_other_apps_and_envelopes_only_to_the_requester(bus):
    answerer = bus.fake_app("stix2/indicator")
    bystander = bus.fake_app("stix2/sighting")
    requester = bus.fake_app("stix2/indicator", snapshot=3)

    for app in (answerer, bystander):
        kind, request = app.recv()
        assert kind == "snapshotrequest" and isinstance(request, SnapshotRequest)
        assert request.snapshot_type is SnapshotType.INDICATOR
        assert request.snapshot == timedelta(days=3)
    answers = [indicator("1.2.3.4"), indicator("example.com", "domain-name:value")]
    for ioc in answers:
        answerer.send(SnapshotEnvelope.wrap(request, ioc))

    received = requester.recv_many(2)
    assert [(kind, same(bus, message)) for kind, message in received] == [("indicator", same(bus, a)) for a in answers]
    assert all(isinstance(message, Indicator) for _, message in received)
    requester.assert_nothing()  # not its own request, nothing else
    answerer.assert_nothing(0.2)  # envelopes go to the requester only
    bystander.assert_nothing(0.2)


def test_snapshot_of_a_topic_prefix_asks_for_both_kinds(our_bus):
    answerer = our_bus.fake_app("stix2/indicator")
    our_bus.fake_app("stix2", snapshot=1)
    kinds = sorted(request.snapshot_type for _, request in answerer.recv_many(2))
    assert kinds == [SnapshotType.INDICATOR, SnapshotType.SIGHTING]


def test_snapshot_request_from_another_app_plugin_reaches_zmq_apps(inprocess_bus):
    answerer = inprocess_bus.fake_app("stix2")
    internal = Subscriber(inprocess_bus.bus, "stix2/sighting", snapshot=timedelta(days=1))
    kind, request = answerer.recv()
    assert kind == "snapshotrequest" and request.snapshot_id == internal.snapshot_ids[0]
    answer = sighting(source="zmq-app")
    answerer.send(SnapshotEnvelope.wrap(request, answer))
    envelope = get_within(internal.queue)
    assert isinstance(envelope, SnapshotEnvelope) and envelope.stix.payload == answer.payload


def test_snapshot_request_from_another_node_reaches_every_zmq_app(inprocess_bus):
    apps = [inprocess_bus.fake_app("stix2/indicator"), inprocess_bus.fake_app("stix2/sighting")]
    remote = SnapshotRequest.create(SnapshotType.SIGHTING, timedelta(hours=6))
    inprocess_bus.bus.publish_queue.put(remote)  # as a backbone delivers it from another node
    for app in apps:
        kind, request = app.recv()
        assert kind == "snapshotrequest" and request.payload == remote.payload
        app.assert_nothing(0.2)


def test_garbage_on_the_sub_socket_is_rejected_and_valid_messages_around_it_arrive(bus):
    consumer = bus.fake_app("stix2")
    producer = bus.sender()
    valid = [indicator(f"10.0.0.{i}") for i in range(4)]
    bad_pattern = new_indicator("[ipv4-addr:value = '1.2.3.4'")
    garbage = [
        b"garbage without a topic",
        b"stix2/indicator this is not json",
        b'stix2/indicator {"type": "indicator"}',
        b"stix2/indicator " + bad_pattern.encode(),
        b"stix2/indicator \xff\xfe\x00",
        b"other/topic " + valid[0].encode(),
        b"threatbus/snapshotenvelope " + valid[0].encode(),
    ]
    if bus.ours:  # the original reads frame by frame and re-publishes the previous message for a lone '{...' frame
        garbage.append([b"stix2/indicator", valid[0].encode()])
    producer.send(valid[0])
    for frame in garbage[:4]:
        producer.send_frame(frame)
    producer.send(valid[1])
    for frame in garbage[4:]:
        producer.send_frame(frame)
    producer.send(valid[2])
    producer.send(valid[3])
    assert [same(bus, message) for _, message in consumer.recv_many(4)] == [same(bus, v) for v in valid]
    consumer.assert_nothing()
    producer.close(linger=1)
    if bus.bus is not None:
        wait_until(lambda: bus.metric(APP_REJECTED, plugin="zmq", endpoint="sub") == len(garbage), 5)
    elif bus.ours:
        bus.process.wait_for_log("rejected frame on the sub socket", 5)


def test_raw_tcp_garbage_on_every_port_does_not_stop_the_bus(bus):
    for port in (bus.manage, bus.pub, bus.sub):
        with socket.create_connection((bus.host, port), timeout=5) as raw:
            raw.sendall(b"\xff" * 64 + b"GET / HTTP/1.1\r\n\r\n" + bytes(range(256)))
    consumer = bus.fake_app("stix2/indicator")
    ioc = indicator("9.9.9.9")
    consumer.send(ioc)
    assert same(bus, consumer.recv()[1]) == same(bus, ioc)


def test_an_oversized_frame_is_refused_and_the_bus_keeps_serving(our_bus):
    from threatbus.data import MAX_MESSAGE_BYTES

    consumer = our_bus.fake_app("stix2/indicator")
    rogue = our_bus.sender()
    rogue.send_frame(b"stix2/indicator " + b" " * (MAX_MESSAGE_BYTES + 4096))
    rogue.close(linger=1)
    ioc = indicator("8.8.4.4")
    consumer.send(ioc)
    kind, got = consumer.recv()
    assert (kind, got.payload) == ("indicator", ioc.payload)
    consumer.assert_nothing()


def test_an_oversized_manage_request_gets_an_error_reply_and_is_logged_and_counted(our_bus, caplog):
    from threatbus.metrics import DROPPED

    manage = our_bus.manage_client()
    huge = {"action": "subscribe", "topic": "stix2/" + "x" * (70 * 1024)}
    reply = manage.request(huge)  # a client without a timeout would have waited forever
    assert reply["status"] == "error" and "request too large" in reply["reason"]
    assert is_success(manage.subscribe("stix2"))  # the socket keeps serving
    if our_bus.bus is not None:
        assert our_bus.metric(DROPPED, where="zmq-manage-oversized") == 1
        assert our_bus.metric(APP_REJECTED, plugin="zmq", endpoint="manage") == 1
        logged = caplog.text
    else:
        wait_until(lambda: "dropped a manage request of" in our_bus.log(), 10, what="the log line")
        logged = our_bus.log()
    assert f"dropped a manage request of {len(orjson.dumps(huge))} bytes (at most 65536)" in logged
    manage.close()


def test_a_client_subscribing_to_everything_on_pub_gets_nothing(our_bus):
    eavesdropper = Receiver(our_bus.host, our_bus.pub, "", our_bus.context)
    consumer = our_bus.fake_app("stix2/indicator")
    consumer.send(indicator("7.7.7.7"))
    assert consumer.recv()[0] == "indicator"
    assert eavesdropper.recv_frame(0.5) is None
    eavesdropper.close()


def test_subscribers_that_stop_heartbeating_expire(configured_bus):
    with configured_bus("inprocess", heartbeat_timeout=0.5) as target:
        alive = target.manage_client()
        silent = target.manage_client()
        alive_topic = alive.subscribe("stix2")["topic"]
        silent_topic = silent.subscribe("stix2")["topic"]
        assert target.metric(SUBSCRIBERS, plugin="zmq") == 2

        def silent_expired() -> bool:
            assert alive.heartbeat(alive_topic)["status"] == "success"
            return target.metric(SUBSCRIBERS, plugin="zmq") == 1

        wait_until(silent_expired, 10, what="the silent subscriber to expire")
        assert silent.heartbeat(silent_topic)["status"] == "error"
        assert alive.heartbeat(alive_topic)["status"] == "success"
        alive.close()
        silent.close()


@pytest.mark.parametrize("kind", [Indicator, Sighting])
def test_messages_wait_for_a_slow_joining_app(inprocess_bus, kind):
    manage = inprocess_bus.manage_client()
    reply = manage.subscribe("stix2")
    message = indicator() if kind is Indicator else sighting()
    inprocess_bus.sender().send(message)
    wait_until(lambda: inprocess_bus.app.subscriptions.get(reply["topic"]).pending, 5, what="message buffered")
    receiver = Receiver(inprocess_bus.host, reply["pub_port"], reply["topic"], inprocess_bus.context)
    got = receiver.recv(10)
    assert got is not None and got[1].payload == message.payload
    receiver.close()
    manage.close()
