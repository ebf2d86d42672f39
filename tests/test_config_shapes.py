"""Malformed config files, as an operator writes them: one line naming the key, exit 2, never a traceback.

Each case goes through the command line (``cli.main`` in-process; a few as
real ``threatbus`` processes) for both ``threatbus check`` and a plain run.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from threatbus import cli

BACKBONE = "plugins:\n  backbones:\n    inmem: {}\n"
RABBIT = "plugins:\n  backbones:\n    rabbitmq:\n"


def rabbit(body: str) -> str:
    return RABBIT + "".join(f"      {line}\n" for line in body.splitlines())


def zmq(body: str) -> str:
    return BACKBONE + "  apps:\n    zmq:\n" + "".join(f"      {line}\n" for line in body.splitlines())


# (id, YAML text, the key the one error line must name)
CASES = [
    # --- the top level and the core's sections ---
    ("top-list", "[1, 2]\n", "top level must be a mapping"),
    ("top-scalar", "5\n", "top level must be a mapping"),
    ("top-string", "plugins\n", "top level must be a mapping"),
    ("plugins-scalar", "plugins: inmem\n", "plugins must be a mapping"),
    ("plugins-list", "plugins: [inmem]\n", "plugins must be a mapping"),
    ("plugins-number", "plugins: 5\n", "plugins must be a mapping"),
    ("backbones-list", "plugins:\n  backbones: [inmem]\n", "plugins.backbones must be a mapping"),
    ("backbones-scalar", "plugins:\n  backbones: inmem\n", "plugins.backbones must be a mapping"),
    ("apps-scalar", BACKBONE + "  apps: zmq\n", "plugins.apps must be a mapping"),
    ("apps-list", BACKBONE + "  apps: [zmq]\n", "plugins.apps must be a mapping"),
    ("inmem-number", "plugins:\n  backbones:\n    inmem: 5\n", "plugins.backbones.inmem must be a mapping"),
    ("inmem-list", "plugins:\n  backbones:\n    inmem: [1]\n", "plugins.backbones.inmem must be a mapping"),
    ("inmem-true", "plugins:\n  backbones:\n    inmem: true\n", "plugins.backbones.inmem must be a mapping"),
    ("rabbitmq-list", "plugins:\n  backbones:\n    rabbitmq: [1]\n", "plugins.backbones.rabbitmq must be a mapping"),
    ("rabbitmq-string", "plugins:\n  backbones:\n    rabbitmq: localhost\n", "plugins.backbones.rabbitmq must be"),
    ("zmq-number", BACKBONE + "  apps:\n    zmq: 5\n", "plugins.apps.zmq must be a mapping"),
    ("http-list", BACKBONE + "http: [1]\n", "http must be a mapping"),
    ("http-scalar", BACKBONE + "http: 8080\n", "http must be a mapping"),
    ("logging-scalar", BACKBONE + "logging: 5\n", "logging must be a mapping"),
    ("logging-list", BACKBONE + "logging: [console]\n", "logging must be a mapping"),
    ("node-scalar", BACKBONE + "node: vm1\n", "node must be a mapping"),
    # --- sections inside a plugin's section ---
    ("rabbitmq-queue-number", rabbit("queue: 5"), "plugins.backbones.rabbitmq.queue must be a mapping"),
    ("rabbitmq-queue-list", rabbit("queue: [durable]"), "plugins.backbones.rabbitmq.queue must be a mapping"),
    ("rabbitmq-ssl-on", rabbit("ssl: on"), "plugins.backbones.rabbitmq.ssl must be a mapping"),
    ("rabbitmq-ssl-true", rabbit("ssl: true"), "plugins.backbones.rabbitmq.ssl must be a mapping"),
    ("rabbitmq-reconnect-number", rabbit("reconnect: 3"), "plugins.backbones.rabbitmq.reconnect must be a mapping"),
    ("zeek-tls-number", BACKBONE + "  apps:\n    zeek:\n      tls: 5\n", "plugins.apps.zeek.tls must be a mapping"),
    (
        "taxii-serve-list",
        BACKBONE + "  apps:\n    taxii:\n      serve: [on]\n",
        "plugins.apps.taxii.serve must be a mapping",
    ),
    # --- wrong types ---
    ("logging-console-word", BACKBONE + "logging:\n  console: loud\n", "logging.console must be true or false"),
    ("logging-file-number", BACKBONE + "logging:\n  file: 1\n", "logging.file must be true or false"),
    ("logging-verbosity", BACKBONE + "logging:\n  console_verbosity: LOUD\n", "logging.console_verbosity"),
    ("logging-filename-list", BACKBONE + "logging:\n  filename: [a]\n", "logging.filename must be a string"),
    ("node-name-empty", BACKBONE + "node:\n  name: ''\n", "node.name must be a non-empty string"),
    ("node-name-list", BACKBONE + "node:\n  name: [a]\n", "node.name must be a non-empty string"),
    ("http-port-string", BACKBONE + "http:\n  port: eighty\n", "http.port must be a TCP port"),
    ("http-host-number", BACKBONE + "http:\n  host: 5\n", "http.host must be a host name"),
    ("rabbitmq-host-number", rabbit("host: 5"), "plugins.backbones.rabbitmq.host"),
    ("rabbitmq-durable-word", rabbit("queue:\n  durable: sometimes"), "plugins.backbones.rabbitmq.queue.durable"),
    ("rabbitmq-prefetch-string", rabbit("prefetch: many"), "plugins.backbones.rabbitmq.prefetch"),
    ("rabbitmq-heartbeat-bool", rabbit("heartbeat: true"), "plugins.backbones.rabbitmq.heartbeat"),
    ("rabbitmq-queue-type", rabbit("queue:\n  type: stream"), "plugins.backbones.rabbitmq.queue.type"),
    ("zmq-host-number", zmq("host: 5"), "plugins.apps.zmq.host"),
    ("zmq-manage-string", zmq("manage: port"), "plugins.apps.zmq.manage must be a TCP port"),
    # --- out-of-range values ---
    ("http-port-high", BACKBONE + "http:\n  port: 70000\n", "http.port must be a TCP port"),
    ("http-port-negative", BACKBONE + "http:\n  port: -1\n", "http.port must be a TCP port"),
    ("rabbitmq-port-zero", rabbit("port: 0"), "plugins.backbones.rabbitmq.port must be a TCP port"),
    ("rabbitmq-port-high", rabbit("port: 65536"), "plugins.backbones.rabbitmq.port must be a TCP port"),
    ("rabbitmq-prefetch-zero", rabbit("prefetch: 0"), "plugins.backbones.rabbitmq.prefetch"),
    ("rabbitmq-max-items-negative", rabbit("queue:\n  max_items: -5"), "plugins.backbones.rabbitmq.queue.max_items"),
    ("rabbitmq-reconnect-order", rabbit("reconnect:\n  initial: 10\n  max: 1"), "plugins.backbones.rabbitmq.reconnect"),
    ("rabbitmq-timeout-zero", rabbit("connect_timeout: 0"), "plugins.backbones.rabbitmq.connect_timeout"),
    ("zmq-pub-high", zmq("pub: 99999"), "plugins.apps.zmq.pub must be a TCP port"),
    ("zmq-sub-zero", zmq("sub: 0"), "plugins.apps.zmq.sub must be a TCP port"),
    # --- plugins that do not exist, or not exactly one backbone ---
    ("unknown-backbone", "plugins:\n  backbones:\n    kafka: {}\n", "plugins.backbones.kafka"),
    ("unknown-app", BACKBONE + "  apps:\n    nosuchapp: {}\n", "plugins.apps.nosuchapp"),
    ("no-backbone", "plugins:\n  apps: {}\n", "plugins.backbones"),
    ("two-backbones", "plugins:\n  backbones:\n    inmem: {}\n    rabbitmq: {}\n", "plugins.backbones"),
]


def test_the_table_is_big_enough():
    assert len(CASES) >= 40
    assert len({case[0] for case in CASES}) == len(CASES)


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("threatbus:")]


@pytest.mark.parametrize("command", [["check"], []], ids=["check", "run"])
@pytest.mark.parametrize(("yaml_text", "key"), [case[1:] for case in CASES], ids=[case[0] for case in CASES])
def test_malformed_config_is_one_line_naming_the_key(tmp_path, monkeypatch, capsys, command, yaml_text, key):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "c.yaml"
    path.write_text(yaml_text)
    code = cli.main([*command, "-c", str(path)])
    stderr = capsys.readouterr().err
    assert code == 2, stderr
    lines = error_lines(stderr)
    assert len(lines) == 1, stderr
    assert key in lines[0], lines[0]
    assert "Traceback" not in stderr


@pytest.mark.parametrize(
    ("yaml_text", "key"),
    [
        ("plugins: inmem\n", "plugins must be a mapping"),
        ("plugins:\n  backbones:\n    rabbitmq: [1]\n", "plugins.backbones.rabbitmq must be a mapping"),
        (rabbit("queue: 5"), "plugins.backbones.rabbitmq.queue must be a mapping"),
        (rabbit("ssl: on"), "plugins.backbones.rabbitmq.ssl must be a mapping"),
        (BACKBONE + "http: [1]\n", "http must be a mapping"),
        ("plugins:\n  backbones:\n    inmem: 5\n", "plugins.backbones.inmem must be a mapping"),
    ],
    ids=["plugins-scalar", "rabbitmq-list", "queue-number", "ssl-on", "http-list", "inmem-number"],
)
@pytest.mark.parametrize("command", ["check", "run"])
def test_the_issue_cases_as_real_processes(tmp_path, command, yaml_text, key):
    path = tmp_path / "c.yaml"
    path.write_text(yaml_text)
    args = [sys.executable, "-m", "threatbus", *(["check"] if command == "check" else []), "-c", str(path)]
    result = subprocess.run(args, capture_output=True, text=True, timeout=60, cwd=tmp_path, env=os.environ)
    assert result.returncode == 2, result.stderr
    lines = error_lines(result.stderr)
    assert len(lines) == 1 and key in lines[0], result.stderr
    assert "Traceback" not in result.stderr


def test_environment_overrides_are_shape_checked_too(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "c.yaml"
    path.write_text(BACKBONE)
    monkeypatch.setenv("THREATBUS_HTTP", "5")
    assert cli.main(["check", "-c", str(path)]) == 2
    assert error_lines(capsys.readouterr().err) == ["threatbus: invalid config: http must be a mapping, got 5"]


def test_plugins_listing_checks_shapes(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text("plugins:\n  backbones: [inmem]\n")
    assert cli.main(["plugins", "-c", str(path)]) == 2
    assert "plugins.backbones must be a mapping" in capsys.readouterr().err
