"""From STIX 2.1 indicators to Suricata detections (rules, dataset entries, hash list entries).

Pure functions, no I/O: ``classify`` decides how an indicator is detected,
``Detection.render`` writes the rule text of rule-based detections.
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import os
import re
from dataclasses import dataclass
from typing import NamedTuple
from urllib.parse import urlsplit

from threatbus.data import Indicator
from threatbus.stix import dotted_ipv4, point_indicator

# How an indicator is detected.
RULE = "rule"  # one rule of its own (sid maps alerts back)
DATASET = "dataset"  # one entry of a Suricata dataset, matched by a static rule
HASHLIST = "hashlist"  # one line of a file hash list (filemd5/filesha1/filesha256)

MODES = ("rules", "datasets")
ACTIONS = ("alert", "drop", "reject", "pass")

# Static rules use the first sids of the configured range; indicator rules the rest.
RESERVED_SIDS = 16
STATIC_SID_OFFSETS = {"ip-dst": 0, "ip-src": 1, "domain": 2, "md5": 3, "sha1": 4, "sha256": 5}

HASH_ALGORITHMS = {"MD5": "md5", "SHA-1": "sha1", "SHA-256": "sha256"}
HASH_KEYWORDS = {"md5": "filemd5", "sha1": "filesha1", "sha256": "filesha256"}

_INDICATOR_ID = re.compile(r"^indicator--[A-Za-z0-9-]{1,64}$")
_DOMAIN = re.compile(
    r"^(?=.{1,253}$)([a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?)(\.[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?)*$"
)
_SID = re.compile(r"(?:^|[(;\s])sid\s*:\s*(\d{1,10})\s*;")
_RULE_START = re.compile(r"^(alert|drop|reject|rejectsrc|rejectdst|rejectboth|pass)\s+\S+")
# Characters that cannot appear literally inside a content string.
_PLAIN = frozenset(chr(c) for c in range(0x20, 0x7F)) - set('";\\|')
_NOT_PLAIN = re.compile(r'[^\x20-\x7e]|[";\\|]')  # any character content() must write as |hex|


class Unsupported(ValueError):
    """The indicator cannot be turned into a Suricata detection; the message says why."""


@dataclass(frozen=True)
class Settings:
    """The parts of the plugin config that decide the mapping."""

    mode: str = "rules"
    action: str = "alert"
    ip_set: str = "threatbus-ip"
    domain_set: str = "threatbus-domain"


class Detection(NamedTuple):  # a tuple: built for every indicator of a bulk load, ~4x faster than a dataclass
    """How one indicator is detected.

    ``value`` is what sightings report (the IP, domain, URL or hash; empty for
    rules given as ``pattern_type: suricata``). For ``RULE``: ``header`` and
    ``options`` (without msg, metadata, sid, rev), or ``given_rule`` with
    its own ``sid``. For ``DATASET``: ``set_name``, ``set_type``, ``datavalue``
    (serialized as Suricata's unix socket expects). For ``HASHLIST``:
    ``set_name`` is the algorithm (md5, sha1, sha256) and ``datavalue`` the hex.
    """

    kind: str
    value: str
    what: str = ""
    header: str = ""
    options: tuple[str, ...] = ()
    given_rule: str = ""
    sid: int | None = None
    set_name: str = ""
    set_type: str = ""
    datavalue: str = ""

    def render(self, indicator_id: str, sid: int, action: str, rev: int = 1) -> str:
        """The rule line of a ``RULE`` detection."""
        if self.given_rule:
            return self.given_rule
        options = (
            f'msg:"Threat Bus {self.what} {indicator_id}"',
            *self.options,
            f"metadata:threatbus_indicator {indicator_id}",
            f"sid:{sid}",
            f"rev:{rev}",
        )
        return f"{action} {self.header} (" + "; ".join(options) + ";)"


def stable_sid(indicator_id: str, low: int, high: int) -> int:
    """A sid in [low, high] derived from the indicator id (the same on every node and restart)."""
    digest = hashlib.sha256(indicator_id.encode()).digest()
    return low + int.from_bytes(digest[:8], "big") % (high - low + 1)


def content(value: str) -> str:
    """A Suricata content string: printable ASCII as is, everything else as |hex|."""
    if _NOT_PLAIN.search(value) is None:  # nearly every value
        return '"' + value + '"'
    out = []
    hex_run: list[str] = []
    for byte in value.encode("utf-8"):
        char = chr(byte)
        if char in _PLAIN:
            if hex_run:
                out.append("|" + " ".join(hex_run) + "|")
                hex_run = []
            out.append(char)
        else:
            hex_run.append(f"{byte:02X}")
    if hex_run:
        out.append("|" + " ".join(hex_run) + "|")
    return '"' + "".join(out) + '"'


def exact(buffer: str, value: str, nocase: bool = True) -> tuple[str, ...]:
    """Options that match ``buffer`` exactly equal to ``value``."""
    return (buffer, f"content:{content(value)}", *(("nocase",) if nocase else ()), "startswith", "endswith")


def given_rule_sid(rule: str) -> int:
    """The sid of a rule given as ``pattern_type: suricata``; raises Unsupported."""
    if "\n" in rule or "\r" in rule:
        raise Unsupported("a suricata rule must be a single line")
    text = rule.strip()
    if not _RULE_START.match(text) or not text.endswith(")") or "(" not in text:
        raise Unsupported(f"not a Suricata rule: {text[:80]!r}")
    found = _SID.findall(text[text.index("(") :])
    if len(found) != 1:
        raise Unsupported("a suricata rule needs exactly one sid option")
    sid = int(found[0])
    if not 0 < sid < 2**32:
        raise Unsupported(f"sid {sid} out of range")
    return sid


def _ip(object_type: str, value: str, settings: Settings) -> Detection:
    if object_type == "ipv4-addr" and dotted_ipv4(value):  # the common case, without ipaddress (slow)
        if settings.mode == "datasets":
            return Detection(DATASET, value, set_name=settings.ip_set, set_type="ip", datavalue=value)
        return Detection(RULE, value, what="IP", header=f"ip any any <> [{value}] any")
    try:
        network = ipaddress.ip_network(value, strict=False)
    except ValueError:
        raise Unsupported(f"{value!r} is not an IP address or network") from None
    if (network.version == 4) != (object_type == "ipv4-addr"):
        raise Unsupported(f"{value!r} is not an {object_type} value")
    single = network.num_addresses == 1
    address = str(network.network_address) if single else str(network)
    if settings.mode == "datasets" and single:
        return Detection(DATASET, address, set_name=settings.ip_set, set_type="ip", datavalue=address)
    target = f"[{address}]"
    return Detection(RULE, address, what="IP", header=f"ip any any <> {target} any")


def _domain(value: str, settings: Settings) -> Detection:
    domain = value.strip().rstrip(".").lower()
    if not _DOMAIN.match(domain):
        raise Unsupported(f"{value!r} is not a domain name")
    if settings.mode == "datasets":
        encoded = base64.b64encode(domain.encode()).decode()
        return Detection(DATASET, domain, set_name=settings.domain_set, set_type="string", datavalue=encoded)
    return Detection(RULE, domain, what="domain", header="dns any any -> any any", options=exact("dns.query", domain))


def _url(value: str) -> Detection:
    try:
        parts = urlsplit(value.strip())
        host = parts.hostname
    except ValueError:
        host = None
    if not host or not parts.scheme:
        raise Unsupported(f"{value!r} is not an absolute URL with a host")
    options = exact("http.host", host.lower())
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    if path != "/":
        options += exact("http.uri", path, nocase=False)
    return Detection(RULE, value.strip(), what="URL", header="http any any -> any any", options=options)


def _hash(prop: str, value: str) -> Detection:
    algorithm = HASH_ALGORITHMS.get(prop[len("hashes.") :])
    if algorithm is None:
        supported = ", ".join(HASH_ALGORITHMS)
        raise Unsupported(f"file hash {prop} is not supported by Suricata (supported: {supported})")
    digest = value.lower()
    return Detection(HASHLIST, digest, set_name=algorithm, set_type=algorithm, datavalue=digest)


def classify(indicator: Indicator, settings: Settings) -> Detection:
    """How ``indicator`` is detected; raises ``Unsupported`` with the reason."""
    if not _INDICATOR_ID.match(indicator.id):
        raise Unsupported(f"indicator id {indicator.id[:80]!r} is not a STIX identifier")
    if indicator.pattern_type == "suricata":
        rule = indicator.pattern.strip()
        return Detection(RULE, "", given_rule=rule, sid=given_rule_sid(rule))
    if indicator.pattern_type != "stix":
        raise Unsupported(f"pattern_type {indicator.pattern_type!r} (supported: stix, suricata)")
    point = point_indicator(indicator.pattern)
    if point is None:
        raise Unsupported(f"pattern {indicator.pattern[:120]!r} is not a single-value comparison")
    if point.object_type in ("ipv4-addr", "ipv6-addr") and point.property == "value":
        return _ip(point.object_type, point.value, settings)
    if point.path == "domain-name:value":
        return _domain(point.value, settings)
    if point.path == "url:value":
        return _url(point.value)
    if point.object_type == "file" and point.property.startswith("hashes."):
        return _hash(point.property, point.value)
    raise Unsupported(f"{point.path} indicators have no Suricata mapping")


def static_rules(settings: Settings, sid_min: int, base: str, hashlists: dict[str, int]) -> list[str]:
    """The rules of shared detections: dataset lookups and hash lists.

    ``base`` is the rules file path without its suffix: data files live next
    to it. ``hashlists`` maps an algorithm to its number of hashes; lists
    without hashes get no rule (Suricata refuses to load an empty hash list).
    """
    directory = os.path.dirname(base)
    rules = []
    action = settings.action
    if settings.mode == "datasets":
        ip_file = dataset_path(directory, settings.ip_set)
        for direction, sticky in (("ip-dst", "ip.dst"), ("ip-src", "ip.src")):
            sid = sid_min + STATIC_SID_OFFSETS[direction]
            rules.append(
                f'{action} ip any any -> any any (msg:"Threat Bus dataset {settings.ip_set} ({sticky})"; '
                f"{sticky}; dataset:isset,{settings.ip_set}, type ip, load {ip_file}; "
                f"metadata:threatbus_dataset {settings.ip_set}; sid:{sid}; rev:1;)"
            )
        domain_file = dataset_path(directory, settings.domain_set)
        sid = sid_min + STATIC_SID_OFFSETS["domain"]
        rules.append(
            f'{action} dns any any -> any any (msg:"Threat Bus dataset {settings.domain_set}"; '
            f"dns.query; dataset:isset,{settings.domain_set}, type string, load {domain_file}; "
            f"metadata:threatbus_dataset {settings.domain_set}; sid:{sid}; rev:1;)"
        )
    for algorithm, keyword in HASH_KEYWORDS.items():
        if hashlists.get(algorithm):
            sid = sid_min + STATIC_SID_OFFSETS[algorithm]
            rules.append(
                f'{action} http any any -> any any (msg:"Threat Bus file {algorithm} list"; '
                f"{keyword}:{hashlist_path(base, algorithm)}; "
                f"metadata:threatbus_hashlist {algorithm}; sid:{sid}; rev:1;)"
            )
    return rules


def hashlist_path(base: str, algorithm: str) -> str:
    """The hash list file of ``algorithm`` (read by filemd5/filesha1/filesha256)."""
    return f"{base}-{algorithm}.list"


def dataset_path(directory: str, set_name: str) -> str:
    """The file a dataset loads its entries from (the ``load`` option of its rule)."""
    return os.path.join(directory, f"{set_name}.lst")
