"""``threatbus-zmq``: publish intel into a Threat Bus and watch what it carries.

The front: argument parsing, and the errors every command may end with.
The commands live in ``cli_publish`` and ``cli_tail``; both speak the ZeroMQ
protocol of the zmq app plugin (manage, pub and sub endpoints), so they work
with any Threat Bus node that runs it.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from threatbus_zmq import cli_publish, cli_tail
from threatbus_zmq.cli_common import EXIT_OK, EXIT_UNREACHABLE, EXIT_USAGE, PROG, UsageError, notice, require_positive
from threatbus_zmq.client import BusUnreachable

DESCRIPTION = """\
Talk to a Threat Bus over its ZeroMQ app plugin (the manage, pub and sub
ports; by default 127.0.0.1:13370-13372, as `threatbus` without a config
serves them)."""

EPILOG = """\
`threatbus-zmq COMMAND --help` explains a command, its options and its exit
status (0 success, 1 invalid input, 2 bad usage, 3 the bus did not answer)."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description=DESCRIPTION, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    cli_publish.add_parser(commands)
    cli_tail.add_parser(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        require_positive(args.timeout, "--timeout")
        return args.run(args)
    except UsageError as err:
        notice(str(err))
        return EXIT_USAGE
    except BusUnreachable as err:
        notice(f"{err}. Is Threat Bus running with the zmq app plugin, and are --host and --manage right?")
        return EXIT_UNREACHABLE
    except KeyboardInterrupt:
        return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
