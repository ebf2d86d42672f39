"""Dead letters: messages a node rejected, kept so that an operator can look at them and send them again.

A backbone keeps them (rabbitmq: a durable queue per node; inmem: a bounded
list in the node's memory) and hands out a ``DeadLetters`` store: the
running node's store is served by its HTTP endpoint under ``/dlq``; the
``threatbus dlq`` command gets one from the backbone's ``dead_letter_admin``
hook. This module holds what is the same for every backbone: the record,
the store's interface, the HTTP client and the command's output.
"""

from __future__ import annotations

import json
import sys
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Protocol, TextIO

from threatbus.errors import ThreatBusError

DEAD_LETTERED = "threatbus_dead_lettered"  # counter{backbone, reason}: messages put into the DLQ
DEAD_LETTERS = "threatbus_dead_letters"  # gauge{backbone}: messages held in the DLQ (in-memory DLQ)
DEAD_LETTERS_REPLAYED = "threatbus_dead_letters_replayed"  # counter{backbone}

# Why a message was dead-lettered (the `reason` label and header).
INVALID_MESSAGE = "invalid-message"  # not a Threat Bus message (JSON, structure)
INVALID_STIX = "invalid-stix"  # a foreign message whose STIX content is invalid
UNDELIVERED = "undelivered"  # a local subscriber (an app) could not take it
REASONS = (INVALID_MESSAGE, INVALID_STIX, UNDELIVERED)

DEFAULT_LIST_LIMIT = 1000


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass(frozen=True)
class DeadLetter:
    """One rejected message with why, where from and when."""

    id: str
    reason: str  # one of REASONS
    detail: str  # the error, for a human
    time: str  # ISO 8601 UTC, when it was dead-lettered
    origin: str  # who published it: a Threat Bus node ("threatbus"), or "foreign"
    node: str  # the node that rejected it
    body: bytes = field(repr=False)

    def summary(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "reason": self.reason,
            "detail": self.detail,
            "time": self.time,
            "origin": self.origin,
            "node": self.node,
            "size": len(self.body),
        }

    def to_json(self) -> dict[str, Any]:
        return {**self.summary(), "body": self.body.decode("utf-8", "replace")}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> DeadLetter:
        return cls(
            id=str(data["id"]),
            reason=str(data.get("reason", "")),
            detail=str(data.get("detail", "")),
            time=str(data.get("time", "")),
            origin=str(data.get("origin", "")),
            node=str(data.get("node", "")),
            body=str(data.get("body", "")).encode(),
        )


@dataclass(frozen=True)
class Replayed:
    replayed: list[str]
    not_found: list[str]


class DeadLetters(Protocol):
    """The dead letters of one node, as the operator sees them."""

    def list(self, limit: int = DEFAULT_LIST_LIMIT) -> list[DeadLetter]:
        """The oldest ``limit`` dead letters, oldest first (bodies included)."""

    def get(self, letter_id: str) -> DeadLetter | None: ...

    def replay(self, ids: Sequence[str] | None) -> Replayed:
        """Send the given dead letters (None: all) to the bus again and remove them from the DLQ."""

    def purge(self) -> int:
        """Remove every dead letter; returns how many there were."""

    def close(self) -> None: ...


class DeadLetterError(ThreatBusError):
    """The dead letters cannot be reached (node down, broker down, endpoint off)."""


class HttpDeadLetters:
    """``DeadLetters`` of a running node, through its HTTP endpoint (``/dlq``)."""

    def __init__(self, url: str, timeout: float = 10.0) -> None:
        self.url = url.rstrip("/")
        self.timeout = timeout

    def _call(self, path: str, body: dict[str, Any] | None = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(f"{self.url}/dlq{path}", data=data, method="GET" if data is None else "POST")
        if data is not None:
            request.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as err:
            if err.code == 404 and data is None and path.startswith("/"):
                return None  # GET /dlq/<id>: no such dead letter
            raise DeadLetterError(f"{self.url}/dlq{path}: HTTP {err.code} {_error_text(err)}") from None
        except (OSError, ValueError) as err:
            raise DeadLetterError(f"cannot reach the node at {self.url}: {err}") from None

    def list(self, limit: int = DEFAULT_LIST_LIMIT) -> list[DeadLetter]:
        return [DeadLetter.from_json(item) for item in self._call(f"?limit={limit}")["dead_letters"]]

    def get(self, letter_id: str) -> DeadLetter | None:
        found = self._call(f"/{urllib.request.quote(letter_id, safe='')}")
        return DeadLetter.from_json(found) if found else None

    def replay(self, ids: Sequence[str] | None) -> Replayed:
        result = self._call("/replay", {"all": True} if ids is None else {"ids": list(ids)})
        return Replayed(list(result["replayed"]), list(result["not_found"]))

    def purge(self) -> int:
        return int(self._call("/purge", {})["purged"])

    def close(self) -> None:
        pass


# ---- the `threatbus dlq` command -------------------------------------------


def add_parser(commands: Any, parents: list[Any]) -> None:
    parser = commands.add_parser(
        "dlq",
        parents=parents,
        help="look at the node's dead-letter queue and send messages from it again",
        description="The messages this node rejected (invalid, or no app could take them), with the reason.",
    )
    actions = parser.add_subparsers(dest="dlq_action", metavar="ACTION", required=True)
    listing = actions.add_parser("list", parents=parents, help="list the dead letters, oldest first")
    listing.add_argument("--limit", type=int, default=DEFAULT_LIST_LIMIT, help="at most this many")
    show = actions.add_parser("show", parents=parents, help="one dead letter with its headers and body")
    show.add_argument("id")
    replay = actions.add_parser("replay", parents=parents, help="publish dead letters again and remove them")
    replay.add_argument("ids", nargs="*", metavar="ID")
    replay.add_argument("--all", action="store_true", help="replay every dead letter")
    actions.add_parser("purge", parents=parents, help="delete every dead letter")


def command(args: Any, store: DeadLetters, out: TextIO | None = None) -> int:
    """Run one ``threatbus dlq`` action on ``store``; returns the exit status."""
    out = out or sys.stdout
    action = args.dlq_action
    if action == "list":
        letters = store.list(args.limit)
        out.write(f"{'ID':<24} {'TIME':<24} {'REASON':<16} {'ORIGIN':<10} {'SIZE':>7}  DETAIL\n")
        for letter in letters:
            detail = " ".join(letter.detail.split())[:80]
            out.write(
                f"{letter.id:<24} {letter.time:<24} {letter.reason:<16} {letter.origin:<10} "
                f"{len(letter.body):>7}  {detail}\n"
            )
        out.write(f"{len(letters)} dead letter(s)\n")
        return 0
    if action == "show":
        letter = store.get(args.id)
        if letter is None:
            raise DeadLetterError(f"no dead letter with id {args.id!r}")
        for key, value in letter.summary().items():
            out.write(f"{key}: {value}\n")
        out.write("body:\n" + letter.body.decode("utf-8", "replace") + "\n")
        return 0
    if action == "replay":
        if bool(args.all) == bool(args.ids):
            raise DeadLetterError("replay needs either --all or one or more IDs")
        result = store.replay(None if args.all else args.ids)
        out.write(f"replayed {len(result.replayed)} dead letter(s)\n")
        if result.not_found:
            raise DeadLetterError(f"not found: {', '.join(result.not_found)}")
        return 0
    if action == "purge":
        out.write(f"purged {store.purge()} dead letter(s)\n")
        return 0
    raise DeadLetterError(f"unknown dlq action {action!r}")


def _error_text(err: urllib.error.HTTPError) -> str:
    text = err.read().decode(errors="replace")
    try:
        return str(json.loads(text)["error"])
    except (ValueError, KeyError, TypeError):
        return " ".join(text.split())[:200]
