"""Threat Bus app plugin for Suricata."""

from threatbus_suricata.plugin import SuricataApp

__all__ = ["SuricataApp"]
