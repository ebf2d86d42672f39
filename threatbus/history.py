"""The intel log seen from the core: its ``history`` config keys and snapshots answered from it.

Backbones keep every message the bus carried in a log (``inmem`` in memory,
``rabbitmq`` in a RabbitMQ stream) and offer it through the ``history``
hook. When an app subscribes with a snapshot, its own node reads the log of
the period, folds it to the current intel (``threatbus.lifecycle``) and
hands the result to the requester only: one answer per request across the
cluster, since only the requester's node knows the request is its own.
"""

from __future__ import annotations

import logging
import queue
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

from dynaconf import Validator

from threatbus.config import option
from threatbus.data import Indicator, Message, Sighting, SnapshotRequest, SnapshotType, StixObject
from threatbus.lifecycle import IntelState, is_active
from threatbus.worker import StoppableWorker

logger = logging.getLogger(__name__)

LogEntry = tuple[float, Message]
"""One message of the log and when the bus carried it (epoch seconds)."""

ReadLog = Callable[[datetime, datetime], "Iterable[LogEntry] | None"]
"""``read_log(since, until)``: the log's entries of that window, None without a log."""

DEFAULT_MAX_AGE_DAYS = 30


def _positive(value: Any) -> bool:
    return value > 0


def _non_negative(value: Any) -> bool:
    return value >= 0


def validators(prefix: str) -> list[Validator]:
    """The ``history`` keys under a backbone's section ``prefix`` (both backbones share them)."""
    p = f"{prefix}.history"
    return [
        option(p, dict, default={}),
        option(f"{p}.enabled", bool, default=True),
        option(f"{p}.max_age", (int, float), default=DEFAULT_MAX_AGE_DAYS, check=_positive, expected="days > 0"),
        option(f"{p}.max_bytes", int, default=0, check=_non_negative, expected="bytes >= 0 (0: no size cap)"),
    ]


@dataclass(frozen=True)
class HistorySettings:
    """The ``history`` section, built from the validated backbone section (the defaults are in ``validators``)."""

    enabled: bool
    max_age: timedelta
    max_bytes: int  # 0: no cap

    @classmethod
    def from_config(cls, config: Any) -> HistorySettings:
        section = config["history"]
        return cls(
            enabled=bool(section["enabled"]),
            max_age=timedelta(days=float(section["max_age"])),
            max_bytes=int(section["max_bytes"]),
        )


_KINDS: dict[SnapshotType, type[StixObject]] = {SnapshotType.INDICATOR: Indicator, SnapshotType.SIGHTING: Sighting}


def fold(entries: Iterable[LogEntry], snapshot_type: SnapshotType, since: float, now: float) -> list[StixObject]:
    """The current intel of ``snapshot_type`` the log holds from ``since`` on (epoch seconds).

    The latest version of each id counts; removed, revoked and (at ``now``)
    expired indicators are left out. Entries before ``since`` are skipped: a
    log may start reading a little early (stream chunks). Most ids have one
    version in a log: those are only checked for being active; ids with
    several versions go through ``IntelState``, which orders them. The
    messages are returned as they came (their encoded bytes cached).
    """
    kind = _KINDS[snapshot_type]
    moment = datetime.fromtimestamp(now, timezone.utc)
    single: dict[str, StixObject] = {}
    state = IntelState()
    for when, message in entries:
        if when < since or type(message) is not kind:
            continue
        ident = message.payload["id"]
        try:
            if ident in state:
                state.apply(message.payload)
                continue
            first = single.pop(ident, None)
            if first is None:
                single[ident] = message  # type: ignore[assignment]
                continue
            state.apply(first.payload)
            state.apply(message.payload)
        except (KeyError, ValueError, TypeError) as err:  # a timestamp the structure check let through
            logger.debug("history: skipped a %s the fold cannot order: %s", message.type_name, err)
    result = [message for message in single.values() if _active(message.payload, moment)]
    result.extend(kind(payload) for payload in state.active(moment))
    return result


def _active(payload: dict[str, Any], moment: datetime) -> bool:
    try:
        return is_active(payload, moment)
    except (ValueError, TypeError):  # a valid_until nobody can read: not usable
        return False


@dataclass(frozen=True)
class _Job:
    request: SnapshotRequest
    since: datetime
    until: datetime


class LogAnswerer(StoppableWorker):
    """Answers this node's own snapshot requests from the backbone's log, one request at a time.

    ``deliver(request, messages)`` hands the folded intel to the requester
    (through the snapshot router's gate); ``finished(request)`` follows,
    also when the backbone keeps no log or reading it failed.
    """

    def __init__(
        self,
        read_log: ReadLog,
        deliver: Callable[[SnapshotRequest, list[StixObject]], None],
        finished: Callable[[SnapshotRequest], None],
    ) -> None:
        super().__init__(name="snapshot-log-answerer")
        self.jobs: queue.SimpleQueue[_Job] = queue.SimpleQueue()
        self._read_log = read_log
        self._deliver = deliver
        self._finished = finished
        self.answered = 0

    def submit(self, request: SnapshotRequest) -> None:
        until = datetime.now(timezone.utc)
        self.jobs.put(_Job(request, until - request.snapshot, until))

    def run(self) -> None:
        for job in self.drain(self.jobs):
            try:
                self._answer(job)
            except Exception:
                logger.exception("history: answering snapshot %s from the log failed", job.request.snapshot_id)
            finally:
                self._finished(job.request)

    def _answer(self, job: _Job) -> None:
        entries = self._read_log(job.since, job.until)
        if entries is None:
            return
        intel = fold(
            self._until_stopped(entries), job.request.snapshot_type, job.since.timestamp(), job.until.timestamp()
        )
        if self.stopping:
            return
        logger.info(
            "history: snapshot %s answered from the log: %d %s(s) of the last %s",
            job.request.snapshot_id,
            len(intel),
            job.request.snapshot_type.name.lower(),
            job.request.snapshot,
        )
        self.answered += 1
        self._deliver(job.request, intel)

    def _until_stopped(self, entries: Iterable[LogEntry]) -> Iterable[LogEntry]:
        for entry in entries:
            if self.stopping:
                return
            yield entry
