"""The config section ``plugins.backbones.rabbitmq``: validators and the resolved settings."""

from __future__ import annotations

import logging
import socket
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pika
from dynaconf import Validator

from threatbus.config import choice, count, option, port, readable_file, seconds
from threatbus.errors import ConfigError
from threatbus.node import Node

logger = logging.getLogger(__name__)

NAME = "rabbitmq"
PREFIX = f"plugins.backbones.{NAME}"
AMQP_PORT = 5672
AMQPS_PORT = 5671
QUEUE_TYPES = ("classic", "quorum")
STATE_KINDS = ("disk", "memory")
OUTBOX_MAX_BYTES = 256 * 1024 * 1024


def _host_port(entry: str) -> tuple[str, int | None]:
    """``host``, ``host:port`` or ``[v6]:port``; ValueError if malformed."""
    entry = entry.strip()
    if entry.startswith("["):
        host, _, rest = entry[1:].partition("]")
        if rest and not rest.startswith(":"):
            raise ValueError(entry)
        port_text = rest[1:] if rest else None
    elif entry.count(":") == 1:
        host, _, port_text = entry.partition(":")
    else:  # a name, or an IPv6 address without brackets (and so without port)
        host, port_text = entry, None
    if not host or (port_text is not None and not port_text.isdigit()):
        raise ValueError(entry)
    number = int(port_text) if port_text else None
    if number is not None and not 0 < number < 65536:
        raise ValueError(entry)
    return host, number


def _broker_list(value: Any) -> bool:
    if not value or not all(isinstance(entry, str) for entry in value):
        return False
    try:
        for entry in value:
            _host_port(entry)
    except ValueError:
        return False
    return True


def validators() -> list[Any]:
    """Validators (with defaults) of every key; see README.md for what each means."""
    p = PREFIX
    return [
        # --- the keys of the original Threat Bus (WIRE.md) ---
        option(f"{p}.host", str, default="localhost", check=bool, expected="a host name"),
        port(f"{p}.port", default=None),
        # Several brokers (a cluster): tried in turn, the next one when a connection fails. Overrides host/port.
        option(
            f"{p}.hosts",
            list,
            default=None,
            check=_broker_list,
            expected="a non-empty list of 'host:port' strings (port optional, 1-65535)",
        ),
        option(f"{p}.username", str, default="guest"),
        option(f"{p}.password", str, default=None),
        option(f"{p}.vhost", str, default="/"),
        option(f"{p}.exchange_name", str, default="threatbus", check=bool, expected="a non-empty string"),
        option(f"{p}.queue", dict, default={}),
        option(f"{p}.queue.name_suffix", str, default=None, check=bool, expected="a non-empty string"),
        option(f"{p}.queue.name_join_symbol", str, default="."),
        option(f"{p}.queue.durable", bool, default=True),
        option(f"{p}.queue.auto_delete", bool, default=False),
        option(f"{p}.queue.lazy", bool, default=True),
        option(f"{p}.queue.exclusive", bool, default=False),
        count(f"{p}.queue.max_items", default=0, minimum=0),
        # --- additions of this release ---
        choice(f"{p}.queue.type", QUEUE_TYPES, default="classic"),
        readable_file(f"{p}.password_file", default=None),
        option(f"{p}.exchange_durable", bool, default=False),
        option(f"{p}.bridge_exchange", str, default=None),
        option(f"{p}.ssl", dict, default={}),
        option(f"{p}.ssl.enabled", bool, default=False),
        readable_file(f"{p}.ssl.ca_file", default=None),
        readable_file(f"{p}.ssl.cert_file", default=None),
        readable_file(f"{p}.ssl.key_file", default=None),
        option(f"{p}.ssl.verify", bool, default=True),
        option(f"{p}.ssl.server_hostname", str, default=None),
        count(f"{p}.heartbeat", default=30, minimum=0, expected="seconds >= 0 (0 disables)"),
        seconds(f"{p}.connect_timeout", default=10.0),
        count(f"{p}.prefetch", default=200),
        count(f"{p}.max_in_flight", default=1000),
        count(f"{p}.outbox_size", default=100_000),
        count(f"{p}.outbox_max_bytes", default=OUTBOX_MAX_BYTES, expected="bytes, an integer > 0"),
        choice(f"{p}.state", STATE_KINDS, default="disk"),
        count(f"{p}.dedup_window", default=100_000, minimum=0),
        option(f"{p}.reconnect", dict, default={}),
        seconds(f"{p}.reconnect.initial", default=0.5),
        seconds(f"{p}.reconnect.max", default=30.0),
        seconds(f"{p}.stop_timeout", default=5.0),
        seconds(
            f"{p}.wait_for_subscribers", default=15.0, exclusive=False, expected="seconds >= 0 (0 consumes at once)"
        ),
        # Rules across keys, after the keys (their defaults filled in). Static messages: a section may
        # hold a password, never echo it.
        _rule(f"{p}.reconnect", _backoff_ordered, f"{p}.reconnect.max must be >= reconnect.initial"),
        _rule(f"{p}.ssl", _key_with_cert, f"{p}.ssl.key_file is set but ssl.cert_file is not: set both or neither"),
        _rule(p, _bridge_differs, f"{p}.bridge_exchange must differ from exchange_name"),
        _rule(f"{p}.queue", _quorum_compatible, f"{p}.queue.type quorum {QUORUM_NEEDS}"),
    ]


def _rule(name: str, condition: Any, message: str) -> Validator:
    def valid(value: Any) -> bool:
        try:
            return value is None or bool(condition(value))
        except (TypeError, ValueError):
            return True  # a wrong type is reported by the key's own validator

    return Validator(name, condition=valid, messages={"condition": message})


def _backoff_ordered(section: Any) -> bool:
    return float(section["max"]) >= float(section["initial"])


def _key_with_cert(section: Any) -> bool:
    return not section.get("key_file") or bool(section.get("cert_file"))


def _bridge_differs(section: Any) -> bool:
    return section["bridge_exchange"] != section["exchange_name"]


QUORUM_NEEDS = "needs queue.durable true, queue.exclusive false and queue.auto_delete false"


def _quorum_conflicts(section: Any) -> list[str]:
    """The queue keys at odds with ``type: quorum`` (RabbitMQ's quorum queues are durable and shared)."""
    if section.get("type") != "quorum":
        return []
    wrong = {"durable": False, "exclusive": True, "auto_delete": True}
    return [f"queue.{key}" for key, bad in wrong.items() if section.get(key, not bad) == bad]


def _quorum_compatible(section: Any) -> bool:
    return not _quorum_conflicts(section)


def _get(config: Any, dotted: str) -> Any:
    """The value at ``a.b`` of the section, None where the way there is missing (a section not validated)."""
    value: Any = config
    for part in dotted.split("."):
        if value is None:
            return None
        value = value.get(part) if hasattr(value, "get") else None
    return value


@dataclass(frozen=True)
class BrokerSettings:
    """Everything the publisher and consumer need, resolved once at start from the validated section.

    The defaults are in ``validators`` only.
    """

    host: str
    port: int
    vhost: str
    username: str
    password: str
    # Every broker to try, in order (host/port are the first); a cluster's nodes with `hosts`.
    addresses: tuple[tuple[str, int], ...]
    ssl: bool
    exchange: str
    exchange_durable: bool
    bridge_exchange: str  # empty: publish straight to `exchange`
    queue_name: str
    queue_durable: bool
    queue_auto_delete: bool
    queue_exclusive: bool
    queue_type: str
    queue_arguments: tuple[tuple[str, Any], ...]
    heartbeat: int
    connect_timeout: float
    prefetch: int
    max_in_flight: int
    outbox_size: int
    outbox_max_bytes: int
    state_on_disk: bool  # the outbox and the dedup window in node.data_dir
    dedup_window: int
    reconnect_initial: float
    reconnect_max: float
    stop_timeout: float
    wait_for_subscribers: float
    node_name: str
    ssl_options: pika.SSLOptions | None
    ssl_server_hostname: str  # empty: the host connected to

    @property
    def url(self) -> str:
        """Where we connect (the first broker), for log lines (never with the password)."""
        return self.url_of(0)

    @property
    def brokers(self) -> tuple[tuple[str, int], ...]:
        return self.addresses or ((self.host, self.port),)

    def url_of(self, index: int) -> str:
        host, port = self.brokers[index % len(self.brokers)]
        scheme = "amqps" if self.ssl else "amqp"
        vhost = "" if self.vhost == "/" else self.vhost
        return f"{scheme}://{self.username}@{host}:{port}/{vhost}"

    @property
    def publish_exchange(self) -> str:
        return self.bridge_exchange or self.exchange

    @property
    def quorum(self) -> bool:
        return self.queue_type == "quorum"

    @property
    def persistent(self) -> bool:
        return self.queue_durable

    def _ssl_for(self, host: str) -> pika.SSLOptions | None:
        # Several brokers: check each one's certificate against its own name (unless ssl.server_hostname).
        if self.ssl_options is None or len(self.brokers) == 1 or self.ssl_server_hostname:
            return self.ssl_options
        return pika.SSLOptions(self.ssl_options.context, host)

    def parameters(self, role: str, index: int = 0) -> pika.ConnectionParameters:
        """Connection parameters for one connection to broker ``index`` (``role`` names it on the broker)."""
        host, port = self.brokers[index % len(self.brokers)]
        return pika.ConnectionParameters(
            host=host,
            port=port,
            virtual_host=self.vhost,
            credentials=pika.PlainCredentials(self.username, self.password),
            heartbeat=self.heartbeat,
            ssl_options=self._ssl_for(host),
            connection_attempts=1,
            socket_timeout=self.connect_timeout,
            stack_timeout=self.connect_timeout * 2,
            blocked_connection_timeout=None,
            client_properties={
                "connection_name": f"threatbus {self.node_name} {role} {self.queue_name}",
                "product": "threatbus-rabbitmq",
            },
        )


def default_queue_suffix(node: Node) -> str:
    """Unique per node, stable across its restarts: ``<host name>.<node instance>``."""
    return f"{socket.gethostname()}.{node.instance}"


def _password(config: Any) -> str:
    password_file = _get(config, "password_file")
    password = _get(config, "password")
    if password_file:
        if password is not None:
            logger.warning("both password and password_file are set in %s: using password_file", PREFIX)
        try:
            return Path(password_file).read_text().rstrip("\r\n")
        except OSError as err:
            raise ConfigError(f"{PREFIX}.password_file: cannot read {password_file!r}: {err}") from None
    return "guest" if password is None else str(password)


def _ssl_options(config: Any, host: str) -> pika.SSLOptions:
    ca_file = _get(config, "ssl.ca_file")
    cert_file = _get(config, "ssl.cert_file")
    key_file = _get(config, "ssl.key_file")
    verify = _get(config, "ssl.verify") is not False  # only an explicit false turns checking off
    if key_file and not cert_file:
        raise ConfigError(f"{PREFIX}.ssl.key_file is set but ssl.cert_file is not: set both or neither")
    try:
        context = ssl.create_default_context(cafile=ca_file)
        if not verify:
            logger.warning("%s.ssl.verify is false: the broker's certificate is NOT checked", PREFIX)
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        if cert_file:
            context.load_cert_chain(cert_file, key_file)
    except (OSError, ssl.SSLError) as err:
        raise ConfigError(f"{PREFIX}.ssl: cannot load CA/certificate/key: {err}") from None
    return pika.SSLOptions(context, server_hostname=_get(config, "ssl.server_hostname") or host)


def _addresses(hosts: Any, host: str, default_port: int) -> tuple[tuple[str, int], ...]:
    """``hosts`` (port default: ``port``, else 5672/5671) or else the single ``host``. Raises ``ConfigError``."""
    if not hosts:
        return ((host, default_port),)
    if isinstance(hosts, str) or not _broker_list(hosts):
        raise ConfigError(f"{PREFIX}.hosts must be a non-empty list of 'host:port' strings, got {hosts!r}")
    addresses = []
    for entry in hosts:
        name, number = _host_port(entry)
        addresses.append((name, number or default_port))
    return tuple(addresses)


def resolve(config: Any, node: Node) -> BrokerSettings:
    """Turn the validated config section into ``BrokerSettings``. Raises ``ConfigError``."""
    host = _get(config, "host")
    use_ssl = bool(_get(config, "ssl.enabled"))
    exchange = _get(config, "exchange_name")
    exchange_durable = bool(_get(config, "exchange_durable"))
    bridge = _get(config, "bridge_exchange")
    if bridge is None:
        # A durable exchange only adds something when the main one is not durable.
        bridge = "" if exchange_durable else f"{exchange}.durable"
    if bridge == exchange:
        raise ConfigError(f"{PREFIX}.bridge_exchange must differ from exchange_name ({exchange!r})")
    suffix = _get(config, "queue.name_suffix") or default_queue_suffix(node)
    queue_type = _get(config, "queue.type")
    conflicts = _quorum_conflicts(_get(config, "queue"))
    if conflicts:
        raise ConfigError(f"{PREFIX}.queue.type quorum {QUORUM_NEEDS}; at odds: {', '.join(conflicts)}")
    arguments: dict[str, Any]
    if queue_type == "quorum":
        # Quorum queues refuse x-queue-mode (406) and ignore the exclusive flag of basic.consume
        # (RabbitMQ 3.10): single active consumer keeps a second node on the queue standing by.
        arguments = {"x-queue-type": "quorum", "x-single-active-consumer": True}
    else:
        # Exactly the original's declaration (no x-queue-type): existing queues stay compatible.
        arguments = {"x-queue-mode": "lazy" if _get(config, "queue.lazy") else "default"}
    max_items = int(_get(config, "queue.max_items"))
    if max_items > 0:
        arguments["x-max-length"] = max_items
    reconnect_initial = float(_get(config, "reconnect.initial"))
    reconnect_max = float(_get(config, "reconnect.max"))
    if reconnect_max < reconnect_initial:
        raise ConfigError(
            f"{PREFIX}.reconnect.max ({reconnect_max}) must be >= reconnect.initial ({reconnect_initial})"
        )
    default_port = int(_get(config, "port") or (AMQPS_PORT if use_ssl else AMQP_PORT))
    addresses = _addresses(_get(config, "hosts"), host, default_port)
    return BrokerSettings(
        host=addresses[0][0],
        port=addresses[0][1],
        addresses=addresses,
        vhost=_get(config, "vhost"),
        username=_get(config, "username"),
        password=_password(config),
        ssl=use_ssl,
        exchange=exchange,
        exchange_durable=exchange_durable,
        bridge_exchange=bridge,
        queue_name=f"threatbus{_get(config, 'queue.name_join_symbol')}{suffix}",
        queue_durable=bool(_get(config, "queue.durable")),
        queue_auto_delete=bool(_get(config, "queue.auto_delete")),
        queue_exclusive=bool(_get(config, "queue.exclusive")),
        queue_type=queue_type,
        queue_arguments=tuple(arguments.items()),
        heartbeat=int(_get(config, "heartbeat")),
        connect_timeout=float(_get(config, "connect_timeout")),
        prefetch=int(_get(config, "prefetch")),
        max_in_flight=int(_get(config, "max_in_flight")),
        outbox_size=int(_get(config, "outbox_size")),
        outbox_max_bytes=int(_get(config, "outbox_max_bytes")),
        state_on_disk=_get(config, "state") == "disk",
        dedup_window=int(_get(config, "dedup_window")),
        reconnect_initial=reconnect_initial,
        reconnect_max=reconnect_max,
        stop_timeout=float(_get(config, "stop_timeout")),
        wait_for_subscribers=float(_get(config, "wait_for_subscribers")),
        node_name=node.name,
        ssl_options=_ssl_options(config, host) if use_ssl else None,
        ssl_server_hostname=_get(config, "ssl.server_hostname") or "",
    )
