"""The command socket client against the stand-in Suricata (Suricata cannot be
installed here; threatbus_suricata.testing follows its documented protocol)."""

from __future__ import annotations

import socket
import threading
from pathlib import Path
from typing import Any

import pytest

from threatbus_suricata.suricata_socket import CommandFailed, SocketError, SuricataSocket


def test_handshake_commands_and_refusals(suricata: Any) -> None:
    client = SuricataSocket(suricata.path, timeout=2)
    assert client.command("version") == "7.0.0 stand-in"
    assert suricata.handshakes == ["0.2"]
    with pytest.raises(CommandFailed, match="set not found or wrong type"):
        client.command("dataset-add", {"setname": "nope", "settype": "ip", "datavalue": "1.2.3.4"})
    with pytest.raises(CommandFailed, match="Unknown command"):
        client.command("no-such-command")
    assert client.command("reload-rules") == "done"
    assert suricata.names() == ["version", "dataset-add", "no-such-command", "reload-rules"]
    assert suricata.handshakes == ["0.2"]  # one connection for all of them
    client.close()


def test_missing_socket_is_a_socket_error(short_dir: Path) -> None:
    with pytest.raises(SocketError, match="cannot talk to Suricata"):
        SuricataSocket(str(short_dir / "absent.socket"), timeout=1).command("version")


def test_a_server_that_answers_garbage_is_a_socket_error(short_dir: Path) -> None:
    path = str(short_dir / "garbage.socket")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(1)

    def answer() -> None:
        conn, _ = server.accept()
        with conn:
            conn.recv(1024)
            conn.sendall(b"this is not json\n")

    thread = threading.Thread(target=answer)
    thread.start()
    try:
        with pytest.raises(SocketError, match="unreadable reply"):
            SuricataSocket(path, timeout=2).connect()
    finally:
        thread.join(5)
        server.close()
