"""Fixtures of the Zeek plugin's tests: the stand-in for Zeek's WebSocket API
(``threatbus_zeek.testing.ZeekStandIn``, see there) and TLS files."""

from __future__ import annotations

import shutil
import ssl
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from threatbus_zeek.testing import Received, ZeekStandIn


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
