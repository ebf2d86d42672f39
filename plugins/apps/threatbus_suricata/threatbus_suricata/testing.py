"""A stand-in for Suricata's unix command socket (Suricata cannot be installed here).

Used by the plugin's tests and by the benchmark (``benchmark/bulk.py``),
hence a module of the package rather than of the tests.

It follows the protocol of Suricata's user guide ("Interacting via Unix
Socket") and its unix-manager: the client's first message is
``{"version": "0.1" | "0.2"}``, answered with ``{"return": "OK"}``; with 0.2
every command and every answer is one JSON object terminated by a newline.
Answers are ``{"return": "OK" | "NOK", "message": ...}``. It implements the
commands the plugin uses with Suricata's own messages: the rule reloads
(``reload-rules``, ``ruleset-reload-rules``, ``ruleset-reload-nonblocking``
answer "done") and ``dataset-add`` / ``dataset-remove`` with arguments
``setname``, ``settype``, ``datavalue`` ("data added", "data already in set",
"data removed", "set not found or wrong type"). Unknown commands get
``NOK`` "Unknown command". Every command is recorded.

A reload reads the rules file like Suricata would: datasets declared by
``dataset:...,load <file>`` rules are (re)loaded from their files, hash
lists named by ``filemd5:``/``filesha1:``/``filesha256:`` are read, and the
sids of the loaded rules are kept. ``held()`` counts what the stand-in
detects after its last reload and dataset commands: dataset entries, hash
list entries and rules other than the dataset and hash list rules.
"""

from __future__ import annotations

import base64
import json
import os
import re
import socket
import threading
from pathlib import Path
from typing import Any

RELOADS = ("reload-rules", "ruleset-reload-rules", "ruleset-reload-nonblocking")
DATASET_TYPES = ("string", "md5", "sha256", "ipv4", "ip")
_DATASET_RULE = re.compile(r"dataset:isset,([A-Za-z0-9_-]+), type (\w+), load ([^;]+);")
_HASHLIST_RULE = re.compile(r"file(md5|sha1|sha256):([^;]+);")
_SID = re.compile(r"[(;\s]sid\s*:\s*(\d+)\s*;")


class FakeSuricata(threading.Thread):
    def __init__(
        self, path: str, rules_file: Path | None = None, keep_commands: bool = True, background_reloads: bool = False
    ) -> None:
        super().__init__(name="fake-suricata", daemon=True)
        # True: ruleset-reload-nonblocking answers at once and reloads in a thread, as Suricata does
        # (tests keep False: a reload is complete when its answer arrives).
        self.background_reloads = background_reloads
        self._reload_lock = threading.Lock()
        self._reloaders: list[threading.Thread] = []
        self.path = path
        self.rules_file = rules_file
        self.keep_commands = keep_commands  # False: count commands only (a million would fill the memory)
        self.commands: list[dict[str, Any]] = []
        self.command_count = 0
        self.rule_sids: set[int] = set()  # sids of the rules loaded, without dataset and hash list rules
        self.hashlists: dict[str, set[str]] = {}  # algorithm -> hashes loaded
        self.handshakes: list[str] = []
        self.datasets: dict[str, tuple[str, set[str]]] = {}  # name -> (type, decoded values)
        self.reloads = 0
        self.refuse_reloads = False  # answer "Reload already in progress"
        self._lock = threading.Lock()
        self._closing = threading.Event()
        self._server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._server.bind(path)
        self._server.listen(8)
        self._server.settimeout(0.1)
        self._clients: list[threading.Thread] = []

    # ---- what tests read ---------------------------------------------

    def names(self) -> list[str]:
        with self._lock:
            return [c.get("command", "?") for c in self.commands]

    def count(self, name: str) -> int:
        return sum(1 for n in self.names() if n == name)

    def reload_count(self) -> int:
        return sum(1 for n in self.names() if n in RELOADS)

    def dataset(self, name: str) -> set[str]:
        with self._lock:
            return set(self.datasets.get(name, ("", set()))[1])

    def held(self) -> int:
        """Detections in force: dataset entries, hash list entries and indicator rules."""
        with self._lock:
            return (
                sum(len(values) for _type, values in self.datasets.values())
                + sum(len(hashes) for hashes in self.hashlists.values())
                + len(self.rule_sids)
            )

    # ---- server ------------------------------------------------------

    def run(self) -> None:
        while not self._closing.is_set():
            try:
                conn, _ = self._server.accept()
            except TimeoutError:
                continue
            except OSError:
                break
            client = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            client.start()
            self._clients.append(client)

    def _serve(self, conn: socket.socket) -> None:
        conn.settimeout(0.2)
        buffer = b""
        version = None
        with conn:
            while not self._closing.is_set():
                try:
                    chunk = conn.recv(65536)
                except TimeoutError:
                    continue
                except OSError:
                    return
                if not chunk:
                    return
                buffer += chunk
                if version is None:  # Suricata reads the version with one recv, no newline required
                    try:
                        hello = json.loads(buffer)
                    except ValueError:
                        return  # Suricata closes the connection on an invalid handshake
                    buffer = b""
                    version = hello.get("version") if isinstance(hello, dict) else None
                    if version not in ("0.1", "0.2"):
                        return
                    with self._lock:
                        self.handshakes.append(version)
                    conn.sendall(b'{"return": "OK"}\n')
                    continue
                while b"\n" in buffer:
                    line, _, buffer = buffer.partition(b"\n")
                    conn.sendall(json.dumps(self._execute(line)).encode() + b"\n")

    def _execute(self, line: bytes) -> dict[str, Any]:
        try:
            request = json.loads(line)
        except ValueError:
            return {"return": "NOK", "message": "Invalid command"}
        with self._lock:
            self.command_count += 1
            if self.keep_commands:
                self.commands.append(request)
        name = request.get("command")
        arguments = request.get("arguments") or {}
        if name in RELOADS:
            if self.refuse_reloads:
                return {"return": "NOK", "message": "Reload already in progress"}
            if self.background_reloads and name == "ruleset-reload-nonblocking":
                reloader = threading.Thread(target=self._reload, args=(True,), name="fake-suricata-reload", daemon=True)
                reloader.start()
                self._reloaders.append(reloader)
            else:
                self._reload()
            return {"return": "OK", "message": "done"}
        if name in ("dataset-add", "dataset-remove"):
            return self._dataset(name, arguments)
        if name == "version":
            return {"return": "OK", "message": "7.0.0 stand-in"}
        return {"return": "NOK", "message": "Unknown command"}

    def _dataset(self, name: str, arguments: dict[str, Any]) -> dict[str, Any]:
        for key in ("setname", "settype", "datavalue"):
            if not isinstance(arguments.get(key), str):
                return {"return": "NOK", "message": f"{key} is not a string"}
        if arguments["settype"] not in DATASET_TYPES:
            return {"return": "NOK", "message": "unknown settype"}
        with self._lock:
            found = self.datasets.get(arguments["setname"])
            if found is None or found[0] != arguments["settype"]:
                return {"return": "NOK", "message": "set not found or wrong type"}
            value = _decode(arguments["settype"], arguments["datavalue"])
            if name == "dataset-add":
                if value in found[1]:
                    return {"return": "OK", "message": "data already in set"}
                found[1].add(value)
                return {"return": "OK", "message": "data added"}
            found[1].discard(value)
            return {"return": "OK", "message": "data removed"}

    def _reload(self, merge: bool = False) -> None:
        with self._reload_lock:  # one reload at a time; lookups and commands go on meanwhile
            self._read_rules(merge)

    def _read_rules(self, merge: bool) -> None:
        """Load the rules file; ``merge``: add the dataset files' entries to the sets instead of replacing
        them (a background reload must not undo dataset-add commands answered while it ran)."""
        with self._lock:
            self.reloads += 1
        if self.rules_file is None or not self.rules_file.exists():
            return
        sids: set[int] = set()
        hashlists: dict[str, set[str]] = {}
        datasets: dict[str, tuple[str, set[str]]] = {}
        with open(self.rules_file, encoding="utf-8") as rules:
            for line in rules:
                if line.startswith("#") or not line.strip():
                    continue
                match = _DATASET_RULE.search(line)
                if match:
                    set_name, set_type, load = match.groups()
                    values = {_decode(set_type, v) for v in Path(load.strip()).read_text().split()}
                    datasets[set_name] = (set_type, values)
                    continue
                match = _HASHLIST_RULE.search(line)
                if match:
                    algorithm, load = match.groups()
                    hashlists[algorithm] = set(Path(load.strip()).read_text().split())
                    continue
                found = _SID.search(line)
                if found:
                    sids.add(int(found.group(1)))
        with self._lock:
            for name, (set_type, values) in datasets.items():
                old = self.datasets.get(name)
                if merge and old is not None and old[0] == set_type:
                    values |= old[1]
                self.datasets[name] = (set_type, values)
            self.rule_sids = sids
            self.hashlists = hashlists

    def close(self) -> None:
        self._closing.set()
        self._server.close()
        self.join(2)
        for reloader in self._reloaders:
            reloader.join(30)
        for client in self._clients:
            client.join(2)
        if os.path.exists(self.path):
            os.unlink(self.path)


def _decode(set_type: str, value: str) -> str:
    return base64.b64decode(value).decode() if set_type == "string" else value
