"""The suricata plugin's settings: validators with the defaults, and the frozen settings built from them."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

from threatbus.config import choice, count, empty_or, matching, option, seconds, writable_file
from threatbus.errors import PluginError
from threatbus_suricata.mapping import ACTIONS, MODES, RESERVED_SIDS, Settings

NAME = "suricata"
PREFIX = f"plugins.apps.{NAME}"
RELOAD_COMMANDS = ("ruleset-reload-nonblocking", "ruleset-reload-rules", "reload-rules")
MAX_SID = 2**32 - 1
# sun_path of a unix socket holds 108 bytes including the terminating NUL.
MAX_SOCKET_PATH = 107
_SET_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
SET_NAME_EXPECTED = "a dataset name of letters, digits, '-' and '_'"

RULES_FILE = "/var/lib/suricata/rules/threatbus.rules"
SOCKET = "/var/run/suricata/suricata-command.socket"
EVE = "/var/log/suricata/eve.json"


def _existing_dir(path: Any) -> bool:
    return bool(path) and os.path.isdir(os.path.dirname(os.path.abspath(path)))


def validators() -> list[Any]:
    """Every key of ``plugins.apps.suricata`` with its default; see README.md."""
    return [
        writable_file(f"{PREFIX}.rules_file", default=RULES_FILE),
        option(
            f"{PREFIX}.socket",
            str,
            default=SOCKET,
            check=lambda p: bool(p) and len(os.fsencode(p)) <= MAX_SOCKET_PATH,
            expected=f"the path of Suricata's unix command socket (at most {MAX_SOCKET_PATH} bytes)",
        ),
        empty_or(
            f"{PREFIX}.eve",
            _existing_dir,
            default=EVE,
            expected="the path of Suricata's eve.json in an existing directory, or '' to ignore alerts",
        ),
        option(f"{PREFIX}.eve_from_start", bool, default=False),
        choice(f"{PREFIX}.mode", MODES, default="rules"),
        choice(f"{PREFIX}.action", ACTIONS, default="alert"),
        count(
            f"{PREFIX}.sid_min",
            default=3_900_000_000,
            maximum=MAX_SID - RESERVED_SIDS,
            expected=f"a sid between 1 and {MAX_SID - RESERVED_SIDS}",
        ),
        count(f"{PREFIX}.sid_max", default=3_999_999_999, maximum=MAX_SID, expected=f"a sid between 1 and {MAX_SID}"),
        option(f"{PREFIX}.datasets", dict, default={}),
        matching(f"{PREFIX}.datasets.ip", _SET_NAME, default="threatbus-ip", expected=SET_NAME_EXPECTED),
        matching(f"{PREFIX}.datasets.domain", _SET_NAME, default="threatbus-domain", expected=SET_NAME_EXPECTED),
        seconds(
            f"{PREFIX}.reload_interval", default=2.0, maximum=3600, expected="a number of seconds between 0 and 3600"
        ),
        choice(f"{PREFIX}.reload_command", RELOAD_COMMANDS, default=RELOAD_COMMANDS[0]),
        count(f"{PREFIX}.dataset_command_limit", default=1000, minimum=0, expected="a number of commands (0 or more)"),
        seconds(f"{PREFIX}.socket_timeout", default=5.0, maximum=300, expected="a number of seconds between 0 and 300"),
        count(f"{PREFIX}.snapshot", default=0, minimum=0, expected="a number of days (0 or more)"),
    ]


@dataclass(frozen=True)
class SuricataSettings:
    """The plugin's settings, built from its validated section (the defaults are in ``validators``)."""

    rules_file: Path
    socket: str
    socket_timeout: float
    eve: str
    eve_from_start: bool
    mapping: Settings
    sid_min: int
    sid_max: int
    reload_interval: float
    reload_command: str
    dataset_command_limit: int
    snapshot: timedelta

    @classmethod
    def from_config(cls, config: Any) -> SuricataSettings:
        """Raises ``PluginError`` when the sid range is too small for the plugin's rules."""
        sid_min, sid_max = int(config["sid_min"]), int(config["sid_max"])
        if sid_max - sid_min < RESERVED_SIDS + 1000:
            raise PluginError(
                f"{PREFIX}: sid_max ({sid_max}) must be at least sid_min ({sid_min}) + {RESERVED_SIDS + 1000}: "
                f"the first {RESERVED_SIDS} sids are the plugin's own rules, the rest one per indicator"
            )
        datasets = config["datasets"]
        return cls(
            rules_file=Path(config["rules_file"]).absolute(),
            socket=str(config["socket"]),
            socket_timeout=float(config["socket_timeout"]),
            eve=config["eve"],
            eve_from_start=bool(config["eve_from_start"]),
            mapping=Settings(
                mode=config["mode"], action=config["action"], ip_set=datasets["ip"], domain_set=datasets["domain"]
            ),
            sid_min=sid_min,
            sid_max=sid_max,
            reload_interval=float(config["reload_interval"]),
            reload_command=config["reload_command"],
            dataset_command_limit=int(config["dataset_command_limit"]),
            snapshot=timedelta(days=int(config["snapshot"])),
        )
