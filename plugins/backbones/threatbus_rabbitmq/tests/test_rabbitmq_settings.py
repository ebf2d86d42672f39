"""The config section of the RabbitMQ backbone, and its small building blocks (no broker needed)."""

from __future__ import annotations

import re
import socket
from pathlib import Path
from typing import Any

import pytest

from threatbus import config as core_config
from threatbus.errors import ConfigError
from threatbus.node import Node
from threatbus.testing import indicator, settings_from
from threatbus_rabbitmq.consumer import Deduplicator
from threatbus_rabbitmq.publisher import Outbox
from threatbus_rabbitmq.settings import PREFIX, BrokerSettings, resolve, validators

README = Path(__file__).parents[1] / "README.md"


def settings_for(section: dict[str, Any], node: Node | None = None) -> BrokerSettings:
    settings = settings_from({"plugins": {"backbones": {"rabbitmq": section}}})
    core_config.validate(settings, validators())
    return resolve(core_config.section(settings, "backbones", "rabbitmq"), node or Node.create("n1"))


def test_defaults_are_those_of_the_original_plus_a_unique_queue():
    node = Node.create("n1", "/etc/threatbus/n1.yaml")
    s = settings_for({}, node)
    assert (s.host, s.port, s.vhost, s.username, s.password) == ("localhost", 5672, "/", "guest", "guest")
    assert s.exchange == "threatbus" and not s.exchange_durable
    assert s.queue_name == f"threatbus.{socket.gethostname()}.{node.instance}"
    assert (s.queue_durable, s.queue_auto_delete, s.queue_exclusive) == (True, False, False)
    assert dict(s.queue_arguments) == {"x-queue-mode": "lazy"}
    assert s.bridge_exchange == "threatbus.durable" and s.publish_exchange == "threatbus.durable"
    assert s.persistent and s.ssl_options is None and s.url == "amqp://guest@localhost:5672/"
    assert (s.prefetch, s.max_in_flight, s.outbox_size, s.dedup_window) == (200, 1000, 100_000, 100_000)
    assert s.queue_type == "classic" and not s.quorum and s.wait_for_subscribers == 15


def test_default_queue_is_stable_per_node_and_differs_between_nodes():
    same = settings_for({}, Node.create("a", "/etc/a.yaml")).queue_name
    assert settings_for({}, Node.create("a", "/etc/a.yaml")).queue_name == same
    assert settings_for({}, Node.create("b", "/etc/a.yaml")).queue_name != same
    assert settings_for({}, Node.create("a", "/etc/other.yaml")).queue_name != same


def test_original_queue_keys_shape_the_declaration():
    s = settings_for(
        {
            "queue": {
                "name_suffix": "sensor7",
                "name_join_symbol": "-",
                "lazy": False,
                "max_items": 50,
                "durable": False,
                "auto_delete": True,
                "exclusive": True,
            }
        }
    )
    assert s.queue_name == "threatbus-sensor7"
    assert dict(s.queue_arguments) == {"x-queue-mode": "default", "x-max-length": 50}
    assert (s.queue_durable, s.queue_auto_delete, s.queue_exclusive, s.persistent) == (False, True, True, False)


def test_quorum_queue_opt_in_declares_without_queue_mode():
    s = settings_for({"queue": {"type": "quorum", "max_items": 10, "lazy": True}, "wait_for_subscribers": 0})
    assert s.quorum and s.persistent and s.wait_for_subscribers == 0
    assert dict(s.queue_arguments) == {"x-queue-type": "quorum", "x-single-active-consumer": True, "x-max-length": 10}
    assert dict(settings_for({"queue": {"type": "classic"}}).queue_arguments) == {"x-queue-mode": "lazy"}


@pytest.mark.parametrize(
    ("queue", "at_odds"),
    [
        ({"durable": False}, "queue.durable"),
        ({"exclusive": True}, "queue.exclusive"),
        ({"auto_delete": True}, "queue.auto_delete"),
        ({"durable": False, "auto_delete": True}, "queue.durable, queue.auto_delete"),
    ],
)
def test_quorum_queue_needs_a_durable_shared_queue(queue, at_odds):
    message = f"{PREFIX}.queue.type quorum needs queue.durable true, queue.exclusive false and queue.auto_delete false"
    with pytest.raises(ConfigError, match=re.escape(message)):
        settings_for({"queue": {"type": "quorum", **queue}})
    # resolve() names exactly the keys at odds (for configs that skipped the validators).
    with pytest.raises(ConfigError, match=re.escape(f"at odds: {at_odds}")):
        resolve({"queue": {"type": "quorum", **queue}}, Node.create("n1"))
    settings_for({"queue": queue})  # fine for a classic queue


def test_durable_exchange_opt_in_and_bridge_choices():
    assert settings_for({"exchange_durable": True}).bridge_exchange == ""
    assert settings_for({"exchange_durable": True}).publish_exchange == "threatbus"
    assert settings_for({"bridge_exchange": ""}).publish_exchange == "threatbus"
    assert settings_for({"exchange_name": "x", "bridge_exchange": "x-keep"}).publish_exchange == "x-keep"


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ({"port": 0}, "port must be a TCP port"),
        ({"port": "5672"}, "port must be a TCP port"),
        ({"prefetch": 0}, "prefetch must be an integer > 0"),
        ({"queue": {"durable": "yes"}}, "queue.durable must be true or false"),
        ({"queue": {"max_items": -1}}, "queue.max_items must be an integer >= 0"),
        ({"ssl": {"ca_file": "/nonexistent/ca.pem"}}, "ssl.ca_file must be the path of a readable file"),
        ({"password_file": "/nonexistent/secret"}, "password_file must be the path of a readable file"),
        ({"reconnect": {"initial": 5, "max": 1}}, "reconnect.max must be >= reconnect.initial"),
        ({"exchange_name": "x", "bridge_exchange": "x"}, "bridge_exchange must differ from exchange_name"),
        ({"queue": {"type": "stream"}}, "queue.type must be one of classic, quorum"),
        ({"wait_for_subscribers": -1}, "wait_for_subscribers must be seconds >= 0 (0 consumes at once)"),
    ],
)
def test_invalid_values_name_the_key(section, message):
    with pytest.raises(ConfigError, match=re.escape(f"{PREFIX}.{message}")):
        settings_for(section)


def test_password_from_a_file_or_the_environment(tmp_path, monkeypatch):
    secret = tmp_path / "secret"
    secret.write_text("s3cret\n")
    assert settings_for({"password_file": str(secret)}).password == "s3cret"
    assert "s3cret" not in settings_for({"password_file": str(secret)}).url

    path = tmp_path / "config.yaml"
    path.write_text("plugins:\n  backbones:\n    rabbitmq:\n      password: in-file\n")
    monkeypatch.setenv("THREATBUS_PLUGINS__BACKBONES__RABBITMQ__PASSWORD", "from-env")
    settings, _ = core_config.load(path)
    core_config.validate(settings, validators())
    assert resolve(core_config.section(settings, "backbones", "rabbitmq"), Node.create("n")).password == "from-env"


def test_tls_settings(tmp_path, tls_files):
    ca, cert, key = tls_files
    s = settings_for({"ssl": {"enabled": True, "ca_file": str(ca), "cert_file": str(cert), "key_file": str(key)}})
    assert s.port == 5671 and s.url.startswith("amqps://")
    assert s.ssl_options is not None and s.ssl_options.server_hostname == "localhost"
    assert s.parameters("publisher").ssl_options is s.ssl_options
    with pytest.raises(ConfigError, match=re.escape(f"{PREFIX}.ssl.key_file is set but ssl.cert_file is not")):
        settings_for({"ssl": {"enabled": True, "key_file": str(key)}})
    with pytest.raises(ConfigError, match="cannot load CA/certificate/key"):
        settings_for({"ssl": {"enabled": True, "ca_file": str(key)}})


def test_deduplicator_forgets_the_oldest_beyond_its_window():
    dedup = Deduplicator(3)
    assert [dedup.seen(k) for k in "abca"] == [False, False, False, True]
    assert not dedup.seen("d")  # evicts "a"
    assert not dedup.seen("a") and len(dedup) == 3
    assert not Deduplicator(0).seen("a") and not Deduplicator(0).seen("a")


def test_outbox_is_bounded_and_counts_what_it_drops():
    outbox = Outbox(2)
    assert outbox.put(indicator("1.1.1.1")) and outbox.put(indicator("1.1.1.2"))
    assert not outbox.put(indicator("1.1.1.3"))
    assert len(outbox) == 2 and outbox.dropped == 1


def test_readme_documents_every_config_key():
    text = README.read_text()
    keys = [v.names[0].removeprefix(f"{PREFIX}.") for v in validators()]
    missing = [key for key in keys if f"`{key}`" not in text]
    assert not missing, f"README.md does not document: {missing}"


def test_a_config_error_never_echoes_the_password():
    with pytest.raises(ConfigError) as caught:
        settings_for({"password": "hunter2", "exchange_name": "x", "bridge_exchange": "x", "reconnect": {"max": 0.1}})
    assert "hunter2" not in str(caught.value)
    assert "reconnect.max must be" in str(caught.value) and "bridge_exchange must differ" in str(caught.value)
