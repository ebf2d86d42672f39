"""The detections the plugin holds, persisted in the rules file it writes.

The rules file is the single source of truth: every detection is one
comment line ``# threatbus-entry {json}`` (indicator id, modified time, sid,
how it is detected, the indicator itself), followed by its rule for
rule-based detections. On start the state is rebuilt from that file, so a
restart of the plugin neither loses detections nor changes their sids.
Dataset and hash list files are derived from the same state and rewritten
with it. Every file is written atomically: a temporary file in the same
directory, fsync, then ``os.replace``.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import logging
import os
import tempfile
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import orjson

from threatbus.data import DecodeError, Indicator, from_payload
from threatbus.lifecycle import is_active, is_older, is_removal
from threatbus_suricata.mapping import (
    DATASET,
    RESERVED_SIDS,
    RULE,
    STATIC_SID_OFFSETS,
    Detection,
    Settings,
    Unsupported,
    classify,
    dataset_path,
    hashlist_path,
    stable_sid,
    static_rules,
)

logger = logging.getLogger(__name__)

ENTRY_PREFIX = "# threatbus-entry "
SETTINGS_PREFIX = "# threatbus-settings "
HEADER = (
    "# Written by Threat Bus (threatbus-suricata). Do not edit: the file is rewritten on every change.\n"
    "# Each '# threatbus-entry' line records one indicator; rules follow their entry.\n"
)


class ForeignFile(Exception):
    """The rules file exists but is not the plugin's own."""


@dataclass(slots=True)
class Entry:
    """One indicator and its detection.

    A million of them may be held, so each keeps its indicator once: in
    ``text``, the entry line of the rules file (``payload_json`` holds it only
    until the entry is rendered). ``payload`` decodes it when needed
    (alerts, snapshots).
    """

    indicator_id: str
    modified: str
    detection: Detection
    sid: int | None = None
    payload_json: str | None = None  # the indicator as JSON, until rendered into text
    text: str = field(default="", compare=False)  # its lines in the rules file, rendered once
    rev: int = 1  # the rule's rev: bumped when a new version replaces the detection under the same sid

    @property
    def payload(self) -> dict[str, Any] | None:
        if self.payload_json is not None:
            return orjson.loads(self.payload_json)
        if self.text.startswith(ENTRY_PREFIX):
            end = self.text.find("\n")
            record = orjson.loads(self.text[len(ENTRY_PREFIX) : end if end >= 0 else None])
            indicator = record.get("indicator") if isinstance(record, dict) else None
            return indicator if isinstance(indicator, dict) else None
        return None

    def may_expire(self) -> bool:
        """False when the indicator has no ``valid_until`` (told without decoding it)."""
        return '"valid_until"' in (self.payload_json if self.payload_json is not None else self.text)

    def record(self) -> dict[str, Any]:
        detection = {}
        for name in _DETECTION_FIELDS:
            value = getattr(self.detection, name)
            if name in ("kind", "value") or value not in ("", (), None):
                detection[name] = value
        record = {
            "id": self.indicator_id,
            "modified": self.modified,
            "sid": self.sid,
            "detection": detection,
            "indicator": self.payload if self.payload_json is None else orjson.Fragment(self.payload_json),
        }
        if self.rev > 1:
            record["rev"] = self.rev
        return record


_DETECTION_FIELDS = tuple(f.name for f in fields(Detection))


@dataclass
class Match:
    """An indicator an alert matched, with the value that matched."""

    indicator_id: str
    value: str
    payload: dict[str, Any] | None


@dataclass
class Changes:
    """What a flush has to do."""

    write: bool = False  # files differ from disk
    reload: bool = False  # rule lines changed: Suricata must reload its rules
    dataset_ops: list[tuple[str, Detection]] = field(default_factory=list)  # (command, detection)


def _still_active(payload: dict[str, Any], now: datetime) -> bool:
    try:
        return is_active(payload, now)
    except ValueError:  # an unreadable valid_until (held from before validation): keep it
        return True


def write_atomically(path: Path, text: str | Iterable[str]) -> None:
    """Replace ``path`` with ``text`` (or its parts) so readers see the old or the new file, never a mix."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            if isinstance(text, str):
                out.write(text)
            else:  # a million entries: no copy of the whole file in memory
                out.writelines(text)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(tmp, 0o644)  # Suricata often runs as another user
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


class DetectionStore:
    """All detections, indexed for applying indicators and for mapping alerts back.

    Thread-safe: the detection worker applies indicators and flushes, the EVE
    worker looks up alerts, the snapshot hook reads payloads.
    """

    def __init__(
        self, rules_file: Path, settings: Settings, sid_min: int, sid_max: int, dataset_command_limit: int = 1000
    ) -> None:
        self.rules_file = rules_file
        self.base = str(rules_file.with_suffix("")) if rules_file.suffix else str(rules_file)
        self.directory = str(rules_file.parent)
        self.settings = settings
        self.sid_min = sid_min
        self.sid_max = sid_max
        self._lock = threading.RLock()
        self.entries: dict[str, Entry] = {}
        self.by_sid: dict[int, str] = {}
        # (set or algorithm, value) -> ids of the indicators that share this entry
        self.by_value: dict[tuple[str, str], list[str]] = {}
        self._changes = Changes()
        self._dirty_lists: set[str] = set()  # dataset names and hash algorithms to rewrite
        self.dataset_command_limit = dataset_command_limit

    # ---- applying indicators ------------------------------------------

    def apply(self, indicator: Indicator) -> str:
        """Add, update or remove the detection of ``indicator``.

        Returns what happened: added, updated, removed, unchanged, stale or
        unknown (removal of an indicator we do not hold). Raises ``Unsupported``.
        """
        modified = indicator.modified or ""
        if is_removal(indicator.payload):  # REMOVE, revoked, or expiry
            with self._lock:
                old = self.entries.get(indicator.id)
                if old is None:
                    return "unknown"
                if is_older(modified, old.modified):
                    return "stale"  # the removal of a version a newer one replaced
                self._remove(old)
                return "removed"
        detection = classify(indicator, self.settings)
        # The JSON it came in (no second encoding) unless that spans lines (the entry is one line);
        # a str: orjson's bytes keep a buffer of KiBs each.
        raw = indicator.encode()
        one_line = b"\n" not in raw and b"\r" not in raw
        payload_json = raw.decode() if one_line else orjson.dumps(indicator.payload).decode()
        with self._lock:
            old = self.entries.get(indicator.id)
            if old is not None:
                if is_older(modified, old.modified):
                    return "stale"
                if old.detection == detection:
                    if modified != old.modified or old.payload != indicator.payload:
                        old.modified, old.payload_json = modified, payload_json
                        self._render(old)
                        self._changes.write = True
                    return "unchanged"
            entry = Entry(indicator.id, modified, detection, payload_json=payload_json)
            keep = old.sid if old is not None and old.detection.sid is None else None
            if keep is not None and old is not None:
                entry.rev = old.rev + 1  # the same sid with another rule: Suricata sees a new revision
            self._add(entry, keep_sid=keep, replacing=old)
            return "updated" if old is not None else "added"

    def _add(self, entry: Entry, keep_sid: int | None = None, replacing: Entry | None = None) -> None:
        detection = entry.detection
        if detection.kind == RULE:
            entry.sid = self._allocate_sid(entry, keep_sid)
        if replacing is not None:
            self._remove(replacing)
        if not entry.text or (detection.kind == RULE and entry.sid != keep_sid):
            self._render(entry)
        self.entries[entry.indicator_id] = entry
        self._changes.write = True
        if detection.kind == RULE:
            assert entry.sid is not None
            self.by_sid[entry.sid] = entry.indicator_id
            self._changes.reload = True
            return
        key = (detection.set_name, detection.value)
        holders = self.by_value.setdefault(key, [])
        holders.append(entry.indicator_id)
        if len(holders) == 1:
            self._dirty_lists.add(detection.set_name)
            if detection.kind == DATASET:
                self._dataset_op("dataset-add", detection)
            else:  # hash lists are read by Suricata on a rule reload only
                self._changes.reload = True

    def _remove(self, entry: Entry) -> None:
        detection = entry.detection
        del self.entries[entry.indicator_id]
        self._changes.write = True
        if detection.kind == RULE:
            if self.by_sid.get(entry.sid) == entry.indicator_id:  # type: ignore[arg-type]
                del self.by_sid[entry.sid]  # type: ignore[arg-type]
            self._changes.reload = True
            return
        key = (detection.set_name, detection.value)
        holders = self.by_value.get(key, [])
        if entry.indicator_id in holders:
            holders.remove(entry.indicator_id)
        if not holders:
            self.by_value.pop(key, None)
            self._dirty_lists.add(detection.set_name)
            if detection.kind == DATASET:
                self._dataset_op("dataset-remove", detection)
            else:
                self._changes.reload = True

    def _dataset_op(self, command: str, detection: Detection) -> None:
        changes = self._changes
        if changes.reload:
            return  # a reload makes Suricata read the dataset files: no command needed
        changes.dataset_ops.append((command, detection))
        if len(changes.dataset_ops) > self.dataset_command_limit:
            # One reload is cheaper than thousands of commands (and a bulk load would queue millions).
            changes.dataset_ops.clear()
            changes.reload = True

    def _allocate_sid(self, entry: Entry, keep_sid: int | None) -> int:
        detection = entry.detection
        if detection.sid is not None:  # a rule given with its own sid
            owner = self.by_sid.get(detection.sid)
            if owner is not None and owner != entry.indicator_id:
                raise Unsupported(f"sid {detection.sid} is already used by {owner}")
            if self.sid_min <= detection.sid < self.sid_min + RESERVED_SIDS:
                raise Unsupported(f"sid {detection.sid} is reserved for the plugin's own rules")
            return detection.sid
        low, high = self.sid_min + RESERVED_SIDS, self.sid_max
        if (
            keep_sid is not None
            and low <= keep_sid <= high
            and self.by_sid.get(keep_sid, entry.indicator_id) == entry.indicator_id
        ):
            return keep_sid
        sid = stable_sid(entry.indicator_id, low, high)
        # Collisions are rare in a wide range; probe to the next free sid.
        for _ in range(high - low + 1):
            owner = self.by_sid.get(sid)
            if owner is None or owner == entry.indicator_id:
                return sid
            sid = low if sid == high else sid + 1
        raise Unsupported(f"no free sid left in {low}-{high}")

    def _render(self, entry: Entry) -> None:
        line = ENTRY_PREFIX + orjson.dumps(entry.record()).decode() + "\n"
        if entry.detection.kind == RULE:
            assert entry.sid is not None
            line += entry.detection.render(entry.indicator_id, entry.sid, self.settings.action, entry.rev) + "\n"
        entry.text = line
        entry.payload_json = None  # the text holds it now

    # ---- flushing -----------------------------------------------------

    def take_changes(self) -> Changes:
        """The changes since the last call; the caller writes and reloads."""
        with self._lock:
            changes, self._changes = self._changes, Changes()
            return changes

    def requeue(self, changes: Changes) -> None:
        """Give back the work of a flush that could not write the files."""
        with self._lock:
            self._changes.write |= changes.write
            self._changes.reload |= changes.reload
            self._changes.dataset_ops[:0] = changes.dataset_ops

    def render(self) -> tuple[list[str], dict[str, list[str]]]:
        """The parts of the rules file and of the data files that changed, by path.

        Parts, not one string: the entries' texts are written as they are,
        without a copy of the whole file (hundreds of MB for a million entries).
        """
        with self._lock:
            counts = {a: 0 for a in STATIC_SID_OFFSETS}
            for set_name, _value in self.by_value:
                if set_name in counts:
                    counts[set_name] += 1
            parts = [HEADER, SETTINGS_PREFIX + self._fingerprint() + "\n"]
            parts.extend(rule + "\n" for rule in static_rules(self.settings, self.sid_min, self.base, counts))
            parts.extend(entry.text for entry in self.entries.values())
            lists = self._dirty_lists
            self._dirty_lists = set()
            if self.settings.mode == "datasets":  # their files must exist before Suricata loads the rules
                lists |= {self.settings.ip_set, self.settings.domain_set}
            files: dict[str, list[str]] = {name: [] for name in lists}
            for (set_name, _value), holders in self.by_value.items():
                if set_name in files and holders:
                    files[set_name].append(self.entries[holders[0]].detection.datavalue)
            paths = {}
            for name, values in files.items():
                path = hashlist_path(self.base, name) if name in ("md5", "sha1", "sha256") else None
                path = path or dataset_path(self.directory, name)
                paths[path] = [v + "\n" for v in values]
            return parts, paths

    def _fingerprint(self) -> str:
        """What decides the mapping; entries written under the same fingerprint are reused as they are."""
        settings = {**vars(self.settings), "sid_min": self.sid_min, "sid_max": self.sid_max, "base": self.base}
        return orjson.dumps(settings, option=orjson.OPT_SORT_KEYS).decode()

    def write(self) -> None:
        """Write the data files, then the rules file that refers to them."""
        rules, data_files = self.render()
        try:
            for path, text in data_files.items():
                write_atomically(Path(path), text)
            write_atomically(self.rules_file, rules)
        except OSError:
            with self._lock:  # write every list again next time
                self._dirty_lists |= {name for (name, _v) in self.by_value}
            raise

    # ---- loading ------------------------------------------------------

    def load(self) -> int:
        """Rebuild the state from the rules file; returns the number of entries read.

        Entries that cannot be read are logged and skipped. Entries whose
        indicator maps differently under the current config (another mode,
        another sid range) are re-mapped, and the next flush rewrites them.
        """
        # Read line by line, with a digest to compare it with what the state renders: a file of a
        # million entries is hundreds of MB, and neither it nor its lines are held whole.
        try:
            source = open(self.rules_file, encoding="utf-8")
        except FileNotFoundError:
            logger.info("rules file %s does not exist yet; starting without detections", self.rules_file)
            self._changes.write = self._changes.reload = True
            return 0
        digest = hashlib.sha256()
        loaded = 0
        with source:
            head = [source.readline() for _ in range(5)]
            if not head[0].startswith(HEADER.splitlines()[0]) and ("".join(head) + source.read()).strip():
                raise ForeignFile(
                    f"{self.rules_file} exists but was not written by Threat Bus; refusing to overwrite it "
                    "(configure another rules_file, or remove the file)"
                )
            # Written under the same config: the entries' mapping and lines can be reused unchanged.
            same = SETTINGS_PREFIX + self._fingerprint() + "\n" in head
            pending: tuple[int, str] | None = None  # an entry line, until the line after it is read
            for number, raw in enumerate(itertools.chain(head, source), 1):
                digest.update(raw.encode())
                line = raw.rstrip("\n")
                if pending is not None:
                    loaded += self._load_line(*pending, line, same)
                    pending = None
                if line.startswith(ENTRY_PREFIX):
                    pending = (number, line)
            if pending is not None:
                loaded += self._load_line(*pending, "", same)
        with self._lock:
            self._dirty_lists |= {name for (name, _v) in self.by_value}
            self._changes.dataset_ops.clear()  # Suricata loads the sets from their files
            rules, data_files = self.render()
            self._dirty_lists |= {name for (name, _v) in self.by_value}
            rendered = hashlib.sha256()
            for part in rules:
                rendered.update(part.encode())
            if rendered.digest() != digest.digest() or not all(os.path.exists(path) for path in data_files):
                self._changes.write = self._changes.reload = True
            else:
                self._changes = Changes()
        return loaded

    def _load_line(self, number: int, line: str, next_line: str, same_settings: bool) -> int:
        """Load the entry of ``line`` (``next_line`` may be its rule); 1 if loaded, 0 if skipped."""
        try:
            self._load_entry(orjson.loads(line[len(ENTRY_PREFIX) :]), line, next_line, same_settings)
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError, DecodeError) as err:
            logger.warning("%s:%d: skipping unreadable entry: %s", self.rules_file, number, err)
            return 0
        return 1

    def _load_entry(self, record: dict[str, Any], line: str, next_line: str, same_settings: bool) -> None:
        payload = record.get("indicator")
        raw = dict(record["detection"])
        raw["options"] = tuple(raw.get("options", ()))
        detection = Detection(**raw)
        text = ""
        if same_settings and (detection.kind != RULE or not next_line.startswith("#")):
            text = line + "\n" + (next_line + "\n" if detection.kind == RULE else "")
        elif payload is not None:
            indicator = from_payload(payload)
            if not isinstance(indicator, Indicator) or indicator.id != record["id"]:
                raise ValueError("embedded indicator does not match the entry")
            try:
                detection = classify(indicator, self.settings)
            except Unsupported as err:
                logger.warning("dropping detection of %s: %s", record["id"], err)
                return
        rev = record.get("rev", 1)
        entry = Entry(
            str(record["id"]),
            str(record["modified"]),
            detection,
            payload_json=None if payload is None or text else orjson.dumps(payload).decode(),
            text=text,
            rev=rev if isinstance(rev, int) and rev > 0 else 1,
        )
        sid = record.get("sid")
        with self._lock:
            duplicate = self.entries.get(entry.indicator_id)
            if duplicate is not None:
                self._remove(duplicate)
            self._add(entry, keep_sid=sid if isinstance(sid, int) else None)

    # ---- reading ------------------------------------------------------

    def __len__(self) -> int:
        return len(self.entries)

    def indicator_of_sid(self, sid: int) -> Entry | None:
        with self._lock:
            indicator_id = self.by_sid.get(sid)
            return self.entries.get(indicator_id) if indicator_id else None

    def entry(self, indicator_id: str) -> Entry | None:
        with self._lock:
            return self.entries.get(indicator_id)

    def holders(self, set_name: str, value: str) -> list[Match]:
        with self._lock:
            return [
                Match(i, value, self.entries[i].payload)
                for i in self.by_value.get((set_name, value), ())
                if i in self.entries
            ]

    def payloads(self, now: datetime | None = None) -> Iterator[tuple[str, dict[str, Any]]]:
        """(modified, indicator) of every held indicator active at ``now`` (not yet expired), decoded one at a time."""
        now = now or datetime.now(timezone.utc)
        with self._lock:
            held = list(self.entries.values())
        for entry in held:
            payload = entry.payload
            if payload is not None and (not entry.may_expire() or _still_active(payload, now)):
                yield entry.modified, payload

    def expiring(self) -> list[dict[str, Any]]:
        """The held indicators that have a ``valid_until`` (to schedule their expiry)."""
        with self._lock:
            held = [e for e in self.entries.values() if e.may_expire()]
        return [p for p in (e.payload for e in held) if p is not None and "valid_until" in p]

    def drop_expired(self, now: datetime | None = None) -> int:
        """Remove the detections whose ``valid_until`` passed (e.g. while the node was down)."""
        now = now or datetime.now(timezone.utc)
        with self._lock:
            gone = []
            for entry in self.entries.values():
                if entry.may_expire():
                    payload = entry.payload
                    if payload is not None and not _still_active(payload, now):
                        gone.append(entry)
            for entry in gone:
                self._remove(entry)
            return len(gone)

    def static_sid(self, name: str) -> int:
        return self.sid_min + STATIC_SID_OFFSETS[name]
