"""The identity of one Threat Bus node, and where it keeps state on disk."""

from __future__ import annotations

import hashlib
import os
import socket
from dataclasses import dataclass
from pathlib import Path

from threatbus.errors import ConfigError, PluginError

# Relative to the working directory, one folder per node name (node.data_dir).
DEFAULT_DATA_ROOT = "threatbus-data"


@dataclass(frozen=True)
class Node:
    """Who this node is, for logs, metrics and per-node broker resources.

    ``name`` comes from the config (``node.name``, default the host name).
    ``instance`` is stable across restarts of the same node but differs
    between nodes on one host: it is derived from the host name, the node
    name and the path of the config file. ``data_dir`` (``node.data_dir``)
    is where plugins keep what must survive a crash; ``None`` (in-process
    tests, embedded use) means they keep it in memory.
    """

    name: str
    instance: str
    data_dir: Path | None = None

    @classmethod
    def create(cls, name: str | None = None, config_path: str | None = None, data_dir: str | None = None) -> Node:
        host = socket.gethostname()
        name = name or host
        seed = f"{host}\0{name}\0{config_path or ''}".encode()
        return cls(
            name=name,
            instance=hashlib.sha256(seed).hexdigest()[:12],
            data_dir=Path(data_dir).resolve() if data_dir else None,
        )

    @staticmethod
    def default_data_dir(name: str) -> str:
        return str(Path(DEFAULT_DATA_ROOT) / name)

    def check_data_dir(self) -> None:
        """ConfigError unless ``data_dir`` is a writable directory or can be created."""
        if self.data_dir is None:
            return
        existing = self.data_dir
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
        if not existing.is_dir():
            raise ConfigError(f"node.data_dir: {str(existing)!r} exists and is not a directory")
        if not os.access(existing, os.W_OK | os.X_OK):
            raise ConfigError(f"node.data_dir: {str(existing)!r} is not writable")

    def state_dir(self, plugin: str) -> Path | None:
        """``<data_dir>/<plugin>``, created if needed; ``None`` without a data_dir. Raises ``PluginError``."""
        if self.data_dir is None:
            return None
        path = self.data_dir / plugin
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise PluginError(f"cannot create the state directory {str(path)!r} (node.data_dir): {err}") from None
        return path
