"""The ``threatbus`` command: argument parsing, config loading, signals, main()."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from threatbus import __version__, config, deadletters, explain, plugins
from threatbus import logging as threatbus_logging
from threatbus.bus import Bus
from threatbus.errors import ConfigError, ThreatBusError
from threatbus.node import Node

logger = logging.getLogger("threatbus")

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_CONFIG = 2

DESCRIPTION = """\
Threat Bus: a pub-sub bus for threat intelligence. Security tools connect
through app plugins (zmq, zeek, suricata, ...) and exchange STIX 2.1
indicators and sightings; a backbone plugin (inmem for one node, rabbitmq for
several) carries them between apps and nodes.

Without a command, the bus runs until SIGINT or SIGTERM."""

EPILOG = """\
configuration:
  -c FILE, else config.yaml or config.yml in the working directory, else the
  embedded default (in-memory backbone, ZeroMQ app on 127.0.0.1:13370-13372).
  Environment variables override the file: THREATBUS_ prefix, __ for nesting,
  e.g. THREATBUS_PLUGINS__BACKBONES__RABBITMQ__HOST=broker.example.org

exit status:
  0 stopped cleanly, 1 a plugin failed, 2 invalid config or usage"""


def build_parser() -> argparse.ArgumentParser:
    config_option = argparse.ArgumentParser(add_help=False)
    config_option.add_argument(
        "-c",
        "--config",
        metavar="FILE",
        help="config file (default: ./config.yaml, ./config.yml, or the embedded default)",
    )
    parser = argparse.ArgumentParser(
        prog="threatbus",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        parents=[config_option],
    )
    parser.add_argument("--version", action="version", version=f"threatbus {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    # Subcommands repeat -c so that both `threatbus -c F check` and `threatbus check -c F` work.
    sub_option = argparse.ArgumentParser(add_help=False)
    sub_option.add_argument("-c", "--config", metavar="FILE", default=argparse.SUPPRESS, help="config file")
    commands.add_parser("run", parents=[sub_option], help="run the bus (the default)")
    commands.add_parser("check", parents=[sub_option], help="validate the config and plugins, then exit")
    commands.add_parser("plugins", parents=[sub_option], help="list installed and configured plugins")
    explain.add_parser(commands, parents=[sub_option])
    for name, extension in plugins.commands().items():
        extension.add_parser(commands)
        parser.set_defaults(**{f"_extension_{name}": extension})
    deadletters.add_parser(commands, [sub_option])
    return parser


def prepare(config_path: str | None) -> Bus:
    """Read and validate the config and create the bus with its plugins."""
    settings, source = config.load(config_path)
    if source == config.embedded_default():
        logger.info("no config file given or found: using the embedded default (in-memory backbone, ZeroMQ app)")
    else:
        logger.info("using config file %s", source)
    config.validate(settings, config.core_validators())
    node = node_of(settings, source)
    loaded = plugins.load(settings)
    bus = Bus(settings, apps=loaded["apps"], backbones=loaded["backbones"], node=node)
    bus.configure()
    return bus


def node_of(settings: Any, source: Path) -> Node:
    """The node's identity and data directory from the validated core config. Raises ``ConfigError``."""
    name = settings.node.name
    data_dir = settings.node.get("data_dir") or Node.default_data_dir(name or Node.create().name)
    node = Node.create(name, str(Path(source).resolve()), data_dir)
    node.check_data_dir()
    return node


def run(bus: Bus) -> int:
    stop_requested = threading.Event()

    def request_stop(signum: int, _frame: Any) -> None:
        # Only record the signal; the main loop below does the work.
        stop_requested.set()

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)
    bus.start()
    logger.info("Threat Bus %s is running; stop it with Ctrl-C or SIGTERM", __version__)
    while not stop_requested.wait(0.5):
        pass
    logger.info("stopping")
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # a second Ctrl-C kills at once
    bus.stop()
    logger.info("stopped")
    return EXIT_OK


def check(bus: Bus) -> int:
    print(
        f"config OK: node '{bus.node.name}', backbone {', '.join(bus.plugin_names(bus.backbones))}, "
        f"apps {', '.join(bus.plugin_names(bus.apps)) or 'none'}"
    )
    return EXIT_OK


def list_plugins(config_path: str | None) -> int:
    settings, _source = config.load(config_path)
    rows = plugins.inventory(settings)
    print(f"{'KIND':<10} {'NAME':<12} {'INSTALLED':<22} {'CONFIGURED':<10}")
    for info in rows:
        installed = f"{info.distribution} {info.version}" if info.installed else "no"
        print(f"{info.kind[:-1]:<10} {info.name:<12} {installed:<22} {'yes' if info.configured else 'no':<10}")
    return EXIT_OK


def dead_letters(args: argparse.Namespace) -> int:
    """``threatbus dlq ...``: the backbone plugin provides the store, ``threatbus.deadletters`` the output."""
    store = prepare(args.config).dead_letter_admin()
    try:
        return deadletters.command(args, store)
    finally:
        store.close()


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    threatbus_logging.configure_early()
    try:
        extension = getattr(args, f"_extension_{args.command}", None)
        if extension is not None:
            return int(extension.command(args))
        if args.command == "plugins":
            return list_plugins(args.config)
        if args.command == "policy":
            return explain.command(args, sys.stdout)
        if args.command == "dlq":
            return dead_letters(args)
        bus = prepare(args.config)
        if args.command == "check":
            return check(bus)
        threatbus_logging.configure(bus.settings.logging, bus.node.name)
        return run(bus)
    except ConfigError as err:
        print(f"threatbus: {err}", file=sys.stderr)
        return EXIT_CONFIG
    except ThreatBusError as err:
        print(f"threatbus: {err}", file=sys.stderr)
        return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
