"""Client processes of the benchmark, steered over pipes by the orchestrator."""

from __future__ import annotations

import contextlib
import multiprocessing
import time
from collections.abc import Callable
from typing import Any

# spawn: children start clean (no inherited threads or sockets), the same on every platform.
CONTEXT = multiprocessing.get_context("spawn")


class ChildError(RuntimeError):
    """A client process failed or did not answer in time."""


class Child:
    """One client process and the orchestrator's end of its pipe."""

    def __init__(self, name: str, target: Callable[..., None], *args: Any) -> None:
        self.name = name
        self.conn, child_conn = CONTEXT.Pipe()
        self.process = CONTEXT.Process(target=target, args=(child_conn, *args), name=name)
        self.process.start()
        child_conn.close()

    def receive(self, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while not self.conn.poll(0.1):
            if not self.process.is_alive():
                raise ChildError(f"{self.name} exited with code {self.process.exitcode}")
            if time.monotonic() > deadline:
                raise ChildError(f"{self.name} did not answer within {timeout:.0f}s")
        message = self.conn.recv()
        if message.get("event") == "error" or "error" in message:
            raise ChildError(f"{self.name}: {message.get('error')}")
        return message

    def expect(self, event: str, timeout: float) -> dict[str, Any]:
        message = self.receive(timeout)
        if message.get("event") != event:
            raise ChildError(f"{self.name}: expected {event!r}, got {message!r}")
        return message

    def send(self, cmd: str, **fields: Any) -> None:
        self.conn.send({"cmd": cmd, **fields})

    def request(self, cmd: str, timeout: float, **fields: Any) -> dict[str, Any]:
        self.send(cmd, **fields)
        return self.receive(timeout)

    def stop(self, timeout: float = 10.0) -> None:
        if self.process.is_alive():
            with contextlib.suppress(BrokenPipeError, OSError):
                self.send("stop")
            self.process.join(timeout)
        if self.process.is_alive():
            self.process.terminate()
            self.process.join(5)
        self.conn.close()


def shared_counter() -> Any:
    """An integer shared between processes without a lock (one writer each)."""
    return CONTEXT.RawValue("q", 0)


def stop_all(children: list[Child]) -> None:
    for child in children:
        child.stop()
