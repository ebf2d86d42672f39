"""Fixtures of the Zeek plugin's tests: a stand-in for Zeek's WebSocket API.

Zeek cannot be installed on our machines, so the tests talk to
``ZeekStandIn``, a WebSocket server that follows the documented protocol
(Broker's "Web Socket / JSON API v1" and Zeek's "Interacting with Zeek using
WebSockets") and nothing more:

- it serves ``/v1/messages/json`` only;
- the client's first message must be a JSON array of topic prefixes; the
  server answers ``{"type": "ack", "endpoint": <uuid>, "version": <str>}``,
  or an ``error`` message and closes when the handshake is malformed;
- every later client message must be a ``data-message``; the stand-in parses
  it with zeek-client's independent implementation of Broker's data model
  (``zeekclient.brokertypes``) and answers malformed input with an ``error``
  message ("deserialization_failed"), as Broker does;
- ``publish`` sends a Zeek event (``[1, 1, [name, args, metadata]]``, the Zeek 8
  layout with a metadata vector) to every client subscribed to a prefix of
  the topic.
"""

from __future__ import annotations

import json
import queue
import shutil
import ssl
import subprocess
import threading
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.server import ServerConnection, serve
from zeekclient import brokertypes

from threatbus.testing import free_port

WEBSOCKET_PATH = "/v1/messages/json"


@dataclass
class Received:
    """One data message a client sent, as zeek-client's brokertypes parsed it."""

    topic: str
    raw: dict[str, Any]
    event: brokertypes.ZeekEvent | None
    # True if brokertypes re-encode the message exactly as it was sent: same types, same layout.
    canonical: bool


@dataclass
class Client:
    connection: ServerConnection
    topics: list[str]
    headers: dict[str, str] = field(default_factory=dict)


class ZeekStandIn:
    """A WebSocket endpoint that behaves like Zeek's WebSocket API (see module docstring)."""

    def __init__(self, port: int | None = None, ssl_context: ssl.SSLContext | None = None) -> None:
        self.port = port or free_port()
        self.ssl_context = ssl_context
        self.endpoint = str(uuid.uuid4())
        self.handshakes: queue.Queue[Client] = queue.Queue()
        self.received: queue.Queue[Received] = queue.Queue()
        self.errors_sent: list[dict[str, Any]] = []
        self.refuse_handshake = False
        self._clients: list[Client] = []
        self._lock = threading.Lock()
        self._server: Any = None
        self._thread: threading.Thread | None = None

    # ---- lifecycle ---------------------------------------------------------

    def start(self) -> ZeekStandIn:
        self._server = serve(self._handle, "127.0.0.1", self.port, ssl=self.ssl_context, compression=None)
        self._thread = threading.Thread(target=self._server.serve_forever, name="zeek-standin")
        self._thread.start()
        return self

    def stop(self) -> None:
        """Go away like a stopped Zeek: close every connection and stop listening."""
        if self._server is None:
            return
        self._server.shutdown()
        with self._lock:
            clients, self._clients = self._clients, []
        for client in clients:
            client.connection.close()
        if self._thread is not None:
            self._thread.join(5)
        self._server = None

    def restart(self) -> None:
        self.stop()
        self.start()

    @property
    def clients(self) -> list[Client]:
        with self._lock:
            return list(self._clients)

    # ---- protocol ------------------------------------------------------------

    def _error(self, connection: ServerConnection, code: str, context: str) -> None:
        message = {"type": "error", "code": code, "context": context}
        self.errors_sent.append(message)
        connection.send(json.dumps(message))

    def _handle(self, connection: ServerConnection) -> None:
        if connection.request is None or connection.request.path != WEBSOCKET_PATH:
            connection.close(1008, "unknown path")
            return
        try:
            topics = json.loads(connection.recv(timeout=5))
        except (TimeoutError, ValueError, ConnectionClosed):
            connection.close()
            return
        if self.refuse_handshake or not isinstance(topics, list) or not all(isinstance(t, str) for t in topics):
            self._error(connection, "deserialization_failed", "expected a JSON array of topic strings")
            connection.close()
            return
        client = Client(connection, topics, dict(connection.request.headers.raw_items()))
        connection.send(json.dumps({"type": "ack", "endpoint": self.endpoint, "version": "standin-8.0.0"}))
        with self._lock:
            self._clients.append(client)
        self.handshakes.put(client)
        try:
            for raw in connection:
                self._receive(connection, raw)
        except ConnectionClosed:
            pass
        finally:
            with self._lock:
                self._clients = [c for c in self._clients if c is not client]

    def _receive(self, connection: ServerConnection, raw: str | bytes) -> None:
        if not isinstance(raw, str):
            self._error(connection, "deserialization_failed", "binary frames are not allowed")
            return
        try:
            message = brokertypes.DataMessage.unserialize(raw)
        except TypeError as err:
            self._error(connection, "deserialization_failed", str(err))
            return
        event = None
        if isinstance(message.data, brokertypes.Vector):
            try:
                event = brokertypes.ZeekEvent.from_vector(message.data)
            except TypeError:
                event = None
        raw_json = json.loads(raw)
        self.received.put(Received(message.topic, raw_json, event, message.to_broker() == raw_json))

    # ---- sending -------------------------------------------------------------

    def send_raw(self, text: str) -> None:
        for client in self.clients:
            client.connection.send(text)

    def publish(self, topic: str, name: str, *args: brokertypes.Type, metadata: bool = True) -> int:
        """Send event ``name(args)`` to the clients subscribed to ``topic``; returns how many got it."""
        body = brokertypes.ZeekEvent(name, *args).to_broker()
        if metadata:
            body["data"][2]["data"].append({"@data-type": "vector", "data": []})
        message = json.dumps({"type": "data-message", "topic": topic, **body})
        sent = 0
        for client in self.clients:
            if any(topic.startswith(prefix) for prefix in client.topics):
                client.connection.send(message)
                sent += 1
        return sent

    def wait_for_client(self, timeout: float = 10.0) -> Client:
        try:
            return self.handshakes.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no client completed the handshake within {timeout}s") from None

    def next_event(self, timeout: float = 10.0) -> Received:
        try:
            return self.received.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"the stand-in received nothing within {timeout}s") from None


@pytest.fixture
def zeek() -> Any:
    standin = ZeekStandIn().start()
    try:
        yield standin
    finally:
        standin.stop()


@pytest.fixture
def make_zeek() -> Any:
    """Start stand-ins with custom arguments (port, TLS); all are stopped at the end of the test."""
    created: list[ZeekStandIn] = []

    def make(**kwargs: Any) -> ZeekStandIn:
        standin = ZeekStandIn(**kwargs).start()
        created.append(standin)
        return standin

    yield make
    for standin in created:
        standin.stop()


@pytest.fixture
def zeek_config(zeek: ZeekStandIn) -> dict[str, Any]:
    """The ``plugins`` section for a bus whose Zeek app talks to the stand-in."""
    return {"apps": {"zeek": {"host": "127.0.0.1", "port": zeek.port}}}


@dataclass
class TlsFiles:
    cert: Path
    key: Path

    def server_context(self) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(self.cert, self.key)
        return context


@pytest.fixture
def tls_files(tmp_path: Path) -> TlsFiles:
    """A self-signed certificate for 127.0.0.1 / localhost, made with the openssl command."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("the openssl command is needed to make a test certificate (apt-get install openssl)")
    cert, key = tmp_path / "zeek.crt", tmp_path / "zeek.key"
    subprocess.run(
        [
            openssl,
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=DNS:localhost,IP:127.0.0.1",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
        timeout=30,
    )
    return TlsFiles(cert, key)


__all__ = ["Received", "TlsFiles", "ZeekStandIn"]
