"""TLS: the backbone speaks AMQP inside a verified TLS session (amqps).

The shared test broker has no TLS listener, so a local TLS server stands in
for it: it completes the handshake with its own certificate and records the
AMQP protocol header the client sends through the tunnel.
"""

from __future__ import annotations

import socket
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from testbus import running_bus

from threatbus.testing import wait_until
from threatbus_rabbitmq import RabbitMQBackbone

AMQP_HEADER = b"AMQP\x00\x00\x09\x01"


class TlsServer(threading.Thread):
    """Accepts TLS connections on 127.0.0.1 and keeps the first 8 bytes each client sends."""

    def __init__(self, cert: Path, key: Path) -> None:
        super().__init__(name="tls-test-server")
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.load_cert_chain(cert, key)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.1)
        self.port = self.listener.getsockname()[1]
        self.headers: list[bytes] = []
        self.handshake_errors: list[str] = []
        self._closed = threading.Event()

    def run(self) -> None:
        while not self._closed.is_set():
            try:
                raw, _ = self.listener.accept()
            except TimeoutError:
                continue
            # One thread per connection: a client held open by the backbone must not
            # keep the next one waiting in the backlog until its handshake times out.
            threading.Thread(target=self._serve, args=(raw,), name="tls-test-connection", daemon=True).start()

    def _serve(self, raw: socket.socket) -> None:
        raw.settimeout(5)
        try:
            with self.context.wrap_socket(raw, server_side=True) as tls:
                header = b""
                while len(header) < len(AMQP_HEADER):
                    chunk = tls.recv(len(AMQP_HEADER) - len(header))
                    if not chunk:
                        break
                    header += chunk
                if header:  # an empty read is a client that gave up before speaking: nothing to check
                    self.headers.append(header)
        except (ssl.SSLError, OSError) as err:
            self.handshake_errors.append(str(err))
            raw.close()

    def close(self) -> None:
        self._closed.set()
        self.join(5)
        self.listener.close()


@pytest.fixture
def tls_server(tls_files: tuple[Path, Path, Path]) -> Iterator[TlsServer]:
    _ca, cert, key = tls_files
    server = TlsServer(cert, key)
    server.start()
    yield server
    server.close()


def backbone_config(port: int, **ssl_section: Any) -> dict[str, Any]:
    section = {"host": "localhost", "port": port, "ssl": {"enabled": True, **ssl_section}}
    section["reconnect"] = {"initial": 0.2, "max": 0.5}
    section["stop_timeout"] = 1.0
    return {"backbones": {"rabbitmq": section}}


def test_amqp_goes_through_a_verified_tls_session(tls_server, tls_files):
    ca, cert, key = tls_files
    config = backbone_config(tls_server.port, ca_file=str(ca), cert_file=str(cert), key_file=str(key))
    with running_bus(backbones={"rabbitmq": RabbitMQBackbone()}, plugin_config=config, node_name="tls-node"):
        wait_until(lambda: len(tls_server.headers) >= 2, 15, what="publisher and consumer to speak AMQP over TLS")
    assert set(tls_server.headers) == {AMQP_HEADER}


def test_an_untrusted_broker_certificate_is_refused_and_retried(tls_server, caplog):
    # No ca_file: the system's CAs do not vouch for the test server's self-signed certificate.
    config = backbone_config(tls_server.port)
    with running_bus(backbones={"rabbitmq": RabbitMQBackbone()}, plugin_config=config, node_name="tls-node") as bus:
        wait_until(
            lambda: (
                sum(
                    "CERTIFICATE_VERIFY_FAILED" in r.getMessage()
                    for r in caplog.records
                    if r.name.startswith("threatbus_rabbitmq")
                )
                >= 3
            ),
            15,
            what="repeated certificate errors",
        )
        assert not bus.health()["connected"]
    assert tls_server.headers == []
    assert tls_server.handshake_errors
