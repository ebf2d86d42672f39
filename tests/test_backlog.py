"""threatbus.backlog: the deepest unbounded subscriber queue, which apps read to hold intel back."""

from __future__ import annotations

import queue

from testbus import running_bus

import threatbus
from threatbus.backlog import Backlog
from threatbus.policy import Filter, FilteredSink, FilterStats
from threatbus.testing import indicator, wait_until


def filled(sink: queue.SimpleQueue | queue.Queue, count: int) -> None:
    for _ in range(count):
        sink.put_nowait(indicator())


def test_the_deepest_unbounded_queue_counts_and_bounded_ones_do_not() -> None:
    publish: queue.SimpleQueue = queue.SimpleQueue()
    backlog = Backlog(publish)
    assert backlog() == 0
    slow, quick, bounded = queue.SimpleQueue(), queue.Queue(), queue.Queue(maxsize=100)
    for sink in (slow, quick, bounded):
        backlog.watch(sink)
    filled(slow, 7)
    filled(quick, 3)
    filled(bounded, 50)  # loses what does not fit: never a backlog to hold intel back for
    assert backlog() == 7
    filled(publish, 9)
    assert backlog() == 9


def test_a_queue_behind_a_filter_counts_and_is_forgotten_after_its_last_subscription() -> None:
    backlog = Backlog(queue.SimpleQueue())
    sink: queue.SimpleQueue = queue.SimpleQueue()
    gated = FilteredSink(sink, Filter.from_config({"tlp_max": "amber"}, "test"), FilterStats())
    backlog.watch(gated)  # subscribed to two topics
    backlog.watch(sink)
    filled(sink, 4)
    assert backlog() == 4
    backlog.forget(gated)
    assert backlog() == 4  # still subscribed once
    backlog.forget(sink)
    assert backlog() == 0
    backlog.forget(sink)  # unknown: nothing happens
    assert backlog() == 0


class BacklogApp:
    """An app that takes ``backlog`` in ``run`` (pluggy passes only parameters without a default)."""

    def __init__(self) -> None:
        self.backlog = None
        self.queue: queue.SimpleQueue = queue.SimpleQueue()

    @threatbus.app
    def run(self, subscribe, backlog):
        self.backlog = backlog
        subscribe("stix2/indicator", self.queue)


def test_apps_get_the_backlog_of_the_queues_subscribed_on_the_node() -> None:
    app = BacklogApp()
    with running_bus(apps={"backlog": app}) as bus:
        assert app.backlog is not None and app.backlog() == 0
        for _ in range(5):
            bus.publish_queue.put(indicator())
        wait_until(lambda: app.queue.qsize() == 5, what="five indicators in the app's queue")
        assert app.backlog() == 5
        app.queue.get_nowait()
        assert app.backlog() == 4
