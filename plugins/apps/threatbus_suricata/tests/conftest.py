"""Fixtures of the Suricata plugin tests: a stand-in command socket and short paths."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from threatbus_suricata.testing import FakeSuricata


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A directory with a short path: unix socket paths are limited to 107 bytes."""
    path = Path(tempfile.mkdtemp(prefix="tbsc-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def suricata(short_dir: Path, tmp_path: Path) -> Iterator[Any]:
    """A running stand-in Suricata whose reloads read tmp_path/threatbus.rules."""
    fake = FakeSuricata(str(short_dir / "suricata.socket"), rules_file=tmp_path / "threatbus.rules")
    fake.start()
    yield fake
    fake.close()


@pytest.fixture
def app_config(tmp_path: Path, suricata: Any) -> dict[str, Any]:
    """Plugin config pointing at tmp_path and the stand-in socket."""
    (tmp_path / "eve.json").touch()
    return {
        "rules_file": str(tmp_path / "threatbus.rules"),
        "socket": suricata.path,
        "eve": str(tmp_path / "eve.json"),
        "reload_interval": 0.3,
        "socket_timeout": 2,
    }


@pytest.fixture
def start_suricata() -> Iterator[Any]:
    """Starts more stand-in Suricatas on demand: ``start_suricata(socket_path, rules_file)``."""
    started: list[Any] = []

    def start(path: str, rules_file: Path | None = None) -> Any:
        fake = FakeSuricata(path, rules_file=rules_file)
        fake.start()
        started.append(fake)
        return fake

    yield start
    for fake in started:
        fake.close()
