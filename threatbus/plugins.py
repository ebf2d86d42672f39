"""Finding plugins through entry points and creating their objects."""

from __future__ import annotations

import logging
import types
from dataclasses import dataclass
from importlib.metadata import EntryPoint, entry_points
from typing import Any

from threatbus import config
from threatbus.errors import MissingPlugin, PluginError

logger = logging.getLogger(__name__)

APP_GROUP = "threatbus.app"
BACKBONE_GROUP = "threatbus.backbone"
GROUPS = {"apps": APP_GROUP, "backbones": BACKBONE_GROUP}
# Subcommands of `threatbus` that live outside the core (e.g. `threatbus cluster`).
COMMAND_GROUP = "threatbus.command"


@dataclass(frozen=True)
class PluginInfo:
    kind: str  # "apps" or "backbones"
    name: str
    installed: bool
    configured: bool
    distribution: str
    version: str


def installed(kind: str) -> dict[str, EntryPoint]:
    """The plugins of ``kind`` installed in this environment, by name."""
    return {ep.name.lower(): ep for ep in entry_points(group=GROUPS[kind])}


def commands() -> dict[str, Any]:
    """Installed subcommands by name: modules with ``add_parser(subparsers)`` and ``command(args) -> int``.

    One that cannot be loaded is logged and left out, so it cannot break the bus.
    """
    found = {}
    for ep in entry_points(group=COMMAND_GROUP):
        try:
            found[ep.name] = ep.load()
        except Exception:
            logger.exception("cannot load the command '%s' (%s)", ep.name, ep.value)
    return found


def package_name(name: str) -> str:
    return f"threatbus-{name}"


def inventory(settings: Any) -> list[PluginInfo]:
    """Every plugin that is installed or configured, with both facts."""
    result = []
    for kind in GROUPS:
        found = installed(kind)
        wanted = set(config.configured(settings, kind))
        for name in sorted(found.keys() | wanted):
            ep = found.get(name)
            dist = ep.dist if ep is not None else None
            result.append(
                PluginInfo(
                    kind=kind,
                    name=name,
                    installed=ep is not None,
                    configured=name in wanted,
                    distribution=dist.name if dist else package_name(name),
                    version=dist.version if dist else "",
                )
            )
    return result


def instantiate(kind: str, name: str, entry_point: EntryPoint) -> object:
    """Load an entry point and create the plugin object it names."""
    label = f"{kind[:-1]} plugin '{name}'"
    try:
        factory = entry_point.load()
    except Exception as err:
        raise PluginError(f"{label} cannot be imported ({entry_point.value}): {err}") from err
    if isinstance(factory, types.ModuleType):
        raise PluginError(
            f"{label} ({entry_point.value}) is a module, as plugins of the original Threat Bus were; "
            "this release needs a plugin class: install a current version of "
            f"{package_name(name)}"
        )
    try:
        return factory()
    except Exception as err:
        raise PluginError(f"{label} could not be created: {err}") from err


def load(settings: Any) -> dict[str, dict[str, object]]:
    """Create the objects of all plugins that are installed AND configured.

    Returns ``{"apps": {name: plugin}, "backbones": {name: plugin}}``.
    Installed but unconfigured plugins are logged; configured but missing
    ones raise ``PluginError`` naming the package to install.
    """
    loaded: dict[str, dict[str, object]] = {}
    for kind in GROUPS:
        found = installed(kind)
        wanted = config.configured(settings, kind)
        missing = [name for name in wanted if name not in found]
        if missing:
            packages = " ".join(package_name(name) for name in missing)
            raise MissingPlugin(
                f"configured but not installed: {', '.join(f'plugins.{kind}.{n}' for n in missing)}; "
                f"install with: pip install {packages}"
            )
        for name in sorted(found.keys() - set(wanted)):
            logger.info(
                "%s plugin '%s' is installed but not configured in plugins.%s: not started", kind[:-1], name, kind
            )
        loaded[kind] = {name: instantiate(kind, name, found[name]) for name in wanted}
    return loaded
