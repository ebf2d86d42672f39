"""Receipts and the DeliveryQueue: the backbone learns when an app is done with a message, from the app's thread."""

import queue
import threading

import pytest

from threatbus.delivery import DeliveryQueue, Receipt
from threatbus.policy import AppGate, Filter, FilterStats
from threatbus.routing import TopicRouter
from threatbus.testing import indicator, wait_until


class Counted(Receipt):
    __slots__ = ("threads",)

    def __init__(self) -> None:
        super().__init__()
        self.threads: list[str] = []

    def on_done(self) -> None:
        self.threads.append(threading.current_thread().name)


def routed(router, message):
    """Route ``message`` with a receipt, as a backbone does."""
    receipt = Counted()
    router.route(message, receipt)
    receipt.finish()
    return receipt


def test_a_receipt_is_done_once_every_tracking_queue_acknowledged_and_not_before():
    router = TopicRouter()
    first, second, plain = DeliveryQueue(), DeliveryQueue(), queue.Queue()
    for sink in (first, second, plain):
        router.subscribe("stix2", sink)
    message = indicator()
    receipt = routed(router, message)
    assert plain.get_nowait() == message  # a plain queue is done when handed the message
    assert first.get_nowait() == message and second.get_nowait() == message
    assert not receipt.settled  # taken is not done
    first.task_done()
    assert not receipt.settled
    app = threading.Thread(target=second.task_done, name="app-worker")
    app.start()
    app.join()
    assert receipt.settled and receipt.threads == ["app-worker"]


def test_without_a_tracking_queue_the_receipt_is_done_when_routing_ends():
    router = TopicRouter()
    router.subscribe("stix2", queue.SimpleQueue())
    assert routed(router, indicator()).threads == [threading.current_thread().name]


def test_task_done_acknowledges_in_the_order_taken_and_counts_untracked_items():
    router, app = TopicRouter(), DeliveryQueue()
    router.subscribe("stix2", app)
    app.put_nowait("from the snapshot router")  # no receipt: acknowledged all the same
    receipts = [routed(router, indicator()) for _ in range(3)]
    for _ in range(4):
        app.get_nowait()
    app.task_done(2)
    assert [r.settled for r in receipts] == [True, False, False]
    app.task_done(2)
    assert all(r.settled for r in receipts)
    with pytest.raises(ValueError, match="more often"):
        app.task_done()


def test_get_many_takes_a_batch_that_one_task_done_acknowledges_in_order():
    router, app = TopicRouter(), DeliveryQueue()
    router.subscribe("stix2", app)
    first = routed(router, indicator("10.0.0.1"))
    app.put_nowait("untracked in between")
    second, third = routed(router, indicator("10.0.0.2")), routed(router, indicator("10.0.0.3"))
    batch = app.get_many(3)
    assert [getattr(m, "pattern", m) for m in batch] == [
        "[ipv4-addr:value = '10.0.0.1']",
        "untracked in between",
        "[ipv4-addr:value = '10.0.0.2']",
    ]
    app.task_done(2)
    assert first.settled and not second.settled
    app.task_done()
    assert second.settled and not third.settled
    assert len(app.get_many(10)) == 1 and app.get_many(10, timeout=0) == []
    app.task_done()
    assert third.settled
    with pytest.raises(ValueError, match="more often"):
        app.task_done()


def test_get_many_skips_what_was_delivered_before_a_crash_and_waits_for_the_first_item():
    delivered_before, missing = indicator("10.1.1.1"), indicator("10.1.1.2")
    app = DeliveryQueue(already_delivered=lambda m: m == delivered_before)
    skipped, kept = Counted(), Counted()
    for message, receipt in ((delivered_before, skipped), (missing, kept)):
        receipt.in_doubt = True
        receipt.expect()
        app.put_tracked(message, receipt)
    assert app.get_many(10) == [missing] and skipped.settled and not kept.settled
    app.task_done()
    assert kept.settled
    assert app.get_many(10, timeout=0.01) == []  # timed out: nothing there
    threading.Timer(0.01, app.put_nowait, ("late",)).start()
    assert app.get_many(10, timeout=5) == ["late"]


def test_get_many_makes_room_for_a_put_waiting_on_a_full_queue():
    app = DeliveryQueue(maxsize=2)
    app.put_nowait("a")
    app.put_nowait("b")
    putter = threading.Thread(target=app.put, args=("c",), kwargs={"timeout": 5})
    putter.start()
    wait_until(lambda: app._putters, 5, interval=0.005, what="the put to wait for room")
    assert app.get_many(2) == ["a", "b"]
    putter.join(5)
    assert not putter.is_alive() and app.get_nowait() == "c"


def test_a_full_delivery_queue_drops_and_the_receipt_is_not_held():
    router, app = TopicRouter(), DeliveryQueue(maxsize=1)
    router.subscribe("stix2", app)
    kept = routed(router, indicator())
    dropped = routed(router, indicator())
    assert router.dropped == 1 and dropped.settled and not kept.settled


def test_what_an_apps_filter_holds_back_is_done_at_once():
    router, app = TopicRouter(), DeliveryQueue()
    gate = AppGate(
        Filter({"unmarked": "deny"}),
        FilterStats(),
        lambda topic, sink, **_: router.subscribe(topic, sink),
        router.unsubscribe,
    )
    gate.subscribe("stix2", app)
    green = indicator(object_marking_refs=["marking-definition--34098fce-860f-48ae-8e50-ebd3cc5e41da"])
    assert routed(router, indicator()).settled and app.empty()  # unmarked: held back
    receipt = routed(router, green)
    assert not receipt.settled  # passed the filter: waits for the app
    app.get_nowait()
    app.task_done()
    assert receipt.settled
    stuck = routed(router, green)
    (wrapper,) = router.subscribers("stix2/indicator")
    assert wrapper.release(stuck) == 1 and stuck.settled  # a backbone reaches the queue through the filter


def test_release_gives_up_the_receipts_until_the_app_caught_up():
    router, app = TopicRouter(), DeliveryQueue()
    router.subscribe("stix2", app)
    taken, waiting = routed(router, indicator()), routed(router, indicator())
    app.get_nowait()
    assert app.release(Counted()) == 0  # a receipt it does not hold: nothing to do
    assert app.release(waiting) == 2 and taken.settled and waiting.settled and app.released
    meanwhile = routed(router, indicator())
    assert meanwhile.settled  # released: done when handed over
    app.get_nowait()
    app.get_nowait()
    app.task_done(3)  # everything taken and acknowledged: tracked again
    assert not app.released
    tracked = routed(router, indicator())
    assert not tracked.settled
    app.get_nowait()
    app.task_done()
    assert tracked.settled and taken.threads == waiting.threads == [threading.current_thread().name]


def test_get_blocks_until_an_item_comes_or_the_timeout_passes():
    app = DeliveryQueue()
    with pytest.raises(queue.Empty):
        app.get(timeout=0.01)
    threading.Timer(0.01, app.put_nowait, ("late",)).start()
    assert app.get(timeout=5) == "late"


class Instant:
    """A tracking sink whose app is done the moment it gets the message."""

    def put_tracked(self, item, receipt):
        receipt.done()

    def put_nowait(self, item):
        pass


def test_an_app_done_at_once_does_not_settle_what_another_app_still_holds():
    router, slow = TopicRouter(), DeliveryQueue()
    router.subscribe("stix2", Instant())
    router.subscribe("stix2", slow)
    receipt = routed(router, indicator())
    assert not receipt.settled
    slow.get_nowait()
    slow.task_done()
    assert receipt.settled


def test_messages_in_doubt_the_app_already_delivered_are_acknowledged_and_skipped():
    delivered_before, missing = indicator("10.1.1.1"), indicator("10.1.1.2")
    app = DeliveryQueue(already_delivered=lambda m: m == delivered_before)
    router = TopicRouter()
    router.subscribe("stix2", app)
    receipts = []
    for message, in_doubt in ((delivered_before, True), (missing, True), (delivered_before, False)):
        receipt = Counted()
        receipt.in_doubt = in_doubt
        router.route(message, receipt)
        receipt.finish()
        receipts.append(receipt)
    assert app.get_nowait() == missing  # in doubt, but the app does not have it: delivered again
    assert receipts[0].settled and not receipts[1].settled
    assert app.get_nowait() == delivered_before  # not in doubt: the app is not asked
    app.task_done(2)
    assert all(r.settled for r in receipts)


def test_stopping_a_worker_that_drains_a_delivery_queue_puts_no_item_in_it_to_acknowledge():
    """stop() wakes the worker without a marker item: it would be taken and acknowledged before a real one."""
    from threatbus.worker import StoppableWorker

    source, taken, started = DeliveryQueue(), [], threading.Event()

    class Drainer(StoppableWorker):
        def run(self) -> None:
            started.set()
            for item in self.drain(source):
                taken.append(item)
                source.task_done()

    receipt = Counted()
    receipt.expect()
    worker = Drainer()
    worker.start()
    assert started.wait(5)
    source.put_tracked("first", receipt)
    wait_until(lambda: taken, 5, interval=0.005, what="the worker to take the item")
    worker.stop()
    worker.join(0.4)  # well under drain's poll interval: woken, not timed out
    assert not worker.is_alive()
    assert taken == ["first"] and receipt.threads
    assert source.qsize() == 0
    with pytest.raises(ValueError):
        source.task_done()  # nothing else was taken
