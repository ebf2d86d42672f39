"""Detection sync: indicators into the store, the store into files, dataset commands and rule reloads."""

from __future__ import annotations

import logging
import time
from typing import Any

from threatbus.data import Indicator, Message, SnapshotEnvelope
from threatbus.delivery import DeliveryQueue
from threatbus.expiry import ExpirySchedule
from threatbus.worker import POLL_INTERVAL, Backoff, StoppableWorker
from threatbus_suricata.mapping import Unsupported
from threatbus_suricata.settings import SuricataSettings
from threatbus_suricata.store import DetectionStore
from threatbus_suricata.suricata_socket import CommandFailed, SocketError, SuricataSocket

# Flushing may take at most 1 / (1 + FLUSH_SPACING) of the detection worker's time.
FLUSH_SPACING = 4
# Seconds a due flush may wait while indicators keep arriving.
BULK_HOLD = 60.0
# Indicators applied in a row, when that many wait, before the flush timer is looked at again.
TAKE_AT_ONCE = 500

logger = logging.getLogger(__name__)


class DetectionSync:
    """Keeps Suricata's detections in step with the store; its counters are read by the metrics.

    ``expiry`` schedules the removal of what the rules file held at start
    (the bus schedules what it delivers from then on); removals are handed
    to ``inbox``, the queue the detection worker takes indicators from.

    The messages taken from ``inbox`` are acknowledged (``task_done``) once
    the files hold what they changed (``durable``): Suricata reads them at
    its next reload or start even if it cannot be reached now, and what a
    killed node had not written comes again from the backbone.
    """

    def __init__(
        self, settings: SuricataSettings, store: DetectionStore, socket: SuricataSocket, inbox: DeliveryQueue
    ) -> None:
        self.store = store
        self.socket = socket
        self.inbox = inbox
        self.expiry = ExpirySchedule()
        self.reload_interval = settings.reload_interval
        self.reload_command = settings.reload_command
        self.dataset_command_limit = settings.dataset_command_limit
        self.reload_pending = False
        self.indicators = 0  # indicators taken from the bus
        self.taken = 0  # messages taken from the inbox and not yet acknowledged
        self.unsupported = 0  # indicators without a Suricata mapping
        self.reloads = 0
        self.dataset_commands = 0
        self.socket_errors = 0
        self.write_errors = 0
        self.out_of_step = False  # Suricata missed changes (unreachable): say so when it has them
        # Changes since Suricata last took the files: the counts of a reconciliation.
        self.unsynced = {"added": 0, "updated": 0, "removed": 0}

    def expire_held(self) -> None:
        """Drop what expired while the node was down; schedule the expiry of the rest."""
        removed = self.store.drop_expired()
        if removed:
            logger.info("reconciled: 0 added, %d removed (expired while the node was down)", removed)
        for payload in self.store.expiring():
            self.expiry.observe(Indicator(payload), (self.inbox,))

    def apply(self, message: Message) -> bool:
        """Apply an indicator (or a snapshot envelope of one) to the store; True if a flush is due."""
        self.taken += 1
        if isinstance(message, SnapshotEnvelope):
            message = message.stix
        if not isinstance(message, Indicator):
            return False
        self.indicators += 1
        try:
            outcome = self.store.apply(message)
        except Unsupported as err:
            self.unsupported += 1
            logger.info("indicator %s not mapped to Suricata: %s", message.id, err)
            return False
        logger.debug("indicator %s: %s", message.id, outcome)
        if outcome in self.unsynced:
            self.unsynced[outcome] += 1
        if message.id in self.expiry:  # held since before a restart: a newer version moves its expiry
            self.expiry.observe(message, (self.inbox,))
        return outcome in ("added", "updated", "removed", "unchanged")

    def flush(self, final: bool = False) -> bool:
        """Write changed files, send dataset commands, reload rules. True when all done."""
        store = self.store
        changes = store.take_changes()
        if changes.write:
            try:
                store.write()
            except OSError as err:
                self.write_errors += 1
                logger.error("cannot write %s: %s; retrying", store.rules_file, err)
                store.requeue(changes)
                return False
            logger.debug("wrote %s (%d detections)", store.rules_file, len(store))
        self.durable()
        self.reload_pending |= changes.reload
        if len(changes.dataset_ops) > self.dataset_command_limit:
            # One reload (Suricata reads the dataset files) is cheaper than thousands of commands.
            logger.info("%d dataset changes: reloading instead of sending each", len(changes.dataset_ops))
            self.reload_pending = True
        try:
            if not self.reload_pending:
                self._dataset_commands(changes.dataset_ops)
            if self.reload_pending:
                # A reload makes Suricata read the dataset files too: no commands needed.
                self._reload()
        except SocketError as err:
            self.socket_errors += 1
            if final:
                logger.warning("Suricata not reachable at shutdown (%s); it reads the files on its next start", err)
            else:
                logger.warning("%s; the files are written, reloading once Suricata is reachable", err)
            # The files are current: a reload later brings Suricata up to date.
            self.reload_pending = True
            self.out_of_step = True
            return False
        unsynced = self.unsynced
        if self.out_of_step:
            logger.info(
                "reconciled Suricata: %d added, %d replaced, %d removed while it was unreachable (%d detections)",
                unsynced["added"],
                unsynced["updated"],
                unsynced["removed"],
                len(store),
            )
            self.out_of_step = False
        for outcome in unsynced:
            unsynced[outcome] = 0
        return True

    def durable(self) -> None:
        """The files hold every change taken so far: acknowledge the messages they came from, in one call."""
        if self.taken:
            taken, self.taken = self.taken, 0
            self.inbox.task_done(taken)

    def _dataset_commands(self, ops: list[tuple[str, Any]]) -> None:
        for position, (command, detection) in enumerate(ops):
            arguments = {"setname": detection.set_name, "settype": detection.set_type, "datavalue": detection.datavalue}
            try:
                message = self.socket.command(command, arguments)
                self.dataset_commands += 1
                logger.debug("%s %s %s: %s", command, detection.set_name, detection.value, message)
            except CommandFailed as err:
                # E.g. "set not found or wrong type": Suricata has not loaded our rules yet.
                logger.warning("%s of %r failed: %s; reloading the rules instead", command, detection.value, err)
                self.reload_pending = True
                return
            except SocketError:
                if position:
                    logger.debug("sent %d of %d dataset commands", position, len(ops))
                raise

    def _reload(self) -> None:
        try:
            message = self.socket.command(self.reload_command)
        except CommandFailed as err:
            logger.warning("Suricata refused to reload the rules: %s; retrying", err)
            raise SocketError(str(err)) from None
        self.reload_pending = False
        self.reloads += 1
        logger.info("Suricata reloads its rules (%s): %s", self.reload_command, message)


class DetectionWorker(StoppableWorker):
    """Applies indicators to the store; writes files and talks to Suricata in batches.

    The first change after a flush starts a timer of ``reload_interval``;
    everything that arrives meanwhile is flushed together: one file write,
    the dataset commands, and at most one rule reload.

    A flush rewrites the files whole, so during a bulk load (a feed of a
    million indicators, a snapshot) flushing every ``reload_interval`` would
    cost time quadratic in the set: the timer is at least ``FLUSH_SPACING``
    times the last flush's duration, and a due flush waits while the inbox
    still holds indicators (up to ``BULK_HOLD`` seconds after the first
    change), so a bulk load ends in one write and one reload. A load that
    outlasts the hold gets a write at its end, and the rest is written as
    soon as the inbox runs empty, not a spacing after that write (a million
    indicators on a busy machine waited half a minute there, idle).
    """

    def __init__(self, sync: DetectionSync, inbox: DeliveryQueue) -> None:
        super().__init__(name="suricata-detections")
        self.sync = sync
        self.inbox = inbox
        self.backoff = Backoff(initial=sync.reload_interval, maximum=max(60.0, sync.reload_interval))
        self.next_flush: float | None = time.monotonic()  # the state read from disk may need a write
        self.first_change = time.monotonic()  # of the changes the next flush writes
        self.last_flush_seconds = 0.0
        self.cut_short = False  # the last flush was at the hold's end, indicators still waiting

    def run(self) -> None:
        while not self.stopping:
            timeout = POLL_INTERVAL
            if self.next_flush is not None:
                timeout = max(0.0, min(timeout, self.next_flush - time.monotonic()))
            try:
                # A bulk load: take what is there at once, without a timer or a lock per indicator.
                self.handle_all(self.inbox.get_many(TAKE_AT_ONCE, timeout))
                now = time.monotonic()
                waiting = not self.inbox.empty()
                if self.cut_short and not waiting:
                    self.cut_short = False
                    if self.next_flush is not None:
                        # The load that outlasted the hold ended: no more to space the next write from.
                        self.next_flush = min(self.next_flush, self.first_change + self.sync.reload_interval)
                if self.next_flush is not None and now >= self.next_flush:
                    if waiting and now - self.first_change < max(BULK_HOLD, self.sync.reload_interval):
                        continue  # a bulk load is arriving: apply it first, then write the files once
                    self.next_flush = None
                    done = self.sync.flush()
                    self.last_flush_seconds = time.monotonic() - now
                    self.cut_short = done and waiting
                    if not done:
                        self.next_flush = time.monotonic() + self.backoff.next_delay()
                    else:
                        self.backoff.reset()
            except Exception:  # a bug must not end the worker: log it and go on
                logger.exception("suricata detection worker failed; continuing")
                self.next_flush = time.monotonic() + self.backoff.next_delay()
        # Apply what already arrived and persist it, so nothing accepted is lost.
        while taken := self.inbox.get_many(TAKE_AT_ONCE, 0):
            self.handle_all(taken)
        self.sync.flush(final=True)

    def handle_all(self, messages: list[Message]) -> None:
        """``handle`` each; one that fails is logged and the rest are still applied (all were taken)."""
        for message in messages:
            try:
                self.handle(message)
            except Exception:  # a bug must not end the worker: log it and go on
                logger.exception("suricata detection worker failed on %s; continuing", message.type_name)
                self.next_flush = time.monotonic() + self.backoff.next_delay()

    def handle(self, message: Message) -> None:
        if self.sync.apply(message):
            if self.next_flush is None:
                self.first_change = time.monotonic()
                self.next_flush = self.first_change + max(
                    self.sync.reload_interval, FLUSH_SPACING * self.last_flush_seconds
                )
        elif self.next_flush is None:
            self.sync.durable()  # nothing for Suricata in it and no change waits to be written before it
