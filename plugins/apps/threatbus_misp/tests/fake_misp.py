"""A stand-in for MISP: its REST API as pymisp uses it, and its ZeroMQ publisher.

MISP itself (PHP, MySQL, Redis) cannot run here. This stand-in follows
MISP's documented REST API (the OpenAPI spec at
https://www.misp-project.org/openapi/) for the endpoints pymisp calls:

- ``GET /servers/getVersion`` and ``GET /users/view/me`` (pymisp's
  constructor), ``GET /attributes/describeTypes.json``;
- ``POST /attributes/restSearch`` (filters ``to_ids``, ``timestamp``,
  ``page``/``limit``; answer ``{"response": {"Attribute": [...]}}``);
- ``POST /sightings/add/{id}`` and ``POST /sightings/add`` (uuid in the body);
  an unknown attribute is a 404 with a JSON error, as MISP answers.

Requests need the API key in ``Authorization``. Its ZeroMQ side is an XPUB
socket (a PUB that also sees subscriptions, so tests know when the plugin
listens) sending MISP's frames ``misp_json_attribute <json>``.
"""

from __future__ import annotations

import json
import re
import threading
import time
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pymisp
import zmq
from pymisp.api import describe_types

from threatbus.worker import StoppableWorker

API_KEY = "standin-key-0123456789abcdef0123456789abcdef"
ORG = {"id": "7", "name": "CIRCL", "uuid": "55f6ea5e-2c60-40e5-964f-47a8950d210f"}


def attribute(
    value: str = "6.6.6.6",
    type: str = "ip-dst",
    to_ids: bool = True,
    tags: tuple[str, ...] = (),
    timestamp: int | None = None,
    attribute_uuid: str | None = None,
    deleted: bool = False,
) -> dict[str, Any]:
    """An attribute as MISP writes it into its ZeroMQ messages and search results."""
    return {
        "id": "1234",
        "event_id": "42",
        "object_id": "0",
        "object_relation": None,
        "category": "Network activity",
        "type": type,
        "value": value,
        "to_ids": to_ids,
        "uuid": attribute_uuid or str(uuid.uuid4()),
        "timestamp": str(timestamp if timestamp is not None else int(time.time())),
        "distribution": "5",
        "sharing_group_id": "0",
        "comment": "",
        "deleted": deleted,
        "disable_correlation": False,
        "first_seen": None,
        "last_seen": None,
        "Tag": [{"id": str(i), "name": name, "colour": "#ffffff", "exportable": True} for i, name in enumerate(tags)],
    }


def event(org: dict[str, str] | None = None) -> dict[str, Any]:
    org = org or ORG
    return {
        "id": "42",
        "uuid": "5e6e8c2a-7f6c-4a8d-9e1f-0a6b8c2d4e6f",
        "info": "stand-in event",
        "orgc_id": org["id"],
        "org_id": org["id"],
        "Orgc": dict(org),
    }


def notification(action: str, attr: dict[str, Any], org: dict[str, str] | None = None) -> bytes:
    """A frame of MISP's ZeroMQ publisher for an attribute change."""
    body = {"Attribute": attr, "Event": event(org), "action": action}
    return b"misp_json_attribute " + json.dumps(body).encode()


@dataclass
class Recorded:
    sightings: list[dict[str, Any]] = field(default_factory=list)
    searches: list[dict[str, Any]] = field(default_factory=list)
    requests: list[str] = field(default_factory=list)


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    # HTTP/1.0: one request per connection, so no idle keep-alive holds up close().
    protocol_version = "HTTP/1.0"
    timeout = 5

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _reply(self, status: int, body: Any) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _body(self) -> Any:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        return json.loads(raw) if raw else {}

    def _authorised(self) -> bool:
        if self.headers.get("Authorization") == API_KEY:
            return True
        self._reply(403, {"name": "Authentication failed.", "message": "Authentication failed.", "url": self.path})
        return False

    def do_GET(self) -> None:
        misp = self.server.misp
        misp.record(f"GET {self.path}")
        if not self._authorised():
            return
        if self.path == "/servers/getVersion":
            self._reply(
                200,
                {"version": "2.5.2", "pymisp_recommended_version": pymisp.__version__, "perm_sync": False},
            )
        elif self.path == "/users/view/me":
            self._reply(
                200,
                {
                    "User": {"id": "1", "email": "admin@admin.test", "org_id": ORG["id"], "role_id": "1"},
                    "Role": {"id": "1", "name": "admin", "perm_sighting": True},
                    "UserSetting": [],
                    "Organisation": dict(ORG),
                },
            )
        elif self.path == "/attributes/describeTypes.json":
            self._reply(200, {"result": describe_types})
        else:
            self._reply(404, {"name": "Not Found", "message": "Not Found", "url": self.path})

    def do_POST(self) -> None:
        misp = self.server.misp
        misp.record(f"POST {self.path}")
        if not self._authorised():
            return
        try:
            body = self._body()
        except ValueError:
            self._reply(400, {"name": "Bad Request", "message": "Invalid JSON", "url": self.path})
            return
        failure = misp.take_failure()
        if failure is not None:
            self._reply(failure, {"name": "Internal error", "message": "stand-in failure", "url": self.path})
            return
        if self.path == "/attributes/restSearch":
            self._reply(200, {"response": {"Attribute": misp.search(body)}})
            return
        match = re.fullmatch(r"/sightings/add(?:/([^/]+))?", self.path)
        if match:
            target = match.group(1) or body.get("uuid") or body.get("id")
            found = misp.find(target)
            if found is None:
                self._reply(404, {"name": "Invalid attribute.", "message": "Invalid attribute.", "url": self.path})
                return
            sighting = {
                "id": str(len(misp.recorded.sightings) + 1),
                "attribute_id": found["id"],
                "attribute_uuid": found["uuid"],
                "type": str(body.get("type", "0")),
                "source": body.get("source", ""),
                "date_sighting": str(body.get("timestamp", int(time.time()))),
                "uuid": str(uuid.uuid4()),
            }
            with misp.lock:
                misp.recorded.sightings.append(sighting)
            self._reply(200, {"Sighting": sighting})
            return
        self._reply(404, {"name": "Not Found", "message": "Not Found", "url": self.path})


class _Server(ThreadingHTTPServer):
    daemon_threads = False
    block_on_close = True

    def __init__(self, misp: FakeMisp, port: int) -> None:
        self.misp = misp
        super().__init__(("127.0.0.1", port), _Handler)


class FakeMisp(StoppableWorker):
    """The stand-in: HTTP API on ``url``, ZeroMQ publisher on ``zmq_port`` (any free ports unless given)."""

    def __init__(self, http_port: int = 0, zmq_port: int = 0) -> None:
        super().__init__(name="fake-misp")
        self.lock = threading.Lock()
        self.attributes: dict[str, dict[str, Any]] = {}  # uuid -> attribute with its "Event"
        self.recorded = Recorded()
        self._failures: list[int] = []
        self.server = _Server(self, http_port)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.context = zmq.Context()
        self.pub = self.context.socket(zmq.XPUB)
        self.pub.setsockopt(zmq.LINGER, 0)
        if zmq_port:
            self._bind(zmq_port)
            self.zmq_port = zmq_port
        else:
            self.zmq_port = self.pub.bind_to_random_port("tcp://127.0.0.1")

    def _bind(self, port: int, timeout: float = 5.0) -> None:
        # A port a stand-in closed a moment ago may still be held by the closing socket.
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.pub.bind(f"tcp://127.0.0.1:{port}")
                return
            except zmq.ZMQError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    # ---- HTTP state -----------------------------------------------------

    def run(self) -> None:
        self.server.serve_forever(poll_interval=0.1)

    def close(self) -> None:
        self.stop()
        self.server.shutdown()
        self.join(5)
        self.server.server_close()
        self.pub.close(linger=0)
        self.context.term()

    def record(self, line: str) -> None:
        with self.lock:
            self.recorded.requests.append(line)

    def store(self, attr: dict[str, Any], org: dict[str, str] | None = None) -> dict[str, Any]:
        """Keep an attribute for searches and sightings; returns it."""
        with self.lock:
            self.attributes[attr["uuid"]] = {**attr, "Event": event(org)}
        return attr

    def find(self, target: str | None) -> dict[str, Any] | None:
        with self.lock:
            if target in self.attributes:
                return self.attributes[target]
            return next((a for a in self.attributes.values() if a["id"] == target), None)

    def fail_next(self, count: int, status: int = 500) -> None:
        """The next ``count`` POST requests get ``status``."""
        with self.lock:
            self._failures.extend([status] * count)

    def take_failure(self) -> int | None:
        with self.lock:
            return self._failures.pop(0) if self._failures else None

    def search(self, query: dict[str, Any]) -> list[dict[str, Any]]:
        with self.lock:
            self.recorded.searches.append(query)
            found = sorted(self.attributes.values(), key=lambda a: int(a["timestamp"]))
        if str(query.get("to_ids")) in ("1", "True", "true"):
            found = [a for a in found if a["to_ids"]]
        since = query.get("timestamp")
        if since is not None:
            found = [a for a in found if int(a["timestamp"]) >= int(since)]
        limit, page = query.get("limit"), query.get("page") or 1
        if limit:
            found = found[(int(page) - 1) * int(limit) : int(page) * int(limit)]
        return found

    def sightings(self) -> list[dict[str, Any]]:
        with self.lock:
            return list(self.recorded.sightings)

    # ---- ZeroMQ -------------------------------------------------------

    def wait_subscribed(self, timeout: float = 10.0) -> None:
        """Wait until a subscriber (the plugin) subscribed to attribute notifications."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.pub.poll(100) and self.pub.recv().startswith(b"\x01misp_json_attribute"):
                return
        raise AssertionError(f"nobody subscribed to the stand-in's ZeroMQ feed within {timeout}s")

    def publish(self, action: str, attr: dict[str, Any], org: dict[str, str] | None = None) -> None:
        self.pub.send(notification(action, attr, org))

    def publish_raw(self, frame: bytes | list[bytes]) -> None:
        if isinstance(frame, list):
            self.pub.send_multipart(frame)
        else:
            self.pub.send(frame)
