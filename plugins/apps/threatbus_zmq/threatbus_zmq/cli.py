"""``threatbus-zmq``: publish intel into a Threat Bus and watch what it carries.

Both commands speak the ZeroMQ protocol of the zmq app plugin (manage, pub
and sub endpoints), so they work with any Threat Bus node that runs it.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, TextIO

import orjson
import zmq

from threatbus import stix
from threatbus.data import Indicator, Message, Sighting, SnapshotRequest, decode, from_payload
from threatbus.errors import DecodeError
from threatbus_zmq.client import BusUnreachable, ManageClient, Sender, SubscriptionRefused, Tail, is_success
from threatbus_zmq.wire import SNAPSHOT_END_KIND, split_pub_frame

EXIT_OK = 0
EXIT_INVALID = 1  # some or all input was invalid
EXIT_USAGE = 2  # bad arguments or unreadable input
EXIT_UNREACHABLE = 3  # the bus did not answer

PROGRESS_THRESHOLD = 1000  # objects; fewer are sent without a progress bar
MAX_ERRORS_SHOWN = 10

DESCRIPTION = """\
Talk to a Threat Bus over its ZeroMQ app plugin (the manage, pub and sub
ports; by default 127.0.0.1:13370-13372, as `threatbus` without a config
serves them)."""

PUBLISH_HELP = """\
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

TAIL_HELP = """\
Subscribe to the bus and print what it carries until Ctrl-C. Each line shows
time, kind, id and the essentials; --raw prints the JSON of each message, one
per line (for jq and scripts). Keeps the subscription alive with heartbeats
and subscribes again if the bus restarts.

example:
  threatbus-zmq tail                      # indicators and sightings
  threatbus-zmq tail --topic stix2/sighting --raw | jq .
  threatbus-zmq tail --snapshot 7         # ask other apps for the last 7 days"""


class UsageError(Exception):
    pass


def _connection_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("bus connection")
    group.add_argument("--host", default="127.0.0.1", help="host of the Threat Bus node (default: %(default)s)")
    group.add_argument(
        "--manage", type=int, default=13370, metavar="PORT", help="its manage port (default: %(default)s)"
    )
    group.add_argument(
        "--timeout",
        type=float,
        default=5.0,
        metavar="SECONDS",
        help="give up when the bus does not answer within this time (default: %(default)s)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="threatbus-zmq", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    publish = commands.add_parser(
        "publish",
        help="publish indicators and sightings from a file or stdin",
        description=PUBLISH_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    publish.add_argument("source", nargs="?", default="-", metavar="FILE", help="input file, or - for stdin (default)")
    publish.add_argument(
        "--sub", type=int, metavar="PORT", help="send to this sub port directly instead of asking the manage port"
    )
    publish.add_argument("--dry-run", action="store_true", help="validate and count only; send nothing")
    progress = publish.add_mutually_exclusive_group()
    progress.add_argument("--progress", dest="progress", action="store_true", default=None, help="always show progress")
    progress.add_argument("--no-progress", dest="progress", action="store_false", help="never show progress")
    _connection_options(publish)

    tail = commands.add_parser(
        "tail",
        help="print the intel the bus carries",
        description=TAIL_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    tail.add_argument(
        "--topic",
        action="append",
        metavar="T",
        help="topic prefix to follow, repeatable (default: stix2 = indicators and sightings)",
    )
    tail.add_argument("--raw", action="store_true", help="print each message's JSON, one per line")
    tail.add_argument("--snapshot", type=float, default=0, metavar="DAYS", help="request a snapshot of the last DAYS")
    tail.add_argument("--count", type=int, metavar="N", help="exit after N messages")
    tail.add_argument(
        "--filter",
        type=_json_object,
        metavar="JSON",
        help='receive only what passes this policy filter, e.g. \'{"tlp": "amber", "min_confidence": 50}\'',
    )
    tail.add_argument(
        "--heartbeat", type=float, default=5.0, metavar="SECONDS", help="heartbeat interval (default: %(default)s)"
    )
    _connection_options(tail)
    return parser


def _json_object(text: str) -> dict[str, Any]:
    try:
        value = orjson.loads(text)
    except orjson.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"not JSON: {err}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object")
    return value


# ---- publish --------------------------------------------------------------


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
            print("threatbus-zmq: reading STIX from stdin (Ctrl-D to end; see --help)", file=sys.stderr)
        return sys.stdin.buffer.read()
    try:
        with open(source, "rb") as handle:
            return handle.read()
    except OSError as err:
        raise UsageError(f"cannot read {source}: {err.strerror or err}") from None


def _plural(count: int, word: str) -> str:
    return f"{count} {word}{'' if count == 1 else 's'}"


def publish(args: argparse.Namespace) -> int:
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
        print("threatbus-zmq: nothing to publish", file=sys.stderr)
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


# ---- tail -----------------------------------------------------------------


def describe_message(kind: str, message: Message) -> str:
    """One readable line for a message from the bus."""
    now = datetime.now().strftime("%H:%M:%S")
    payload = message.payload
    if isinstance(message, Indicator):
        removal = "  [REMOVE]" if message.is_removal else ""
        return f"{now} indicator  {message.id}  {message.pattern}{removal}"
    if isinstance(message, Sighting):
        details = [f"of {message.sighting_of_ref}"]
        for key, label in (("x_threatbus_indicator_value", "value"), ("x_threatbus_source", "source")):
            if key in payload:
                details.append(f"{label}={payload[key]}")
        if "x_threatbus_match_type" in payload:
            details.append(f"match={payload['x_threatbus_match_type']}")
        return f"{now} sighting   {message.id}  {' '.join(details)}"
    if isinstance(message, SnapshotRequest):
        return (
            f"{now} snapshot request {message.snapshot_id}: {message.snapshot_type.name.lower()}s "
            f"of the last {message.snapshot}"
        )
    return f"{now} {kind}  {orjson.dumps(payload).decode()}"


def describe_snapshot_end(body: bytes) -> str:
    """The line for the end marker of a snapshot: how many objects arrived."""
    try:
        end = orjson.loads(body)
        kind = {1: "indicator", 2: "sighting"}[end["snapshot_type"]]
        return f"snapshot {end['snapshot_id']}: {end['count']} {kind}(s) arrived"
    except (orjson.JSONDecodeError, KeyError, TypeError) as err:
        raise ValueError(f"malformed snapshot end marker {body[:80]!r}: {err}") from None


class _Stop:
    def __init__(self) -> None:
        self.event = threading.Event()

    def __call__(self, signum: int, _frame: Any) -> None:
        self.event.set()


def tail(args: argparse.Namespace, out: TextIO) -> int:
    topics = args.topic or ["stix2"]
    topic: str | list[str] = topics[0] if len(topics) == 1 else topics
    stop = _Stop()
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    context = zmq.Context()
    manage = ManageClient(args.host, args.manage, args.timeout, context)
    subscription = Tail(
        manage,
        args.host,
        topic,
        args.snapshot,
        args.heartbeat,
        lambda line: print(f"threatbus-zmq: {line}", file=sys.stderr),
        context,
        args.filter,
    )
    try:
        try:
            receiver = subscription.open()
        except SubscriptionRefused as err:
            print(f"threatbus-zmq: the bus refused the subscription: {err.args[0]}", file=sys.stderr)
            return EXIT_USAGE
        print(
            f"tailing {', '.join(topics)} on {receiver.socket.get(zmq.LAST_ENDPOINT).decode() or args.host}"
            " (Ctrl-C to stop)",
            file=sys.stderr,
        )
        seen = 0
        for frame in subscription.frames(stop.event.is_set):
            try:
                _p2p, kind, body = split_pub_frame(frame)
                if kind == SNAPSHOT_END_KIND:
                    print(describe_snapshot_end(body), file=sys.stderr, flush=True)
                    continue
                line = body.decode("utf-8", "replace") if args.raw else describe_message(kind, decode(body))
            except (ValueError, DecodeError) as err:
                print(f"threatbus-zmq: skipped a malformed frame: {err}", file=sys.stderr)
                continue
            print(line, file=out, flush=True)
            seen += 1
            if args.count and seen >= args.count:
                break
        return EXIT_OK
    except BrokenPipeError:
        # The reader went away (`| head`): stop quietly, also at interpreter exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), out.fileno())
        return EXIT_OK
    finally:
        subscription.close()
        manage.close()
        context.term()


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.timeout <= 0:
            raise UsageError("--timeout must be positive")
        if args.command == "publish":
            return publish(args)
        if args.heartbeat <= 0:
            raise UsageError("--heartbeat must be positive")
        return tail(args, sys.stdout)
    except UsageError as err:
        print(f"threatbus-zmq: {err}", file=sys.stderr)
        return EXIT_USAGE
    except BusUnreachable as err:
        print(
            f"threatbus-zmq: {err}. Is Threat Bus running with the zmq app plugin, and are --host and --manage right?",
            file=sys.stderr,
        )
        return EXIT_UNREACHABLE
    except KeyboardInterrupt:
        return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
