"""TAXII in: polls TAXII 2.1 collections and puts their indicators and sightings on the bus.

Each poll asks every collection for the objects added after its saved
position (``added_after``), follows the server's paging (``more``/``next``)
and, after each page, saves the page's ``X-TAXII-Date-Added-Last`` as the
new position. Objects are published before their page's position is saved,
so a restart repeats nothing that was fully handled and misses nothing.
"""

from __future__ import annotations

import logging
import queue
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import requests
from requests.adapters import HTTPAdapter
from taxii2client.common import _HTTPConnection
from taxii2client.exceptions import TAXIIServiceException
from taxii2client.v21 import ApiRoot, Collection, Server

from threatbus import stix
from threatbus.data import Message, describe, from_payload
from threatbus.errors import DecodeError
from threatbus.lifecycle import parse_timestamp
from threatbus.worker import Backoff, StoppableWorker
from threatbus_taxii.positions import PositionStore
from threatbus_taxii.settings import PollSettings

logger = logging.getLogger(__name__)

INTEL_TYPES = ("indicator", "sighting")
DATE_ADDED_LAST = "X-TAXII-Date-Added-Last"
# Longest wait between retries after errors (seconds).
MAX_BACKOFF = 300.0


@dataclass
class PollStats:
    """Plain counters, written by the poller only, read by metrics and tests."""

    received: int = 0  # published on the bus
    rejected: int = 0  # invalid indicators and sightings
    skipped: int = 0  # other STIX types
    skipped_types: Counter[str] = field(default_factory=Counter)
    polls: int = 0  # polls that reached every collection
    errors: int = 0  # polls that failed
    healthy: bool = False  # the last poll succeeded


class _ApiKey(requests.auth.AuthBase):
    """Sends an API key in a header of the operator's choice (e.g. ``Authorization``)."""

    def __init__(self, header: str, key: str) -> None:
        self.header = header
        self.key = key

    def __call__(self, request: requests.PreparedRequest) -> requests.PreparedRequest:
        request.headers[self.header] = self.key
        return request


class _Adapter(HTTPAdapter):
    """Puts the configured timeout and certificate checks on every request.

    taxii2-client passes no timeout: without one a stalled server would block
    the poller forever. requests lets REQUESTS_CA_BUNDLE in the environment
    win over a session's CA file: the configured ``tls.ca_file`` and
    ``tls.verify: false`` must win.
    """

    def __init__(self, timeout: float, verify: bool | str) -> None:
        super().__init__()
        self.timeout = timeout
        self.verify = verify

    def send(self, request: requests.PreparedRequest, **kwargs: Any) -> requests.Response:  # type: ignore[override]
        if kwargs.get("timeout") is None:
            kwargs["timeout"] = self.timeout
        if self.verify is not True:
            kwargs["verify"] = self.verify
        return super().send(request, **kwargs)


class TaxiiConnection:
    """One HTTP session to the TAXII server, shared by every endpoint object.

    Made as taxii2-client's connection type (its documented ``conn``
    argument) so that we can add a request timeout and read the response
    headers (``X-TAXII-Date-Added-Last``), which taxii2-client's calls do not
    return.
    """

    def __init__(self, settings: PollSettings) -> None:
        auth = _ApiKey(settings.api_key_header, settings.api_key) if settings.api_key else None
        self.conn = _HTTPConnection(
            user=settings.username or None,
            password=settings.password or None,
            verify=settings.tls_verify(),
            version="2.1",
            auth=auth,
            cert=settings.client_cert(),
            user_agent="threatbus-taxii",
        )
        adapter = _Adapter(settings.timeout, settings.tls_verify())
        self.conn.session.mount("http://", adapter)
        self.conn.session.mount("https://", adapter)
        self.conn.session.hooks["response"].append(self._remember)
        self.last_headers: requests.structures.CaseInsensitiveDict[str] = requests.structures.CaseInsensitiveDict()

    def _remember(self, response: requests.Response, **_: Any) -> None:
        self.last_headers = response.headers

    def close(self) -> None:
        self.conn.close()


class TaxiiPoller(StoppableWorker):
    """Polls the configured collections every ``poll_interval`` seconds; backs off on errors."""

    def __init__(
        self,
        settings: PollSettings,
        positions: PositionStore,
        publish_queue: queue.SimpleQueue[Message] | queue.Queue[Message],
        stats: PollStats,
    ) -> None:
        super().__init__(name="taxii-poller")
        self.settings = settings
        self.positions = positions
        self.publish_queue = publish_queue
        self.stats = stats
        self._backoff = Backoff(initial=1.0, maximum=min(MAX_BACKOFF, max(1.0, settings.poll_interval)))
        self._connection: TaxiiConnection | None = None
        self._collections: list[Collection] = []
        self._missing: set[str] = set()  # configured collections the server does not offer (yet)

    def run(self) -> None:
        try:
            while not self.stopping:
                delay = self.settings.poll_interval
                try:
                    self.poll()
                except Exception as err:
                    self._failed(err)
                    delay = self._backoff.next_delay()
                    logger.warning("TAXII poll of %s failed: %s; retrying in %.1fs", self.settings.url, err, delay)
                else:
                    self._backoff.reset()
                self.wait(delay)
        finally:
            self._disconnect()

    def _failed(self, err: Exception) -> None:
        self.stats.errors += 1
        self.stats.healthy = False
        if not isinstance(err, (requests.RequestException, TAXIIServiceException, ValueError)):
            logger.exception("unexpected error while polling TAXII")
        # Resolve the collections again next time: the server may have changed.
        self._disconnect()

    def _disconnect(self) -> None:
        if self._connection is not None:
            self._connection.close()
        self._connection = None
        self._collections = []

    # ---- one poll --------------------------------------------------------

    def poll(self) -> None:
        """Read every collection up to its end. Raises on any server or network error."""
        if self._connection is None:
            self._connection = TaxiiConnection(self.settings)
            self._collections = self._resolve(self._connection)
        elif self._missing:
            # Configured collections that were not there may appear (a feed set up after Threat Bus).
            self._collections = self._resolve(self._connection)
        for collection in self._collections:
            if self.stopping:
                return
            self._poll_collection(self._connection, collection)
        self.stats.polls += 1
        self.stats.healthy = True

    def _api_roots(self, connection: TaxiiConnection) -> list[ApiRoot]:
        if not self.settings.is_discovery:
            return [ApiRoot(self.settings.url, conn=connection.conn)]
        server = Server(self.settings.url, conn=connection.conn)
        # Server makes its ApiRoot objects with connections of their own: rebuild them on ours.
        roots = [ApiRoot(root.url, conn=connection.conn) for root in server.api_roots]
        logger.info("TAXII server %s (%s) lists %d API roots", self.settings.url, server.title, len(roots))
        return roots

    def _resolve(self, connection: TaxiiConnection) -> list[Collection]:
        """The collections to poll: the configured ids, else every readable one."""
        available: dict[str, Collection] = {}
        for root in self._api_roots(connection):
            for collection in root.collections:
                available.setdefault(collection.id, collection)
        if self.settings.collections:
            chosen, missing = [], set()
            for wanted in self.settings.collections:
                collection = available.get(wanted)
                if collection is not None and collection.can_read:
                    chosen.append(collection)
                    continue
                missing.add(wanted)
                problem = "not found" if collection is None else "not readable"
                # Looked up again every poll: say it loudly once, then quietly.
                log = logger.debug if wanted in self._missing else logger.error
                log("TAXII collection %s at %s is %s; not polled", wanted, self.settings.url, problem)
            known = self._missing == missing and self._collections
            self._missing = missing
            if known:
                return chosen
        else:
            chosen = [c for c in available.values() if c.can_read]
        logger.info(
            "polling %d TAXII collections at %s every %gs: %s",
            len(chosen),
            self.settings.url,
            self.settings.poll_interval,
            ", ".join(f"{c.id} ({c.title})" for c in chosen) or "none",
        )
        return chosen

    def _poll_collection(self, connection: TaxiiConnection, collection: Collection) -> None:
        key = collection.url
        added_after = self.positions.get(key)
        # The filter stays the same while paging with `next` (servers may refuse a change).
        query: dict[str, Any] = {"limit": self.settings.page_size}
        if added_after:
            query["added_after"] = added_after
        pages = objects = 0
        while not self.stopping:
            envelope = collection.get_objects(**query)
            headers = connection.last_headers
            if not isinstance(envelope, dict):
                raise ValueError(f"collection {collection.id}: the envelope is not a JSON object")
            page = envelope.get("objects") or []
            if not isinstance(page, list):
                raise ValueError(f"collection {collection.id}: 'objects' is not a list")
            for obj in page:
                self._take(obj, collection)
            pages += 1
            objects += len(page)
            position = self._position(headers, collection) if page else None
            if position:
                self.positions.set(key, position)
            if not envelope.get("more"):
                break
            following = envelope.get("next")
            if following and following != query.get("next"):
                query["next"] = following
            elif not following and position and position != query.get("added_after"):
                # TAXII 2.1 servers may page by added_after alone.
                query = {"limit": self.settings.page_size, "added_after": position}
            else:
                logger.warning(
                    "TAXII collection %s says 'more' but gives no way on (next %r); rest on the next poll",
                    collection.id,
                    following,
                )
                break
        if objects:
            logger.info(
                "TAXII collection %s: %d objects in %d pages (position %s)",
                collection.id,
                objects,
                pages,
                self.positions.get(key),
            )
        else:
            logger.debug("TAXII collection %s: nothing new after %s", collection.id, added_after)

    @staticmethod
    def _position(headers: Any, collection: Collection) -> str | None:
        """The page's ``X-TAXII-Date-Added-Last`` if it is a timestamp, else None (with a warning)."""
        value = headers.get(DATE_ADDED_LAST)
        try:
            parse_timestamp(value)
        except (TypeError, ValueError, IndexError):
            logger.warning(
                "TAXII collection %s sends no usable %s header (%r): its position cannot be kept; objects may repeat",
                collection.id,
                DATE_ADDED_LAST,
                value,
            )
            return None
        return value

    def _take(self, obj: Any, collection: Collection) -> None:
        """Publish one STIX object if it is valid intel; count and drop everything else."""
        if not isinstance(obj, dict):
            self.stats.rejected += 1
            logger.warning("dropping a non-object from TAXII collection %s: %s", collection.id, describe(repr(obj)))
            return
        kind = obj.get("type")
        if kind not in INTEL_TYPES:
            self.stats.skipped += 1
            self.stats.skipped_types[str(kind)] += 1
            logger.debug("skipping %s object from TAXII collection %s", kind, collection.id)
            return
        try:
            message = from_payload(obj)
            stix.validate(message)
        except DecodeError as err:
            self.stats.rejected += 1
            logger.warning(
                "dropping invalid %s %s from TAXII collection %s: %s", kind, obj.get("id"), collection.id, err
            )
            return
        self.stats.received += 1
        self.publish_queue.put(message)
