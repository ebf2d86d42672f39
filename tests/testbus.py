"""Test support that needs the plugins, a broker or the original release (not part of the core).

``pytest.ini`` puts ``tests/`` on the path, so plugin tests import it as
``testbus``. The core's ``threatbus.testing`` keeps what needs only the core.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from threatbus.bus import Bus
from threatbus.node import Node
from threatbus.testing import settings_from, unavailable

ORIGINAL_RELEASE = "2022.5.16"
ORIGINAL_PACKAGES = tuple(
    f"{name}=={ORIGINAL_RELEASE}" for name in ("threatbus", "threatbus-inmem", "threatbus-rabbitmq", "threatbus-zmq")
)
# Where the original's venv is built once and reused: the repo root, or $THREATBUS_ORIGINAL_VENV.
ORIGINAL_VENV = Path(os.environ.get("THREATBUS_ORIGINAL_VENV", Path(__file__).resolve().parents[1] / ".venv-original"))

RABBITMQ_HOST = os.environ.get("THREATBUS_TEST_RABBITMQ_HOST", "127.0.0.1")
RABBITMQ_PORT = int(os.environ.get("THREATBUS_TEST_RABBITMQ_PORT", "5672"))


@contextmanager
def running_bus(
    apps: Mapping[str, object] | None = None,
    backbones: Mapping[str, object] | None = None,
    plugin_config: Mapping[str, Any] | None = None,
    node_name: str = "test-node",
) -> Iterator[Bus]:
    """A started in-process bus with the given plugin objects; stopped on exit.

    ``plugin_config`` is the ``plugins`` section; sections default to ``{}``
    for every plugin passed in. Without backbones, the in-memory one is used.
    """
    if backbones is None:
        from threatbus_inmem import InMemoryBackbone

        backbones = {"inmem": InMemoryBackbone()}
    apps = apps or {}
    plugins: dict[str, dict[str, Any]] = {"apps": {}, "backbones": {}}
    for kind, given in (("apps", apps), ("backbones", backbones)):
        for name in given:
            plugins[kind][name] = dict((plugin_config or {}).get(kind, {}).get(name, {}))
    settings = settings_from({"plugins": plugins, "logging": {}, "node": {"name": node_name}})
    bus = Bus(settings, apps=apps, backbones=backbones, node=Node.create(node_name))
    bus.configure()
    bus.start()
    try:
        yield bus
    finally:
        bus.stop()


def _original_usable(venv: Path) -> bool:
    python = venv / "bin" / "python"
    if not python.exists():
        return False
    # -I: not our checkout's `threatbus` package from the working directory or PYTHONPATH.
    probe = "import threatbus, threatbus_inmem, threatbus_rabbitmq, threatbus_zmq"
    return subprocess.run([str(python), "-I", "-c", probe], capture_output=True, timeout=60).returncode == 0


def original_threatbus(venv: Path = ORIGINAL_VENV) -> Path:
    """The ``threatbus`` command of the original Threat Bus 2022.5.16, for interop tests.

    Its packages are installed from PyPI into a venv of their own on first
    use (about 15 s), then reused; parallel test runs build it once. Fails
    the calling test, with pip's errors, if it cannot be installed.
    """
    import fcntl
    import tempfile

    import pytest

    with open(Path(tempfile.gettempdir()) / "threatbus-venv-original.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not _original_usable(venv):
            subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True, timeout=120)
            pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
            result = subprocess.run([*pip, *ORIGINAL_PACKAGES], capture_output=True, text=True, timeout=600)
            if result.returncode != 0 or not _original_usable(venv):
                errors = "\n".join(line for line in result.stderr.splitlines() if "is ignored" not in line)
                pytest.fail(f"cannot install the original Threat Bus into {venv}:\n{errors[-3000:]}")
    return venv / "bin" / "threatbus"


def rabbitmq_reachable(host: str = RABBITMQ_HOST, port: int = RABBITMQ_PORT) -> bool:
    try:
        with socket.create_connection((host, port), timeout=2):
            return True
    except OSError:
        return False


def require_rabbitmq() -> None:
    """Skip (locally) or fail (with CI=true) when RabbitMQ is not reachable."""

    if not rabbitmq_reachable():
        unavailable(f"RabbitMQ not reachable at {RABBITMQ_HOST}:{RABBITMQ_PORT} (start it: rabbitmq-server -detached)")
