"""Finding plugins through entry points (faked here, not installed)."""

import logging
import subprocess
import sys
from importlib.metadata import EntryPoint
from pathlib import Path

import pytest

from threatbus import plugins
from threatbus.errors import PluginError
from threatbus.testing import settings_from


@pytest.fixture
def fake_entry_points(monkeypatch):
    registry = {
        "threatbus.backbone": [EntryPoint("inmem", "threatbus_inmem:InMemoryBackbone", "threatbus.backbone")],
        "threatbus.app": [
            EntryPoint("lineapp", "lineapp_plugin:LineApp", "threatbus.app"),
            EntryPoint("oldstyle", "threatbus_inmem.plugin", "threatbus.app"),
            EntryPoint("broken", "no_such_module_xyz:Plugin", "threatbus.app"),
        ],
    }
    monkeypatch.setattr(plugins, "entry_points", lambda group: registry[group])
    monkeypatch.syspath_prepend(str(__import__("pathlib").Path(__file__).parent))
    return registry


def config_with(apps):
    return settings_from({"plugins": {"backbones": {"inmem": {}}, "apps": {name: {} for name in apps}}})


def test_only_installed_and_configured_plugins_are_created(fake_entry_points, caplog):
    caplog.set_level(logging.INFO, logger="threatbus.plugins")
    loaded = plugins.load(config_with(["lineapp"]))
    assert list(loaded["apps"]) == ["lineapp"]
    assert type(loaded["apps"]["lineapp"]).__name__ == "LineApp"
    assert type(loaded["backbones"]["inmem"]).__name__ == "InMemoryBackbone"
    assert "app plugin 'oldstyle' is installed but not configured" in caplog.text


def test_configured_but_missing_names_the_package(fake_entry_points):
    with pytest.raises(PluginError, match="plugins.apps.zeek.*pip install threatbus-zeek"):
        plugins.load(config_with(["zeek"]))


def test_plugin_that_cannot_be_imported(fake_entry_points):
    with pytest.raises(PluginError, match="app plugin 'broken' cannot be imported"):
        plugins.load(config_with(["broken"]))


def test_module_plugins_of_the_original_threat_bus_are_refused_clearly(fake_entry_points):
    with pytest.raises(PluginError, match="is a module, as plugins of the original Threat Bus were"):
        plugins.load(config_with(["oldstyle"]))


def test_inventory_lists_both_facts(fake_entry_points):
    rows = {(row.kind, row.name): row for row in plugins.inventory(config_with(["lineapp", "zeek"]))}
    assert rows[("apps", "lineapp")].installed and rows[("apps", "lineapp")].configured
    assert not rows[("apps", "zeek")].installed and rows[("apps", "zeek")].configured
    assert rows[("apps", "broken")].installed and not rows[("apps", "broken")].configured
    assert rows[("backbones", "inmem")].configured


def test_the_core_imports_no_broker_client_and_no_plugin():
    # The core is only the bus: every module of threatbus/ loads without pika or any plugin package.
    probe = (
        "import importlib, pkgutil, sys, threatbus\n"
        "for m in pkgutil.iter_modules(threatbus.__path__):\n"
        "    if not m.name.startswith('__'): importlib.import_module('threatbus.' + m.name)\n"
        "print(sorted(n for n in sys.modules if n.split('.')[0] in ('pika', 'threatbus_cluster') "
        "or n.startswith('threatbus_')))\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]"
    setup = (Path(__file__).parent.parent / "setup.py").read_text()
    assert "pika" not in setup


def test_cluster_is_a_command_from_outside_the_core():
    from threatbus.plugins import commands

    assert commands()["cluster"].__name__ == "threatbus_cluster"
    out = subprocess.run(
        [sys.executable, "-m", "threatbus", "cluster", "--help"], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0 and "threatbus cluster up" in out.stdout
