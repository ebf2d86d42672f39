"""Loading and validating the configuration (dynaconf, YAML, THREATBUS_ env)."""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable, Iterable, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from dynaconf import Dynaconf, ValidationError, Validator

from threatbus.errors import ConfigError

logger = logging.getLogger(__name__)

ENV_PREFIX = "THREATBUS"
DEFAULT_FILE_NAMES = ("config.yaml", "config.yml")
YAML_SUFFIXES = (".yaml", ".yml")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
_UNSET = object()
# Longer than any intel log keeps; bounds what a typo can ask for.
MAX_SNAPSHOT_DAYS = 100_000

_TYPE_WORDS: dict[Any, str] = {
    bool: "true or false",
    int: "an integer",
    float: "a number",
    str: "a string",
    dict: "a mapping",
    list: "a list",
}


def option(
    name: str,
    kind: type | tuple[type, ...],
    *,
    default: Any = _UNSET,
    required: bool = False,
    check: Callable[[Any], bool] | None = None,
    expected: str | None = None,
    when: Validator | None = None,
) -> Validator:
    """A dynaconf ``Validator`` for one key, with an error message a user can act on.

    ``kind`` is the accepted type (``bool`` values are never accepted as
    numbers); ``check`` an extra condition, described by ``expected``. The
    ``default`` is the key's only one: it fills in a missing key and a null
    one (``key: ~``), so a plugin builds its settings from the validated
    section without fallbacks. ``when`` (e.g. ``given(section)``) limits the
    validator, and its default, to configs it holds for.
    """
    kinds = kind if isinstance(kind, tuple) else (kind,)
    wanted = expected or " or ".join(_TYPE_WORDS.get(k, k.__name__) for k in kinds)
    # YAML and dynaconf's environment parsing turn 123456 into a number.
    hint = " (quote numbers in YAML; in the environment write '@str 123456')" if kinds == (str,) else ""

    def valid(value: Any) -> bool:
        if value is None and not required:
            return True
        if isinstance(value, bool) and bool not in kinds:
            return False
        return isinstance(value, kinds) and (check is None or check(value))

    kwargs: dict[str, Any] = {}
    if default is not _UNSET:
        kwargs["default"] = default
        kwargs["apply_default_on_none"] = True
    if when is not None:
        kwargs["when"] = when
    return Validator(
        name,
        must_exist=True if required else None,
        condition=valid,
        messages={
            "must_exist_true": f"{name} is required",
            "condition": f"{name} must be {wanted}, got {{value!r}}{hint}",
        },
        **kwargs,
    )


def given(section: str) -> Validator:
    """For ``option(..., when=given(section))``: the key is checked, and its default applied, only in ``section``.

    For sections that may be left out or null, such as one of two alternative
    feeds: a default of one of their keys must not make the section appear.
    """
    return Validator(section, must_exist=True, condition=lambda value: isinstance(value, dict))


def port(name: str, default: Any = _UNSET, required: bool = False, when: Validator | None = None) -> Validator:
    return option(
        name,
        int,
        default=default,
        required=required,
        check=lambda p: 0 < p < 65536,
        expected="a TCP port (1-65535)",
        when=when,
    )


def choice(name: str, choices: Sequence[Any], default: Any = _UNSET) -> Validator:
    words = ", ".join(str(c) for c in choices)
    return option(name, type(choices[0]), default=default, check=lambda v: v in choices, expected=f"one of {words}")


# The shapes plugins' keys keep taking: written once here, so each plugin states only its numbers.


def _within(minimum: float, exclusive: bool, maximum: float | None) -> Callable[[Any], bool]:
    def check(value: Any) -> bool:
        above = value > minimum if exclusive else value >= minimum
        return above and (maximum is None or value <= maximum)

    return check


def seconds(
    name: str,
    *,
    default: Any = _UNSET,
    minimum: float = 0,
    exclusive: bool = True,
    maximum: float | None = None,
    expected: str | None = None,
) -> Validator:
    """A duration in seconds (int or float), above ``minimum`` (or from it, ``exclusive=False``), at most ``maximum``."""
    wanted = expected or f"seconds {'>' if exclusive else '>='} {minimum:g}"
    return option(name, (int, float), default=default, check=_within(minimum, exclusive, maximum), expected=wanted)


def count(
    name: str,
    *,
    default: Any = _UNSET,
    minimum: int = 1,
    maximum: int | None = None,
    expected: str | None = None,
) -> Validator:
    """A whole number of things (messages, commands, ...) from ``minimum`` to ``maximum``."""
    wanted = expected or ("an integer > 0" if minimum == 1 else f"an integer >= {minimum}")
    return option(name, int, default=default, check=_within(minimum, False, maximum), expected=wanted)


def snapshot_days(name: str, *, default: Any = 0) -> Validator:
    """How far back a snapshot asks for intel: days (int or float) from 0 (none) below 100 000."""
    return option(
        name,
        (int, float),
        default=default,
        check=lambda days: 0 <= days < MAX_SNAPSHOT_DAYS,
        expected="a number of days >= 0",
    )


def matching(name: str, pattern: re.Pattern[str], *, default: Any = _UNSET, expected: str) -> Validator:
    """A string that ``pattern`` matches (names of things in other tools: modules, sets, ...)."""
    return option(name, str, default=default, check=lambda value: bool(pattern.match(value)), expected=expected)


def _readable(path: Any) -> bool:
    return os.path.isfile(path) and os.access(path, os.R_OK)


def readable_file(name: str, *, default: Any = _UNSET, expected: str = "the path of a readable file") -> Validator:
    """The path of a file that exists and this process may read."""
    return option(name, str, default=default, check=_readable, expected=expected)


def in_writable_dir(path: Any) -> bool:
    """True when ``path`` names a file this process may create or replace: its directory exists and is writable."""
    parent = os.path.dirname(os.path.abspath(path))
    return bool(path) and os.path.isdir(parent) and os.access(parent, os.W_OK | os.X_OK)


def writable_file(
    name: str,
    *,
    default: Any = _UNSET,
    expected: str = "a file path in an existing directory Threat Bus may write to",
) -> Validator:
    """The path of a file this process creates or replaces (state, rules)."""
    return option(name, str, default=default, check=in_writable_dir, expected=expected)


def empty_or(name: str, check: Callable[[str], bool], *, default: str = "", expected: str) -> Validator:
    """A string that is '' (the feature it configures is off) or passes ``check``."""
    return option(name, str, default=default, check=lambda value: value == "" or check(value), expected=expected)


def tls_files(section: str) -> list[Validator]:
    """A TLS client's ``<section>`` and its ``ca_file``, ``cert_file`` and ``key_file``: each a path, or '' for none.

    The section left out or null means all defaults. List these before the section's other keys.
    """
    files = [option(f"{section}.{key}", str, default="") for key in ("ca_file", "cert_file", "key_file")]
    return [option(section, dict, default={}), *files]


def core_validators() -> list[Validator]:
    return [
        option("logging.console", bool, default=True),
        choice("logging.console_verbosity", LOG_LEVELS, default="INFO"),
        option("logging.file", bool, default=False),
        choice("logging.file_verbosity", LOG_LEVELS, default="DEBUG"),
        option("logging.filename", str, default="threatbus.log"),
        option("node.name", str, default=None, check=bool, expected="a non-empty string"),
        # State that must survive a crash (the rabbitmq outbox and dedup window); default ./threatbus-data/<name>.
        option("node.data_dir", str, default=None, check=bool, expected="a directory path"),
        # Metrics and health endpoints (threatbus.observability): off unless http.port is set.
        option("http", dict, default={}),
        option("http.host", str, default="127.0.0.1", check=bool, expected="a host name or IP address"),
        option(
            "http.port",
            int,
            default=None,
            check=lambda p: 0 <= p < 65536,
            expected="a TCP port (1-65535), 0 for any free port, or null for off",
        ),
        option("plugins.apps", dict, default={}),
        option("plugins.backbones", dict, default={}),
    ]


def find_config_file(path: str | os.PathLike[str] | None) -> Path | None:
    """The config file to use: ``path`` if given, else config.yaml/.yml in the working directory."""
    if path is not None:
        candidate = Path(path)
        if not candidate.is_file():
            raise ConfigError(f"config file {str(candidate)!r} does not exist or is not a file")
        if candidate.suffix.lower() not in YAML_SUFFIXES:
            # dynaconf picks its loader by suffix and would silently read nothing.
            raise ConfigError(f"config file {str(candidate)!r} must be YAML named *.yaml or *.yml")
        return candidate
    for name in DEFAULT_FILE_NAMES:
        if Path(name).is_file():
            return Path(name)
    return None


def embedded_default() -> Path:
    """The built-in config used when no file is found: in-memory backbone, ZeroMQ app."""
    return Path(str(resources.files("threatbus").joinpath("default_config.yaml")))


def load(path: str | os.PathLike[str] | None) -> tuple[Dynaconf, Path]:
    """Read the config file (or the embedded default) plus THREATBUS_ env overrides.

    Returns the settings (not yet validated) and the file they came from.
    """
    source = find_config_file(path) or embedded_default()
    settings = Dynaconf(
        settings_files=[str(source.resolve())],
        envvar_prefix=ENV_PREFIX,
        environments=False,
        load_dotenv=False,
        core_loaders=["YAML"],
    )
    try:
        settings.as_dict()  # dynaconf reads lazily: surface YAML errors here
    except Exception as err:
        detail = " ".join(str(err).split())
        top = _top_level(source)
        if top is not None and not isinstance(top, dict):
            detail = f"the top level must be a mapping (logging, node, http, plugins), got {_show(top)}"
        raise ConfigError(f"cannot read config file {str(source)!r}: {detail}") from None
    _normalise_sections(settings)
    return settings, source


def _top_level(source: Path) -> Any:
    try:
        return yaml.safe_load(source.read_text())
    except Exception:  # dynaconf's own message says what is wrong with the file
        return None


def _normalise_sections(settings: Dynaconf) -> None:
    """Check the sections every node reads before any plugin does, and fill in empty ones.

    ``plugins``, ``plugins.apps``, ``plugins.backbones`` and each plugin's
    section must be mappings; ``inmem:`` with nothing after it is YAML null
    and means "configured, all defaults".
    """
    for name in ("logging", "node", "http", "plugins"):
        _require_mapping(name, settings.get(name))
    plugins = settings.get("plugins") or {}
    for kind in ("apps", "backbones"):
        sections = plugins.get(kind)
        _require_mapping(f"plugins.{kind}", sections)
        for name, section in list((sections or {}).items()):
            _require_mapping(
                f"plugins.{kind}.{name}", section, what="a mapping (the plugin's settings, or {} for none)"
            )
            if section is None:
                settings.set(f"plugins.{kind}.{name}", {})
    if "http" in settings and settings.get("http") is None:  # `http:` alone: all defaults
        settings.set("http", {})


def _require_mapping(key: str, value: Any, what: str = "a mapping") -> None:
    if value is not None and not isinstance(value, dict):
        raise ConfigError(f"invalid config: {key} must be {what}, got {_show(value)}")


def _show(value: Any, limit: int = 60) -> str:
    text = " ".join(repr(value).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def raw_value(settings: Any, dotted: str) -> Any:
    """The value at ``a.b.c`` as written, or None; never raises, whatever shape is on the way."""
    parts = dotted.split(".")
    value = settings.get(parts[0])
    for part in parts[1:]:
        if not isinstance(value, dict):
            return None
        value = value.get(part)
    return value


def check_shapes(settings: Any, validators: Iterable[Validator]) -> None:
    """Every section a validator looks into must be a mapping (or absent).

    Runs before the validators: dynaconf cannot look up ``queue.name_suffix``
    when ``queue`` is ``5`` (it raises deep inside), and a plugin reading its
    section would crash the same way. Raises ``ConfigError`` naming the key.
    """
    parents: dict[str, None] = {}
    for validator in validators:
        for name in getattr(validator, "names", ()):
            parts = str(name).split(".")
            for depth in range(1, len(parts)):
                parents.setdefault(".".join(parts[:depth]), None)
    # Shallowest first, so the message names the outermost wrong section.
    for key in sorted(parents, key=lambda k: (k.count("."), k)):
        _require_mapping(key, raw_value(settings, key))


def validate(settings: Dynaconf, validators: Iterable[Validator]) -> None:
    """Apply validators (setting their defaults); raise ``ConfigError`` naming every bad key."""
    validators = list(validators)
    check_shapes(settings, validators)
    settings.validators.register(*validators)
    try:
        settings.validators.validate_all()
    except ValidationError as err:
        messages = [message for _validator, message in err.details] or [str(err)]
        raise ConfigError("invalid config: " + "; ".join(dict.fromkeys(messages))) from None


def section(settings: Dynaconf, kind: str, name: str) -> Any:
    """The config section ``plugins.<kind>.<name>``."""
    return settings.get(f"plugins.{kind}.{name}")


def configured(settings: Dynaconf, kind: str) -> list[str]:
    """Names of the plugins configured under ``plugins.<kind>``."""
    sections = settings.get(f"plugins.{kind}") or {}
    return [str(name).lower() for name in sections]
