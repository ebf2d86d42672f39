"""``threatbus-zmq tail``: subscribe to the bus and print what it carries, one line a message."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from datetime import datetime
from typing import Any, TextIO

import orjson
import zmq

from threatbus.data import Indicator, Message, Sighting, SnapshotRequest, decode
from threatbus.errors import DecodeError
from threatbus_zmq.cli_common import EXIT_OK, EXIT_USAGE, add_command, notice, require_positive
from threatbus_zmq.client import ManageClient, SubscriptionRefused, Tail
from threatbus_zmq.wire import SNAPSHOT_END_KIND, split_pub_frame

HELP = """\
Subscribe to the bus and print what it carries until Ctrl-C. Each line shows
time, kind, id and the essentials; --raw prints the JSON of each message, one
per line (for jq and scripts). Keeps the subscription alive with heartbeats
and subscribes again if the bus restarts. Progress and problems go to stderr,
messages to stdout.

exit status: 0 stopped (Ctrl-C, or --count reached), 2 bad usage or the bus
refused the subscription, 3 the bus did not answer

example:
  threatbus-zmq tail                      # indicators and sightings
  threatbus-zmq tail --topic stix2/sighting --raw | jq .
  threatbus-zmq tail --snapshot 7         # ask other apps for the last 7 days"""


def add_parser(commands: Any) -> None:
    """The ``tail`` subcommand."""
    add_command(
        commands, "tail", "print the intel the bus carries", HELP, _options, lambda args: tail_command(args, sys.stdout)
    )


def _options(tail: argparse.ArgumentParser) -> None:
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


def _json_object(text: str) -> dict[str, Any]:
    try:
        value = orjson.loads(text)
    except orjson.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"not JSON: {err}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object")
    return value


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
    """The SIGINT/SIGTERM handler: it only records the signal; the loop looks at ``event``."""

    def __init__(self) -> None:
        self.event = threading.Event()

    def __call__(self, signum: int, _frame: Any) -> None:
        self.event.set()


def tail_command(args: argparse.Namespace, out: TextIO) -> int:
    require_positive(args.heartbeat, "--heartbeat")
    topics = args.topic or ["stix2"]
    topic: str | list[str] = topics[0] if len(topics) == 1 else topics
    stop = _Stop()
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    context = zmq.Context()
    manage = ManageClient(args.host, args.manage, args.timeout, context)
    subscription = Tail(manage, args.host, topic, args.snapshot, args.heartbeat, notice, context, args.filter)
    try:
        try:
            receiver = subscription.open()
        except SubscriptionRefused as err:
            notice(f"the bus refused the subscription: {err.args[0]}")
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
                notice(f"skipped a malformed frame: {err}")
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
