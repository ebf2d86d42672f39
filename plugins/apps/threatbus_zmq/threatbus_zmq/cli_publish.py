"""``threatbus-zmq publish``: read STIX indicators and sightings, validate them, send them to the sub port."""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import orjson
import zmq

from threatbus import stix
from threatbus.data import Message, from_payload
from threatbus.errors import DecodeError
from threatbus_zmq.cli_common import EXIT_INVALID, EXIT_OK, UsageError, add_command, notice
from threatbus_zmq.client import BusUnreachable, ManageClient, Sender, is_success

PROGRESS_THRESHOLD = 1000  # objects; fewer are sent without a progress bar
MAX_ERRORS_SHOWN = 10

HELP = """\
Publish STIX 2.1 indicators and sightings into the bus. The input is a STIX
bundle, a single object, a JSON list of objects, or JSON lines (one object per
line). Every object is validated first (structure and STIX pattern); invalid
ones are reported and not sent. Objects of other STIX types in a bundle are
skipped.

exit status: 0 all sent, 1 some or all input invalid (the valid rest was
sent), 2 bad usage or unreadable input, 3 the bus did not answer

example:
  threatbus-zmq publish intel.json
  echo '{"type": "indicator", ...}' | threatbus-zmq publish -"""


def add_parser(commands: Any) -> None:
    """The ``publish`` subcommand."""
    add_command(
        commands, "publish", "publish indicators and sightings from a file or stdin", HELP, _options, publish_command
    )


def _options(publish: argparse.ArgumentParser) -> None:
    publish.add_argument("source", nargs="?", default="-", metavar="FILE", help="input file, or - for stdin (default)")
    publish.add_argument(
        "--sub", type=int, metavar="PORT", help="send to this sub port directly instead of asking the manage port"
    )
    publish.add_argument("--dry-run", action="store_true", help="validate and count only; send nothing")
    progress = publish.add_mutually_exclusive_group()
    progress.add_argument("--progress", dest="progress", action="store_true", default=None, help="always show progress")
    progress.add_argument("--no-progress", dest="progress", action="store_false", help="never show progress")


@dataclass
class Input:
    valid: list[Message] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    skipped: Counter[str] = field(default_factory=Counter)


def _objects(data: bytes) -> list[tuple[str, Any]]:
    """(position, parsed JSON or an exception) for every object in ``data``."""
    try:
        whole = orjson.loads(data)
    except orjson.JSONDecodeError:
        whole = None
        is_json = False
    else:
        is_json = True
    if is_json:
        if isinstance(whole, dict) and whole.get("type") == "bundle":
            objects = whole.get("objects")
            if not isinstance(objects, list):
                raise UsageError("the bundle has no list of 'objects'")
            return [(f"object {i + 1}", obj) for i, obj in enumerate(objects)]
        if isinstance(whole, list):
            return [(f"object {i + 1}", obj) for i, obj in enumerate(whole)]
        return [("object 1", whole)]
    result: list[tuple[str, Any]] = []
    for number, line in enumerate(data.splitlines(), 1):
        if not line.strip():
            continue
        try:
            result.append((f"line {number}", orjson.loads(line)))
        except orjson.JSONDecodeError as err:
            result.append((f"line {number}", DecodeError(f"not valid JSON: {err}")))
    if not result:
        raise UsageError("the input is empty")
    return result


def parse_input(data: bytes) -> Input:
    """The valid indicators and sightings in ``data``, what is wrong with the rest, and what was skipped."""
    parsed = Input()
    for position, obj in _objects(data):
        try:
            if isinstance(obj, Exception):
                raise obj
            kind = obj.get("type") if isinstance(obj, dict) else None
            if isinstance(obj, dict) and kind not in ("indicator", "sighting"):
                parsed.skipped[str(kind)] += 1
                continue
            message = from_payload(obj)
            stix.validate(message)
            parsed.valid.append(message)
        except DecodeError as err:
            parsed.errors.append(f"{position}: {err}")
    return parsed


def _read(source: str) -> bytes:
    if source == "-":
        if sys.stdin.isatty():
            notice("reading STIX from stdin (Ctrl-D to end; see --help)")
        return sys.stdin.buffer.read()
    try:
        with open(source, "rb") as handle:
            return handle.read()
    except OSError as err:
        raise UsageError(f"cannot read {source}: {err.strerror or err}") from None


def _plural(count: int, word: str) -> str:
    return f"{count} {word}{'' if count == 1 else 's'}"


def publish_command(args: argparse.Namespace) -> int:
    parsed = parse_input(_read(args.source))
    kinds = Counter(message.type_name for message in parsed.valid)
    summary = " and ".join(_plural(kinds[k], k) for k in ("indicator", "sighting") if kinds[k]) or "nothing"
    for error in parsed.errors[:MAX_ERRORS_SHOWN]:
        print(f"invalid: {error}", file=sys.stderr)
    if len(parsed.errors) > MAX_ERRORS_SHOWN:
        print(f"... and {len(parsed.errors) - MAX_ERRORS_SHOWN} more invalid objects", file=sys.stderr)
    if parsed.skipped:
        other = ", ".join(f"{count} {kind}" for kind, count in sorted(parsed.skipped.items()))
        print(f"skipped objects that are not indicators or sightings: {other}", file=sys.stderr)
    if args.dry_run:
        print(f"valid: {summary}; invalid: {len(parsed.errors)} (dry run: nothing sent)", file=sys.stderr)
        return EXIT_INVALID if parsed.errors else EXIT_OK
    if not parsed.valid:
        notice("nothing to publish")
        return EXIT_INVALID

    context = zmq.Context()
    try:
        sub_port = args.sub or _discover_sub_port(args, context)
        sender = Sender(args.host, sub_port, context=context, send_timeout=max(args.timeout, 1.0))
        try:
            sender.wait_ready(args.timeout)
            show = args.progress if args.progress is not None else len(parsed.valid) >= PROGRESS_THRESHOLD
            _send_all(sender, parsed.valid, show)
        finally:
            sender.close(linger=max(args.timeout, 1.0))
    finally:
        context.term()
    print(f"published {summary} to {sender.address}", file=sys.stderr)
    return EXIT_INVALID if parsed.errors else EXIT_OK


def _discover_sub_port(args: argparse.Namespace, context: zmq.Context) -> int:
    """Ask the manage port for the sub port (a subscription, ended at once)."""
    manage = ManageClient(args.host, args.manage, args.timeout, context)
    try:
        reply = manage.subscribe("stix2/indicator")
        if not is_success(reply) or not isinstance(reply.get("sub_port"), int):
            raise BusUnreachable(f"the manage endpoint {manage.address} refused a subscription: {reply}")
        manage.unsubscribe(reply["topic"])
        return reply["sub_port"]
    finally:
        manage.close()


def _send_all(sender: Sender, messages: list[Message], show_progress: bool) -> None:
    if not show_progress:
        for message in messages:
            sender.send(message)
        return
    from tqdm import tqdm

    with tqdm(total=len(messages), unit="obj", file=sys.stderr, desc="publishing") as bar:
        for index, message in enumerate(messages, 1):
            sender.send(message)
            if index % 500 == 0:
                bar.update(500)
        bar.update(len(messages) % 500)
