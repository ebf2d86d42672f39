"""The error types of Threat Bus. Only ``cli.main`` turns them into exit codes."""


class ThreatBusError(Exception):
    """Base class of every error Threat Bus raises on purpose."""


class ConfigError(ThreatBusError):
    """The configuration is unusable; the message names the key and the problem."""


class PluginError(ThreatBusError):
    """A plugin is missing, cannot be loaded, or failed to start."""


class DecodeError(ThreatBusError, ValueError):
    """Bytes from the outside are not a valid Threat Bus message."""


class MissingPlugin(ConfigError, PluginError):
    """The config names a plugin that is not installed (a typo, or a package to install): exit 2."""
