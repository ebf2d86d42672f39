"""The backbone's state directory under ``node.data_dir``, held by one node process at a time."""

from __future__ import annotations

import fcntl
import logging
import os
from pathlib import Path

from threatbus.errors import PluginError
from threatbus.node import Node

logger = logging.getLogger(__name__)

LOCK_FILE = "lock"


class StateDir:
    """``<node.data_dir>/rabbitmq``, locked (``flock``) while the backbone runs.

    Two nodes writing one outbox would send each other's messages and lose
    track of what was confirmed: the second one is refused at start.
    The kernel drops the lock when the process dies, SIGKILL included.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None

    @classmethod
    def open(cls, node: Node, plugin: str) -> StateDir | None:
        """The locked state directory, or ``None`` when the node has no data_dir. Raises ``PluginError``."""
        path = node.state_dir(plugin)
        if path is None:
            return None
        state = cls(path)
        state.lock()
        return state

    def lock(self) -> None:
        lock_path = self.path / LOCK_FILE
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise PluginError(
                f"{self.path} is in use by another Threat Bus process (pid {holder}): "
                "give every node its own node.data_dir (or node.name)"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # releases the flock
            self._fd = None
