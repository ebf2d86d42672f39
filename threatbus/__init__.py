"""Threat Bus: a pub-sub bus for threat intelligence.

Plugins mark their hook implementations with one of the two markers below:
``threatbus.app`` for app plugins, ``threatbus.backbone`` for backbones.
"""

import pluggy

__version__ = "2026.11.24"

app = pluggy.HookimplMarker("threatbus.app")
backbone = pluggy.HookimplMarker("threatbus.backbone")

__all__ = ["__version__", "app", "backbone"]
