"""Every default is written once, in a validator: a key left null (``key: ~``) gets it, as a missing key does.

For each plugin's settings and each of its keys with a default, the
settings built from a section with that key null must equal the settings
built without the key. The plugins build their settings from the validated
section without fallbacks, so a null the validators let through would show
here as a None in the settings or a crash in ``from_config``.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from dynaconf.validator import empty
from threatbus_misp import settings as misp
from threatbus_taxii import settings as taxii

from threatbus import config, history
from threatbus.node import Node
from threatbus.testing import settings_from
from threatbus_rabbitmq import deadletter
from threatbus_rabbitmq import intel_log as rabbitmq_log
from threatbus_rabbitmq import settings as rabbitmq
from threatbus_suricata import settings as suricata
from threatbus_zeek import settings as zeek
from threatbus_zmq import settings as zmq

INMEM = "plugins.backbones.inmem"
# What LogSettings and DeadLetterSettings read of the broker settings.
BROKER: Any = type("Broker", (), {"exchange": "threatbus", "ssl": False, "queue_name": "threatbus.n1"})()
ZMQ_FEED = {"zmq": {"host": "127.0.0.1", "port": 50000}}
KAFKA_FEED = {"kafka": {"topics": ["misp_attribute"]}}


@dataclass(frozen=True)
class Plugin:
    id: str
    kind: str
    name: str
    validators: Callable[[], list[Any]]
    build: Callable[[Any], Any]  # the plugin's settings from its validated section
    base: Callable[[Path], dict[str, Any]] = lambda _tmp_path: {}  # what the section needs beside defaults

    def keys_with_defaults(self, base: dict[str, Any]) -> list[str]:
        """Keys (relative to the section) with a default other than None that ``base`` leaves out."""
        prefix = f"plugins.{self.kind}.{self.name}."
        keys = []
        for validator in self.validators():
            if validator.default is empty or validator.default is None:
                continue
            if validator.when is not None and validator.when.names[0].removeprefix(prefix) not in base:
                continue  # an optional section this base leaves out: its defaults do not apply
            keys.extend(str(key).removeprefix(prefix) for key in validator.names)
        return [key for key in keys if key not in base]

    def built(self, section: dict[str, Any]) -> Any:
        settings = settings_from({"plugins": {self.kind: {self.name: section}}})
        config.validate(settings, self.validators())
        return self.build(config.section(settings, self.kind, self.name))


def suricata_base(tmp_path: Path) -> dict[str, Any]:
    # The defaults of these three are system paths this test cannot write: set here, they are not tested null.
    (tmp_path / "eve.json").touch()
    return {"rules_file": str(tmp_path / "threatbus.rules"), "socket": "/tmp/s.sock", "eve": str(tmp_path / "eve.json")}


ZEEK = Plugin("zeek", "apps", "zeek", zeek.validators, zeek.ZeekSettings.from_config)
TAXII = Plugin("taxii", "apps", "taxii", taxii.validators, taxii.TaxiiSettings.from_config)
MISP_ZMQ = Plugin(
    "misp-zmq", "apps", "misp", misp.validators, misp.MispSettings.from_config, lambda _: copy.deepcopy(ZMQ_FEED)
)
MISP_KAFKA = Plugin(
    "misp-kafka", "apps", "misp", misp.validators, misp.MispSettings.from_config, lambda _: copy.deepcopy(KAFKA_FEED)
)
PLUGINS = [
    ZEEK,
    TAXII,
    MISP_ZMQ,
    MISP_KAFKA,
    Plugin("zmq", "apps", "zmq", zmq.validators, zmq.ZmqSettings.from_config),
    Plugin("suricata", "apps", "suricata", suricata.validators, suricata.SuricataSettings.from_config, suricata_base),
    Plugin(
        "rabbitmq",
        "backbones",
        "rabbitmq",
        rabbitmq.validators,
        lambda section: rabbitmq.resolve(section, Node.create("n1")),
    ),  # The sections several backbones share, or that the rabbitmq backbone resolves beside its broker settings.
    Plugin(
        "inmem-history", "backbones", "inmem", lambda: history.validators(INMEM), history.HistorySettings.from_config
    ),
    Plugin(
        "rabbitmq-log",
        "backbones",
        "rabbitmq",
        rabbitmq_log.validators,
        lambda section: rabbitmq_log.LogSettings.resolve(section, BROKER),
    ),
    Plugin(
        "rabbitmq-dlq",
        "backbones",
        "rabbitmq",
        deadletter.validators,
        lambda section: deadletter.DeadLetterSettings.resolve(section, BROKER),
    ),
]


def with_null(section: dict[str, Any], dotted: str) -> dict[str, Any]:
    result = copy.deepcopy(section)
    *parents, last = dotted.split(".")
    place = result
    for part in parents:
        place = place.setdefault(part, {})
    place[last] = None
    return result


@pytest.mark.parametrize("plugin", PLUGINS, ids=[plugin.id for plugin in PLUGINS])
def test_a_null_key_gets_the_default(tmp_path, plugin):
    base = plugin.base(tmp_path)
    keys = plugin.keys_with_defaults(base)
    assert len(keys) >= 2, keys  # the table reaches the plugin's keys
    expected = plugin.built(base)
    wrong = [key for key in keys if plugin.built(with_null(base, key)) != expected]
    assert wrong == []


def test_the_table_covers_sections_and_nested_keys():
    zeek_keys = ZEEK.keys_with_defaults({})
    assert {"port", "tls", "tls.ca_file", "tls.enabled", "snapshot", "state_file"} <= set(zeek_keys)
    taxii_keys = TAXII.keys_with_defaults({})
    assert {"serve", "serve.port", "serve.tls", "serve.tls.cert_file", "poll_interval", "url"} <= set(taxii_keys)
    assert "kafka.poll_interval" in MISP_KAFKA.keys_with_defaults(KAFKA_FEED)
    assert "kafka.poll_interval" not in MISP_ZMQ.keys_with_defaults(ZMQ_FEED)


def test_null_keys_in_a_yaml_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(
        "plugins:\n"
        "  backbones:\n    inmem: {}\n"
        "  apps:\n"
        "    zeek:\n      port: ~\n      tls: ~\n      snapshot:\n"
        "    taxii:\n      poll_interval: ~\n      serve:\n        port: ~\n        tls: ~\n"
        "    misp:\n      api:\n        ssl: ~\n      kafka:\n        topics: [misp_attribute]\n        poll_interval: ~\n"
    )
    settings, _source = config.load(path)
    validators = [*config.core_validators(), *zeek.validators(), *taxii.validators(), *misp.validators()]
    config.validate(settings, validators)
    zeek_settings = zeek.ZeekSettings.from_config(config.section(settings, "apps", "zeek"))
    assert (zeek_settings.port, zeek_settings.tls, zeek_settings.ca_file, zeek_settings.snapshot_days) == (
        9997,
        False,
        "",
        0,
    )
    taxii_settings = taxii.TaxiiSettings.from_config(config.section(settings, "apps", "taxii"))
    assert (taxii_settings.poll.poll_interval, taxii_settings.serve.port, taxii_settings.serve.cert_file) == (
        300,
        9470,
        "",
    )
    misp_settings = misp.MispSettings.from_config(config.section(settings, "apps", "misp"))
    assert (misp_settings.api_ssl, misp_settings.kafka_poll_interval, misp_settings.zmq_host) == (True, 1.0, None)


def test_an_optional_section_left_null_stays_absent():
    """``zmq: ~`` beside a kafka feed is no feed: the zmq keys' defaults must not make it appear."""
    settings = settings_from({"plugins": {"apps": {"misp": {**KAFKA_FEED, "zmq": None}}}})
    config.validate(settings, misp.validators())
    config.validate(settings, misp.validators())  # the command line validates twice (core first, then all)
    parsed = misp.MispSettings.from_config(config.section(settings, "apps", "misp"))
    assert parsed.uses_kafka and parsed.zmq_host is None
