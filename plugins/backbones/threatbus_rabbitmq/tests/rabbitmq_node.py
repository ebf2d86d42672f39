"""Run one Threat Bus node like the ``threatbus`` command, plus a test-only file app.

Usage: ``python rabbitmq_node.py CONFIG``. The config is a normal Threat Bus
config (backbone from its entry point) with an extra top-level section
``testapp: {inbox: PATH, outbox: PATH}``: the app publishes every JSON line
appended to ``inbox`` (validated like a real app does) and appends every
message it receives for ``stix2`` to ``outbox``, one JSON line each,
acknowledging them (``DeliveryQueue.task_done``) right after the write. Like
an app that can look into what it delivered, it tells the backbone which of
the messages in doubt after a crash are in ``outbox`` already (each logged);
with ``knows_delivered: false`` it is an app that cannot tell. With
``subscribe_when: PATH`` it subscribes only once that file exists (an app that
reconnects to a restarted node a while after it started). With
``snapshot_days: N`` it subscribes with a snapshot of N days and asks for the
end marker: envelopes are written as they are, the marker as a line
``{"type": "snapshotend", ...}``. Signals and shutdown are those of
``threatbus.cli.run``.
"""

from __future__ import annotations

import logging
import queue
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

import orjson

import threatbus
from threatbus import cli, config, plugins
from threatbus import logging as threatbus_logging
from threatbus.bus import Bus
from threatbus.data import Message, decode
from threatbus.delivery import DeliveryQueue
from threatbus.errors import DecodeError
from threatbus.snapshots import SnapshotEnd
from threatbus.stix import validate
from threatbus.worker import StoppableWorker, stop_workers

logger = logging.getLogger("testapp")

POLL = 0.02


class _InboxReader(StoppableWorker):
    def __init__(self, path: Path, publish_queue: queue.Queue[Message]) -> None:
        super().__init__(name="testapp-inbox")
        self.path = path
        self.publish_queue = publish_queue
        self.offset = 0

    def run(self) -> None:
        while not self.wait(POLL):
            with self.path.open("rb") as inbox:
                inbox.seek(self.offset)
                data = inbox.read()
            complete = data[: data.rfind(b"\n") + 1]
            self.offset += len(complete)
            for line in complete.splitlines():
                try:
                    message = decode(line)
                    validate(message)
                except DecodeError as err:
                    logger.warning("testapp: invalid line in inbox: %s", err)
                    continue
                self.publish_queue.put(message)


class _OutboxWriter(StoppableWorker):
    def __init__(self, path: Path, source: DeliveryQueue) -> None:
        super().__init__(name="testapp-outbox")
        self.path = path
        self.source = source

    def run(self) -> None:
        # Unbuffered: each batch is one write(), so a SIGKILL leaves whole lines (tests kill nodes mid-stream).
        with self.path.open("ab", buffering=0) as outbox:
            for message in self.drain(self.source):
                batch = [message]
                while True:
                    try:
                        batch.append(self.source.get_nowait())
                    except queue.Empty:
                        break
                outbox.write(b"".join(_line(m) + b"\n" for m in batch))
                # Sent on: the backbone keeps their keys now (a kill after the write and before this repeats them).
                self.source.task_done(len(batch))


def _written(outbox: Path) -> set[tuple[str, ...]]:
    keys = set()
    for line in outbox.read_bytes().splitlines() if outbox.exists() else ():
        try:
            keys.add(decode(line).dedup_key)
        except DecodeError:
            continue  # a snapshot end marker
    return keys


def _line(item: Message | SnapshotEnd) -> bytes:
    if isinstance(item, SnapshotEnd):
        return orjson.dumps({"type": "snapshotend", "snapshot_id": item.snapshot_id, "count": item.count})
    return item.encode()


class _LateSubscriber(StoppableWorker):
    def __init__(self, trigger: Path, subscribe: Any) -> None:
        super().__init__(name="testapp-subscriber")
        self.trigger = trigger
        self.subscribe = subscribe

    def run(self) -> None:
        while not self.wait(POLL):
            if self.trigger.exists():
                logger.info("testapp: subscribing to stix2 now")
                self.subscribe()
                return


class FileApp:
    def __init__(
        self,
        inbox: str,
        outbox: str,
        subscribe_when: str | None = None,
        snapshot_days: float = 0,
        knows_delivered: bool = True,
    ) -> None:
        self.snapshot = timedelta(days=snapshot_days)
        self.inbox = Path(inbox)
        self.outbox = Path(outbox)
        self.subscribe_when = Path(subscribe_when) if subscribe_when else None
        self.written = _written(self.outbox)  # before this start: what messages in doubt are checked against
        self.received = DeliveryQueue(already_delivered=self._already_delivered if knows_delivered else None)
        self.workers: list[StoppableWorker] = []

    def _already_delivered(self, message: Message) -> bool:
        if message.dedup_key not in self.written:
            return False
        logger.info("testapp: in doubt and already in the outbox: %s", getattr(message, "id", message))
        return True

    @threatbus.app
    def config_validators(self) -> list[Any]:
        return []

    @threatbus.app
    def run(self, publish_queue: queue.Queue[Message], subscribe: Any) -> None:
        self.workers = [_InboxReader(self.inbox, publish_queue), _OutboxWriter(self.outbox, self.received)]

        def subscribe_all() -> None:
            if self.snapshot:
                subscribe("stix2", self.received, snapshot=self.snapshot, snapshot_end=True)
            else:
                subscribe("stix2", self.received)

        if self.subscribe_when is None:
            subscribe_all()
        else:
            self.workers.append(_LateSubscriber(self.subscribe_when, subscribe_all))
        for worker in self.workers:
            worker.start()

    @threatbus.app
    def stop(self) -> None:
        stop_workers(self.workers)


def main(path: str) -> int:
    threatbus_logging.configure_early()
    settings, source = config.load(path)
    config.validate(settings, config.core_validators())
    node = cli.node_of(settings, source)
    loaded = plugins.load(settings)
    app = FileApp(
        settings.testapp.inbox,
        settings.testapp.outbox,
        settings.testapp.get("subscribe_when"),
        float(settings.testapp.get("snapshot_days") or 0),
        bool(settings.testapp.get("knows_delivered", True)),
    )
    bus = Bus(settings, apps={"testapp": app}, backbones=loaded["backbones"], node=node)
    bus.configure()
    threatbus_logging.configure(bus.settings.logging, node.name)
    logging.getLogger("threatbus_rabbitmq").setLevel(logging.DEBUG)
    return cli.run(bus)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
