"""The threatbus-zmq publish and tail commands, end to end against a real threatbus process."""

from __future__ import annotations

import os
import selectors
import signal
import subprocess
import sys
import time
from pathlib import Path

import orjson
import pytest
import yaml

from threatbus.testing import ThreatBusProcess, free_port, indicator, sighting
from threatbus_zmq.cli_publish import parse_input

CLI = [sys.executable, "-m", "threatbus_zmq.cli"]


def run_cli(*args: str, stdin: bytes | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], input=stdin, capture_output=True, timeout=timeout)


class Tail:
    """A running ``threatbus-zmq tail`` whose stdout lines we read with deadlines."""

    def __init__(self, *args: str) -> None:
        self.process = subprocess.Popen([*CLI, "tail", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self._selector = selectors.DefaultSelector()
        self._selector.register(self.process.stdout, selectors.EVENT_READ)
        self._stderr_selector = selectors.DefaultSelector()
        self._stderr_selector.register(self.process.stderr, selectors.EVENT_READ)
        self.stderr = b""
        self._stdout = b""

    def wait_for_stderr(self, text: str, timeout: float = 15) -> None:
        deadline = time.monotonic() + timeout
        while text.encode() not in self.stderr:
            remaining = deadline - time.monotonic()
            assert remaining > 0 and self.process.poll() is None, f"tail said: {self.stderr.decode()}"
            if self._stderr_selector.select(remaining):
                self.stderr += os.read(self.process.stderr.fileno(), 65536)

    def lines(self, count: int, timeout: float = 30) -> list[str]:
        deadline = time.monotonic() + timeout
        while self._stdout.count(b"\n") < count:
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"got fewer than {count} lines: {self._stdout[-2000:]!r}"
            if self._selector.select(remaining):
                chunk = os.read(self.process.stdout.fileno(), 1 << 20)
                assert chunk, f"tail ended: {self.stderr.decode()}"
                self._stdout += chunk
        lines = self._stdout.split(b"\n")
        self._stdout = b"\n".join(lines[count:])
        return [line.decode() for line in lines[:count]]

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
        try:
            return self.process.wait(15)
        finally:
            self.process.kill()
            self._selector.close()
            self._stderr_selector.close()
            for stream in (self.process.stdout, self.process.stderr):
                stream.close()


def connection(bus) -> list[str]:
    return ["--host", bus.host, "--manage", str(bus.manage), "--timeout", "5"]


@pytest.fixture
def process_bus(configured_bus):
    with configured_bus("process") as bus:
        yield bus


def test_publish_a_bundle_and_tail_it_raw(process_bus, tmp_path: Path):
    tail = Tail("--raw", *connection(process_bus))
    try:
        tail.wait_for_stderr("tailing stix2")
        iocs = [indicator(f"192.0.2.{i}") for i in range(3)]
        seen = sighting(iocs[0], source="cli-test")
        bad = dict(indicator("bad").payload, pattern="[ipv4-addr:value = ")
        identity = {"type": "identity", "spec_version": "2.1", "id": "identity--0f8e3fb8-4b8e-4bd4-8b47-6a7b5bbcbb6a"}
        bundle = {
            "type": "bundle",
            "id": "bundle--5d0092c5-5f74-4287-9642-33f4c354e56d",
            "objects": [*(i.payload for i in iocs), seen.payload, bad, identity],
        }
        path = tmp_path / "bundle.json"
        path.write_bytes(orjson.dumps(bundle))

        result = run_cli("publish", str(path), *connection(process_bus))
        assert result.returncode == 1, result.stderr  # one object was invalid; the valid rest was sent
        stderr = result.stderr.decode()
        assert "invalid: object 5" in stderr and "pattern" in stderr
        assert "skipped objects that are not indicators or sightings: 1 identity" in stderr
        assert "published 3 indicators and 1 sighting" in stderr

        received = [orjson.loads(line) for line in tail.lines(4)]
        assert received == [*(i.payload for i in iocs), seen.payload]
    finally:
        assert tail.stop() == 0
    process_bus.process.wait_for_log("unsubscribed", 10)


def test_publish_json_lines_from_stdin_with_progress_and_tail_readable(process_bus):
    tail = Tail("--topic", "stix2/indicator", "--count", "1500", *connection(process_bus))
    try:
        tail.wait_for_stderr("tailing stix2/indicator")
        iocs = [indicator(f"198.51.{i // 250}.{i % 250}") for i in range(1500)]
        lines = b"\n".join(i.encode() for i in iocs) + b"\n"
        result = run_cli("publish", "-", "--progress", *connection(process_bus), stdin=lines)
        assert result.returncode == 0, result.stderr
        assert b"publishing" in result.stderr and b"1500/1500" in result.stderr
        assert b"published 1500 indicators" in result.stderr
        out = tail.lines(1500)
        assert out[0].split()[1:] == ["indicator", iocs[0].id, "[ipv4-addr:value", "=", "'198.51.0.0']"]
        assert [line.split()[2] for line in out] == [i.id for i in iocs]
        assert tail.process.wait(15) == 0  # --count reached
    finally:
        tail.stop()


def test_tools_explain_an_unreachable_bus_without_a_traceback(tmp_path: Path):
    path = tmp_path / "one.json"
    path.write_bytes(indicator().encode())
    for command in (["publish", str(path)], ["tail"]):
        result = run_cli(*command, "--manage", str(free_port()), "--timeout", "0.5")
        assert result.returncode == 3, result
        assert b"no reply from the manage endpoint" in result.stderr
        assert b"Traceback" not in result.stderr


def test_publish_reports_unreadable_and_invalid_input(tmp_path: Path):
    missing = run_cli("publish", str(tmp_path / "missing.json"))
    assert missing.returncode == 2 and b"cannot read" in missing.stderr
    garbage = run_cli("publish", "-", stdin=b"not json at all\n{also not}\n")
    assert garbage.returncode == 1 and b"invalid: line 1" in garbage.stderr and b"invalid: line 2" in garbage.stderr
    empty = run_cli("publish", "-", stdin=b"\n")
    assert empty.returncode == 2 and b"empty" in empty.stderr
    dry = run_cli("publish", "--dry-run", "-", stdin=indicator().encode())
    assert dry.returncode == 0 and b"valid: 1 indicator" in dry.stderr
    for result in (missing, garbage, empty, dry):
        assert b"Traceback" not in result.stderr


def test_help_explains_the_commands():
    for command in ([], ["publish"], ["tail"]):
        result = run_cli(*command, "--help")
        assert result.returncode == 0
    assert b"JSON lines" in run_cli("publish", "--help").stdout
    assert b"--raw" in run_cli("tail", "--help").stdout


def test_parse_input_accepts_bundles_objects_lists_and_json_lines():
    ioc = indicator()
    as_bundle = orjson.dumps({"type": "bundle", "id": "bundle--1", "objects": [ioc.payload]})
    for data in (as_bundle, ioc.encode(), orjson.dumps([ioc.payload]), ioc.encode() + b"\n\n" + ioc.encode()):
        parsed = parse_input(data)
        assert parsed.valid and all(m.payload == ioc.payload for m in parsed.valid) and not parsed.errors


def test_tail_follows_a_restarted_bus(configured_bus, tmp_path):
    with configured_bus("process") as bus:
        tail = Tail("--raw", "--heartbeat", "0.3", *connection(bus))
        restarted = None
        try:
            tail.wait_for_stderr("tailing")
            config = yaml.safe_load(bus.process.config_path.read_text())
            assert bus.process.stop() == 0  # the fixture's second stop() finds it ended: allowed
            restarted = ThreatBusProcess(config, tmp_path, "restarted").start()
            tail.wait_for_stderr("subscribing again")
            restarted.wait_for_log("subscribed", 10)
            ioc = indicator("203.0.113.7")
            sender = bus.sender()
            sender.send(ioc)
            sender.close(1)
            assert orjson.loads(tail.lines(1)[0]) == ioc.payload
        finally:
            code = tail.stop()
            if restarted is not None:
                restarted.stop()
        assert code == 0


def test_tail_with_a_filter_prints_only_what_passes_it(process_bus, tmp_path: Path):
    from threatbus.testing import intel_mix

    mix = intel_mix()
    tail = Tail("--raw", "--filter", '{"tlp": "green", "min_confidence": 50}', *connection(process_bus))
    try:
        tail.wait_for_stderr("tailing stix2")
        path = tmp_path / "mix.jsonl"
        path.write_bytes(b"\n".join(item.encode() for item in mix.values()))
        result = run_cli("publish", str(path), *connection(process_bus))
        assert result.returncode == 0, result.stderr
        # clear (70), white (95), unmarked_noconf (no confidence): in publishing order.
        expected = [mix[name].id for name in ("clear", "white", "unmarked_noconf")]
        assert [orjson.loads(line)["id"] for line in tail.lines(3)] == expected
    finally:
        assert tail.stop() == 0
    bad = run_cli("tail", "--filter", "[1]", *connection(process_bus))
    assert bad.returncode == 2 and b"must be a JSON object" in bad.stderr
    refused = run_cli("tail", "--filter", '{"tlp": "pink"}', *connection(process_bus))
    assert refused.returncode != 0 and b"filter.tlp must be one of" in refused.stderr


def test_tail_with_a_snapshot_gets_the_log_and_says_how_many_arrived(process_bus):
    iocs = [indicator(f"198.18.0.{n}") for n in range(3)]
    live = Tail("--count", "3", *connection(process_bus))
    try:
        live.wait_for_stderr("tailing")
        result = run_cli("publish", "-", *connection(process_bus), stdin=b"\n".join(i.encode() for i in iocs))
        assert result.returncode == 0, result.stderr
        live.lines(3)  # carried by the bus, so in its intel log
    finally:
        live.stop()
    tail = Tail("--topic", "stix2/indicator", "--snapshot", "1", *connection(process_bus))
    try:
        lines = tail.lines(3)
        assert sorted(line.split()[2] for line in lines) == sorted(i.id for i in iocs)
        tail.wait_for_stderr("indicator(s) arrived")
        assert ": 3 indicator(s) arrived" in tail.stderr.decode()
    finally:
        assert tail.stop() == 0
