"""Expiry at valid_until: the schedule, the router's hand-over, and a running bus."""

from __future__ import annotations

import queue
import threading
import time
from datetime import datetime, timedelta, timezone

from testbus import running_bus

import threatbus
from threatbus.data import Indicator, SnapshotEnvelope
from threatbus.expiry import ExpirySchedule, ExpiryWorker
from threatbus.lifecycle import REMOVE, as_removal
from threatbus.metrics import EXPIRY_REMOVALS, EXPIRY_SCHEDULED
from threatbus.routing import TopicRouter
from threatbus.stix import timestamp
from threatbus.testing import Subscriber, assert_nothing_more, get_within, indicator

T0 = datetime(2026, 11, 30, 12, 0, tzinfo=timezone.utc)


def at(seconds: float) -> str:
    return timestamp(T0 + timedelta(seconds=seconds))


def epoch(seconds: float) -> float:
    return (T0 + timedelta(seconds=seconds)).timestamp()


def versioned(modified: float, until: float | None, ind: Indicator | None = None, **extra: object) -> Indicator:
    base = ind.payload if ind else indicator(valid_from=at(-3600)).payload
    payload = {**base, "modified": at(modified), **extra}
    if until is None:
        payload.pop("valid_until", None)
    else:
        payload["valid_until"] = at(until)
    return Indicator(payload)


def router_with_expiry() -> tuple[TopicRouter, ExpirySchedule]:
    router = TopicRouter()
    router.expiry = ExpirySchedule()
    return router, router.expiry


def test_each_subscriber_that_got_it_gets_the_removal_once():
    router, schedule = router_with_expiry()
    early, late, unsubscribed = queue.Queue(), queue.Queue(), queue.Queue()
    router.subscribe("stix2/indicator", early)
    router.subscribe("stix2", unsubscribed)
    ind = versioned(0, 10)
    assert router.route(ind) == 2
    router.subscribe("stix2/indicator", late)  # never got it: gets no removal
    router.unsubscribe("stix2", unsubscribed)
    assert schedule.fire(epoch(9.999), router.deliver_to) == 0
    assert schedule.fire(epoch(10), router.deliver_to) == 1
    assert schedule.fire(epoch(20), router.deliver_to) == 0
    early.get_nowait()
    removal = early.get_nowait()
    assert isinstance(removal, Indicator)
    assert removal.payload == as_removal(ind.payload)
    assert removal.payload["x_threatbus_update"] == REMOVE
    assert early.empty() and late.empty()
    assert unsubscribed.qsize() == 1  # only the indicator itself
    assert (schedule.expired, schedule.removals, len(schedule)) == (1, 1, 0)


def test_newer_versions_reschedule_or_cancel_and_older_ones_change_nothing():
    router, schedule = router_with_expiry()
    sink = queue.Queue()
    router.subscribe("stix2/indicator", sink)
    v1 = versioned(0, 10)
    router.route(v1)
    router.route(versioned(5, 30, v1))  # newer: later expiry
    assert schedule.expires(v1.id) == epoch(30)
    router.route(versioned(1, 12, v1))  # older: ignored
    assert schedule.expires(v1.id) == epoch(30)
    assert schedule.fire(epoch(15), router.deliver_to) == 0
    router.route(versioned(6, None, v1))  # newer without valid_until: no expiry at all
    assert v1.id not in schedule
    assert schedule.fire(epoch(100), router.deliver_to) == 0
    assert schedule.delay(epoch(100)) is None  # the cancelled heap slots are gone too


def test_removals_and_revocations_cancel_the_expiry():
    router, schedule = router_with_expiry()
    sink = queue.Queue()
    router.subscribe("stix2/indicator", sink)
    removed, revoked = versioned(0, 10), versioned(0, 10)
    router.route(removed)
    router.route(revoked)
    router.route(Indicator(as_removal(removed.payload)))  # same version with REMOVE: wins
    router.route(versioned(1, 10, revoked, revoked=True))
    assert len(schedule) == 0
    assert schedule.fire(epoch(60), router.deliver_to) == 0
    assert sink.qsize() == 4  # the four messages routed, no expiry removal


def test_observe_all_schedules_cancels_and_skips_like_observe_one_by_one():
    schedule = ExpirySchedule()
    sink = queue.Queue()
    ending, endless = versioned(0, 10), versioned(0, None)
    schedule.observe_all([endless, ending], (sink,))
    assert len(schedule) == 1 and schedule.expires(ending.id) == epoch(10)
    schedule.observe_all([versioned(5, None, ending)], (sink,))  # a newer version without valid_until
    assert len(schedule) == 0 and schedule.cancelled == 1
    schedule.observe_all([versioned(6, 20, ending), versioned(7, 30, endless)], (sink,))
    assert schedule.expires(ending.id) == epoch(20) and schedule.expires(endless.id) == epoch(30)
    assert schedule.fire(epoch(25), lambda removal, sinks: len(sinks)) == 1


def test_redelivery_of_the_same_version_adds_subscribers_but_fires_once():
    router, schedule = router_with_expiry()
    first, second = queue.Queue(), queue.Queue()
    router.subscribe("stix2/indicator", first)
    ind = versioned(0, 10)
    router.route(ind)
    router.subscribe("stix2/indicator", second)
    router.route(ind)
    schedule.fire(epoch(10), router.deliver_to)
    assert [m.payload.get("x_threatbus_update") for m in (first.get(), first.get(), first.get())] == [
        None,
        None,
        REMOVE,
    ]
    assert [m.payload.get("x_threatbus_update") for m in (second.get(), second.get())] == [None, REMOVE]
    assert schedule.removals == 2


def test_nobody_subscribed_nothing_scheduled():
    router, schedule = router_with_expiry()
    router.route(versioned(0, 10))
    assert len(schedule) == 0


def test_intel_without_valid_until_is_not_held_up_by_a_busy_schedule():
    # Nothing scheduled, nothing to schedule: the hand-over does not wait for the schedule's lock
    # (held by the expiry worker while it fires a batch).
    router, schedule = router_with_expiry()
    sink = queue.Queue()
    router.subscribe("stix2/indicator", sink)
    with schedule.lock:
        routing = threading.Thread(target=router.route, args=(versioned(0, None),))
        routing.start()
        routing.join(5)
        assert not routing.is_alive()
        assert sink.qsize() == 1
    assert len(schedule) == 0


def test_fire_is_batched_and_soonest_first():
    router, schedule = router_with_expiry()
    sink = queue.Queue()
    router.subscribe("stix2/indicator", sink)
    inds = [versioned(0, 100 - i) for i in range(50)]
    for ind in inds:
        router.route(ind)
    while not sink.empty():
        sink.get_nowait()
    assert schedule.fire(epoch(1000), router.deliver_to, limit=20) == 20
    assert schedule.fire(epoch(1000), router.deliver_to, limit=100) == 30
    order = [sink.get_nowait().id for _ in range(50)]
    assert order == [ind.id for ind in reversed(inds)]


def test_heap_stays_bounded_under_rescheduling():
    router, schedule = router_with_expiry()
    router.subscribe("stix2/indicator", queue.Queue())
    ind = versioned(0, 10)
    for step in range(5000):
        router.route(versioned(step, 10 + step, ind))
    assert len(schedule) == 1
    assert len(schedule._heap) <= 2 * 1 + 1024 + 1


def test_worker_fires_within_a_second_and_stops_promptly():
    router, schedule = router_with_expiry()
    sink = queue.Queue()
    router.subscribe("stix2/indicator", sink)
    worker = ExpiryWorker(schedule, router.deliver_to)
    worker.start()
    try:
        now = datetime.now(timezone.utc)
        ind = indicator(
            valid_from=timestamp(now - timedelta(hours=1)), valid_until=timestamp(now + timedelta(seconds=1))
        )
        router.route(ind)
        assert sink.get(timeout=5) == ind
        removal = sink.get(timeout=5)
        late = time.time() - now.timestamp() - 1
        assert removal.payload["x_threatbus_update"] == REMOVE
        assert -0.01 <= late < 1.0
    finally:
        started = time.monotonic()
        worker.stop()
        worker.join(5)
        assert not worker.is_alive()
        assert time.monotonic() - started < 1.5


class PublishingApp:
    """Publishes what a test gives it; answers snapshots with `held`."""

    def __init__(self, held=()):
        self.held = list(held)

    @threatbus.app
    def run(self, publish_queue):
        self.publish_queue = publish_queue

    @threatbus.app
    def snapshot(self, snapshot_request, result_queue):
        for item in self.held:
            result_queue.put(SnapshotEnvelope.wrap(snapshot_request, item))


def soon(seconds: float) -> Indicator:
    now = datetime.now(timezone.utc)
    return indicator(
        valid_from=timestamp(now - timedelta(hours=1)), valid_until=timestamp(now + timedelta(seconds=seconds))
    )


def test_running_bus_delivers_the_removal_at_valid_until_and_counts_it():
    app = PublishingApp()
    with running_bus(apps={"app": app}) as bus:
        subscriber = Subscriber(bus, "stix2/indicator")
        ind = soon(1.0)
        app.publish_queue.put(ind)
        assert get_within(subscriber.queue) == ind
        assert bus.metrics.value(EXPIRY_SCHEDULED) == 1
        removal = get_within(subscriber.queue, timeout=5)
        assert removal.id == ind.id
        assert removal.payload["x_threatbus_update"] == REMOVE
        assert_nothing_more(subscriber.queue)
        assert bus.metrics.value(EXPIRY_REMOVALS) == 1
        assert bus.metrics.value(EXPIRY_SCHEDULED) == 0


def test_snapshot_requester_gets_the_removal_of_what_the_snapshot_gave_it():
    ind = soon(1.0)
    app = PublishingApp(held=[ind])
    with running_bus(apps={"app": app}) as bus:
        requester = queue.Queue()
        bus.subscribe("stix2/indicator", requester, snapshot=timedelta(days=1))
        envelope = get_within(requester)
        assert isinstance(envelope, SnapshotEnvelope) and envelope.stix == ind
        removal = get_within(requester, timeout=5)
        assert isinstance(removal, Indicator) and removal.payload["x_threatbus_update"] == REMOVE
        assert removal.id == ind.id


def test_a_revoked_version_reaches_apps_as_a_removal():
    router = TopicRouter()  # also without an expiry schedule
    sink = queue.Queue()
    router.subscribe("stix2", sink)
    ind = versioned(0, None)
    router.route(versioned(1, None, ind, revoked=True))
    delivered = sink.get_nowait()
    assert delivered.payload["revoked"] is True
    assert delivered.payload["x_threatbus_update"] == REMOVE


def test_garbage_timestamps_from_another_node_cost_only_the_expiry(caplog):
    router, schedule = router_with_expiry()
    sink = queue.Queue()
    router.subscribe("stix2/indicator", sink)
    good = versioned(0, 10)
    router.route(good)
    for bad in ("tomorrow", 42, "2026-11-30T99:00:00Z"):
        router.route(Indicator({**versioned(0, None).payload, "valid_until": bad}))
    router.route(Indicator({**good.payload, "modified": "soon"}))  # a version that cannot be ordered
    assert sink.qsize() == 5  # all delivered anyway
    assert schedule.unparsable == 4
    assert "no expiry for indicator--" in caplog.text
    assert schedule.fire(epoch(10), router.deliver_to) == 1
