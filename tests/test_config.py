"""Loading config from YAML files, the embedded default and THREATBUS_ variables."""

import pytest

from threatbus import config
from threatbus.errors import ConfigError


def load_valid(path):
    settings, _source = config.load(path)
    config.validate(settings, config.core_validators())
    return settings


def test_defaults_fill_in_missing_keys(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("plugins:\n  backbones:\n    inmem:\n")
    settings = load_valid(path)
    assert settings.logging.console is True
    assert settings.logging.console_verbosity == "INFO"
    assert settings.plugins.backbones.inmem == {}
    assert config.configured(settings, "backbones") == ["inmem"]
    assert config.configured(settings, "apps") == []


def test_config_file_in_working_directory_is_found(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "config.yml").write_text("plugins:\n  backbones:\n    inmem: {}\n")
    _settings, source = config.load(None)
    assert source.name == "config.yml"


def test_embedded_default_without_any_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    settings, source = config.load(None)
    assert source == config.embedded_default()
    assert config.configured(settings, "backbones") == ["inmem"]
    assert settings.plugins.apps.zmq.manage == 13370


def test_environment_overrides_nested_keys(tmp_path, monkeypatch):
    path = tmp_path / "c.yaml"
    path.write_text("plugins:\n  backbones:\n    rabbitmq:\n      host: localhost\n      port: 5672\n")
    monkeypatch.setenv("THREATBUS_PLUGINS__BACKBONES__RABBITMQ__HOST", "broker.example.org")
    monkeypatch.setenv("THREATBUS_PLUGINS__BACKBONES__RABBITMQ__PORT", "5671")
    monkeypatch.setenv("THREATBUS_LOGGING__CONSOLE_VERBOSITY", "DEBUG")
    settings = load_valid(path)
    assert settings.plugins.backbones.rabbitmq.host == "broker.example.org"
    assert settings.plugins.backbones.rabbitmq.port == 5671
    assert settings.logging.console_verbosity == "DEBUG"


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        config.load(tmp_path / "nope.yaml")


def test_invalid_yaml_is_a_clear_error(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("plugins: [unclosed\n")
    with pytest.raises(ConfigError, match="cannot read config file"):
        config.load(path)


@pytest.mark.parametrize(
    ("yaml_text", "message"),
    [
        ("logging:\n  console: maybe\n", "logging.console must be true or false, got 'maybe'"),
        ("logging:\n  console_verbosity: LOUD\n", "logging.console_verbosity must be one of DEBUG, INFO"),
        ("logging:\n  file: 1\n", "logging.file must be true or false, got 1"),
        ("plugins:\n  apps: [zmq]\n", "plugins.apps must be a mapping"),
        ("node:\n  name: ''\n", "node.name must be a non-empty string"),
    ],
)
def test_invalid_values_name_the_key(tmp_path, yaml_text, message):
    path = tmp_path / "c.yaml"
    path.write_text(yaml_text)
    with pytest.raises(ConfigError, match=message):
        load_valid(path)


def test_port_validator_message(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("plugins:\n  apps:\n    x:\n      manage: 70000\n")
    settings, _ = config.load(path)
    with pytest.raises(ConfigError, match=r"plugins.apps.x.manage must be a TCP port \(1-65535\), got 70000"):
        config.validate(settings, [config.port("plugins.apps.x.manage", required=True)])


def test_required_key_message(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("plugins:\n  apps:\n    x: {}\n")
    settings, _ = config.load(path)
    with pytest.raises(ConfigError, match="plugins.apps.x.manage is required"):
        config.validate(settings, [config.port("plugins.apps.x.manage", required=True)])


def test_file_that_is_not_named_yaml_is_refused(tmp_path):
    path = tmp_path / "config.yaml.example"
    path.write_text("plugins:\n  backbones:\n    inmem: {}\n")
    with pytest.raises(ConfigError, match=r"must be YAML named \*.yaml or \*.yml"):
        config.load(path)


def test_numeric_value_for_a_string_key_explains_the_fix(tmp_path, monkeypatch):
    path = tmp_path / "c.yaml"
    path.write_text("plugins:\n  apps:\n    x: {}\n")
    monkeypatch.setenv("THREATBUS_PLUGINS__APPS__X__PASSWORD", "123456")
    settings, _ = config.load(path)
    with pytest.raises(ConfigError, match="got 123456.*'@str 123456'"):
        config.validate(settings, [config.option("plugins.apps.x.password", str)])
    monkeypatch.setenv("THREATBUS_PLUGINS__APPS__X__PASSWORD", "@str 123456")
    settings, _ = config.load(path)
    config.validate(settings, [config.option("plugins.apps.x.password", str)])
    assert settings.plugins.apps.x.password == "123456"
