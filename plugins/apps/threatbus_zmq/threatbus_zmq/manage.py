"""The manage endpoint: a REP socket serving subscribe, unsubscribe and heartbeat."""

from __future__ import annotations

import logging
import math
import time
from datetime import timedelta
from typing import Any

import orjson
import zmq

from threatbus.data import describe
from threatbus.policy import Filter, FilterError
from threatbus.ratelimit import RateLimitedLog
from threatbus.worker import StoppableWorker
from threatbus_zmq.settings import ZmqSettings
from threatbus_zmq.subscribers import SubscriptionError, Subscriptions
from threatbus_zmq.wire import STATUS_ERROR, STATUS_SUCCESS, STATUS_UNKNOWN, is_p2p_topic

logger = logging.getLogger(__name__)

# Longest manage request served; a longer one gets an error reply (and is logged and counted).
MAX_REQUEST_BYTES = 64 * 1024
MAX_TOPICS = 16
MAX_TOPIC_LENGTH = 256
MAX_SNAPSHOT_DAYS = 36500
HOUSEKEEPING_INTERVAL = 1.0


class BadRequest(ValueError):
    """A manage request that does not follow the protocol."""


def parse_topics(value: Any) -> list[str]:
    topics = value if isinstance(value, list) else [value]
    if not topics or len(topics) > MAX_TOPICS:
        raise BadRequest(f"'topic' must be a topic or a list of 1 to {MAX_TOPICS} topics")
    for topic in topics:
        if not isinstance(topic, str) or not topic or len(topic) > MAX_TOPIC_LENGTH:
            raise BadRequest(f"each topic must be a non-empty string of at most {MAX_TOPIC_LENGTH} characters")
    return list(dict.fromkeys(topics))


def parse_filter(value: Any) -> Filter | None:
    """The client's own filter (optional ``"filter"``, the keys of ``threatbus.policy``); it narrows the app's."""
    if value is None:
        return None
    try:
        compiled = Filter(value, "filter")
    except FilterError as err:
        raise BadRequest(str(err)) from None
    return compiled if compiled else None


def parse_snapshot(value: Any) -> timedelta:
    """The snapshot period; the protocol gives it in days (0 or absent: none)."""
    if value is None:
        return timedelta(0)
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise BadRequest("'snapshot' must be a number of days")
    try:
        days = float(value)
    except ValueError:
        raise BadRequest(f"'snapshot' must be a number of days, got {value!r}") from None
    if not math.isfinite(days) or not 0 <= days <= MAX_SNAPSHOT_DAYS:
        raise BadRequest(f"'snapshot' must be between 0 and {MAX_SNAPSHOT_DAYS} days, got {value!r}")
    return timedelta(days=days)


class ManageWorker(StoppableWorker):
    """Owns the REP socket: every request gets exactly one JSON reply."""

    def __init__(self, socket: zmq.Socket, subscriptions: Subscriptions, settings: ZmqSettings) -> None:
        super().__init__(name="zmq-manage")
        self.socket = socket
        self.subscriptions = subscriptions
        self.ports = settings.ports  # the pub and sub ports are announced to every subscriber
        self.rejected = 0
        self.oversized = 0  # requests over MAX_REQUEST_BYTES, answered with an error
        self._log_rejected = RateLimitedLog(logger)

    def run(self) -> None:
        next_housekeeping = time.monotonic() + HOUSEKEEPING_INTERVAL
        try:
            while not self.stopping:
                if self.socket.poll(250):
                    self.serve_one()
                now = time.monotonic()
                if now >= next_housekeeping:
                    next_housekeeping = now + HOUSEKEEPING_INTERVAL
                    self._housekeeping(now)
        except Exception:
            logger.exception("manage endpoint failed; apps can no longer subscribe")
        finally:
            self.release()

    def release(self) -> None:
        self.socket.close(linger=0)

    def _housekeeping(self, now: float) -> None:
        try:
            self.subscriptions.expire(now)
            self.subscriptions.report_drops(now)
        except Exception:
            logger.exception("subscriber housekeeping failed")

    def serve_one(self) -> None:
        frames = self.socket.recv_multipart()
        try:
            reply = self.handle(frames)
        except Exception:
            logger.exception("failed to handle manage request %s", describe(b"".join(frames)))
            reply = {"status": STATUS_ERROR, "reason": "internal error"}
        self.socket.send(orjson.dumps(reply))

    def handle(self, frames: list[bytes]) -> dict[str, Any]:
        size = sum(len(frame) for frame in frames)
        if size > MAX_REQUEST_BYTES:
            # Answered, so that a client without a timeout does not wait forever; never parsed.
            self.rejected += 1
            self.oversized += 1
            self._log_rejected(
                "dropped a manage request of %d bytes (at most %d): %s", size, MAX_REQUEST_BYTES, describe(frames[0])
            )
            return {"status": STATUS_ERROR, "reason": f"request too large: {size} bytes, at most {MAX_REQUEST_BYTES}"}
        raw = b"".join(frames)
        try:
            if len(frames) != 1:
                raise BadRequest(f"expected one frame, got {len(frames)}")
            try:
                request = orjson.loads(frames[0])
            except orjson.JSONDecodeError:
                raise BadRequest("not a JSON object") from None
            if not isinstance(request, dict):
                raise BadRequest("not a JSON object")
            action = request.get("action")
            if action == "subscribe":
                return self._subscribe(request)
            if action == "unsubscribe":
                return self._unsubscribe(request)
            if action == "heartbeat":
                return self._heartbeat(request)
        except BadRequest as err:
            self.rejected += 1
            self._log_rejected("malformed manage request %s: %s", describe(raw), err)
            return {"status": STATUS_ERROR, "reason": str(err)}
        self.rejected += 1
        self._log_rejected("unknown manage request %s", describe(raw))
        return {"status": STATUS_UNKNOWN}

    def _subscribe(self, request: dict[str, Any]) -> dict[str, Any]:
        topics = parse_topics(request.get("topic"))
        snapshot = parse_snapshot(request.get("snapshot"))
        client_filter = parse_filter(request.get("filter"))
        snapshot_end = request.get("snapshot_end") is True  # our addition: a marker after the snapshot
        try:
            sub = self.subscriptions.add(topics, snapshot, client_filter, snapshot_end=snapshot_end)
        except SubscriptionError as err:
            logger.warning("refused subscription to %s: %s", ", ".join(topics), err)
            return {"status": STATUS_ERROR, "reason": str(err)}
        return {
            "status": STATUS_SUCCESS,
            "topic": sub.p2p_topic,
            "pub_port": self.ports["pub"],
            "sub_port": self.ports["sub"],
        }

    def _unsubscribe(self, request: dict[str, Any]) -> dict[str, Any]:
        topic = request.get("topic")
        if is_p2p_topic(topic) and self.subscriptions.remove(topic, "unsubscribed"):
            return {"status": STATUS_SUCCESS}
        return {"status": STATUS_ERROR, "reason": "unknown p2p topic"}

    def _heartbeat(self, request: dict[str, Any]) -> dict[str, Any]:
        topic = request.get("topic")
        if is_p2p_topic(topic) and self.subscriptions.heartbeat(topic):
            return {"status": STATUS_SUCCESS}
        return {"status": STATUS_ERROR, "reason": "unknown p2p topic: subscribe again"}
