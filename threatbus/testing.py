"""Helpers for testing Threat Bus and its plugins (used by our own tests too).

Everything here waits with deadlines, never with fixed sleeps.
"""

from __future__ import annotations

import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import yaml
from dynaconf import Dynaconf

from threatbus.bus import Bus
from threatbus.data import Indicator, Message, Sighting
from threatbus.delivery import Receipt
from threatbus.stix import new_indicator, new_sighting
from threatbus.worker import StoppableWorker

T = TypeVar("T")


def wait_until(predicate: Callable[[], T], timeout: float = 10.0, interval: float = 0.02, what: str = "") -> T:
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or predicate}")
        time.sleep(interval)


def get_within(source: queue.Queue[T], timeout: float = 10.0) -> T:
    """The next item of ``source``; AssertionError if none arrives in time."""
    try:
        return source.get(timeout=timeout)
    except queue.Empty:
        raise AssertionError(f"nothing arrived within {timeout}s") from None


def collect(source: queue.Queue[T], count: int, timeout: float = 10.0) -> list[T]:
    """Exactly ``count`` items from ``source`` within ``timeout`` overall."""
    deadline = time.monotonic() + timeout
    items = []
    while len(items) < count:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise AssertionError(f"got {len(items)} of {count} items within {timeout}s")
        try:
            items.append(source.get(timeout=remaining))
        except queue.Empty:
            continue
    return items


def assert_nothing_more(source: queue.Queue[Any], within: float = 0.3) -> None:
    """Fail if ``source`` yields anything within ``within`` seconds (for no-duplicate checks)."""
    try:
        extra = source.get(timeout=within)
    except queue.Empty:
        return
    raise AssertionError(f"unexpected extra item: {extra!r}")


def indicator(value: str = "6.6.6.6", object_path: str = "ipv4-addr:value", **properties: Any) -> Indicator:
    """A valid point indicator for ``[object_path = 'value']``, or for ``pattern=`` if given."""
    pattern = properties.pop("pattern", f"[{object_path} = '{value}']")
    return new_indicator(pattern, **properties)


def sighting(of: Indicator | None = None, source: str = "test", **kwargs: Any) -> Sighting:
    of = of or indicator()
    return new_sighting(of.id, source=source, indicator=of, **kwargs)


def assert_live_sighting(message: Message, indicator_id: str, source: str, value: str) -> dict[str, Any]:
    """``message`` is a sighting of ``indicator_id`` as a sensor app reports a live match; returns its payload.

    The properties every sensor sets (INTEL.md): the sighted indicator, the
    sensor, the match type, and the value that matched.
    """
    assert isinstance(message, Sighting), f"expected a sighting, got {message!r}"
    payload = message.payload
    assert payload["sighting_of_ref"] == indicator_id
    assert payload["x_threatbus_source"] == source
    assert payload["x_threatbus_match_type"] == "LIVE"
    assert payload["x_threatbus_indicator_value"] == value
    return payload


def settings_from(data: Mapping[str, Any]) -> Dynaconf:
    """Dynaconf settings from a dict, as if read from a config file."""
    settings = Dynaconf(environments=False, load_dotenv=False, envvar_prefix="THREATBUS_TEST_UNUSED")
    for key, value in data.items():
        settings.set(key, value)
    return settings


class Subscriber:
    """A fake app subscription: a queue subscribed on a running bus."""

    def __init__(self, bus: Bus, topic: str = "stix2", snapshot: Any = None) -> None:
        self.queue: queue.Queue[Message] = queue.Queue()
        self.topic = topic
        args = {} if snapshot is None else {"snapshot": snapshot}
        self.snapshot_ids = bus.subscribe(topic, self.queue, **args)


def terminate(process: subprocess.Popen[Any], timeout: float = 10.0) -> None:
    """SIGTERM a child process and reap it; SIGKILL it if it outlives ``timeout``."""
    process.terminate()
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def unavailable(reason: str) -> None:
    """A real component a test needs is missing: skip locally, fail when CI=true."""
    import pytest

    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"needed in CI: {reason}")
    pytest.skip(reason)


def install_test_plugin(directory: Path, group: str, name: str, module: str, source: str, attribute: str) -> Path:
    """Make ``module.attribute`` an installed plugin for processes with ``directory`` on PYTHONPATH.

    Writes the module's ``source`` and a ``*.dist-info`` folder whose entry
    point ``name`` in ``group`` (``threatbus.app`` / ``threatbus.backbone``)
    names it: a real ``threatbus`` process finds it like any installed plugin.
    """
    directory = Path(directory)
    (directory / f"{module}.py").write_text(source)
    dist_info = directory / f"{module}-0.0.dist-info"
    dist_info.mkdir(parents=True, exist_ok=True)
    (dist_info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {module.replace('_', '-')}\nVersion: 0.0\n")
    (dist_info / "entry_points.txt").write_text(f"[{group}]\n{name} = {module}:{attribute}\n")
    return directory


class ThreatBusProcess:
    """A real ``threatbus`` process started from a config dict, with its log captured."""

    def __init__(
        self, config: Mapping[str, Any], workdir: Path, name: str = "node", extra_env: Mapping[str, str] | None = None
    ) -> None:
        self.config_path = Path(workdir) / f"{name}.yaml"
        config = dict(config)
        # Durable state in the test's directory, not ./threatbus-data/<name> shared by every test of that name.
        config["node"] = {"data_dir": str(Path(workdir) / f"{name}.data"), **(config.get("node") or {})}
        self.data_dir = Path(config["node"]["data_dir"])
        self.config_path.write_text(yaml.safe_dump(config))
        self.log_path = Path(workdir) / f"{name}.log"
        self.extra_env = dict(extra_env or {})
        self.process: subprocess.Popen[bytes] | None = None
        self._log_file: Any = None

    def command(self) -> list[str]:
        """The command line of the process; override to run another launcher."""
        return [sys.executable, "-m", "threatbus", "-c", str(self.config_path)]

    def start(self, ready_line: str = "is running", timeout: float = 30.0) -> ThreatBusProcess:
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **self.extra_env}
        self._log_file = open(self.log_path, "ab")
        self.process = subprocess.Popen(
            self.command(),
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            env=env,
        )
        self.wait_for_log(ready_line, timeout)
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def wait_for_log(self, text: str, timeout: float = 30.0) -> None:
        def seen() -> bool:
            if self.process is not None and self.process.poll() is not None and text not in self.log():
                raise AssertionError(f"threatbus exited with {self.process.returncode}:\n{self.log()}")
            return text in self.log()

        try:
            wait_until(seen, timeout, interval=0.05, what=f"log line {text!r}")
        except AssertionError as err:
            raise AssertionError(f"{err}\n--- log ---\n{self.log()}") from None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int:
        """Signal the process and wait for it; returns its exit code."""
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(sig)
        try:
            code = self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise AssertionError(f"threatbus did not stop within {timeout}s:\n{self.log()}") from None
        finally:
            if self._log_file is not None:
                self._log_file.close()
        return code

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        if self._log_file is not None:
            self._log_file.close()


class TrackedReceipt(Receipt):
    """A receipt for one message handed straight to an app's queue: ``delivered`` is set once the app says it is done.

    It counts its one sink at once, as the router would; subclasses note more in ``on_done`` (then call it here).
    """

    def __init__(self) -> None:
        super().__init__()
        self.delivered = threading.Event()
        self.expect()

    def on_done(self) -> None:
        self.delivered.set()


class ThreadedCollector(StoppableWorker):
    """Drains a queue in the background into a list, for tests with many messages."""

    def __init__(self, source: queue.Queue[T]) -> None:
        super().__init__(name="test-collector")
        self.source = source
        self.items: list[Any] = []

    def run(self) -> None:
        for item in self.drain(self.source):
            self.items.append(item)

    def close(self) -> None:
        self.stop()
        self.join(2)


# TLP marking ids by name (INTEL.md), for tests of policy filters.
TLP1 = {
    "white": "marking-definition--613f2e26-407d-48c7-9eca-b8e91df99dc9",
    "green": "marking-definition--34098fce-860f-48ae-8e50-ebd3cc5e41da",
    "amber": "marking-definition--f88d31f6-486f-44da-b317-01333bde0b82",
    "red": "marking-definition--5e57c739-391a-4eb3-b6be-7d15ca92d5ed",
}
TLP2 = {
    "clear": "marking-definition--94868c89-83c2-464b-929b-a1a8aa3c8487",
    "green": "marking-definition--bab4a63c-aed9-4cf5-a766-dfca5abac2bb",
    "amber": "marking-definition--55d920b0-5e8b-4f79-9ee9-91f868d9b421",
    "amber+strict": "marking-definition--939a9414-2ddd-4d32-a0cd-375ea402b003",
    "red": "marking-definition--e828b379-4e03-4974-9ac4-e53a884c97c1",
}


def intel_mix() -> dict[str, Indicator]:
    """Indicators by name covering what policy filters look at: every TLP (1.0 and 2.0), unmarked,
    low and high confidence, flagged for detection or not. Values are distinct (10.0.0.x)."""
    specs: dict[str, dict[str, Any]] = {
        "red": {"object_marking_refs": [TLP1["red"]], "confidence": 90, "x_opencti_detection": True},
        "red2": {"object_marking_refs": [TLP2["red"]], "confidence": 90, "x_misp_to_ids": True},
        "amber_strict": {"object_marking_refs": [TLP2["amber+strict"]], "confidence": 90, "x_misp_to_ids": True},
        "amber": {"object_marking_refs": [TLP1["amber"]], "confidence": 80, "x_opencti_detection": True},
        "green": {"object_marking_refs": [TLP2["green"]], "confidence": 30, "x_opencti_detection": True},
        "clear": {"object_marking_refs": [TLP2["clear"]], "confidence": 70},
        "white": {"object_marking_refs": [TLP1["white"]], "confidence": 95, "x_misp_to_ids": True},
        "unmarked": {"confidence": 10, "x_opencti_detection": True},
        "unmarked_noconf": {},
    }
    return {name: indicator(f"10.0.0.{i + 1}", **props) for i, (name, props) in enumerate(specs.items())}
