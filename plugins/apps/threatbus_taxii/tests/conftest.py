"""Fixtures of the TAXII plugin tests: a real medallion server (``medallion_server``)."""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

# Test modules import the helpers under this name (sibling imports do not work with --import-mode=importlib).
_NAME = "threatbus_taxii_medallion"
_spec = importlib.util.spec_from_file_location(_NAME, Path(__file__).with_name("medallion_server.py"))
assert _spec is not None and _spec.loader is not None
medallion_server = importlib.util.module_from_spec(_spec)
sys.modules[_NAME] = medallion_server
_spec.loader.exec_module(medallion_server)


@pytest.fixture
def medallion(tmp_path: Path) -> Iterator[medallion_server.Medallion]:
    """medallion on a free port with ``default_feeds()``; stopped after the test."""
    server = medallion_server.start_medallion(tmp_path, medallion_server.default_feeds())
    yield server
    medallion_server.stop_medallion(server)
