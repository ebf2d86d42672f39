"""What the ``threatbus-zmq`` commands share: exit statuses, usage errors, the bus connection options."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any

PROG = "threatbus-zmq"

EXIT_OK = 0
EXIT_INVALID = 1  # some or all input was invalid
EXIT_USAGE = 2  # bad arguments or unreadable input
EXIT_UNREACHABLE = 3  # the bus did not answer


class UsageError(Exception):
    """Bad arguments or unreadable input: the command ends with ``EXIT_USAGE`` and this message."""


def notice(text: str) -> None:
    """One line for the user on stderr, named after the program (stdout carries only data)."""
    print(f"{PROG}: {text}", file=sys.stderr)


def require_positive(value: float, option: str) -> float:
    if value <= 0:
        raise UsageError(f"{option} must be positive")
    return value


def add_command(
    commands: Any,
    name: str,
    summary: str,
    description: str,
    options: Callable[[argparse.ArgumentParser], None],
    run: Callable[[argparse.Namespace], int],
) -> None:
    """A subcommand of ``threatbus-zmq`` that talks to the bus.

    ``summary`` is its line in the main help, ``description`` its own help;
    ``options(parser)`` adds its options, the connection options follow;
    ``main`` calls ``run(args)``.
    """
    parser = commands.add_parser(
        name, help=summary, description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    options(parser)
    _add_connection_options(parser)
    parser.set_defaults(run=run)


def _add_connection_options(parser: argparse.ArgumentParser) -> None:
    """--host, --manage and --timeout: how a command reaches the bus."""
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
