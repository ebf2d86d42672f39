"""Topic routing with prefix semantics."""

import queue

from threatbus.data import SnapshotRequest, SnapshotType
from threatbus.routing import TopicRouter
from threatbus.testing import assert_nothing_more, indicator, sighting


def test_prefix_subscriptions():
    router = TopicRouter()
    everything, indicators, sightings, snapshots = (queue.Queue() for _ in range(4))
    router.subscribe("stix2", everything)
    router.subscribe("stix2/indicator", indicators)
    router.subscribe("stix2/sighting", sightings)
    router.subscribe("threatbus/snapshot", snapshots)
    ind, sight = indicator(), sighting()
    request = SnapshotRequest.create(SnapshotType.INDICATOR, __import__("datetime").timedelta(days=1))
    for message in (ind, sight, request):
        router.route(message)
    assert [everything.get_nowait(), everything.get_nowait()] == [ind, sight]
    assert indicators.get_nowait() == ind
    assert sightings.get_nowait() == sight
    assert snapshots.get_nowait() == request
    for q in (everything, indicators, sightings, snapshots):
        assert q.empty()


def test_overlapping_subscriptions_deliver_once():
    router = TopicRouter()
    sink = queue.Queue()
    router.subscribe("stix2", sink)
    router.subscribe("stix2/indicator", sink)
    router.subscribe("stix2/indicator", sink)
    assert router.route(indicator()) == 1
    sink.get_nowait()
    assert_nothing_more(sink, within=0)


def test_unsubscribe_ends_delivery_of_that_topic_only():
    router = TopicRouter()
    sink = queue.Queue()
    router.subscribe("stix2/indicator", sink)
    router.subscribe("stix2/sighting", sink)
    assert router.unsubscribe("stix2/indicator", sink)
    assert not router.unsubscribe("stix2/indicator", sink)
    router.route(indicator())
    sight = sighting()
    router.route(sight)
    assert sink.get_nowait() == sight
    assert sink.empty()
    assert router.subscription_count == 1


def test_full_subscriber_queue_is_counted_and_does_not_block_others():
    router = TopicRouter()
    full, healthy = queue.Queue(maxsize=1), queue.Queue()
    router.subscribe("stix2", full)
    router.subscribe("stix2", healthy)
    for _ in range(3):
        router.route(indicator())
    assert full.qsize() == 1
    assert healthy.qsize() == 3
    assert router.dropped == 2
    assert router.delivered == 4


def test_unknown_prefix_gets_nothing():
    router = TopicRouter()
    sink = queue.Queue()
    router.subscribe("stix2/indicatorx", sink)
    assert router.route(indicator()) == 0


def test_drops_are_logged_rate_limited(caplog):
    router = TopicRouter()
    full = queue.Queue(maxsize=1)
    router.subscribe("stix2", full)
    for _ in range(100):
        router.route(indicator())
    assert router.dropped == 99
    assert caplog.text.count("subscriber queue full") <= 5
