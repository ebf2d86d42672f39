"""The MISP app plugin: MISP's to_ids attributes become indicators, sightings go back to MISP.

Three workers: the feed (``feed.ZmqFeed`` or ``feed.KafkaFeed``) turns
attribute notifications into indicators and removals; ``SightingWorker``
reports sightings of MISP indicators through the REST API, retrying with
backoff; ``SnapshotWorker`` answers indicator snapshot requests from an
attribute search. The hooks only hand work to them.
"""

from __future__ import annotations

import logging
import queue
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import zmq

import threatbus
from threatbus.app_plugin import AppPlugin, AppRuntime
from threatbus.data import (
    TOPIC_SIGHTING,
    Indicator,
    Message,
    Sighting,
    SnapshotEnvelope,
    SnapshotRequest,
    SnapshotType,
    describe,
)
from threatbus.delivery import DeliveryQueue
from threatbus.lifecycle import parse_timestamp
from threatbus.metrics import DROPPED, AppCounts, Metrics
from threatbus.ratelimit import RateLimitedLog
from threatbus.stix import InvalidIntel, validate
from threatbus.worker import POLL_INTERVAL, Backoff, StoppableWorker
from threatbus_misp.api import TIMEOUT, MispApi, Refused, Unavailable
from threatbus_misp.feed import FeedStatus, InvalidNotification, KafkaFeed, Notification, ZmqFeed, parse_notification
from threatbus_misp.mapping import InvalidAttribute, MispAttribute, Unmappable, is_misp_indicator, to_indicator
from threatbus_misp.settings import NAME, MispSettings, validators

logger = logging.getLogger(__name__)

# Sightings waiting for MISP; beyond this the oldest is dropped (logged and counted).
MAX_PENDING_SIGHTINGS = 10_000
# How long a snapshot request is retried while MISP is unreachable.
SNAPSHOT_GIVE_UP = 300.0
SOURCE_FALLBACK = "Threat Bus"

CONNECTED = "threatbus_misp_connected"  # gauge{link}: 1 while the feed / the API answers
UNMAPPABLE = "threatbus_misp_unmappable"  # counter: attributes without a STIX pattern
IGNORED = "threatbus_misp_ignored"  # counter: notifications filtered out or without to_ids
SIGHTINGS_REFUSED = "threatbus_misp_sightings_refused"  # counter: sightings MISP refused
API_ERRORS = "threatbus_misp_api_errors"  # counter: failed API calls that are retried
SNAPSHOT_INDICATORS = "threatbus_misp_snapshot_indicators"  # counter: indicators sent in snapshots


@dataclass
class Counters(AppCounts):
    """Plain integers, read by the metrics read-outs.

    ``received``: indicators and removals put on the bus; ``rejected``: garbage
    on the feed, invalid attributes or intel; ``delivered``: sightings MISP took.
    """

    unmappable: int = 0
    ignored: int = 0
    sightings_refused: int = 0
    sightings_dropped: int = 0
    api_errors: int = 0
    snapshot_indicators: int = 0
    api_reachable: bool = False


def _parse_time(value: Any) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        return parse_timestamp(value)
    except ValueError:
        return None


@dataclass(frozen=True)
class SightingReport:
    attribute_uuid: str
    source: str
    seen: datetime


def sighting_report(sighting: Sighting) -> SightingReport | None:
    """What to tell MISP about ``sighting``; None when its indicator is not MISP's."""
    ref = sighting.sighting_of_ref
    if not ref.startswith("indicator--"):
        return None
    try:
        attribute_uuid = str(uuid.UUID(ref[len("indicator--") :]))
    except ValueError:
        return None
    embedded = sighting.indicator
    if embedded is not None and not is_misp_indicator(embedded.payload):
        return None  # the sighting names its indicator, and that one did not come from MISP
    payload = sighting.payload
    source = payload.get("x_threatbus_source")
    seen = _parse_time(payload.get("last_seen")) or _parse_time(payload.get("first_seen"))
    return SightingReport(
        attribute_uuid,
        source if isinstance(source, str) and source else SOURCE_FALLBACK,
        seen or _parse_time(payload.get("created")) or datetime.now(timezone.utc),
    )


class SightingWorker(StoppableWorker):
    """Reports sightings to MISP in order; keeps them while MISP is away.

    A sighting MISP cannot take now (unreachable, 5xx, 401/403/429) stays at
    the head of the queue and is retried with backoff; one MISP refuses
    (unknown attribute, say) is logged and counted. At most
    ``MAX_PENDING_SIGHTINGS`` wait; beyond that, and at shutdown, what is
    dropped is logged and counted.

    Messages are acknowledged (``DeliveryQueue.task_done``) once MISP took
    or refused their sighting, or it was dropped; messages with nothing for
    MISP together with the sighting before them (acknowledgements go in order).
    """

    def __init__(self, app: MispApp, api: MispApi, inbox: DeliveryQueue) -> None:
        super().__init__(name="misp-sightings")
        self.app = app
        self.api = api
        self.inbox = inbox
        # Each report with the number of messages its end completes: its own and those taken after it with
        # nothing for MISP.
        self.pending: deque[list[Any]] = deque()
        self.done = 0  # messages to acknowledge now
        self.backoff = Backoff(initial=1.0, maximum=60.0)
        self.retry_at = 0.0
        self.drop_log = RateLimitedLog(logger)

    def run(self) -> None:
        while not self.stopping:
            wait = POLL_INTERVAL
            if self.pending:
                wait = max(0.0, min(POLL_INTERVAL, self.retry_at - time.monotonic()))
            try:
                self.take(self.inbox.get(timeout=wait))
                for message in self.leftovers(self.inbox):
                    self.take(message)
            except queue.Empty:
                pass
            try:
                self.report()
            except Exception:  # a bug must not end the worker
                logger.exception("reporting sightings to MISP failed; continuing")
                self.retry_at = time.monotonic() + self.backoff.next_delay()
            self.acknowledge()
        left = len(self.pending) + sum(1 for m in self.leftovers(self.inbox) if isinstance(m, Sighting))
        if left:
            self.app.counters.sightings_dropped += left
            logger.error("%d sightings not reported to MISP at shutdown were dropped", left)

    def take(self, message: Message) -> None:
        report = sighting_report(message) if isinstance(message, Sighting) else None
        if report is None:
            if isinstance(message, Sighting):
                logger.debug("sighting %s is not of a MISP indicator", message.id)
            self._nothing_for_misp()
            return
        if len(self.pending) >= MAX_PENDING_SIGHTINGS:
            dropped, completes = self.pending.popleft()
            self.done += completes
            self.app.counters.sightings_dropped += 1
            self.drop_log(
                "more than %d sightings wait for MISP: dropped the oldest, of attribute %s",
                MAX_PENDING_SIGHTINGS,
                dropped.attribute_uuid,
            )
        self.pending.append([report, 1])

    def _nothing_for_misp(self) -> None:
        if self.pending:
            self.pending[-1][1] += 1  # done when the report before it is
        else:
            self.done += 1

    def acknowledge(self) -> None:
        if self.done:
            done, self.done = self.done, 0
            self.inbox.task_done(done)

    def report(self) -> None:
        counters = self.app.counters
        while self.pending and not self.stopping and time.monotonic() >= self.retry_at:
            report, completes = self.pending[0]
            try:
                self.api.add_sighting(report.attribute_uuid, report.source, report.seen)
            except Unavailable as err:
                counters.api_errors += 1
                counters.api_reachable = False
                delay = self.backoff.next_delay()
                self.retry_at = time.monotonic() + delay
                logger.warning("%s; %d sightings wait, retrying in %.1fs", err, len(self.pending), delay)
                return
            except Refused as err:
                counters.api_reachable = True
                counters.sightings_refused += 1
                logger.warning("%s; sighting dropped", err)
            else:
                counters.api_reachable = True
                counters.delivered += 1
                logger.debug("reported sighting of attribute %s (%s) to MISP", report.attribute_uuid, report.source)
            self.pending.popleft()
            self.done += completes
            self.backoff.reset()


class SnapshotWorker(StoppableWorker):
    """Answers indicator snapshot requests from MISP's attribute search."""

    def __init__(self, app: MispApp, api: MispApi) -> None:
        super().__init__(name="misp-snapshots")
        self.app = app
        self.api = api
        self.jobs: queue.SimpleQueue[tuple[SnapshotRequest, Any]] = queue.SimpleQueue()
        self.backoff = Backoff(initial=1.0, maximum=60.0)

    def run(self) -> None:
        for request, result_queue in self.drain(self.jobs):
            try:
                self.answer(request, result_queue)
            except Exception:  # a bug must cost this request, not the worker
                logger.exception("answering snapshot %s from MISP failed", request.snapshot_id)

    def search(self, request: SnapshotRequest) -> list[dict[str, Any]] | None:
        """All attributes of the request's period, or None if MISP stayed away or refused."""
        since = datetime.now(timezone.utc) - request.snapshot
        give_up = time.monotonic() + SNAPSHOT_GIVE_UP
        counters = self.app.counters
        while not self.stopping:
            try:
                found = list(self.api.attributes_since(since))
            except Unavailable as err:
                counters.api_errors += 1
                counters.api_reachable = False
                delay = self.backoff.next_delay()
                if time.monotonic() + delay > give_up:
                    logger.error("snapshot %s not answered: %s; gave up", request.snapshot_id, err)
                    return None
                logger.warning("snapshot %s: %s; retrying in %.1fs", request.snapshot_id, err, delay)
                self.wait(delay)
                continue
            except Refused as err:
                counters.api_reachable = True
                logger.error("snapshot %s not answered: %s", request.snapshot_id, err)
                return None
            counters.api_reachable = True
            self.backoff.reset()
            return found
        return None

    def answer(self, request: SnapshotRequest, result_queue: Any) -> None:
        found = self.search(request)
        if found is None:
            return
        answered = 0
        for raw in found:
            try:
                attribute = MispAttribute.from_json(raw)
            except InvalidAttribute as err:
                self.app.counters.rejected += 1
                logger.warning("snapshot %s: skipping an attribute from MISP: %s", request.snapshot_id, err)
                continue
            if not attribute.to_ids or not self.app.settings.passes(attribute.orgs, attribute.type, attribute.tags):
                continue
            indicator = self.app.indicator(attribute, None, f"snapshot {request.snapshot_id}")
            if indicator is not None:
                result_queue.put(SnapshotEnvelope.wrap(request, indicator))
                answered += 1
        self.app.counters.snapshot_indicators += answered
        logger.info(
            "answered snapshot %s with %d indicators from MISP (%d attributes)",
            request.snapshot_id,
            answered,
            len(found),
        )


class MispApp(AppPlugin):
    """Threat Bus app plugin ``misp`` (see README.md)."""

    # An API call in flight ends within its read timeout.
    stop_timeout = sum(TIMEOUT) + 1

    def __init__(self, kafka_consumer_factory: Callable[[dict[str, Any]], Any] | None = None) -> None:
        super().__init__()
        # Tests pass a stand-in for confluent_kafka.Consumer; None uses the real one.
        self.kafka_consumer_factory = kafka_consumer_factory
        self.settings: MispSettings  # built from the validated section in start
        self.counters = Counters()
        self.feed_status = FeedStatus()
        self.publish_queue: Any = None
        # Acknowledged once MISP took the sighting (SightingWorker).
        self.sighting_inbox = DeliveryQueue()
        self.snapshots: SnapshotWorker | None = None
        self.context: zmq.Context | None = None
        self.reject_log = RateLimitedLog(logger)
        self.unmappable_log = RateLimitedLog(logger, level=logging.INFO)

    # ---- hooks --------------------------------------------------------

    def validators(self) -> list[Any]:
        return validators()

    def start(self, runtime: AppRuntime) -> None:
        self.settings = settings = MispSettings.from_config(runtime.config)
        self.publish_queue = runtime.publish_queue
        self._register_metrics(runtime.metrics)
        if settings.uses_kafka:
            runtime.add_workers(KafkaFeed(settings, self.handle, self.feed_status, self.kafka_consumer_factory))
            feed = f"Kafka topics {', '.join(settings.kafka_topics)}"
        else:
            self.context = zmq.Context()
            runtime.add_workers(ZmqFeed(settings, self.handle, self.feed_status, self.context))
            feed = f"ZeroMQ {settings.zmq_endpoint}"
        if settings.has_api:
            self.snapshots = SnapshotWorker(self, MispApi(settings))
            runtime.add_workers(SightingWorker(self, MispApi(settings), self.sighting_inbox), self.snapshots)
            runtime.subscribe_until_stop(TOPIC_SIGHTING, self.sighting_inbox)
        else:
            logger.warning("no api.host and api.key: sightings are not reported to MISP, snapshots not answered")
        logger.info(
            "misp app running on node '%s': attributes from %s, API %s, %d filter entries",
            runtime.node.name,
            feed,
            settings.api_host or "off",
            len(settings.filters),
        )

    def release(self, stuck: list[str]) -> None:
        if self.context is not None:
            self.context.term()
            self.context = None

    @threatbus.app
    def snapshot(self, snapshot_request: SnapshotRequest, result_queue: Any) -> None:
        """Hands indicator snapshot requests to the snapshot worker (MISP holds no sightings of ours)."""
        if snapshot_request.snapshot_type is not SnapshotType.INDICATOR or self.snapshots is None:
            return
        self.snapshots.jobs.put((snapshot_request, result_queue))

    # ---- MISP -> bus ----------------------------------------------------

    def handle(self, origin: str, body: bytes) -> None:
        """One notification from MISP's feed: publish an indicator or a removal, or skip it."""
        try:
            self._handle(origin, body)
        except Exception:  # a bug must cost this message, not the feed
            self.counters.rejected += 1
            logger.exception("cannot handle message on MISP's %s: %s", origin, describe(body))

    def _handle(self, origin: str, body: bytes) -> None:
        try:
            notification = parse_notification(body)
        except InvalidNotification as err:
            self.counters.rejected += 1
            self.reject_log("dropping invalid message on MISP's %s: %s: %s", origin, err, describe(body))
            return
        if notification is None:
            self.counters.ignored += 1
            logger.debug("ignoring message on MISP's %s: %s", origin, describe(body))
            return
        attribute = notification.attribute
        if not self.settings.passes(attribute.orgs, attribute.type, attribute.tags):
            self.counters.ignored += 1
            logger.debug("attribute %s (%s) does not pass the filter", attribute.uuid, attribute.type)
            return
        update = self.update_of(notification)
        if update == "":
            self.counters.ignored += 1
            logger.debug("attribute %s added without to_ids: ignored", attribute.uuid)
            return
        indicator = self.indicator(attribute, update, origin)
        if indicator is not None:
            self.publish_queue.put(indicator)
            self.counters.received += 1
            logger.debug("%s %s from MISP attribute %s", update or "new", indicator.id, attribute.type)

    @staticmethod
    def update_of(notification: Notification) -> str | None:
        """``x_threatbus_update`` for a notification: None (new), EDIT, REMOVE, or "" to ignore it."""
        if notification.action == "delete" or notification.deleted:
            return "REMOVE"
        if notification.action == "edit":
            return "EDIT" if notification.attribute.to_ids else "REMOVE"
        return None if notification.attribute.to_ids else ""

    def indicator(self, attribute: MispAttribute, update: str | None, origin: str) -> Indicator | None:
        """The validated indicator of ``attribute``, or None (logged and counted)."""
        try:
            indicator = to_indicator(attribute, update, self.settings.api_host)
            validate(indicator)
        except Unmappable as err:
            self.counters.unmappable += 1
            self.unmappable_log("MISP attribute %s (%s) skipped: %s", attribute.uuid, attribute.type, err)
            return None
        except InvalidIntel as err:
            self.counters.rejected += 1
            self.reject_log("dropping MISP attribute %s from %s: %s", attribute.uuid, origin, err)
            return None
        return indicator

    # ---- metrics ------------------------------------------------------

    def _register_metrics(self, metrics: Metrics) -> None:
        c, feed = self.counters, self.feed_status
        c.register(metrics, plugin=NAME)
        metrics.counter(DROPPED, lambda: c.sightings_dropped, where="misp-sightings")
        link = "kafka" if self.settings.uses_kafka else "zmq"
        metrics.gauge(CONNECTED, "1 while MISP's feed or API answers", lambda: int(feed.connected), link=link)
        metrics.gauge(CONNECTED, "1 while MISP's feed or API answers", lambda: int(c.api_reachable), link="api")
        metrics.counter(UNMAPPABLE, "MISP attributes without a STIX pattern", lambda: c.unmappable, plugin=NAME)
        metrics.counter(IGNORED, "MISP notifications filtered out or without to_ids", lambda: c.ignored, plugin=NAME)
        metrics.counter(SIGHTINGS_REFUSED, "Sightings MISP refused", lambda: c.sightings_refused, plugin=NAME)
        metrics.counter(API_ERRORS, "Failed MISP API calls, retried", lambda: c.api_errors, plugin=NAME)
        metrics.counter(SNAPSHOT_INDICATORS, "Indicators sent in snapshots", lambda: c.snapshot_indicators, plugin=NAME)
        metrics.counter(
            "threatbus_misp_feed_connects", "Connections to MISP's feed", lambda: feed.connects, plugin=NAME
        )
