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
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

import orjson
from dynaconf import Validator

from threatbus.config import option
from threatbus.data import (
    MAX_MESSAGE_BYTES,
    MESSAGE_TYPES,
    Indicator,
    Message,
    Sighting,
    SnapshotRequest,
    SnapshotType,
    StixObject,
    from_payload,
)
from threatbus.errors import DecodeError
from threatbus.lifecycle import IntelState, is_active
from threatbus.worker import StoppableWorker

logger = logging.getLogger(__name__)

LogEntry = tuple[float, "Message | bytes"]
"""One message of the log and when the bus carried it (epoch seconds).

The message may come as its JSON text (cheaper for a log of 100,000
entries read at every snapshot): the fold parses it, checks only the kind
asked for, and the answer carries that very text on.
"""

Skipped = Callable[[str], None]
"""Told why an entry of the log was left out because it is no Threat Bus message."""

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


# Objects of an answer made at once (see ``fold_in_batches``): small enough that a batch is gone before the
# garbage collector moves it to its oldest generation (batches of 500 still caused a few full collections).
FOLD_BATCH = 100


def fold(
    entries: Iterable[LogEntry],
    snapshot_type: SnapshotType,
    since: float,
    now: float,
    skipped: Skipped | None = None,
) -> list[StixObject]:
    """The current intel of ``snapshot_type`` the log holds from ``since`` on (epoch seconds).

    The latest version of each id counts; removed, revoked and (at ``now``)
    expired indicators are left out. Entries before ``since`` are skipped: a
    log may start reading a little early (stream chunks). Entries given as
    JSON text are parsed here; only those of the kind asked for are checked
    (``threatbus.data.from_payload``), and ``skipped`` hears of each one that
    is no message at all or fails the check. Most ids have one version in a
    log: those are only checked for being active; ids with several versions
    go through ``IntelState``, which orders them. The messages are returned
    as they came (their encoded bytes cached: sent on as they were logged).
    """
    return [stix for batch in fold_in_batches(entries, snapshot_type, since, now, skipped) for stix in batch]


def fold_in_batches(
    entries: Iterable[LogEntry],
    snapshot_type: SnapshotType,
    since: float,
    now: float,
    skipped: Skipped | None = None,
    size: int = FOLD_BATCH,
    stopped: Callable[[], bool] | None = None,
) -> Iterator[list[StixObject]]:
    """``fold``, handed out in lists of up to ``size`` objects, each made only when it is asked for.

    The whole log is read and folded before the first list. Until then the
    single versions stay parsed JSON, which the garbage collector does not
    track: a message object (or a tuple) for each of 100,000 at once made
    full collections a third of a snapshot's time. ``stopped`` is asked
    every 1,024 entries; True ends the fold without a result.
    """
    kind = _KINDS[snapshot_type]
    name = kind.type_name
    moment = datetime.fromtimestamp(now, timezone.utc)
    # id -> its only version so far: a message, or a payload parsed from JSON text not checked yet (and that text).
    single: dict[str, StixObject | dict[str, Any]] = {}
    texts: dict[str, bytes] = {}
    state = IntelState()
    ordered: set[str] = set()  # the ids in ``state``: those with several versions
    versions: dict[int, StixObject] = {}  # the messages the state holds, by their payload: sent as they came
    loads = orjson.loads
    for number, (when, item) in enumerate(entries):
        if not number & STOP_CHECK_MASK and stopped is not None and stopped():
            return
        if when < since:
            continue
        candidate: StixObject | dict[str, Any]
        text = b""
        if isinstance(item, Message):
            if type(item) is not kind:
                continue
            candidate = item  # type: ignore[assignment]
            ident = item.payload["id"]
        else:
            # The common case: JSON text. Other kinds are told apart by their type only, never checked.
            try:
                if len(item) > MAX_MESSAGE_BYTES:
                    raise DecodeError(f"message of {len(item)} bytes exceeds the limit of {MAX_MESSAGE_BYTES}")
                payload = loads(item)
            except orjson.JSONDecodeError as err:
                if skipped is not None:
                    skipped(f"not valid JSON: {err}")
                continue
            except DecodeError as err:
                if skipped is not None:
                    skipped(str(err))
                continue
            if type(payload) is not dict or payload.get("type") != name:
                unknown = type(payload) is not dict or payload.get("type") not in MESSAGE_TYPES
                if unknown and skipped is not None:
                    skipped("not a Threat Bus message")
                continue
            candidate = payload
            text = item if type(item) is bytes else bytes(item)
            ident = payload.get("id")
            if type(ident) is not str:
                _checked(payload, text, skipped)  # no id to fold by: the check says why
                continue
        if ident not in single and ident not in ordered:
            single[ident] = candidate
            texts[ident] = text
            continue
        # A further version of the id: both are checked before they are ordered.
        message = _checked(candidate, text, skipped)
        if message is None:
            continue
        try:
            if ident not in ordered:
                first = _checked(single.pop(ident), texts.pop(ident), skipped)
                if first is None:
                    single[ident] = message
                    texts[ident] = b""
                    continue
                state.apply(first.payload)
                ordered.add(ident)
                versions[id(first.payload)] = first
            state.apply(message.payload)
            versions[id(message.payload)] = message
        except (KeyError, ValueError, TypeError) as err:  # a timestamp the structure check let through
            logger.debug("history: skipped a %s the fold cannot order: %s", message.type_name, err)
    batch: list[StixObject] = []
    for ident, candidate in single.items():
        if type(candidate) is dict:
            message = _checked(candidate, texts[ident], skipped)
            if message is None:
                continue
        else:
            message = candidate  # type: ignore[assignment]
        payload = message.payload
        # Most intel carries none of the keys that can end it: no need to ask is_active.
        if ("revoked" in payload or "x_threatbus_update" in payload or "valid_until" in payload) and not _active(
            payload, moment
        ):
            continue
        batch.append(message)
        if len(batch) >= size:
            yield batch
            batch = []
    for payload in state.active(moment):
        batch.append(versions[id(payload)])
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


def _checked(candidate: StixObject | dict[str, Any], text: bytes, skipped: Skipped | None) -> StixObject | None:
    """The message of a version (parsed from ``text``), once its structure passed the check; None if it did not."""
    if not isinstance(candidate, dict):
        return candidate
    try:
        return from_payload(candidate, text)  # type: ignore[return-value]
    except DecodeError as err:
        if skipped is not None:
            skipped(str(err))
        return None


def _active(payload: dict[str, Any], moment: datetime) -> bool:
    try:
        return is_active(payload, moment)
    except (ValueError, TypeError):  # a valid_until nobody can read: not usable
        return False


# How often reading the log looks at a stop of the bus: every 1,024 entries.
STOP_CHECK_MASK = 1023


@dataclass(frozen=True)
class _Job:
    request: SnapshotRequest
    since: datetime
    until: datetime


class _Tally:
    """Counts the entries a fold left out, and keeps why the first was."""

    def __init__(self) -> None:
        self.count = 0
        self.first = ""

    def __call__(self, reason: str) -> None:
        if not self.count:
            self.first = reason
        self.count += 1


class LogAnswerer(StoppableWorker):
    """Answers this node's own snapshot requests from the backbone's log, one request at a time.

    ``deliver(request, batches)`` hands the folded intel to the requester
    (through the snapshot router's gate), a list of objects at a time;
    ``finished(request)`` follows, also when the backbone keeps no log or
    reading it failed.
    """

    def __init__(
        self,
        read_log: ReadLog,
        deliver: Callable[[SnapshotRequest, Iterable[list[StixObject]]], None],
        finished: Callable[[SnapshotRequest], None],
    ) -> None:
        super().__init__(name="snapshot-log-answerer")
        self.jobs: queue.SimpleQueue[_Job] = queue.SimpleQueue()
        self._read_log = read_log
        self._deliver = deliver
        self._finished = finished
        self.answered = 0
        self.skipped = 0  # log entries that were no Threat Bus message

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
        request = job.request
        skipped = _Tally()
        handed = 0

        def batches() -> Iterator[list[StixObject]]:
            nonlocal handed
            for batch in fold_in_batches(
                entries,
                request.snapshot_type,
                job.since.timestamp(),
                job.until.timestamp(),
                skipped=skipped,
                stopped=lambda: self.stopping,
            ):
                if self.stopping:
                    return
                handed += len(batch)
                yield batch

        self._deliver(request, batches())
        if skipped.count:
            # One line per answer, however many: a log that foreign publishers write to may hold anything.
            self.skipped += skipped.count
            logger.warning(
                "history: snapshot %s: left out %d log entr%s that %s no Threat Bus message (first: %s)",
                request.snapshot_id,
                skipped.count,
                "y" if skipped.count == 1 else "ies",
                "is" if skipped.count == 1 else "are",
                skipped.first,
            )
        if self.stopping:
            return
        logger.info(
            "history: snapshot %s answered from the log: %d %s(s) of the last %s",
            request.snapshot_id,
            handed,
            request.snapshot_type.name.lower(),
            request.snapshot,
        )
        self.answered += 1
