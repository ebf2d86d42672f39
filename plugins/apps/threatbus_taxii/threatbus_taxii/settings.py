"""The config section ``plugins.apps.taxii``: validators with the defaults, and the frozen settings built from them."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from dynaconf import Validator

from threatbus.config import count, empty_or, matching, option, seconds, snapshot_days, tls_files

PLUGIN = "taxii"
PREFIX = f"plugins.apps.{PLUGIN}"

# Stable default id of the served collection, so TAXII clients keep their configuration across restarts.
DEFAULT_COLLECTION_ID = "a36ff26e-bc3e-5ba4-9d73-ba8bc710e8fe"
# A URL path segment of letters, digits and -_.~ (RFC 3986 unreserved; letters and digits of any script).
_PATH_SEGMENT = re.compile(r"(?:[^\W_]|[-_.~])+\Z")


def _is_http_url(value: str) -> bool:
    parsed = urlparse(value)
    return parsed.scheme in ("http", "https") and bool(parsed.netloc)


def _both_or_neither(first: str, second: str) -> Validator:
    """``second`` must be set (non-empty) whenever ``first`` is."""
    return Validator(
        f"{PREFIX}.{second}",
        condition=bool,
        when=Validator(f"{PREFIX}.{first}", condition=bool),
        messages={"condition": f"{PREFIX}.{second} is required when {PREFIX}.{first} is set"},
    )


def _excludes(first: str, second: str) -> Validator:
    return Validator(
        f"{PREFIX}.{second}",
        condition=lambda value: not value,
        when=Validator(f"{PREFIX}.{first}", condition=bool),
        messages={"condition": f"{PREFIX}.{second} cannot be combined with {PREFIX}.{first}"},
    )


def validators() -> list[Validator]:
    """Every key of ``plugins.apps.taxii`` with its default (sections before their keys); see README.md."""
    return [
        # TAXII in: polling. Off while url is empty.
        empty_or(
            f"{PREFIX}.url", _is_http_url, expected="an http(s) URL of a TAXII 2.1 API root or discovery endpoint"
        ),
        option(
            f"{PREFIX}.collections",
            list,
            default=[],
            check=lambda ids: all(isinstance(i, str) and i for i in ids),
            expected="a list of collection ids",
        ),
        option(f"{PREFIX}.username", str, default=""),
        option(f"{PREFIX}.password", str, default=""),
        _both_or_neither("username", "password"),
        _both_or_neither("password", "username"),
        option(f"{PREFIX}.api_key", str, default=""),
        option(f"{PREFIX}.api_key_header", str, default="Authorization", check=bool, expected="an HTTP header name"),
        _excludes("api_key", "username"),
        *tls_files(f"{PREFIX}.tls"),
        option(f"{PREFIX}.tls.verify", bool, default=True),
        seconds(f"{PREFIX}.poll_interval", default=300, expected="a number of seconds > 0"),
        seconds(f"{PREFIX}.timeout", default=10, expected="a number of seconds > 0"),
        count(
            f"{PREFIX}.page_size", default=500, maximum=100_000, expected="a number of objects per request (1-100000)"
        ),
        option(f"{PREFIX}.state_dir", str, default="taxii-state", check=bool, expected="a directory path"),
        # TAXII out: serving the bus's intel. Off by default.
        option(f"{PREFIX}.serve", dict, default={}),
        option(f"{PREFIX}.serve.enabled", bool, default=False),
        option(f"{PREFIX}.serve.host", str, default="127.0.0.1", check=bool, expected="a host name or IP address"),
        option(
            f"{PREFIX}.serve.port",
            int,
            default=9470,
            check=lambda p: 0 <= p < 65536,
            expected="a TCP port (1-65535) or 0 for any free port",
        ),
        matching(f"{PREFIX}.serve.api_root", _PATH_SEGMENT, default="threatbus", expected="a URL path segment"),
        matching(
            f"{PREFIX}.serve.collection_id",
            _PATH_SEGMENT,
            default=DEFAULT_COLLECTION_ID,
            expected="a collection id (a UUID)",
        ),
        option(f"{PREFIX}.serve.title", str, default="Threat Bus intel"),
        option(f"{PREFIX}.serve.description", str, default="The indicators currently active on the bus"),
        option(
            f"{PREFIX}.serve.users",
            dict,
            default={},
            check=lambda users: all(isinstance(u, str) and u and isinstance(p, str) and p for u, p in users.items()),
            expected="a mapping of user names to passwords",
        ),
        count(
            f"{PREFIX}.serve.max_page_size", default=1000, maximum=100_000, expected="a number of objects (1-100000)"
        ),
        snapshot_days(f"{PREFIX}.serve.snapshot"),
        option(f"{PREFIX}.serve.tls", dict, default={}),
        option(f"{PREFIX}.serve.tls.cert_file", str, default=""),
        option(f"{PREFIX}.serve.tls.key_file", str, default=""),
        _both_or_neither("serve.tls.cert_file", "serve.tls.key_file"),
    ]


@dataclass(frozen=True)
class PollSettings:
    """Where and how to poll (TAXII in)."""

    url: str
    collections: tuple[str, ...]
    username: str
    password: str
    api_key: str
    api_key_header: str
    ca_file: str
    cert_file: str
    key_file: str
    verify: bool
    poll_interval: float
    timeout: float
    page_size: int
    state_dir: Path

    @property
    def enabled(self) -> bool:
        return bool(self.url)

    @property
    def is_discovery(self) -> bool:
        """A discovery URL (``.../taxii2/``) lists API roots; anything else is an API root."""
        return (
            urlparse(self.url).path.rstrip("/").endswith("/taxii2") or urlparse(self.url).path.rstrip("/") == "taxii2"
        )

    def tls_verify(self) -> bool | str:
        """The ``verify`` of requests: a CA bundle, or whether to check the server's certificate."""
        if not self.verify:
            return False
        return self.ca_file or True

    def client_cert(self) -> tuple[str, str] | str | None:
        if not self.cert_file:
            return None
        return (self.cert_file, self.key_file) if self.key_file else self.cert_file


@dataclass(frozen=True)
class ServeSettings:
    """The read-only TAXII collection of the bus's intel (TAXII out)."""

    enabled: bool
    host: str
    port: int
    api_root: str
    collection_id: str
    title: str
    description: str
    users: dict[str, str]
    max_page_size: int
    snapshot_days: float
    cert_file: str
    key_file: str


@dataclass(frozen=True)
class TaxiiSettings:
    """The plugin's settings, built from its validated section (the defaults are in ``validators``)."""

    poll: PollSettings
    serve: ServeSettings

    @classmethod
    def from_config(cls, config: Any) -> TaxiiSettings:
        """Settings from the validated section: every key is there, its default filled in by ``validators``."""
        tls, serve = config["tls"], config["serve"]
        poll = PollSettings(
            url=config["url"],
            collections=tuple(config["collections"]),
            username=config["username"],
            password=config["password"],
            api_key=config["api_key"],
            api_key_header=config["api_key_header"],
            ca_file=tls["ca_file"],
            cert_file=tls["cert_file"],
            key_file=tls["key_file"],
            verify=bool(tls["verify"]),
            poll_interval=float(config["poll_interval"]),
            timeout=float(config["timeout"]),
            page_size=int(config["page_size"]),
            state_dir=Path(config["state_dir"]),
        )
        served = ServeSettings(
            enabled=bool(serve["enabled"]),
            host=serve["host"],
            port=int(serve["port"]),
            api_root=serve["api_root"],
            collection_id=serve["collection_id"],
            title=serve["title"],
            description=serve["description"],
            users={str(user): str(password) for user, password in serve["users"].items()},
            max_page_size=int(serve["max_page_size"]),
            snapshot_days=float(serve["snapshot"]),
            cert_file=serve["tls"]["cert_file"],
            key_file=serve["tls"]["key_file"],
        )
        return cls(poll=poll, serve=served)
