"""Log handlers for the command line; plugins only ever call ``getLogger``."""

from __future__ import annotations

import logging
import sys
from typing import Any

FORMAT = "%(asctime)s %(levelname)-7s [{node}] %(name)s: %(message)s"
# Libraries that are chatty about things the bus logs better itself, and the least level they may log at.
# pika logs each failed connection attempt as several ERROR lines with tracebacks; the backbone logs
# one line per attempt with the cause, so pika's own loggers only speak for CRITICAL.
QUIET_LIBRARIES = {"pika": logging.CRITICAL, "websockets": logging.WARNING, "asyncio": logging.WARNING}


def configure(settings: Any, node_name: str) -> None:
    """Install the console and file handlers the ``logging`` config section asks for."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    # Node names may contain '%', which logging would read as a placeholder.
    formatter = logging.Formatter(FORMAT.format(node=node_name.replace("%", "%%")))
    wanted = [
        (logging.StreamHandler(sys.stderr), settings.console_verbosity) if settings.console else None,
        (logging.FileHandler(settings.filename), settings.file_verbosity) if settings.file else None,
    ]
    levels = []
    for handler, verbosity in filter(None, wanted):
        handler.setLevel(verbosity)
        handler.setFormatter(formatter)
        root.addHandler(handler)
        levels.append(logging.getLevelName(verbosity))
    root.setLevel(min(levels) if levels else logging.CRITICAL)
    quiet_libraries(root.level)


def quiet_libraries(level: int = logging.INFO) -> None:
    for name, least in QUIET_LIBRARIES.items():
        logging.getLogger(name).setLevel(max(least, level))


def configure_early() -> None:
    """Console logging until the config is read, so its errors are visible."""
    logging.basicConfig(level=logging.INFO, format=FORMAT.format(node="threatbus"), stream=sys.stderr)
    quiet_libraries()
