"""Alerts: Suricata's EVE log followed, Threat Bus alerts published as sightings."""

from __future__ import annotations

import logging
import queue

import orjson

from threatbus.data import Indicator, Message
from threatbus.stix import InvalidIntel, new_sighting, validate
from threatbus.worker import Backoff, ReconnectingWorker
from threatbus_suricata.eve import LogFollower, event_time, matches, sighting_context
from threatbus_suricata.store import DetectionStore

logger = logging.getLogger(__name__)

# Seconds between attempts to read an EVE log that failed.
EVE_RETRY = 5.0


class Alerts:
    """Turns EVE alert lines into sightings of the held indicators; its counters are read by the metrics."""

    def __init__(self, store: DetectionStore, publish_queue: queue.SimpleQueue[Message]) -> None:
        self.store = store
        self.publish_queue = publish_queue
        self.sightings = 0  # sightings published
        self.bad_lines = 0  # unreadable EVE lines and invalid sightings
        self.unmapped_alerts = 0  # alerts of Threat Bus rules no held indicator explains

    def handle_eve_line(self, line: bytes) -> None:
        """Publish a sighting for each indicator a Threat Bus alert matched."""
        try:
            event = orjson.loads(line)
        except orjson.JSONDecodeError as err:
            self.bad_lines += 1
            logger.warning("unreadable EVE line (%s): %r", err, line[:200])
            return
        if not isinstance(event, dict):
            self.bad_lines += 1
            logger.warning("EVE line is not a JSON object: %r", line[:200])
            return
        if event.get("event_type") != "alert":
            return
        found = matches(event, self.store)
        if found is None:
            return
        if not found:
            self.unmapped_alerts += 1
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
                self.bad_lines += 1
                logger.warning("dropping invalid sighting of %s: %s", match.indicator_id, err)
                continue
            self.publish_queue.put(sighting)
            self.sightings += 1
            logger.debug("sighting of %s (%s) published", match.indicator_id, match.value)


class EveWorker(ReconnectingWorker):
    """Follows the EVE log and publishes a sighting for every Threat Bus alert.

    A read error closes the log; it is opened again after a pause.
    """

    def __init__(self, alerts: Alerts, follower: LogFollower) -> None:
        super().__init__("suricata-eve", Backoff(initial=EVE_RETRY, maximum=EVE_RETRY))
        self.alerts = alerts
        self.follower = follower

    def connect_and_serve(self) -> None:
        while not self.stopping:
            try:
                lines = self.follower.poll()
            except OSError as err:
                logger.warning("cannot read EVE log %s: %s", self.follower.path, err)
                self.follower.close()
                return
            for line in lines:
                try:
                    self.alerts.handle_eve_line(line)
                except Exception:  # a bug must not end the follower: log the line and go on
                    self.alerts.bad_lines += 1
                    logger.exception("cannot handle EVE line %r", line[:200])
            if not lines:
                self.wait(0.2)

    def reconnecting(self, delay: float) -> None:
        logger.debug("opening EVE log %s again in %.1fs", self.follower.path, delay)

    def release(self) -> None:
        self.follower.close()
