"""The sensors' stand-ins as processes of their own (their RSS and CPU are measured apart from the node).

Each runs the stand-in the plugin's tests use (``threatbus_suricata.testing.FakeSuricata``,
``threatbus_zeek.testing.ZeekStandIn``) and answers the orchestrator over a
pipe (``benchmark.procs.Child``): ``held`` -> how many detections or intel
items it holds now, and when its first client connected; ``stop``.
"""

from __future__ import annotations

import contextlib
import queue
from pathlib import Path
from typing import Any


def _serve(conn: Any, standin: Any, first_client: Any) -> None:
    conn.send({"event": "ready"})
    while True:
        if not conn.poll(1.0):
            continue
        command = conn.recv()
        if command.get("cmd") == "stop":
            break
        if command.get("cmd") == "held":
            conn.send({"event": "held", "held": standin.held(), "connected_at": first_client()})


def suricata(conn: Any, socket_path: str, rules_file: str) -> None:
    """A Suricata command socket at ``socket_path`` whose reloads read ``rules_file``."""
    from threatbus_suricata.testing import FakeSuricata

    fake = FakeSuricata(socket_path, rules_file=Path(rules_file), keep_commands=False, background_reloads=True)
    fake.start()
    try:
        _serve(conn, fake, lambda: None)
    finally:
        fake.close()


def zeek(conn: Any, port: int) -> None:
    """Zeek's WebSocket API on 127.0.0.1:``port``, applying intel events as threatbus.zeek does."""
    from threatbus_zeek.testing import ZeekStandIn

    standin = ZeekStandIn(port=port, keep_received=False)
    connected: list[float] = []

    def first_client() -> float | None:
        if not connected:
            with contextlib.suppress(queue.Empty):
                connected.append(standin.handshakes.get_nowait().connected_at)
        return connected[0] if connected else None

    standin.start()
    try:
        _serve(conn, standin, first_client)
    finally:
        standin.stop()
