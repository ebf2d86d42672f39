"""A client of Suricata's unix command socket.

The protocol (Suricata user guide, "Interacting via Unix Socket"): the
client sends ``{"version": "0.2"}``, Suricata answers ``{"return": "OK"}``;
then every command is one JSON object ``{"command": name, "arguments": {...}}``
followed by a newline, and every answer one JSON object
``{"return": "OK" | "NOK", "message": ...}`` followed by a newline.
"""

from __future__ import annotations

import logging
import socket
from typing import Any

import orjson

from threatbus.data import describe, json_object
from threatbus.errors import DecodeError

logger = logging.getLogger(__name__)

PROTOCOL_VERSION = "0.2"
MAX_REPLY_BYTES = 16 * 1024 * 1024


class SocketError(Exception):
    """The socket is unreachable or the conversation broke off."""


class CommandFailed(Exception):
    """Suricata answered NOK; the message is Suricata's."""


class SuricataSocket:
    """One connection to Suricata's command socket, opened on first use."""

    def __init__(self, path: str, timeout: float = 5.0) -> None:
        self.path = path
        self.timeout = timeout
        self._sock: socket.socket | None = None
        self._buffer = b""

    @property
    def connected(self) -> bool:
        return self._sock is not None

    def connect(self) -> None:
        self.close()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.path)
            # Suricata reads the version with a single recv: no newline needed.
            sock.sendall(orjson.dumps({"version": PROTOCOL_VERSION}))
            self._sock = sock
            reply = self._read_reply()
        except OSError as err:
            sock.close()
            self._sock = None
            raise SocketError(f"cannot talk to Suricata at {self.path}: {err}") from None
        except SocketError:
            self.close()
            raise
        if reply.get("return") != "OK":
            self.close()
            raise SocketError(f"Suricata at {self.path} refused protocol version {PROTOCOL_VERSION}: {reply!r}")
        logger.debug("connected to Suricata command socket %s", self.path)

    def command(self, name: str, arguments: dict[str, Any] | None = None) -> Any:
        """Run one command; returns Suricata's message. Raises SocketError or CommandFailed.

        A connection that broke since its last use (Suricata restarted) is
        opened again once; the commands the plugin sends are idempotent.
        """
        if self._sock is None:
            self.connect()
            return self._command(name, arguments)
        try:
            return self._command(name, arguments)
        except SocketError as err:
            logger.debug("command socket connection broke (%s); connecting again", err)
            self.connect()
            return self._command(name, arguments)

    def _command(self, name: str, arguments: dict[str, Any] | None) -> Any:
        assert self._sock is not None
        request: dict[str, Any] = {"command": name}
        if arguments is not None:
            request["arguments"] = arguments
        try:
            self._sock.sendall(orjson.dumps(request) + b"\n")
            reply = self._read_reply()
        except OSError as err:
            self.close()
            raise SocketError(f"command {name} to {self.path} failed: {err}") from None
        except SocketError:
            self.close()
            raise
        if reply.get("return") != "OK":
            raise CommandFailed(f"{name}: {reply.get('message')!r}")
        return reply.get("message")

    def _read_reply(self) -> dict[str, Any]:
        assert self._sock is not None
        while b"\n" not in self._buffer:
            chunk = self._sock.recv(65536)
            if not chunk:
                raise SocketError(f"Suricata closed the command socket {self.path}")
            self._buffer += chunk
            if len(self._buffer) > MAX_REPLY_BYTES:
                raise SocketError(f"reply from {self.path} exceeds {MAX_REPLY_BYTES} bytes")
        line, _, self._buffer = self._buffer.partition(b"\n")
        try:
            return json_object(line)
        except DecodeError as err:
            raise SocketError(f"unreadable reply from {self.path}: {err}: {describe(line, 200)}") from None

    def close(self) -> None:
        if self._sock is not None:
            try:
                self._sock.close()
            finally:
                self._sock = None
                self._buffer = b""
