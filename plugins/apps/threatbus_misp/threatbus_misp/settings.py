"""The plugin's config section ``plugins.apps.misp``: validators and the settings built from it.

The keys are the original MISP app's (WIRE.md): ``api.host``, ``api.ssl``,
``api.key``; ``zmq.host`` and ``zmq.port`` or ``kafka.topics``,
``kafka.poll_interval`` and ``kafka.config`` (exactly one of the two feeds);
``filter``, a list of ``{orgs, types, tags}`` entries. A mapping at
``filter`` is not ours: it is the bus's policy filter (``threatbus.policy``)
of what the app receives, which the core validates and applies.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from dynaconf import Validator

from threatbus.config import given, option, port

NAME = "misp"
PREFIX = f"plugins.apps.{NAME}"
FILTER_KEYS = ("orgs", "types", "tags")
DEFAULT_ZMQ_TOPIC = "misp_json_attribute"


def kafka_available() -> bool:
    """True when the optional Kafka client (``threatbus-misp[kafka]``) is installed."""
    return importlib.util.find_spec("confluent_kafka") is not None


def _present(section: Mapping[str, Any], key: str) -> bool:
    return section.get(key) is not None


def _one_feed(section: Any) -> bool:
    if not isinstance(section, Mapping):
        return True  # option(PREFIX, dict) of the core reports the wrong type
    return _present(section, "zmq") != _present(section, "kafka")


def _zmq_complete(section: Any) -> bool:
    zmq = section.get("zmq") if isinstance(section, Mapping) else None
    return not isinstance(zmq, Mapping) or (_present(zmq, "host") and _present(zmq, "port"))


def _kafka_complete(section: Any) -> bool:
    kafka = section.get("kafka") if isinstance(section, Mapping) else None
    return not isinstance(kafka, Mapping) or _present(kafka, "topics")


def _kafka_installed(section: Any) -> bool:
    return not (isinstance(section, Mapping) and _present(section, "kafka")) or kafka_available()


def _section_rule(check: Any, message: str) -> Validator:
    # The message must not quote the section: it holds api.key.
    return Validator(PREFIX, condition=check, messages={"condition": message})


def _filter_valid(entries: Any) -> bool:
    if isinstance(entries, Mapping):
        return True  # a policy filter of the bus (threatbus.policy), which the core validates
    if not isinstance(entries, list):
        return False
    for entry in entries:
        if not isinstance(entry, Mapping) or not set(entry) <= set(FILTER_KEYS):
            return False
        for values in entry.values():
            if not isinstance(values, list) or not all(
                isinstance(v, (str, int)) and not isinstance(v, bool) for v in values
            ):
                return False
    return True


def validators() -> list[Validator]:
    """Every key of ``plugins.apps.misp`` (sections before their keys); see README.md.

    ``api`` may be left out (no sightings, no snapshots), and so may the feed
    not used: the keys of ``zmq`` and ``kafka`` take their defaults only when
    that section is there, so a default never makes the other feed appear.
    """
    zmq, kafka = f"{PREFIX}.zmq", f"{PREFIX}.kafka"
    return [
        _section_rule(_one_feed, f"{PREFIX} needs exactly one of zmq (MISP's ZeroMQ feed) or kafka, not both"),
        _section_rule(_zmq_complete, f"{PREFIX}.zmq needs host and port (MISP's ZeroMQ publisher)"),
        _section_rule(_kafka_complete, f"{PREFIX}.kafka needs topics (the Kafka topics MISP publishes to)"),
        _section_rule(
            _kafka_installed,
            f"{PREFIX}.kafka is configured but no Kafka client is installed: pip install 'threatbus-misp[kafka]'",
        ),
        option(f"{PREFIX}.api", dict, default={}),
        option(
            f"{PREFIX}.api.host",
            str,
            default=None,
            check=lambda url: url.startswith(("http://", "https://")),
            expected="the URL of MISP, starting with http:// or https://",
        ),
        option(f"{PREFIX}.api.ssl", bool, default=True),
        option(f"{PREFIX}.api.key", str, default=None, check=bool, expected="a MISP API key"),
        option(zmq, dict),
        # host, port and topics have no default: the rules above require them in their section.
        option(
            f"{zmq}.host",
            str,
            when=given(zmq),
            check=bool,
            expected="the host name or address of MISP's ZeroMQ publisher",
        ),
        port(f"{zmq}.port", when=given(zmq)),
        option(kafka, dict),
        option(
            f"{kafka}.topics",
            list,
            when=given(kafka),
            check=lambda topics: bool(topics) and all(isinstance(t, str) and t for t in topics),
            expected="a non-empty list of topic names",
        ),
        option(
            f"{kafka}.poll_interval",
            (int, float),
            default=1.0,
            when=given(kafka),
            check=lambda seconds: 0 < seconds <= 60,
            expected="a number of seconds between 0 and 60",
        ),
        option(f"{kafka}.config", dict, default={}, when=given(kafka)),
        option(
            f"{PREFIX}.filter",
            (list, dict),
            check=_filter_valid,
            expected="a list of entries with lists 'orgs', 'types' and/or 'tags' (or a mapping: a policy filter)",
        ),
    ]


def _feed(config: Any, name: str) -> Any:
    """The section of feed ``name`` (``zmq`` or ``kafka``), or None when the other one is configured."""
    section = config.get(name)
    return section if isinstance(section, Mapping) else None


def _misp_filter(value: Any) -> list[Any]:
    # A list is the original's ingestion filter; a mapping there is the bus's policy filter
    # for what the app receives, applied by the core (threatbus.policy), not by this plugin.
    return value if isinstance(value, list) else []


@dataclass(frozen=True)
class FilterEntry:
    """One entry of ``filter``: an omitted list matches everything."""

    orgs: frozenset[str] | None = None
    types: frozenset[str] | None = None
    tags: frozenset[str] | None = None

    @classmethod
    def from_config(cls, entry: Mapping[str, Any]) -> FilterEntry:
        def values(key: str) -> frozenset[str] | None:
            listed = entry.get(key)
            return None if listed is None else frozenset(str(v) for v in listed)

        return cls(orgs=values("orgs"), types=values("types"), tags=values("tags"))

    def matches(self, orgs: Iterable[str], attribute_type: str, tags: Iterable[str]) -> bool:
        return (
            (self.orgs is None or not self.orgs.isdisjoint(orgs))
            and (self.types is None or attribute_type in self.types)
            and (self.tags is None or not self.tags.isdisjoint(tags))
        )


@dataclass(frozen=True)
class MispSettings:
    """The plugin's settings, built from its validated section (the defaults are in ``validators``).

    The keys of the feed not configured are None (zmq) or empty (kafka).
    """

    api_host: str | None
    api_ssl: bool
    api_key: str | None
    zmq_host: str | None
    zmq_port: int | None
    kafka_topics: tuple[str, ...]
    kafka_poll_interval: float | None
    kafka_config: Mapping[str, Any]
    filters: tuple[FilterEntry, ...]

    @classmethod
    def from_config(cls, config: Any) -> MispSettings:
        api = config["api"]
        zmq = _feed(config, "zmq")
        kafka = _feed(config, "kafka")
        return cls(
            api_host=api["host"],
            api_ssl=bool(api["ssl"]),
            api_key=api["key"],
            zmq_host=zmq["host"] if zmq else None,
            zmq_port=zmq["port"] if zmq else None,
            kafka_topics=tuple(kafka["topics"]) if kafka else (),
            kafka_poll_interval=float(kafka["poll_interval"]) if kafka else None,
            kafka_config=dict(kafka["config"]) if kafka else {},
            filters=tuple(FilterEntry.from_config(entry) for entry in _misp_filter(config.get("filter"))),
        )

    @property
    def has_api(self) -> bool:
        return bool(self.api_host and self.api_key)

    @property
    def uses_kafka(self) -> bool:
        return bool(self.kafka_topics)

    @property
    def zmq_endpoint(self) -> str:
        host = f"[{self.zmq_host}]" if self.zmq_host and ":" in self.zmq_host else self.zmq_host
        return f"tcp://{host}:{self.zmq_port}"

    def passes(self, orgs: Iterable[str], attribute_type: str, tags: Iterable[str]) -> bool:
        """An attribute passes the filter when it matches any entry (no entries: everything passes)."""
        if not self.filters:
            return True
        orgs, tags = set(orgs), set(tags)
        return any(entry.matches(orgs, attribute_type, tags) for entry in self.filters)
