"""The identity of one Threat Bus node."""

from __future__ import annotations

import hashlib
import socket
from dataclasses import dataclass


@dataclass(frozen=True)
class Node:
    """Who this node is, for logs, metrics and per-node broker resources.

    ``name`` comes from the config (``node.name``, default the host name).
    ``instance`` is stable across restarts of the same node but differs
    between nodes on one host: it is derived from the host name, the node
    name and the path of the config file.
    """

    name: str
    instance: str

    @classmethod
    def create(cls, name: str | None = None, config_path: str | None = None) -> Node:
        host = socket.gethostname()
        name = name or host
        seed = f"{host}\0{name}\0{config_path or ''}".encode()
        return cls(name=name, instance=hashlib.sha256(seed).hexdigest()[:12])
