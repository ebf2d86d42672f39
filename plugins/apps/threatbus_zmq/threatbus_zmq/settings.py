"""The zmq plugin's settings: validators with the defaults, and the frozen settings built from them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from threatbus.config import count, option, port, seconds
from threatbus.errors import PluginError
from threatbus_zmq.wire import endpoint

NAME = "zmq"
PREFIX = f"plugins.apps.{NAME}"

# The three endpoints, in the order the settings name their ports.
ENDPOINTS = ("manage", "pub", "sub")


def validators() -> list[Any]:
    """Every key of ``plugins.apps.zmq`` with its default; see README.md."""
    return [
        option(f"{PREFIX}.host", str, default="127.0.0.1", check=bool, expected="a host name or IP address"),
        port(f"{PREFIX}.manage", default=13370),
        port(f"{PREFIX}.pub", default=13371),
        port(f"{PREFIX}.sub", default=13372),
        seconds(
            f"{PREFIX}.heartbeat_timeout",
            default=120,
            exclusive=False,
            expected="a number of seconds >= 0 (0 disables expiry)",
        ),
        count(f"{PREFIX}.buffer_size", default=10_000, expected="a positive number of messages"),
        # Frames queued towards one app inside ZeroMQ before the bus buffers (and, when full, drops) for it.
        count(f"{PREFIX}.send_hwm", default=1000, expected="a positive number of frames"),
        count(f"{PREFIX}.max_subscribers", default=1000, expected="a positive number"),
    ]


@dataclass(frozen=True)
class ZmqSettings:
    """The plugin's settings, built from its validated section (the defaults are in ``validators``)."""

    host: str
    ports: dict[str, int]  # endpoint name (ENDPOINTS) -> port
    heartbeat_timeout: float  # seconds; 0: subscriptions never expire
    buffer_size: int
    send_hwm: int
    max_subscribers: int

    @classmethod
    def from_config(cls, config: Any) -> ZmqSettings:
        """Raises ``PluginError`` when two endpoints share a port."""
        ports = {name: int(config[name]) for name in ENDPOINTS}
        if len(set(ports.values())) != len(ENDPOINTS):
            raise PluginError(f"{PREFIX}: manage, pub and sub need three different ports, got {ports}")
        return cls(
            host=config["host"],
            ports=ports,
            heartbeat_timeout=float(config["heartbeat_timeout"]),
            buffer_size=int(config["buffer_size"]),
            send_hwm=int(config["send_hwm"]),
            max_subscribers=int(config["max_subscribers"]),
        )

    @property
    def ipv6(self) -> bool:
        return ":" in self.host

    def endpoint(self, name: str) -> str:
        """The tcp endpoint of ``manage``, ``pub`` or ``sub``."""
        return endpoint(self.host, self.ports[name])
