"""The zeek plugin's settings: validators with the defaults, and the frozen settings built from them."""

from __future__ import annotations

import re
import ssl
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from threatbus.config import count, empty_or, in_writable_dir, matching, option, port, snapshot_days, tls_files
from threatbus.errors import PluginError
from threatbus_zeek import broker

PLUGIN = "zeek"
PREFIX = f"plugins.apps.{PLUGIN}"

# The cipher Broker selects for TLS without certificates.
ANONYMOUS_CIPHERS = "AECDH-AES256-SHA"

# Intel items per add_intels event, by default (config key batch_size).
BATCH_SIZE = 500
MAX_BATCH_SIZE = 10_000

_NAMESPACE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(::[A-Za-z_][A-Za-z0-9_]*)*$")


def validators() -> list[Any]:
    """Every key of ``plugins.apps.zeek`` with its default; see README.md."""
    return [
        option(f"{PREFIX}.host", str, default="127.0.0.1", check=bool, expected="a host name or address"),
        port(f"{PREFIX}.port", default=9997),
        matching(
            f"{PREFIX}.module_namespace",
            _NAMESPACE,
            default="ThreatBus",
            expected="a Zeek module name such as ThreatBus",
        ),
        snapshot_days(f"{PREFIX}.snapshot"),
        count(f"{PREFIX}.queue_size", default=0, minimum=0, expected="a number of indicators >= 0 (0: unbounded)"),
        option(
            f"{PREFIX}.batch_size",
            int,
            default=BATCH_SIZE,
            check=lambda size: 1 <= size <= MAX_BATCH_SIZE,
            expected=f"a number of intel items from 1 to {MAX_BATCH_SIZE} (1: one add_intel event each)",
        ),
        *tls_files(f"{PREFIX}.tls"),
        option(f"{PREFIX}.tls.enabled", bool, default=False),
        option(f"{PREFIX}.tls.skip_verify", bool, default=False),
        option(f"{PREFIX}.tls.anonymous", bool, default=False),
        empty_or(
            f"{PREFIX}.state_file",
            in_writable_dir,
            expected="'' (keep the state in memory) or a file path in an existing, writable directory",
        ),
    ]


@dataclass(frozen=True)
class ZeekSettings:
    """The plugin's settings, built from its validated section (the defaults are in ``validators``)."""

    host: str
    port: int
    module_namespace: str
    snapshot_days: float
    queue_size: int
    batch_size: int
    tls: bool
    ca_file: str
    cert_file: str
    key_file: str
    skip_verify: bool
    anonymous: bool
    state_file: str

    @classmethod
    def from_config(cls, config: Any) -> ZeekSettings:
        tls = config["tls"]
        return cls(
            host=config["host"],
            port=int(config["port"]),
            module_namespace=config["module_namespace"],
            snapshot_days=float(config["snapshot"]),
            queue_size=int(config["queue_size"]),
            batch_size=int(config["batch_size"]),
            tls=bool(tls["enabled"]),
            ca_file=tls["ca_file"],
            cert_file=tls["cert_file"],
            key_file=tls["key_file"],
            skip_verify=bool(tls["skip_verify"]),
            anonymous=bool(tls["anonymous"]),
            state_file=config["state_file"],
        )

    @property
    def uri(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'wss' if self.tls or self.anonymous else 'ws'}://{host}:{self.port}{broker.WEBSOCKET_PATH}"

    @property
    def snapshot(self) -> timedelta:
        return timedelta(days=self.snapshot_days)

    @property
    def match_event(self) -> str:
        return f"{self.module_namespace}::intel_match"

    def ssl_context(self) -> ssl.SSLContext | None:
        """The client TLS context, or None for plain ``ws://``. Raises ``PluginError`` on bad files."""
        if self.anonymous:
            return _anonymous_context()
        if not self.tls:
            return None
        try:
            context = ssl.create_default_context(cafile=self.ca_file or None)
            if self.cert_file:
                context.load_cert_chain(self.cert_file, self.key_file or None)
        except (OSError, ssl.SSLError) as err:
            raise PluginError(f"{PREFIX}.tls: cannot load certificates: {err}") from err
        if self.skip_verify:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        return context


def _anonymous_context() -> ssl.SSLContext:
    """TLS as Broker speaks it by default (Zeek 5.x to 7.x without certificates): anonymous ECDH ciphers.

    This encrypts but authenticates neither side.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    try:
        context.set_ciphers(ANONYMOUS_CIPHERS + "@SECLEVEL=0")
    except ssl.SSLError:
        try:
            context.set_ciphers(ANONYMOUS_CIPHERS)
        except ssl.SSLError as err:
            raise PluginError(f"{PREFIX}.tls.anonymous: this OpenSSL has no anonymous ciphers: {err}") from err
    return context
