"""``threatbus policy explain``: which filter lets each object of a STIX file through, and why not.

    threatbus policy explain -c config.yaml intel.json [--client NAME=JSON ...]

The file holds a STIX bundle, one object, a JSON list of objects, or one
object per line (as ``threatbus-zmq publish`` reads). For each indicator and
sighting it prints one line per rule of the config: the backbone's export
filter (when this node's apps publish it) and import filter (when another
node does), each app's filter, and each ``--client`` filter (a ZeroMQ
client's ``"filter"`` in its subscribe request, behind the app's filter).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import orjson

from threatbus import config, policy
from threatbus.errors import ConfigError, ThreatBusError

# The backbone that carries nothing between nodes: its export and import filters never apply.
LOCAL_ONLY_BACKBONES = ("inmem",)
CLIENT_APP = "zmq"


class ExplainError(ThreatBusError):
    """The STIX file cannot be read."""


@dataclass(frozen=True)
class Rule:
    """One filter of the config, and where it sits."""

    kind: str  # export, import, app, client
    name: str
    filter: policy.Filter | None
    note: str = ""  # why it never applies, if so

    def verdict(self, payload: dict[str, Any]) -> tuple[bool, str]:
        if self.note:
            return True, self.note
        if self.filter is None:
            return True, "passes (no filter)"
        reason = self.filter.explain(payload)
        return (True, "passes") if reason is None else (False, f"HELD BACK: {reason}")


def rules(settings: Any, clients: Sequence[tuple[str, policy.Filter]]) -> list[Rule]:
    """Every filter of the validated ``settings``, in the order a message meets them."""
    found: list[Rule] = []
    for name in config.configured(settings, "backbones"):
        section = settings.get(f"plugins.backbones.{name}") or {}
        for direction in ("export", "import"):
            key = f"plugins.backbones.{name}.{direction}"
            compiled = policy.Filter.from_config(section.get(direction), key)
            note = "no other nodes: nothing leaves or arrives" if name in LOCAL_ONLY_BACKBONES else ""
            found.append(Rule(direction, name, compiled, note))
    for name in config.configured(settings, "apps"):
        key = f"plugins.apps.{name}"
        found.append(Rule("app", name, policy.Filter.from_config(settings.get(key), key, allow_list=True)))
        if name == CLIENT_APP:
            found.extend(Rule("client", f"{name}/{client}", compiled) for client, compiled in clients)
    return found


def read_objects(path: Path) -> list[tuple[str, Any]]:
    """(position, object or error text) for every JSON object in the file."""
    try:
        data = path.read_bytes()
    except OSError as err:
        raise ExplainError(f"cannot read {str(path)!r}: {err.strerror}") from None
    try:
        whole = orjson.loads(data)
    except orjson.JSONDecodeError:
        lines = [(n, line) for n, line in enumerate(data.splitlines(), 1) if line.strip()]
        if not lines:
            raise ExplainError(f"{str(path)!r} is empty") from None
        result: list[tuple[str, Any]] = []
        for number, line in lines:
            try:
                result.append((f"line {number}", orjson.loads(line)))
            except orjson.JSONDecodeError as err:
                result.append((f"line {number}", f"not valid JSON: {err}"))
        return result
    if isinstance(whole, dict) and whole.get("type") == "bundle":
        whole = whole.get("objects")
        if not isinstance(whole, list):
            raise ExplainError("the bundle has no list of 'objects'")
    if isinstance(whole, list):
        return [(f"object {i + 1}", obj) for i, obj in enumerate(whole)]
    return [("object 1", whole)]


def summary(payload: dict[str, Any]) -> str:
    """What the filters look at, in a few words."""
    subject = payload.get("x_threatbus_indicator") if payload.get("type") == "sighting" else payload
    subject = subject if isinstance(subject, dict) else payload
    level = policy.tlp_level(subject)
    parts = [f"TLP:{policy.TLP_NAMES[level]}" if level is not None else "no TLP"]
    if subject.get("confidence") is not None:
        parts.append(f"confidence {subject['confidence']}")
    if subject.get("type") == "indicator":
        flagged = any(subject.get(flag) is True for flag in policy.DETECTION_FLAGS)
        parts.append("for detection" if flagged else "not for detection")
        parts.append(f"pattern_type {subject.get('pattern_type')}")
    if subject is not payload:
        parts.append(f"of {subject.get('id')}")
    if payload.get("x_threatbus_update") == "REMOVE" or payload.get("revoked") is True:
        parts.append("removal")
    return ", ".join(parts)


def explain(settings: Any, path: Path, clients: Sequence[tuple[str, policy.Filter]], out: TextIO) -> int:
    """Print the verdict of every rule for every object; returns how many objects were explained."""
    found = rules(settings, clients)
    explained = 0
    skipped: dict[str, int] = {}
    for position, obj in read_objects(path):
        if isinstance(obj, str):
            print(f"{position}: skipped, {obj}", file=out)
            continue
        kind = obj.get("type") if isinstance(obj, dict) else None
        if kind not in ("indicator", "sighting"):
            skipped[str(kind)] = skipped.get(str(kind), 0) + 1
            continue
        explained += 1
        print(f"{obj.get('id', position)} ({summary(obj)})", file=out)
        app_passed = True
        for rule in found:
            if rule.kind == "client" and not app_passed:
                print(f"  {rule.kind:<7}{rule.name:<20}not reached: its app holds it back", file=out)
                continue
            passed, text = rule.verdict(obj)
            if rule.kind == "app":
                app_passed = passed
            if rule.kind == "export" and not passed:
                text += " (stays on this node: its own apps still get it)"
            print(f"  {rule.kind:<7}{rule.name:<20}{text}", file=out)
    if skipped:
        kinds = ", ".join(f"{count} {kind}" for kind, count in sorted(skipped.items()))
        print(f"skipped (filters apply to indicators and sightings only): {kinds}", file=out)
    return explained


def parse_client(text: str) -> tuple[str, policy.Filter]:
    name, sep, spec = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"expected NAME=JSON, got {text!r}")
    try:
        value = orjson.loads(spec)
    except orjson.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"client {name}: not JSON: {err}") from None
    try:
        return name, policy.Filter(value, f"client {name}: filter")
    except policy.FilterError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def add_parser(commands: Any, parents: Sequence[argparse.ArgumentParser]) -> None:
    """Add ``threatbus policy explain`` to the subcommands of the ``threatbus`` parser."""
    parser = commands.add_parser("policy", help="explain what the policy filters of a config let through")
    actions = parser.add_subparsers(dest="policy_command", metavar="ACTION", required=True)
    action = actions.add_parser(
        "explain",
        parents=list(parents),
        help="for each object of a STIX file: which filter lets it through or holds it back, and why",
        description=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    action.add_argument("file", metavar="FILE", help="STIX bundle, object, list, or JSON lines")
    action.add_argument(
        "--client",
        action="append",
        type=parse_client,
        default=[],
        metavar="NAME=JSON",
        help=f'a {CLIENT_APP} client\'s subscribe filter, e.g. \'sensor={{"tlp": "green"}}\' (repeatable)',
    )


def command(args: argparse.Namespace, out: TextIO) -> int:
    """Run ``threatbus policy explain``; raises ``ConfigError`` for a bad config."""
    settings, _source = config.load(args.config)
    apps, backbones = config.configured(settings, "apps"), config.configured(settings, "backbones")
    config.validate(settings, config.core_validators() + policy.node_validators(apps, backbones))
    try:
        explained = explain(settings, Path(args.file), args.client, out)
    except ExplainError as err:
        raise ConfigError(str(err)) from None
    if not explained:
        print("no indicators or sightings in the file", file=out)
    return 0
