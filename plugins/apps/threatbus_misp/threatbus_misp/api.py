"""MISP's REST API through pymisp, with failures sorted into "try again" and "refused".

Each worker that talks to MISP owns one ``MispApi`` (pymisp's requests
session is not shared between threads). The pymisp client is made on first
use: its constructor already asks MISP for its version and the API key's
user, so an unreachable MISP fails there and is retried like any request.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from datetime import datetime
from typing import Any

import requests
from pymisp import PyMISP
from pymisp.exceptions import PyMISPError

from threatbus_misp.settings import MispSettings

logger = logging.getLogger(__name__)

# (connect, read) seconds for every request.
TIMEOUT = (5.0, 10.0)
PAGE_SIZE = 1000
SIGHTING_TRUE_POSITIVE = "0"
# HTTP answers that may change without anyone touching the request: retry them.
RETRY_STATUSES = frozenset({401, 403, 408, 425, 429})


class Unavailable(Exception):
    """MISP cannot be reached or failed this time; the request may succeed later."""


class Refused(Exception):
    """MISP refused the request itself (e.g. unknown attribute); retrying will not help."""


class MispApi:
    def __init__(self, settings: MispSettings) -> None:
        assert settings.api_host and settings.api_key
        self.host = settings.api_host
        self.key = settings.api_key
        self.ssl = settings.api_ssl
        self._client: PyMISP | None = None

    def client(self) -> PyMISP:
        if self._client is None:
            try:
                self._client = PyMISP(self.host, self.key, ssl=self.ssl, timeout=TIMEOUT, tool="threatbus")
            except (PyMISPError, requests.RequestException) as err:
                raise Unavailable(f"cannot connect to MISP at {self.host}: {err}") from None
            logger.info("connected to MISP's API at %s", self.host)
        return self._client

    def _call(self, what: str, method: str, *args: Any, **kwargs: Any) -> Any:
        client = self.client()
        try:
            result = getattr(client, method)(*args, **kwargs)
        except (PyMISPError, requests.RequestException) as err:
            raise Unavailable(f"{what} failed: {err}") from None
        if isinstance(result, dict) and "errors" in result:
            errors = result["errors"]
            status = errors[0] if isinstance(errors, (list, tuple)) and errors else None
            if status in RETRY_STATUSES:
                raise Unavailable(f"{what}: MISP answered {status}: {errors}")
            raise Refused(f"{what}: MISP refused it: {errors}")
        return result

    def add_sighting(self, attribute_uuid: str, source: str, seen: datetime) -> None:
        """Report a true-positive sighting (type 0) of the attribute."""
        sighting = {"type": SIGHTING_TRUE_POSITIVE, "source": source, "timestamp": int(seen.timestamp())}
        self._call(f"sighting of attribute {attribute_uuid}", "add_sighting", sighting, attribute=attribute_uuid)

    def attributes_since(self, since: datetime, page_size: int = PAGE_SIZE) -> Iterator[dict[str, Any]]:
        """Attributes with to_ids changed since ``since``, page by page (restSearch)."""
        page = 1
        while True:
            result = self._call(
                f"attribute search (page {page})",
                "search",
                controller="attributes",
                return_format="json",
                to_ids=1,
                timestamp=int(since.timestamp()),
                include_event_tags=True,
                page=page,
                limit=page_size,
            )
            attributes = result.get("Attribute", []) if isinstance(result, dict) else []
            if not isinstance(attributes, list):
                raise Refused(f"attribute search: unexpected answer {str(result)[:200]}")
            yield from attributes
            if len(attributes) < page_size:
                return
            page += 1
