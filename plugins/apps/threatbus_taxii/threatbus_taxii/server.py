"""TAXII out, the protocol: medallion's TAXII 2.1 views over a backend that reads ``ServedIntel``.

medallion (the OASIS reference server) implements the endpoints, the
content negotiation and the errors; ``IntelBackend`` is its pluggable
backend, answering from the plugin's state: one API root with one
read-only collection. medallion keeps its Flask app and user table in
module globals, so the plugin builds a Flask app of its own, registers
medallion's blueprints on it, and checks credentials itself in front of it
(``AuthGate``), which also allows anonymous access.
"""

from __future__ import annotations

import base64
import hmac
import logging
import secrets
import socket
import ssl
from collections.abc import Callable, Iterable
from datetime import datetime
from functools import partialmethod
from typing import Any

import medallion
import orjson
from flask import Flask, request
from medallion.backends.base import Backend
from medallion.exceptions import BackendError, ProcessingError
from medallion.views import MEDIA_TYPE_TAXII_V21, collections, discovery, manifest, objects
from werkzeug.serving import BaseWSGIServer, WSGIRequestHandler

from threatbus.errors import PluginError
from threatbus.lifecycle import parse_timestamp
from threatbus.worker import POLL_INTERVAL, StoppableWorker
from threatbus_taxii.intel import Served, ServedIntel
from threatbus_taxii.settings import ServeSettings

logger = logging.getLogger(__name__)

MEDIA_TYPE_STIX_V21 = "application/stix+json;version=2.1"
# Seconds a client may take to send its request before the (one-at-a-time) server drops it.
CLIENT_TIMEOUT = 10


class IntelBackend(Backend):
    """A medallion backend with one API root and one read-only collection: the served intel."""

    def __init__(self, intel: ServedIntel, settings: ServeSettings) -> None:
        self.intel = intel
        self.settings = settings
        self.requests = 0

    # ---- server, API root, collection ----------------------------------

    def server_discovery(self) -> dict[str, Any]:
        root = f"{request.host_url}{self.settings.api_root}/"
        return {
            "title": "Threat Bus",
            "description": "Threat intelligence currently active on this Threat Bus",
            "default": root,
            "api_roots": [root],
        }

    def get_api_root_information(self, api_root: str) -> dict[str, Any] | None:
        if api_root != self.settings.api_root:
            return None
        return {
            "title": "Threat Bus",
            "description": "Read-only intel of the bus",
            "versions": [MEDIA_TYPE_TAXII_V21],
            "max_content_length": 0,
        }

    def _collection(self) -> dict[str, Any]:
        return {
            "id": self.settings.collection_id,
            "title": self.settings.title,
            "description": self.settings.description,
            "can_read": True,
            "can_write": False,
            "media_types": [MEDIA_TYPE_STIX_V21],
        }

    def get_collections(self, api_root: str) -> dict[str, Any] | None:
        if api_root != self.settings.api_root:
            return None
        return {"collections": [self._collection()]}

    def get_collection(self, api_root: str, collection_id: str) -> dict[str, Any] | None:
        if api_root != self.settings.api_root or collection_id != self.settings.collection_id:
            return None
        return self._collection()

    def get_status(self, api_root: str, status_id: str) -> None:
        return None  # read-only: no add requests, so no statuses

    # ---- objects ---------------------------------------------------------

    def get_objects(
        self, api_root: str, collection_id: str, filter_args: dict[str, str], allowed_filters: Iterable[str], limit: int
    ) -> tuple[dict[str, Any], dict[str, str]]:
        page, more, headers = self._page(filter_args, allowed_filters, limit)
        return _envelope("objects", [item.payload for item in page], more, page), headers

    def get_object_manifest(
        self, api_root: str, collection_id: str, filter_args: dict[str, str], allowed_filters: Iterable[str], limit: int
    ) -> tuple[dict[str, Any], dict[str, str]]:
        page, more, headers = self._page(filter_args, allowed_filters, limit)
        entries = [
            {
                "id": item.payload["id"],
                "date_added": item.date_added_text,
                "version": _version(item.payload),
                "media_type": MEDIA_TYPE_STIX_V21,
            }
            for item in page
        ]
        return _envelope("objects", entries, more, page), headers

    def _object(
        self,
        versions_only: bool,
        api_root: str,
        collection_id: str,
        object_id: str,
        filter_args: dict[str, str],
        allowed_filters: Iterable[str],
        limit: int,
    ) -> tuple[dict[str, Any], dict[str, str]]:
        """The served versions of one object, 404 when there are none.

        ``get_object`` (the versions after the filters, as objects) and
        ``get_object_versions`` (the version of each; filters do not apply).
        """
        if versions_only:
            filter_args, allowed_filters = {}, ()
        page, more, headers = self._page({**filter_args, "match[id]": object_id}, ("id", *allowed_filters), limit)
        if not page:
            raise ProcessingError(f"Object '{object_id}' not found", 404)
        if versions_only:
            return {"more": False, "versions": [_version(item.payload) for item in page]}, headers
        return _envelope("objects", [item.payload for item in page], more, page), headers

    get_object = partialmethod(_object, False)
    get_object_versions = partialmethod(_object, True)

    def add_objects(self, *args: Any, **kwargs: Any) -> None:
        raise ProcessingError("This collection is read-only", 403)

    def delete_object(self, *args: Any, **kwargs: Any) -> None:
        raise ProcessingError("This collection is read-only", 403)

    def _page(
        self, filter_args: dict[str, str], allowed_filters: Iterable[str], limit: int
    ) -> tuple[list[Served], bool, dict[str, str]]:
        """One page of the served intel after the filters, oldest date added first.

        ``next`` is the date added of the last object returned: stateless
        paging that neither skips nor repeats while the intel changes.
        """
        self.requests += 1
        after = None
        for name in ("added_after", "next"):
            if filter_args.get(name):
                stamp = _parse_time(filter_args[name], name)
                after = stamp if after is None else max(after, stamp)
        page, more = self.intel.page(after, limit, _matcher(filter_args, set(allowed_filters)))
        headers = {}
        if page:
            headers["X-TAXII-Date-Added-First"] = page[0].date_added_text
            headers["X-TAXII-Date-Added-Last"] = page[-1].date_added_text
        return page, more, headers


def _version(payload: dict[str, Any]) -> str:
    return payload.get("modified") or payload.get("created") or ""


def _envelope(key: str, items: list[Any], more: bool, page: list[Served]) -> dict[str, Any]:
    envelope: dict[str, Any] = {"more": more}
    if items:
        envelope[key] = items
    if more:
        envelope["next"] = page[-1].date_added_text
    return envelope


def _parse_time(value: str, name: str) -> datetime:
    try:
        return parse_timestamp(value)
    except (ValueError, IndexError):
        raise ProcessingError(f"The server did not understand the '{name}' parameter: {value[:40]!r}", 400) from None


def _matcher(filter_args: dict[str, str], allowed: set[str]) -> Callable[[dict[str, Any]], bool]:
    """The TAXII 2.1 match filters as one test of a served version (the only version served of its object)."""
    tests: list[Callable[[dict[str, Any]], bool]] = []
    wanted_ids = filter_args.get("match[id]")
    if wanted_ids and "id" in allowed:
        ids = set(wanted_ids.split(","))
        tests.append(lambda payload: payload["id"] in ids)
    wanted_types = filter_args.get("match[type]")
    if wanted_types and "type" in allowed:
        types = set(wanted_types.split(","))
        tests.append(lambda payload: payload.get("type") in types)
    wanted_versions = filter_args.get("match[version]")
    # The one version served is the first, the last and (with "all") every version of its object.
    if wanted_versions and "version" in allowed and not set(wanted_versions.split(",")) & {"first", "last", "all"}:
        stamps = {_parse_time(v, "match[version]") for v in wanted_versions.split(",")}
        tests.append(lambda payload: _version(payload) != "" and parse_timestamp(_version(payload)) in stamps)
    wanted_specs = filter_args.get("match[spec_version]")
    if wanted_specs and "spec_version" in allowed and "2.1" not in wanted_specs.split(","):
        tests.append(lambda payload: False)
    return lambda payload: all(test(payload) for test in tests)


class AuthGate:
    """WSGI middleware: HTTP basic auth against the configured users, or anonymous access without users.

    medallion's views insist on basic auth against the user table of the
    app; after our check the request carries an internal credential that
    only that table knows.
    """

    REALM = "Threat Bus TAXII"

    def __init__(self, app: Callable[..., Any], users: dict[str, str], internal: tuple[str, str]) -> None:
        self.app = app
        self.users = {user.encode(): password.encode() for user, password in users.items()}
        self.internal = "Basic " + base64.b64encode(f"{internal[0]}:{internal[1]}".encode()).decode()
        self.refused = 0

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        if self.users and not self._authorised(environ.get("HTTP_AUTHORIZATION", "")):
            self.refused += 1
            logger.info("TAXII request from %s refused: bad or missing credentials", environ.get("REMOTE_ADDR"))
            body = orjson.dumps({"title": "Unauthorized", "http_status": "401", "description": "credentials needed"})
            start_response(
                "401 UNAUTHORIZED",
                [
                    ("Content-Type", MEDIA_TYPE_TAXII_V21),
                    ("Content-Length", str(len(body))),
                    ("WWW-Authenticate", f'Basic realm="{self.REALM}"'),
                ],
            )
            return [body]
        environ["HTTP_AUTHORIZATION"] = self.internal
        return self.app(environ, start_response)

    def _authorised(self, header: str) -> bool:
        scheme, _, encoded = header.partition(" ")
        if scheme.lower() != "basic":
            return False
        try:
            user, _, password = base64.b64decode(encoded, validate=True).partition(b":")
        except ValueError:
            return False
        expected = self.users.get(user)
        # Compare something even for unknown users, so timing does not tell which users exist.
        return hmac.compare_digest(password, expected or secrets.token_bytes(16)) and expected is not None


def create_app(backend: IntelBackend, settings: ServeSettings) -> tuple[Flask, AuthGate]:
    """A Flask app with medallion's TAXII 2.1 views over ``backend``, behind ``AuthGate``."""
    # medallion adds a console handler of its own on import; Threat Bus configures logging once, in its CLI.
    logging.getLogger(medallion.__name__).removeHandler(medallion.ch)
    app = Flask(__name__)
    internal = ("threatbus-internal", secrets.token_urlsafe(24))
    # The attributes medallion's views and its auth callback read from the current app.
    app.medallion_backend = backend  # type: ignore[attr-defined]
    app.taxii_config = {"max_page_size": settings.max_page_size}  # type: ignore[attr-defined]
    app.users_backend = {internal[0]: internal[1]}  # type: ignore[attr-defined]
    for blueprint in (collections.collections_bp, discovery.discovery_bp, manifest.manifest_bp, objects.objects_bp):
        app.register_blueprint(blueprint)
    app.register_error_handler(ProcessingError, medallion.handle_processing_error)
    app.register_error_handler(BackendError, medallion.handle_backend_error)
    app.register_error_handler(500, medallion.handle_error)
    gate = AuthGate(app.wsgi_app, settings.users, internal)
    app.wsgi_app = gate  # type: ignore[method-assign]
    return app, gate


class _RequestHandler(WSGIRequestHandler):
    timeout = CLIENT_TIMEOUT

    def log(self, type: str, message: str, *args: Any) -> None:
        text = f"TAXII {self.address_string()}: {message % args if args else message}".rstrip()
        if type == "error":
            logger.warning("%s", text)
        else:
            logger.debug("%s", text)


class _Server(BaseWSGIServer):
    def handle_error(self, request: Any, client_address: Any) -> None:
        # socketserver would print the traceback to stderr; one bad request must not do more than this.
        logger.exception("TAXII request from %s failed", client_address)


class TaxiiServer(StoppableWorker):
    """Serves the TAXII app with werkzeug, one request at a time, until stopped.

    The socket is bound in the constructor (bind errors become
    ``PluginError`` at start); ``run`` handles requests and looks at the stop
    flag every ``POLL_INTERVAL``. With TLS, the handshake happens on the
    first read, under the client's timeout, not in ``accept``.
    """

    def __init__(self, app: Flask, host: str, port: int, tls: ssl.SSLContext | None = None) -> None:
        super().__init__(name="taxii-server")
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
            family = infos[0][0]
            listener = socket.socket(family, socket.SOCK_STREAM)
            try:
                listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                listener.bind(infos[0][4])
                listener.listen(64)
                # werkzeug exits the process on bind errors: it gets a socket that is already bound.
                self.server = _Server(host, port, app, handler=_RequestHandler, fd=listener.fileno())
            finally:
                listener.close()  # werkzeug works on its own duplicate of the descriptor
        except OSError as err:
            raise PluginError(f"cannot serve TAXII on {host}:{port}: {err}") from err
        if tls is not None:
            self.server.socket = tls.wrap_socket(self.server.socket, server_side=True, do_handshake_on_connect=False)
            self.server.ssl_context = tls  # werkzeug: https URLs, TLS errors logged per request
        self.server.timeout = POLL_INTERVAL
        self.host = host
        self.port = self.server.server_address[1]
        self.scheme = "https" if tls is not None else "http"

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}/"

    def run(self) -> None:
        try:
            while not self.stopping:
                self.server.handle_request()
        finally:
            self.release()

    def release(self) -> None:
        """Close the listening socket (``stop_workers`` calls it for a server that never started)."""
        self.server.server_close()


def server_tls(cert_file: str, key_file: str) -> ssl.SSLContext | None:
    """The server's TLS context from its certificate and key, None without them."""
    if not cert_file:
        return None
    try:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(cert_file, key_file or None)
    except (OSError, ssl.SSLError) as err:
        raise PluginError(f"plugins.apps.taxii.serve.tls: cannot load certificate and key: {err}") from err
    return context


__all__ = ["AuthGate", "IntelBackend", "TaxiiServer", "create_app", "server_tls"]
