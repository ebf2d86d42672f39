"""Threat Bus app plugin for MISP: to_ids attributes become indicators, sightings go back to MISP."""

from threatbus_misp.plugin import MispApp
from threatbus_misp.settings import MispSettings

__all__ = ["MispApp", "MispSettings"]
