"""Policy filters: which intel an app, a client or another node gets.

One ``Filter`` is compiled once from a ``filter:`` mapping (all keys
optional; an empty filter passes everything)::

    tlp: amber            # highest TLP delivered: clear (= white) < green < amber < amber+strict < red
    unmarked: allow       # objects without a TLP marking: allow or deny
    min_confidence: 50    # STIX confidence 0-100; objects without one pass
    detection_only: false # only indicators flagged for detection
    pattern_types: [stix] # pattern_type of indicators
    labels: {include: [], exclude: []}
    created_by: {include: [], exclude: []}   # identity ids (created_by_ref)
    max_age: 0            # days since modified; 0 = no limit

``Filter.check(message)`` returns None when the message passes, else a
short reason (one of ``REASONS``). It reads the plain JSON payload, no STIX
library, so it costs about a microsecond on the hot path.

What the keys mean on each kind of message:

- TLP comes from ``object_marking_refs`` (TLP 1.0 and 2.0 ids); with several
  TLP markings the most restrictive counts; other markings are ignored.
- An indicator is flagged for detection when ``x_opencti_detection`` (OpenCTI)
  or ``x_misp_to_ids`` (MISP's ``to_ids``, as the MISP app writes it) is true.
- A sighting that embeds its indicator (``x_threatbus_indicator``) passes
  when that indicator passes and the sighting's own TLP marking, if any, is
  within ``tlp``. A sighting without it is judged on its own properties;
  ``detection_only`` and ``pattern_types`` concern indicators only.
- A removal (``x_threatbus_update: REMOVE`` or ``revoked``) is judged only by
  what cannot change between versions of one indicator or says who may see
  it: ``tlp``, ``unmarked``, ``pattern_types``, ``created_by``. So it passes
  whenever the indicator it removes passed (unless its markings changed),
  even if the removal itself is, say, no longer flagged for detection.
- A snapshot envelope is judged by its body; snapshot requests always pass.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Mapping
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any

from dynaconf import ValidationError, Validator

from threatbus.data import Message, SnapshotEnvelope, SnapshotRequest
from threatbus.errors import ConfigError
from threatbus.metrics import FILTERED, Metrics

if TYPE_CHECKING:
    from threatbus.delivery import Receipt
    from threatbus.routing import Sink

# The TLP order for filtering (INTEL.md): CLEAR = WHITE < GREEN < AMBER < AMBER+STRICT < RED.
TLP_LEVELS: dict[str, int] = {"clear": 0, "white": 0, "green": 1, "amber": 2, "amber+strict": 3, "red": 4}
TLP_NAMES = ("CLEAR", "GREEN", "AMBER", "AMBER+STRICT", "RED")
TLP_MARKINGS: dict[str, int] = {
    # TLP 1.0, built into STIX 2.1
    "marking-definition--613f2e26-407d-48c7-9eca-b8e91df99dc9": 0,  # WHITE
    "marking-definition--34098fce-860f-48ae-8e50-ebd3cc5e41da": 1,  # GREEN
    "marking-definition--f88d31f6-486f-44da-b317-01333bde0b82": 2,  # AMBER
    "marking-definition--5e57c739-391a-4eb3-b6be-7d15ca92d5ed": 4,  # RED
    # TLP 2.0, OASIS marking definitions
    "marking-definition--94868c89-83c2-464b-929b-a1a8aa3c8487": 0,  # CLEAR
    "marking-definition--bab4a63c-aed9-4cf5-a766-dfca5abac2bb": 1,  # GREEN
    "marking-definition--55d920b0-5e8b-4f79-9ee9-91f868d9b421": 2,  # AMBER
    "marking-definition--939a9414-2ddd-4d32-a0cd-375ea402b003": 3,  # AMBER+STRICT
    "marking-definition--e828b379-4e03-4974-9ac4-e53a884c97c1": 4,  # RED
}
# Properties that flag an indicator for detection: OpenCTI's, and MISP's to_ids as the MISP app maps it.
DETECTION_FLAGS = ("x_opencti_detection", "x_misp_to_ids")

KEYS = ("tlp", "unmarked", "min_confidence", "detection_only", "pattern_types", "labels", "created_by", "max_age")
REASONS = ("tlp", "unmarked", "confidence", "detection", "pattern_type", "labels", "created_by", "age")
_ORDER = ("include", "exclude")
# max_age compares STIX timestamps as text (first 19 characters); the cutoff is refreshed this often.
_CUTOFF_REFRESH = 10.0

Check = Callable[[dict[str, Any]], "str | None"]


class FilterError(ConfigError):
    """A filter that cannot be compiled; the message names the key."""


def tlp_level(payload: dict[str, Any]) -> int | None:
    """The most restrictive TLP level among the object's markings, None when it has no TLP marking."""
    refs = payload.get("object_marking_refs")
    if not refs or not isinstance(refs, list):
        return None
    level = None
    for ref in refs:
        found = TLP_MARKINGS.get(ref) if isinstance(ref, str) else None
        if found is not None and (level is None or found > level):
            level = found
    return level


class Filter:
    """A compiled filter; thread-safe. ``check`` is the hot path."""

    __slots__ = ("_checks", "_cutoff", "_cutoff_at", "_removal_checks", "max_age", "spec", "tlp")

    def __init__(self, spec: Mapping[str, Any] | None = None, key: str = "filter") -> None:
        self.spec: dict[str, Any] = _normalise(spec, key)
        self.tlp: int | None = TLP_LEVELS[self.spec["tlp"]] if "tlp" in self.spec else None
        self.max_age: float = float(self.spec.get("max_age") or 0)
        self._cutoff = ""
        self._cutoff_at = 0.0
        compiled = self._compile()
        self._checks: tuple[Check, ...] = tuple(check for check, _ in compiled)
        self._removal_checks: tuple[Check, ...] = tuple(check for check, removals in compiled if removals)

    @classmethod
    def from_config(cls, section: Any, key: str, allow_list: bool = False) -> Filter | None:
        """The filter at ``section['filter']`` (``key`` names it in errors); None when absent or empty.

        With ``allow_list`` a list there is the app's own key (see ``FilterValidator``), not a policy filter.
        """
        spec = section.get("filter") if isinstance(section, Mapping) else None
        if spec is None or (allow_list and isinstance(spec, list)):
            return None
        compiled = cls(spec, f"{key}.filter")
        return compiled if compiled else None

    def __bool__(self) -> bool:
        """False for a filter that passes everything."""
        return bool(self._checks)

    def __repr__(self) -> str:
        return f"Filter({self.spec!r})"

    # ---- compilation ---------------------------------------------------

    def _compile(self) -> list[tuple[Check, bool]]:
        """The checks the spec asks for, each with whether removals obey it."""
        spec = self.spec
        checks: list[tuple[Check, bool]] = []
        deny_unmarked = spec.get("unmarked") == "deny"
        if self.tlp is not None or deny_unmarked:
            highest = self.tlp if self.tlp is not None else len(TLP_NAMES)

            def tlp(p: dict[str, Any]) -> str | None:
                level = tlp_level(p)
                if level is None:
                    return "unmarked" if deny_unmarked else None
                return "tlp" if level > highest else None

            checks.append((tlp, True))
        pattern_types = frozenset(spec.get("pattern_types") or ())
        if pattern_types:

            def pattern_type(p: dict[str, Any]) -> str | None:
                if p.get("type") == "indicator" and p.get("pattern_type") not in pattern_types:
                    return "pattern_type"
                return None

            checks.append((pattern_type, True))
        created_by = spec.get("created_by") or {}
        by_include = frozenset(created_by.get("include") or ())
        by_exclude = frozenset(created_by.get("exclude") or ())
        if by_include or by_exclude:
            checks.append(
                (lambda p: None if _in_out(p.get("created_by_ref"), by_include, by_exclude) else "created_by", True)
            )
        minimum = spec.get("min_confidence") or 0
        if minimum > 0:

            def confidence(p: dict[str, Any]) -> str | None:
                value = p.get("confidence")
                # Objects without a confidence pass (and a malformed one says nothing).
                if type(value) is int or type(value) is float:
                    return "confidence" if value < minimum else None
                return None

            checks.append((confidence, False))
        if spec.get("detection_only"):

            def detection(p: dict[str, Any]) -> str | None:
                if (
                    p.get("type") != "indicator"
                    or p.get("x_opencti_detection") is True
                    or p.get("x_misp_to_ids") is True
                ):
                    return None
                return "detection"

            checks.append((detection, False))
        labels = spec.get("labels") or {}
        include = frozenset(labels.get("include") or ())
        exclude = frozenset(labels.get("exclude") or ())
        if include or exclude:
            checks.append((lambda p: None if _labels_ok(p.get("labels"), include, exclude) else "labels", False))
        if self.max_age > 0:
            checks.append((self._age, False))
        return checks

    def _age(self, payload: dict[str, Any]) -> str | None:
        stamp = payload.get("modified") or payload.get("created")
        if not isinstance(stamp, str):
            return None
        now = time.monotonic()
        if now >= self._cutoff_at:  # a benign race: two threads compute the same cutoff
            cutoff = datetime.now(timezone.utc) - timedelta(days=self.max_age)
            self._cutoff = cutoff.strftime("%Y-%m-%dT%H:%M:%S")
            self._cutoff_at = now + _CUTOFF_REFRESH
        return None if stamp[:19] >= self._cutoff else "age"

    # ---- evaluation ----------------------------------------------------

    def check(self, message: Message) -> str | None:
        """None when ``message`` passes, else the reason it is held back."""
        if not self._checks:
            return None
        payload = getattr(message, "payload", None)
        if payload is None:  # a marker that carries no intel (threatbus.snapshots.SnapshotEnd)
            return None
        kind = type(message)
        if kind is SnapshotEnvelope:
            body = payload.get("body")
            payload = body if isinstance(body, dict) else {}
        elif kind is SnapshotRequest:
            return None
        return self.check_payload(payload)

    def check_payload(self, payload: dict[str, Any]) -> str | None:
        """``check`` on the JSON object of an indicator or sighting."""
        if payload.get("type") == "sighting":
            embedded = payload.get("x_threatbus_indicator")
            if isinstance(embedded, dict):
                if self.tlp is not None and (tlp_level(payload) or 0) > self.tlp:
                    return "tlp"
                payload = embedded
        if payload.get("x_threatbus_update") == "REMOVE" or payload.get("revoked") is True:
            checks = self._removal_checks
        else:
            checks = self._checks
        for check in checks:
            reason = check(payload)
            if reason is not None:
                return reason
        return None

    def explain(self, payload: dict[str, Any]) -> str | None:
        """Like ``check_payload``, with the values that decided it, for people (``policy explain``)."""
        reason = self.check_payload(payload)
        if reason is None:
            return None
        subject = payload
        if payload.get("type") == "sighting" and isinstance(payload.get("x_threatbus_indicator"), dict):
            subject = payload["x_threatbus_indicator"]
            if reason == "tlp" and self.tlp is not None and (tlp_level(payload) or 0) > self.tlp:
                subject = payload
        spec = self.spec
        if reason == "tlp":
            return f"tlp: TLP:{TLP_NAMES[tlp_level(subject) or 0]} is above TLP:{TLP_NAMES[self.tlp or 0]}"
        if reason == "unmarked":
            return "unmarked: no TLP marking and unmarked: deny"
        if reason == "confidence":
            return f"confidence: {subject.get('confidence')!r} is below {spec['min_confidence']}"
        if reason == "detection":
            return f"detection: neither {' nor '.join(DETECTION_FLAGS)} is true"
        if reason == "pattern_type":
            return f"pattern_type: {subject.get('pattern_type')!r} is not in {sorted(spec['pattern_types'])}"
        if reason == "labels":
            return f"labels: {subject.get('labels') or []} against {spec['labels']}"
        if reason == "created_by":
            return f"created_by: {subject.get('created_by_ref')!r} against {spec['created_by']}"
        return f"age: modified {subject.get('modified') or subject.get('created')} is older than {spec['max_age']} days"


def _labels_ok(labels: Any, include: frozenset[str], exclude: frozenset[str]) -> bool:
    if not isinstance(labels, list):
        return not include
    present = {label for label in labels if isinstance(label, str)}
    if exclude and not exclude.isdisjoint(present):
        return False
    return not include or not include.isdisjoint(present)


def _in_out(value: Any, include: frozenset[str], exclude: frozenset[str]) -> bool:
    if value in exclude:
        return False
    return not include or value in include


# ---- validation ----------------------------------------------------------


def _normalise(spec: Mapping[str, Any] | None, key: str) -> dict[str, Any]:
    """The filter mapping checked key by key; ``FilterError`` names the bad key."""
    if spec is None:
        return {}
    if not isinstance(spec, Mapping):
        raise FilterError(f"{key} must be a mapping with the keys {', '.join(KEYS)}, got {spec!r}")
    spec = {str(name).lower(): value for name, value in spec.items()}
    unknown = sorted(set(spec) - set(KEYS))
    if unknown:
        raise FilterError(f"{key}.{unknown[0]} is not a filter key (known: {', '.join(KEYS)})")
    out: dict[str, Any] = {}
    for name, value in spec.items():
        if value is None:
            continue
        where = f"{key}.{name}"
        if name == "tlp":
            if not isinstance(value, str) or value.lower() not in TLP_LEVELS:
                raise FilterError(f"{where} must be one of {', '.join(TLP_LEVELS)}, got {value!r}")
            out[name] = value.lower()
        elif name == "unmarked":
            if not isinstance(value, str) or value.lower() not in ("allow", "deny"):
                raise FilterError(f"{where} must be allow or deny, got {value!r}")
            out[name] = value.lower()
        elif name == "min_confidence":
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 100:
                raise FilterError(f"{where} must be an integer from 0 to 100, got {value!r}")
            out[name] = value
        elif name == "detection_only":
            if not isinstance(value, bool):
                raise FilterError(f"{where} must be true or false, got {value!r}")
            out[name] = value
        elif name == "pattern_types":
            out[name] = _strings(value, where)
        elif name in ("labels", "created_by"):
            if not isinstance(value, Mapping):
                raise FilterError(f"{where} must be a mapping with include and/or exclude lists, got {value!r}")
            value = {str(part).lower(): items for part, items in value.items()}
            extra = sorted(set(value) - set(_ORDER))
            if extra:
                raise FilterError(f"{where}.{extra[0]} is not a key (known: include, exclude)")
            out[name] = {part: _strings(value.get(part) or [], f"{where}.{part}") for part in _ORDER}
        elif name == "max_age":
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1e6:
                raise FilterError(f"{where} must be a number of days >= 0 (0 = no limit), got {value!r}")
            out[name] = value
    return out


def _strings(value: Any, where: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(item, str) and item for item in value):
        raise FilterError(f"{where} must be a list of non-empty strings, got {value!r}")
    return list(value)


class FilterValidator(Validator):
    """Validates the filter at ``name`` (a mapping, or absent) with the messages of ``Filter``.

    ``allow_list`` leaves a list alone: the original MISP app's own ``filter``
    key is a list of ingestion rules, not a policy filter.
    """

    def __init__(self, name: str, allow_list: bool = False) -> None:
        super().__init__(name)
        self.filter_name = name
        self.allow_list = allow_list

    def validate(self, settings: Any, *args: Any, **kwargs: Any) -> None:
        value = settings.get(self.filter_name)
        if value is None or (self.allow_list and isinstance(value, list)):
            return
        try:
            Filter(value, self.filter_name)
        except FilterError as err:
            raise ValidationError(str(err)) from None


def validators(prefix: str, allow_list: bool = False) -> list[Validator]:
    """The validators of ``<prefix>.filter``."""
    return [FilterValidator(f"{prefix}.filter", allow_list=allow_list)]


def node_validators(apps: Iterable[str], backbones: Iterable[str]) -> list[Validator]:
    """Every filter of a node: one per app, an export and an import filter per backbone. The core adds these."""
    found = [FilterValidator(f"plugins.apps.{name}.filter", allow_list=True) for name in apps]
    for name in backbones:
        found.extend(FilterValidator(f"plugins.backbones.{name}.{way}.filter") for way in ("export", "import"))
    return found


# ---- applying filters ----------------------------------------------------


class FilterStats:
    """How many messages one filter held back, per reason: ``threatbus_filtered_total{plugin,rule,reason}``.

    Plain integers, like every counter of the bus (see ``threatbus.metrics``).
    """

    def __init__(self) -> None:
        self.counts: dict[str, int] = dict.fromkeys(REASONS, 0)

    def held(self, reason: str) -> None:
        self.counts[reason] += 1

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def register(self, metrics: Metrics, plugin: str, rule: str) -> None:
        """Expose the counts; ``rule`` is app, client, export or import."""
        for reason in REASONS:
            metrics.counter(
                FILTERED,
                "Messages a policy filter held back",
                lambda reason=reason: self.counts[reason],  # type: ignore[misc]
                plugin=plugin,
                rule=rule,
                reason=reason,
            )


class FilteredSink:
    """A subscriber queue behind a filter: what the filter holds back never reaches the queue."""

    __slots__ = ("filter", "sink", "stats")

    def __init__(self, sink: Sink, filter: Filter, stats: FilterStats) -> None:
        self.sink = sink
        self.filter = filter
        self.stats = stats

    def put_nowait(self, item: Any) -> None:
        reason = self.filter.check(item)
        if reason is None:
            self.sink.put_nowait(item)  # queue.Full goes to the router, which counts the drop
        else:
            self.stats.held(reason)

    def put_tracked(self, item: Any, receipt: Receipt) -> None:
        """Take the receipt along when the queue tracks deliveries (``threatbus.delivery``); else done on hand-over."""
        reason = self.filter.check(item)
        if reason is not None:
            self.stats.held(reason)
            receipt.done()
            return
        track = getattr(self.sink, "put_tracked", None)
        if track is not None:
            track(item, receipt)
        else:
            self.sink.put_nowait(item)
            receipt.done()

    def release(self, receipt: Receipt | None = None) -> int:
        """The queue's ``release`` (``threatbus.delivery.DeliveryQueue``), where it has one."""
        release = getattr(self.sink, "release", None)
        return release(receipt) if release is not None else 0

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        """A blocking put where the queue has one (the log's snapshot answer waits for room)."""
        reason = self.filter.check(item)
        if reason is not None:
            self.stats.held(reason)
            return
        put = getattr(self.sink, "put", None)
        if put is None:
            self.sink.put_nowait(item)
        else:
            put(item, block, timeout)


class AppGate:
    """Puts one app's filter in front of every queue the app subscribes.

    The bus hands the app ``gate.subscribe`` and ``gate.unsubscribe`` instead
    of its own: each queue is wrapped once (the router recognises a queue by
    identity, so overlapping topics still deliver once) and snapshot answers
    reach the wrapper too, so they obey the filter like live intel.
    """

    def __init__(
        self,
        filter: Filter,
        stats: FilterStats,
        subscribe: Callable[..., list[str]],
        unsubscribe: Callable[[str, Sink], None],
    ) -> None:
        self.filter = filter
        self.stats = stats
        self._subscribe = subscribe
        self._unsubscribe = unsubscribe
        self._lock = threading.Lock()
        self._wrapped: dict[int, tuple[FilteredSink, set[str]]] = {}

    def subscribe(
        self, topic: str, queue: Sink, snapshot: timedelta = timedelta(0), snapshot_end: bool = False
    ) -> list[str]:
        with self._lock:
            wrapped, topics = self._wrapped.setdefault(id(queue), (FilteredSink(queue, self.filter, self.stats), set()))
            topics.add(topic)
        return self._subscribe(topic, wrapped, snapshot=snapshot, snapshot_end=snapshot_end)

    def unsubscribe(self, topic: str, queue: Sink) -> None:
        with self._lock:
            entry = self._wrapped.get(id(queue))
            if entry is None:
                return
            wrapped, topics = entry
            topics.discard(topic)
            if not topics:
                del self._wrapped[id(queue)]
        self._unsubscribe(topic, wrapped)
