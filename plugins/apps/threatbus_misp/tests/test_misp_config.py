"""Config validation of the misp app: one line naming the key, exit 2 from the command line."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml
from testbus import running_bus
from threatbus_misp import MispApp
from threatbus_misp import settings as misp_settings
from threatbus_misp.settings import FilterEntry, MispSettings, validators

from threatbus.config import validate
from threatbus.errors import ConfigError
from threatbus.testing import settings_from

API = {"host": "https://misp.example", "key": "secret-key-value"}
ZMQ = {"host": "127.0.0.1", "port": 50000}
KAFKA = {"topics": ["misp_attribute"], "config": {"group.id": "threatbus"}}


def start(section):
    with running_bus(apps={"misp": MispApp()}, plugin_config={"apps": {"misp": section}}):
        pass


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ({"api": API}, "plugins.apps.misp needs exactly one of zmq .* or kafka"),
        ({"api": API, "zmq": ZMQ, "kafka": KAFKA}, "plugins.apps.misp needs exactly one of zmq .* or kafka"),
        ({"zmq": {"host": "127.0.0.1"}}, "plugins.apps.misp.zmq needs host and port"),
        ({"zmq": {**ZMQ, "port": 70000}}, "plugins.apps.misp.zmq.port must be a TCP port"),
        ({"zmq": ZMQ, "api": {**API, "host": "misp.example"}}, "plugins.apps.misp.api.host must be the URL of MISP"),
        ({"zmq": ZMQ, "api": {**API, "ssl": "yes"}}, "plugins.apps.misp.api.ssl must be true or false"),
        ({"zmq": ZMQ, "filter": "tlp:red"}, "plugins.apps.misp.filter must be a list of entries"),
        ({"zmq": ZMQ, "filter": {"orgs": ["x"]}}, "plugins.apps.misp.filter"),  # the core's policy filter check
        ({"zmq": ZMQ, "filter": [{"org": ["x"]}]}, "plugins.apps.misp.filter must be a list of entries"),
        ({"zmq": ZMQ, "filter": [{"tags": "tlp:red"}]}, "plugins.apps.misp.filter must be a list of entries"),
        ({"kafka": {"config": {}}}, "plugins.apps.misp.kafka needs topics"),
        ({"kafka": {**KAFKA, "topics": []}}, "plugins.apps.misp.kafka.topics must be a non-empty list"),
        ({"kafka": {**KAFKA, "poll_interval": 0}}, "plugins.apps.misp.kafka.poll_interval must be a number"),
    ],
)
def test_invalid_config_names_the_key(section, message):
    with pytest.raises(ConfigError, match=message):
        start(section)


def test_errors_never_quote_the_api_key():
    with pytest.raises(ConfigError) as raised:
        start({"api": API})
    assert API["key"] not in str(raised.value)


def test_kafka_without_its_client_library_is_a_clear_config_error(monkeypatch):
    monkeypatch.setattr(misp_settings, "kafka_available", lambda: False)
    with pytest.raises(ConfigError, match=r"no Kafka client is installed: pip install 'threatbus-misp\[kafka\]'"):
        start({"kafka": KAFKA})


def test_threatbus_check_exits_2_with_the_key_named(tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text(
        yaml.safe_dump(
            {"plugins": {"backbones": {"inmem": {}}, "apps": {"misp": {"api": API, "zmq": ZMQ, "kafka": KAFKA}}}}
        )
    )
    result = subprocess.run(
        [sys.executable, "-m", "threatbus", "check", "-c", str(config)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("threatbus: invalid config: plugins.apps.misp needs exactly one of zmq")
    assert "Traceback" not in result.stderr


def test_a_section_written_for_the_original_misp_app_is_accepted():

    section = yaml.safe_load(
        """
        api:
          host: https://localhost
          ssl: false
          key: MISP_API_KEY
        filter:
          - orgs: ["1", "25"]
            tags: ["TLP:AMBER", "TLP:RED"]
            types: ["ip-src", "ip-dst", "hostname", "domain", "url"]
          - orgs: ["2"]
        zmq:
          host: localhost
          port: 50000
        """
    )
    settings = settings_from({"plugins": {"apps": {"misp": section}}})
    validate(settings, validators())
    parsed = MispSettings.from_config(settings.get("plugins.apps.misp"))
    assert (parsed.api_host, parsed.api_ssl, parsed.api_key) == ("https://localhost", False, "MISP_API_KEY")
    assert parsed.zmq_endpoint == "tcp://localhost:50000" and not parsed.uses_kafka
    assert parsed.filters[1] == FilterEntry(orgs=frozenset({"2"}))
    assert parsed.passes(["25"], "domain", ["TLP:RED"]) and not parsed.passes(["25"], "md5", ["TLP:RED"])


def test_a_mapping_at_filter_is_the_bus_policy_filter_not_misps():
    settings = settings_from({"plugins": {"apps": {"misp": {"zmq": ZMQ, "filter": {"tlp": "amber"}}}}})
    validate(settings, validators())
    assert MispSettings.from_config(settings.get("plugins.apps.misp")).filters == ()
