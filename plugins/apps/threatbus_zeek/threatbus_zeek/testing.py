"""A stand-in for Zeek's WebSocket API, for the plugin's tests and the benchmark.

Zeek cannot be installed on our machines, so the tests (and
``benchmark/bulk.py``) talk to ``ZeekStandIn``, a WebSocket server that follows the documented protocol
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

Like the shipped ``threatbus.zeek``, it applies the intel events it receives
to an intel table (``intel``: (indicator, type) -> sources), so that a test
or the benchmark can see what Zeek would hold.
"""

from __future__ import annotations

import json
import queue
import ssl
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

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
    connected_at: float = field(default_factory=time.monotonic)  # when the handshake was acknowledged


class ZeekStandIn:
    """A WebSocket endpoint that behaves like Zeek's WebSocket API (see module docstring)."""

    def __init__(
        self,
        port: int | None = None,
        ssl_context: ssl.SSLContext | None = None,
        keep_received: bool = True,
        namespace: str = "ThreatBus",
    ) -> None:
        self.port = port or free_port()
        self.ssl_context = ssl_context
        self.endpoint = str(uuid.uuid4())
        self.handshakes: queue.Queue[Client] = queue.Queue()
        self.received: queue.Queue[Received] = queue.Queue()
        # False: apply and count the messages only (the benchmark sends a million).
        self.keep_received = keep_received
        self.received_count = 0
        self.namespace = namespace
        # What threatbus.zeek would hold: (indicator, Intel::Type) -> the sources (indicator ids) of the item.
        self.intel: dict[tuple[str, str], set[str]] = {}
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
        received = Received(message.topic, raw_json, event, message.to_broker() == raw_json)
        with self._lock:
            self.received_count += 1
            if event is not None:
                self._apply(event)
        if self.keep_received:
            self.received.put(received)

    def _apply(self, event: brokertypes.ZeekEvent) -> None:
        """Change the intel table as threatbus.zeek's handler of ``event`` changes Zeek's."""
        name = event.name.removeprefix(self.namespace + "::")
        args = [arg.to_py() for arg in event.args]
        if name == "add_intel" and len(args) >= 3:
            self.intel.setdefault((str(args[0]), str(args[1])), set()).add(str(args[2]))
        elif name == "add_intels" and len(args) == 1 and isinstance(args[0], list):
            for record in args[0]:  # ThreatBus::IntelItem records: vectors of their fields
                if isinstance(record, list) and len(record) >= 3:
                    self.intel.setdefault((str(record[0]), str(record[1])), set()).add(str(record[2]))
        elif name == "remove_intel" and len(args) >= 3:
            key = (str(args[0]), str(args[1]))
            sources = self.intel.get(key, set())
            sources.discard(str(args[2]))
            if not sources:
                self.intel.pop(key, None)

    def held(self) -> int:
        """Intel items the stand-in holds."""
        with self._lock:
            return len(self.intel)

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


__all__ = ["WEBSOCKET_PATH", "Client", "Received", "ZeekStandIn"]
