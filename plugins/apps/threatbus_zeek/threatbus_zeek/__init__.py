"""Threat Bus app plugin for Zeek: indicators into Zeek's Intel framework, matches back as sightings."""

from threatbus_zeek.plugin import INTEL_TOPIC, MATCH_TOPIC, ZeekApp, ZeekSettings, script_path

__all__ = ["INTEL_TOPIC", "MATCH_TOPIC", "ZeekApp", "ZeekSettings", "script_path"]
