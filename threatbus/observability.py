"""Per-node HTTP endpoints: ``GET /metrics`` (Prometheus) and ``GET /health`` (JSON).

Configured by the top-level ``http`` section (``http.host``, default
127.0.0.1; ``http.port``, default null = off, 0 = any free port). Off by
default so that several nodes on one host never collide on a port and an
upgrade from the original Threat Bus opens no new port; the local cluster
tool and the files in deploy/ turn it on with one port per node.

``/health`` answers 200 while the backbone reports ``connected`` (and not
``blocked`` by the broker's flow control), else 503, so it serves as a
readiness probe (container health checks, load balancers, ``threatbus
cluster up``).

Where the backbone keeps its dead letters in the node (inmem), they are
served under ``/dlq`` for ``threatbus dlq``: ``GET /dlq?limit=N``,
``GET /dlq/<id>``, ``POST /dlq/replay`` (``{"ids": [...]}`` or
``{"all": true}``) and ``POST /dlq/purge``.
"""

from __future__ import annotations

import json
import logging
import socket
import sys
from collections.abc import Callable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from prometheus_client import CONTENT_TYPE_LATEST

from threatbus import __version__
from threatbus.deadletters import DEFAULT_LIST_LIMIT, DeadLetters
from threatbus.errors import ThreatBusError
from threatbus.metrics import Metrics
from threatbus.node import Node
from threatbus.worker import POLL_INTERVAL, StoppableWorker

logger = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1"
NODE_INFO = "threatbus_node_info"  # gauge{instance, version}, always 1: who this node is
# A client that sends nothing for this long is dropped, so a stop is never held up by one.
REQUEST_TIMEOUT = 5.0
JSON_TYPE = "application/json"
MAX_REQUEST_BODY = 1024 * 1024


class _Server(ThreadingHTTPServer):
    # Request threads are joined by server_close(): nothing that owns a socket is a daemon thread.
    daemon_threads = False
    block_on_close = True
    timeout = POLL_INTERVAL  # handle_request() returns at least this often

    def __init__(self, address: tuple[str, int], endpoints: ObservabilityServer) -> None:
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.endpoints = endpoints
        super().__init__(address, _Handler)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # The default prints a traceback to stderr; a client that hangs up early is no error of ours.
        if isinstance(sys.exc_info()[1], ConnectionError):
            logger.debug("HTTP client %s went away", client_address[0])
        else:
            logger.exception("error serving an HTTP request from %s", client_address[0])


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    timeout = REQUEST_TIMEOUT
    # HTTP/1.0: one request per connection, so no idle keep-alive holds up a stop.
    server_version = f"threatbus/{__version__}"

    def do_GET(self) -> None:
        self._respond(head=False)

    def do_HEAD(self) -> None:
        self._respond(head=True)

    def do_POST(self) -> None:
        url = urlsplit(self.path)
        length = int(self.headers.get("Content-Length") or 0)
        if not url.path.startswith("/dlq") or not 0 <= length <= MAX_REQUEST_BODY:
            self._send(HTTPStatus.NOT_FOUND, "text/plain; charset=utf-8", b"not found\n", head=False)
            return
        status, content_type, body = self.server.endpoints.dlq_response(
            "POST", url.path, url.query, self.rfile.read(length)
        )
        self._send(status, content_type, body, head=False)

    def _respond(self, head: bool) -> None:
        url = urlsplit(self.path)
        path = url.path.rstrip("/") or "/"
        endpoints = self.server.endpoints
        if path == "/metrics":
            status, content_type, body = endpoints.metrics_response()
        elif path == "/health":
            status, content_type, body = endpoints.health_response()
        elif path == "/dlq" or path.startswith("/dlq/"):
            status, content_type, body = endpoints.dlq_response("GET", path, url.query, b"")
        else:
            status, content_type = HTTPStatus.NOT_FOUND, "text/plain; charset=utf-8"
            body = b"not found: try /metrics or /health\n"
        self._send(status, content_type, body, head)

    def _send(self, status: int, content_type: str, body: bytes, head: bool) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        # Scrapes every few seconds would flood the log at INFO.
        logger.debug("%s %s", self.address_string(), format % args)


class ObservabilityServer(StoppableWorker):
    """Serves the metrics and health of one node from its own thread.

    The socket is bound in the constructor, so a port in use fails the
    start of the node at once with a clear error instead of in a thread.
    """

    def __init__(
        self,
        metrics: Metrics,
        health: Callable[[], dict[str, Any]],
        node: Node,
        host: str = DEFAULT_HOST,
        port: int = 0,
        dead_letters: Callable[[], DeadLetters | None] | None = None,
    ) -> None:
        super().__init__(name="http-endpoints")
        self.metrics = metrics
        self.health = health
        self.dead_letters = dead_letters or (lambda: None)
        self.node = node
        try:
            self.server = _Server((host, port), self)
        except OSError as err:
            what = "any free port" if port == 0 else f"port {port}"
            raise ThreatBusError(
                f"cannot serve metrics and health on {host} {what}: {err.strerror or err}; "
                "choose another http.host/http.port (or set http.port to null to turn the endpoints off)"
            ) from None
        self.host = host
        self.port: int = self.server.server_address[1]
        metrics.gauge(
            NODE_INFO,
            "Identity of this Threat Bus node (always 1)",
            lambda: 1,
            instance=node.instance,
            version=__version__,
        )

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def run(self) -> None:
        logger.info("metrics on %s/metrics, health on %s/health", self.url, self.url)
        try:
            while not self.stopping:
                self.server.handle_request()
        except Exception:
            logger.exception("the metrics and health endpoints failed; they stay off until a restart")
        finally:
            self.server.server_close()

    def release(self) -> None:
        """Release the socket of a server that was never started (``run`` closes it otherwise)."""
        if self.ident is None:
            self.server.server_close()

    # ---- responses -----------------------------------------------------

    def metrics_response(self) -> tuple[int, str, bytes]:
        try:
            return HTTPStatus.OK, CONTENT_TYPE_LATEST, self.metrics.render()
        except Exception as err:
            logger.exception("cannot render metrics")
            return HTTPStatus.INTERNAL_SERVER_ERROR, "text/plain; charset=utf-8", f"metrics failed: {err}\n".encode()

    def health_response(self) -> tuple[int, str, bytes]:
        report = self.health_report()
        status = HTTPStatus.OK if report["status"] == "ok" else HTTPStatus.SERVICE_UNAVAILABLE
        return status, JSON_TYPE, json.dumps(report, default=str, sort_keys=True).encode() + b"\n"

    def health_report(self) -> dict[str, Any]:
        """``{"node", "instance", "version", "status": "ok"|"unavailable", "backbone": {...}}``."""
        report: dict[str, Any] = {"node": self.node.name, "instance": self.node.instance, "version": __version__}
        try:
            backbone = dict(self.health() or {})
        except Exception as err:
            logger.exception("the backbone failed to report its health")
            backbone = {"connected": False, "error": str(err)}
        report["backbone"] = backbone
        # Blocked by the broker's flow control (memory or disk alarm): connected, yet nothing gets published.
        healthy = backbone.get("connected") is True and not backbone.get("blocked")
        report["status"] = "ok" if healthy else "unavailable"
        return report

    def dlq_response(self, method: str, path: str, query: str, body: bytes) -> tuple[int, str, bytes]:
        """The ``/dlq`` endpoints (see the module's docstring)."""
        store = self.dead_letters()
        if store is None:
            return _json(HTTPStatus.NOT_FOUND, {"error": "this node's backbone keeps no dead letters in the node"})
        try:
            if method == "GET" and path == "/dlq":
                limit = int(parse_qs(query).get("limit", [DEFAULT_LIST_LIMIT])[0])
                return _json(HTTPStatus.OK, {"dead_letters": [letter.to_json() for letter in store.list(limit)]})
            if method == "GET":
                letter = store.get(unquote(path[len("/dlq/") :]))
                if letter is None:
                    return _json(HTTPStatus.NOT_FOUND, {"error": "no such dead letter"})
                return _json(HTTPStatus.OK, letter.to_json())
            request = json.loads(body or b"{}")
            if path == "/dlq/replay" and isinstance(request, dict):
                ids = request.get("ids")
                if request.get("all") is True:
                    result = store.replay(None)
                elif isinstance(ids, list) and ids and all(isinstance(i, str) for i in ids):
                    result = store.replay(ids)
                else:
                    return _json(HTTPStatus.BAD_REQUEST, {"error": 'send {"ids": ["..."]} or {"all": true}'})
                logger.info(
                    "dead letters replayed over HTTP: %d (%d not found)", len(result.replayed), len(result.not_found)
                )
                return _json(HTTPStatus.OK, {"replayed": result.replayed, "not_found": result.not_found})
            if path == "/dlq/purge":
                purged = store.purge()
                logger.info("dead letters purged over HTTP: %d", purged)
                return _json(HTTPStatus.OK, {"purged": purged})
        except ValueError as err:
            return _json(HTTPStatus.BAD_REQUEST, {"error": str(err)})
        return _json(HTTPStatus.NOT_FOUND, {"error": "not found"})


def _json(status: int, data: Any) -> tuple[int, str, bytes]:
    return status, JSON_TYPE, json.dumps(data).encode() + b"\n"
