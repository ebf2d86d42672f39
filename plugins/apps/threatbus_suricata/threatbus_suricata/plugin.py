"""The Suricata app plugin: indicators become detections, alerts become sightings."""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import re
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import orjson

import threatbus
from threatbus.config import choice, option
from threatbus.data import TOPIC_INDICATOR, Indicator, Message, SnapshotEnvelope, SnapshotRequest, SnapshotType
from threatbus.errors import PluginError
from threatbus.expiry import ExpirySchedule, ExpiryWorker, hand_to
from threatbus.metrics import APP_RECEIVED, APP_REJECTED, DELIVERED, Metrics
from threatbus.node import Node
from threatbus.stix import InvalidIntel, new_sighting, timestamp, validate
from threatbus.worker import POLL_INTERVAL, Backoff, StoppableWorker, stop_workers
from threatbus_suricata.eve import LogFollower, event_time, matches, sighting_context
from threatbus_suricata.mapping import ACTIONS, MODES, RESERVED_SIDS, Settings, Unsupported
from threatbus_suricata.store import DetectionStore, ForeignFile
from threatbus_suricata.suricata_socket import CommandFailed, SocketError, SuricataSocket

logger = logging.getLogger(__name__)

NAME = "suricata"
PREFIX = f"plugins.apps.{NAME}"
RELOAD_COMMANDS = ("ruleset-reload-nonblocking", "ruleset-reload-rules", "reload-rules")
MAX_SID = 2**32 - 1
# sun_path of a unix socket holds 108 bytes including the terminating NUL.
MAX_SOCKET_PATH = 107
_SET_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
# Flushing may take at most 1 / (1 + FLUSH_SPACING) of the detection worker's time.
FLUSH_SPACING = 4
# Seconds a due flush may wait while indicators keep arriving.
BULK_HOLD = 60.0

RULES_FILE = "/var/lib/suricata/rules/threatbus.rules"
SOCKET = "/var/run/suricata/suricata-command.socket"
EVE = "/var/log/suricata/eve.json"


def _writable_dir(path: Any) -> bool:
    parent = os.path.dirname(os.path.abspath(path))
    return bool(path) and os.path.isdir(parent) and os.access(parent, os.W_OK | os.X_OK)


def _existing_dir(path: Any) -> bool:
    return bool(path) and os.path.isdir(os.path.dirname(os.path.abspath(path)))


class Counters:
    """Plain integers, read by the metrics read-outs."""

    def __init__(self) -> None:
        self.indicators = 0  # indicators taken from the bus
        self.unsupported = 0  # indicators without a Suricata mapping
        self.sightings = 0  # sightings published
        self.bad_lines = 0  # unreadable EVE lines and invalid sightings
        self.unmapped_alerts = 0  # alerts of Threat Bus rules no held indicator explains
        self.reloads = 0
        self.dataset_commands = 0
        self.socket_errors = 0
        self.write_errors = 0
        # Changes since Suricata last took the files: the counts of a reconciliation.
        self.unsynced = {"added": 0, "updated": 0, "removed": 0}


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
    change), so a bulk load ends in one write and one reload.
    """

    def __init__(self, app: SuricataApp, inbox: queue.Queue[Message]) -> None:
        super().__init__(name="suricata-detections")
        self.app = app
        self.inbox = inbox
        self.backoff = Backoff(initial=app.reload_interval, maximum=max(60.0, app.reload_interval))
        self.next_flush: float | None = time.monotonic()  # the state read from disk may need a write
        self.first_change = time.monotonic()  # of the changes the next flush writes
        self.last_flush_seconds = 0.0

    def run(self) -> None:
        while not self.stopping:
            timeout = POLL_INTERVAL
            if self.next_flush is not None:
                timeout = max(0.0, min(timeout, self.next_flush - time.monotonic()))
            try:
                with contextlib.suppress(queue.Empty):
                    self.handle(self.inbox.get(timeout=timeout))
                now = time.monotonic()
                if self.next_flush is not None and now >= self.next_flush:
                    if not self.inbox.empty() and now - self.first_change < max(BULK_HOLD, self.app.reload_interval):
                        continue  # a bulk load is arriving: apply it first, then write the files once
                    self.next_flush = None
                    done = self.app.flush()
                    self.last_flush_seconds = time.monotonic() - now
                    if not done:
                        self.next_flush = time.monotonic() + self.backoff.next_delay()
                    else:
                        self.backoff.reset()
            except Exception:  # a bug must not end the worker: log it and go on
                logger.exception("suricata detection worker failed; continuing")
                self.next_flush = time.monotonic() + self.backoff.next_delay()
        # Apply what already arrived and persist it, so nothing accepted is lost.
        while True:
            try:
                self.handle(self.inbox.get_nowait())
            except queue.Empty:
                break
        self.app.flush(final=True)

    def handle(self, message: Message) -> None:
        if isinstance(message, SnapshotEnvelope):
            message = message.stix
        if not isinstance(message, Indicator):
            return
        app = self.app
        app.counters.indicators += 1
        try:
            outcome = app.store.apply(message)
        except Unsupported as err:
            app.counters.unsupported += 1
            logger.info("indicator %s not mapped to Suricata: %s", message.id, err)
            return
        logger.debug("indicator %s: %s", message.id, outcome)
        if outcome in app.counters.unsynced:
            app.counters.unsynced[outcome] += 1
        if message.id in app.expiry:  # held since before a restart: a newer version moves its expiry
            app.expiry.observe(message, (self.inbox,))
        if outcome in ("added", "updated", "removed", "unchanged") and self.next_flush is None:
            self.first_change = time.monotonic()
            self.next_flush = self.first_change + max(app.reload_interval, FLUSH_SPACING * self.last_flush_seconds)


class EveWorker(StoppableWorker):
    """Follows the EVE log and publishes a sighting for every Threat Bus alert."""

    def __init__(self, app: SuricataApp, follower: LogFollower) -> None:
        super().__init__(name="suricata-eve")
        self.app = app
        self.follower = follower

    def run(self) -> None:
        try:
            while not self.stopping:
                try:
                    lines = self.follower.poll()
                except OSError as err:
                    logger.warning("cannot read EVE log %s: %s", self.follower.path, err)
                    self.follower.close()
                    self.wait(5)
                    continue
                for line in lines:
                    try:
                        self.app.handle_eve_line(line)
                    except Exception:  # a bug must not end the follower: log the line and go on
                        self.app.counters.bad_lines += 1
                        logger.exception("cannot handle EVE line %r", line[:200])
                if not lines:
                    self.wait(0.2)
        finally:
            self.follower.close()


class SuricataApp:
    """Connects Threat Bus to Suricata (see README.md)."""

    def __init__(self) -> None:
        self.counters = Counters()
        self.store: DetectionStore | None = None
        self.socket: SuricataSocket | None = None
        self.publish_queue: queue.Queue[Message] | None = None
        self.inbox: queue.Queue[Message] = queue.Queue()
        self.unsubscribe: Any = None
        self.workers: list[StoppableWorker] = []
        self.reload_interval = 2.0
        self.reload_command = RELOAD_COMMANDS[0]
        self.dataset_command_limit = 1000
        self.own_snapshot_ids: set[str] = set()
        self.reload_pending = False
        self.out_of_step = False  # Suricata missed changes (unreachable): say so when it has them
        # Expiry of what the rules file held at start; the bus schedules what it delivers from then on.
        self.expiry = ExpirySchedule()

    # ---- hooks --------------------------------------------------------

    @threatbus.app
    def config_validators(self) -> list[Any]:
        return [
            option(
                f"{PREFIX}.rules_file",
                str,
                default=RULES_FILE,
                check=_writable_dir,
                expected="a file path in an existing directory Threat Bus may write to",
            ),
            option(
                f"{PREFIX}.socket",
                str,
                default=SOCKET,
                check=lambda p: bool(p) and len(os.fsencode(p)) <= MAX_SOCKET_PATH,
                expected=f"the path of Suricata's unix command socket (at most {MAX_SOCKET_PATH} bytes)",
            ),
            option(
                f"{PREFIX}.eve",
                str,
                default=EVE,
                check=lambda p: p == "" or _existing_dir(p),
                expected="the path of Suricata's eve.json in an existing directory, or '' to ignore alerts",
            ),
            option(f"{PREFIX}.eve_from_start", bool, default=False),
            choice(f"{PREFIX}.mode", MODES, default="rules"),
            choice(f"{PREFIX}.action", ACTIONS, default="alert"),
            option(
                f"{PREFIX}.sid_min",
                int,
                default=3_900_000_000,
                check=lambda v: 0 < v <= MAX_SID - RESERVED_SIDS,
                expected=f"a sid between 1 and {MAX_SID - RESERVED_SIDS}",
            ),
            option(
                f"{PREFIX}.sid_max",
                int,
                default=3_999_999_999,
                check=lambda v: 0 < v <= MAX_SID,
                expected=f"a sid between 1 and {MAX_SID}",
            ),
            option(
                f"{PREFIX}.datasets.ip",
                str,
                default="threatbus-ip",
                check=lambda v: bool(_SET_NAME.match(v)),
                expected="a dataset name of letters, digits, '-' and '_'",
            ),
            option(
                f"{PREFIX}.datasets.domain",
                str,
                default="threatbus-domain",
                check=lambda v: bool(_SET_NAME.match(v)),
                expected="a dataset name of letters, digits, '-' and '_'",
            ),
            option(
                f"{PREFIX}.reload_interval",
                (int, float),
                default=2.0,
                check=lambda v: 0 < v <= 3600,
                expected="a number of seconds between 0 and 3600",
            ),
            choice(f"{PREFIX}.reload_command", RELOAD_COMMANDS, default=RELOAD_COMMANDS[0]),
            option(
                f"{PREFIX}.dataset_command_limit",
                int,
                default=1000,
                check=lambda v: v >= 0,
                expected="a number of commands (0 or more)",
            ),
            option(
                f"{PREFIX}.socket_timeout",
                (int, float),
                default=5.0,
                check=lambda v: 0 < v <= 300,
                expected="a number of seconds between 0 and 300",
            ),
            option(
                f"{PREFIX}.snapshot", int, default=0, check=lambda v: v >= 0, expected="a number of days (0 or more)"
            ),
        ]

    @threatbus.app
    def run(
        self,
        config: Any,
        publish_queue: queue.Queue[Message],
        subscribe: Any,
        unsubscribe: Any,
        node: Node,
        metrics: Metrics,
    ) -> None:
        sid_min, sid_max = int(config["sid_min"]), int(config["sid_max"])
        if sid_max - sid_min < RESERVED_SIDS + 1000:
            raise PluginError(
                f"{PREFIX}: sid_max ({sid_max}) must be at least sid_min ({sid_min}) + {RESERVED_SIDS + 1000}: "
                f"the first {RESERVED_SIDS} sids are the plugin's own rules, the rest one per indicator"
            )
        datasets = config.get("datasets") or {}
        settings = Settings(
            mode=config["mode"],
            action=config["action"],
            ip_set=datasets.get("ip", "threatbus-ip"),
            domain_set=datasets.get("domain", "threatbus-domain"),
        )
        rules_file = Path(config["rules_file"]).absolute()
        self.reload_interval = float(config["reload_interval"])
        self.reload_command = config["reload_command"]
        self.dataset_command_limit = int(config["dataset_command_limit"])
        self.publish_queue = publish_queue
        self.unsubscribe = unsubscribe
        self.store = DetectionStore(rules_file, settings, sid_min, sid_max, self.dataset_command_limit)
        try:
            loaded = self.store.load()
        except OSError as err:
            raise PluginError(f"{PREFIX}: cannot read rules file {rules_file}: {err}") from err
        except ForeignFile as err:
            raise PluginError(f"{PREFIX}.rules_file: {err}") from None
        self.socket = SuricataSocket(str(config["socket"]), timeout=float(config["socket_timeout"]))
        self._register_metrics(metrics)
        self._expire_held()

        self.workers.append(DetectionWorker(self, self.inbox))
        self.workers.append(ExpiryWorker(self.expiry, hand_to))
        eve = config.get("eve") or ""
        if eve:
            follower = LogFollower(eve, from_start=bool(config["eve_from_start"]))
            try:
                follower.begin()  # alerts written from now on are not missed
            except OSError as err:
                raise PluginError(f"{PREFIX}: cannot read EVE log {eve}: {err}") from err
            self.workers.append(EveWorker(self, follower))
        for worker in self.workers:
            worker.start()
        snapshot = timedelta(days=int(config["snapshot"]))
        self.own_snapshot_ids.update(subscribe(TOPIC_INDICATOR, self.inbox, snapshot))
        logger.info(
            "suricata app running on node '%s': %d detections from %s (mode %s), command socket %s, EVE %s",
            node.name,
            loaded,
            rules_file,
            settings.mode,
            config["socket"],
            eve or "not followed",
        )

    def _expire_held(self) -> None:
        """Drop what expired while the node was down; schedule the expiry of the rest."""
        assert self.store is not None
        removed = self.store.drop_expired()
        if removed:
            logger.info("reconciled: 0 added, %d removed (expired while the node was down)", removed)
        for payload in self.store.expiring():
            self.expiry.observe(Indicator(payload), (self.inbox,))

    @threatbus.app
    def stop(self) -> None:
        if self.unsubscribe is not None:
            try:
                self.unsubscribe(TOPIC_INDICATOR, self.inbox)
            except Exception:
                logger.exception("unsubscribing the suricata app failed")
        stop_workers(self.workers, timeout=max(5.0, (self.socket.timeout if self.socket else 0) + 3))
        self.workers = []
        if self.socket is not None:
            self.socket.close()

    @threatbus.app
    def snapshot(self, snapshot_request: SnapshotRequest, result_queue: queue.Queue[Message]) -> None:
        """Answer indicator snapshots with the held indicators modified within the period."""
        if (
            self.store is None
            or snapshot_request.snapshot_type is not SnapshotType.INDICATOR
            or snapshot_request.snapshot_id in self.own_snapshot_ids
        ):
            return
        now = datetime.now(timezone.utc)
        since = timestamp(now - snapshot_request.snapshot)
        answered = 0
        for modified, payload in self.store.payloads(now):  # active intel only
            if modified >= since:
                result_queue.put(SnapshotEnvelope.wrap(snapshot_request, Indicator(payload)))
                answered += 1
        logger.info("answered snapshot %s with %d indicators", snapshot_request.snapshot_id, answered)

    # ---- flushing -----------------------------------------------------

    def flush(self, final: bool = False) -> bool:
        """Write changed files, send dataset commands, reload rules. True when all done."""
        store, sock = self.store, self.socket
        assert store is not None and sock is not None
        changes = store.take_changes()
        if changes.write:
            try:
                store.write()
            except OSError as err:
                self.counters.write_errors += 1
                logger.error("cannot write %s: %s; retrying", store.rules_file, err)
                store.requeue(changes)
                return False
            logger.debug("wrote %s (%d detections)", store.rules_file, len(store))
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
            self.counters.socket_errors += 1
            if final:
                logger.warning("Suricata not reachable at shutdown (%s); it reads the files on its next start", err)
            else:
                logger.warning("%s; the files are written, reloading once Suricata is reachable", err)
            # The files are current: a reload later brings Suricata up to date.
            self.reload_pending = True
            self.out_of_step = True
            return False
        unsynced = self.counters.unsynced
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

    def _dataset_commands(self, ops: list[tuple[str, Any]]) -> None:
        assert self.socket is not None
        for position, (command, detection) in enumerate(ops):
            arguments = {"setname": detection.set_name, "settype": detection.set_type, "datavalue": detection.datavalue}
            try:
                message = self.socket.command(command, arguments)
                self.counters.dataset_commands += 1
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
        assert self.socket is not None
        try:
            message = self.socket.command(self.reload_command)
        except CommandFailed as err:
            logger.warning("Suricata refused to reload the rules: %s; retrying", err)
            raise SocketError(str(err)) from None
        self.reload_pending = False
        self.counters.reloads += 1
        logger.info("Suricata reloads its rules (%s): %s", self.reload_command, message)

    # ---- alerts -------------------------------------------------------

    def handle_eve_line(self, line: bytes) -> None:
        """Publish a sighting for each indicator a Threat Bus alert matched."""
        try:
            event = orjson.loads(line)
        except orjson.JSONDecodeError as err:
            self.counters.bad_lines += 1
            logger.warning("unreadable EVE line (%s): %r", err, line[:200])
            return
        if not isinstance(event, dict):
            self.counters.bad_lines += 1
            logger.warning("EVE line is not a JSON object: %r", line[:200])
            return
        if event.get("event_type") != "alert":
            return
        assert self.store is not None and self.publish_queue is not None
        found = matches(event, self.store)
        if found is None:
            return
        if not found:
            self.counters.unmapped_alerts += 1
            logger.info("alert of sid %s matches no held indicator", (event.get("alert") or {}).get("signature_id"))
            return
        context = sighting_context(event)
        seen = event_time(event)
        for match in found:
            indicator = Indicator(match.payload) if match.payload is not None else None
            sighting = new_sighting(
                match.indicator_id,
                source="Suricata",
                match_type="LIVE",
                value=match.value or None,
                indicator=indicator,
                context=context,
                seen=seen,
            )
            try:
                validate(sighting)
            except InvalidIntel as err:
                self.counters.bad_lines += 1
                logger.warning("dropping invalid sighting of %s: %s", match.indicator_id, err)
                continue
            self.publish_queue.put(sighting)
            self.counters.sightings += 1
            logger.debug("sighting of %s (%s) published", match.indicator_id, match.value)

    # ---- metrics ------------------------------------------------------

    def _register_metrics(self, metrics: Metrics) -> None:
        c = self.counters
        metrics.counter(APP_RECEIVED, "Messages apps gave this node", lambda: c.sightings, plugin=NAME)
        metrics.counter(APP_REJECTED, "Input rejected as invalid", lambda: c.bad_lines + c.unsupported, plugin=NAME)
        metrics.counter(DELIVERED, "Messages handed to subscribers", lambda: c.indicators, plugin=NAME)
        metrics.gauge(
            "threatbus_suricata_detections", "Indicators Suricata detects", lambda: len(self.store or ()), plugin=NAME
        )
        metrics.counter("threatbus_suricata_reloads", "Rule reloads requested", lambda: c.reloads, plugin=NAME)
        metrics.counter(
            "threatbus_suricata_dataset_commands",
            "dataset-add/remove commands",
            lambda: c.dataset_commands,
            plugin=NAME,
        )
        metrics.counter(
            "threatbus_suricata_socket_errors",
            "Failed talks with the command socket",
            lambda: c.socket_errors,
            plugin=NAME,
        )
        metrics.counter(
            "threatbus_suricata_unmapped_alerts",
            "Alerts of Threat Bus rules without a held indicator",
            lambda: c.unmapped_alerts,
            plugin=NAME,
        )
