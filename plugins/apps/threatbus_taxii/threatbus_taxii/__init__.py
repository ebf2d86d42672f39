"""Threat Bus app plugin for TAXII 2.1."""

from threatbus_taxii.plugin import TaxiiApp

__all__ = ["TaxiiApp"]
