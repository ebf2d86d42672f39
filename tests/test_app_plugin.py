"""AppPlugin: the run and stop hooks every app shares, on a real in-process bus."""

from __future__ import annotations

import queue
import threading

import pytest
from testbus import running_bus

from threatbus.app_plugin import AppPlugin, AppRuntime
from threatbus.config import count
from threatbus.data import TOPIC_INDICATOR, Message
from threatbus.errors import PluginError
from threatbus.testing import get_within, indicator
from threatbus.worker import StoppableWorker


class Forwarder(StoppableWorker):
    """Hands what the app receives to the test; records whether it released its resources."""

    def __init__(self, inbox: queue.SimpleQueue[Message], seen: queue.SimpleQueue[Message]) -> None:
        super().__init__(name="forwarder")
        self.inbox, self.seen = inbox, seen
        self.released = threading.Event()

    def run(self) -> None:
        for message in self.drain(self.inbox):
            self.seen.put(message)

    def release(self) -> None:
        self.released.set()


class SmallApp(AppPlugin):
    def __init__(self, fail_after_building: bool = False) -> None:
        super().__init__()
        self.fail_after_building = fail_after_building
        self.inbox: queue.SimpleQueue[Message] = queue.SimpleQueue()
        self.seen: queue.SimpleQueue[Message] = queue.SimpleQueue()
        self.forwarder: Forwarder | None = None
        self.released_with: list[list[str]] = []
        self.buffer = 0

    def validators(self):
        return [count("plugins.apps.small.buffer", default=7)]

    def start(self, runtime: AppRuntime) -> None:
        self.buffer = runtime.config["buffer"]
        self.forwarder = Forwarder(self.inbox, self.seen)
        runtime.add_workers(self.forwarder)
        runtime.subscribe_until_stop(TOPIC_INDICATOR, self.inbox)
        if self.fail_after_building:
            raise PluginError("small: cannot start")

    def release(self, stuck: list[str]) -> None:
        self.released_with.append(stuck)


def test_validators_defaults_reach_start_and_the_workers_run_until_stop():
    app = SmallApp()
    with running_bus(apps={"small": app}) as bus:
        assert app.buffer == 7
        sent = indicator("10.9.0.1")
        bus.publish_queue.put(sent)
        assert get_within(app.seen) == sent
        assert [w.name for w in app.workers] == ["forwarder"] and app.workers[0].is_alive()
    assert not app.workers[0].is_alive()
    assert app.released_with == [[]]
    assert app.runtime is not None and app.runtime.subscriptions == []  # unsubscribed


def test_a_start_that_fails_after_building_releases_the_unstarted_workers_and_unsubscribes():
    app = SmallApp(fail_after_building=True)
    with pytest.raises(PluginError, match="small: cannot start"), running_bus(apps={"small": app}):
        pass
    assert app.forwarder is not None
    assert app.forwarder.ident is None and app.forwarder.released.is_set()
    assert app.runtime is not None and app.runtime.subscriptions == []
    assert app.released_with == [[]]


def test_stop_after_a_stop_changes_nothing():
    app = SmallApp()
    with running_bus(apps={"small": app}):
        pass
    app.stop()
    assert app.released_with == [[], []]
    assert not app.workers[0].is_alive()
