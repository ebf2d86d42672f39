"""The `threatbus` command as a user runs it: real processes, real sockets."""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from lineapp_plugin import install_lineapp

from threatbus.data import decode
from threatbus.testing import ThreatBusProcess, free_port, indicator, wait_until

pytestmark = pytest.mark.e2e


def threatbus(*args, cwd=None, env=None):
    return subprocess.run(
        [sys.executable, "-m", "threatbus", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=cwd,
        env={**os.environ, **(env or {})},
    )


def write_config(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def test_help_explains_commands_and_config():
    result = threatbus("--help")
    assert result.returncode == 0
    for text in ("check", "plugins", "-c FILE", "THREATBUS_", "exit status"):
        assert text in result.stdout


def test_version():
    result = threatbus("--version")
    assert result.returncode == 0
    assert result.stdout.startswith("threatbus 20")


def test_invalid_config_is_one_clear_line_and_exit_2(tmp_path):
    path = write_config(tmp_path / "c.yaml", {"logging": {"console": "loud"}, "plugins": {"backbones": {"inmem": {}}}})
    result = threatbus("check", "-c", str(path))
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("threatbus:")]
    assert errors == ["threatbus: invalid config: logging.console must be true or false, got 'loud'"]
    assert "Traceback" not in result.stderr


def test_unreadable_yaml_exit_2(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("plugins: {backbones: [\n")
    result = threatbus("-c", str(path))
    assert result.returncode == 2
    assert "cannot read config file" in result.stderr
    assert "Traceback" not in result.stderr


def test_configured_but_missing_plugin_names_the_package(tmp_path):
    path = write_config(tmp_path / "c.yaml", {"plugins": {"backbones": {"inmem": {}}, "apps": {"nosuchapp": {}}}})
    result = threatbus("check", "-c", str(path))
    assert result.returncode == 2  # a config naming what is not there: a typo or a package to install
    assert "pip install threatbus-nosuchapp" in result.stderr
    assert "Traceback" not in result.stderr


def test_check_and_plugins_commands(tmp_path):
    install_lineapp(tmp_path)
    path = write_config(
        tmp_path / "c.yaml", {"plugins": {"backbones": {"inmem": {}}, "apps": {"lineapp": {"port": free_port()}}}}
    )
    env = {"PYTHONPATH": str(tmp_path)}
    checked = threatbus("check", "-c", str(path), env=env)
    assert checked.returncode == 0, checked.stderr
    assert "config OK" in checked.stdout and "lineapp" in checked.stdout
    listed = threatbus("plugins", "-c", str(path), env=env)
    assert listed.returncode == 0
    line = next(row for row in listed.stdout.splitlines() if "lineapp" in row)
    assert "threatbus-lineapp 0.0" in line and line.rstrip().endswith("yes")


class LineClient:
    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.buffer = b""

    def send(self, line: bytes) -> None:
        self.sock.sendall(line + b"\n")

    def read_line(self) -> bytes:
        while b"\n" not in self.buffer:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise AssertionError("connection closed by the bus")
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\n", 1)
        return line


def connect_when_listening(port: int) -> LineClient:
    def attempt():
        try:
            return LineClient(port)
        except OSError:
            return None

    return wait_until(attempt, timeout=10, what=f"lineapp on port {port}")


@pytest.fixture
def node(tmp_path):
    install_lineapp(tmp_path)
    port = free_port()
    config = {
        "logging": {"console": True, "console_verbosity": "DEBUG"},
        "node": {"name": "e2e"},
        "plugins": {"backbones": {"inmem": {}}, "apps": {"lineapp": {"port": port}}},
    }
    process = ThreatBusProcess(config, tmp_path, extra_env={"PYTHONPATH": str(tmp_path)})
    process.start()
    yield process, port
    process.kill()


def test_message_through_a_real_process_garbage_around_it_and_clean_sigterm(node):
    process, port = node
    sender, receiver = connect_when_listening(port), connect_when_listening(port)
    wait_until(lambda: process.log().count("lineapp") >= 1, what="lineapp started")
    first, second = indicator("1.1.1.1"), indicator("2.2.2.2")
    sender.send(b"this is not json")
    sender.send(b'{"type": "indicator", "id": "indicator--x", "pattern": "[broken", "pattern_type": "stix"}')
    sender.send(first.encode())
    sender.send(b"\xff\xfe\x00")
    sender.send(second.encode())
    assert sender.read_line().startswith(b"ERROR not valid JSON")
    assert b"invalid pattern" in sender.read_line()
    received = [decode(receiver.read_line()) for _ in range(2)]
    assert received == [first, second]
    assert "rejected line" in process.log()
    started = time.monotonic()
    assert process.stop(signal.SIGTERM) == 0
    assert time.monotonic() - started < 5
    assert "stopped" in process.log()
    assert "Traceback" not in process.log()


def test_sigint_stops_cleanly(node):
    process, _port = node
    assert process.stop(signal.SIGINT) == 0
    assert "stopped" in process.log()
