"""The in-memory backbone: delivers within one Threat Bus process."""

from threatbus_inmem.plugin import InMemoryBackbone

__all__ = ["InMemoryBackbone"]
