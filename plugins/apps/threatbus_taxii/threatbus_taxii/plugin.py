"""The TAXII app plugin: TAXII 2.1 collections in (polling), the bus's intel out (a served collection).

Both directions are optional and independent: polling runs when ``url`` is
set, serving when ``serve.enabled`` is true.
"""

from __future__ import annotations

import logging
import queue
from datetime import timedelta
from typing import Any

import threatbus
from threatbus.app_plugin import AppPlugin, AppRuntime
from threatbus.data import TOPIC_INDICATOR, Message, SnapshotRequest
from threatbus.delivery import DeliveryQueue
from threatbus.metrics import APP_RECEIVED, APP_REJECTED, QUEUE_DEPTH, Metrics
from threatbus_taxii.intel import IntelFolder, ServedIntel
from threatbus_taxii.poller import PollStats, TaxiiPoller
from threatbus_taxii.positions import PositionStore
from threatbus_taxii.server import AuthGate, IntelBackend, TaxiiServer, create_app, server_tls
from threatbus_taxii.settings import PLUGIN, TaxiiSettings, validators

logger = logging.getLogger(__name__)

SKIPPED = "threatbus_taxii_skipped"  # counter: polled STIX objects that are neither indicators nor sightings
POLLS = "threatbus_taxii_polls"  # counter: polls that read every collection
POLL_ERRORS = "threatbus_taxii_poll_errors"  # counter: polls that failed (then retried with backoff)
POLL_OK = "threatbus_taxii_poll_ok"  # gauge: 1 while the last poll succeeded
SERVED = "threatbus_taxii_served"  # gauge: indicators the served collection holds
SERVE_REQUESTS = "threatbus_taxii_serve_requests"  # counter: TAXII requests answered from the served intel
SERVE_REFUSED = "threatbus_taxii_serve_refused"  # counter: TAXII requests refused for bad credentials


class TaxiiApp(AppPlugin):
    """Threat Bus app plugin ``taxii``."""

    def __init__(self) -> None:
        super().__init__()
        self.settings: TaxiiSettings | None = None
        self.stats = PollStats()
        self.intel = ServedIntel()
        self.intel_queue = DeliveryQueue()  # acknowledged once served (intel.IntelFolder)
        self.poller: TaxiiPoller | None = None
        self.folder: IntelFolder | None = None
        self.server: TaxiiServer | None = None
        self.backend: IntelBackend | None = None
        self.gate: AuthGate | None = None

    def validators(self) -> list[Any]:
        return validators()

    def start(self, runtime: AppRuntime) -> None:
        settings = self.settings = TaxiiSettings.from_config(runtime.config)
        if not settings.poll.enabled and not settings.serve.enabled:
            logger.warning("TAXII app configured with neither url (polling) nor serve.enabled: it does nothing")
        if settings.poll.enabled:
            positions = PositionStore(settings.poll.state_dir)
            positions.load()
            self.poller = TaxiiPoller(settings.poll, positions, runtime.publish_queue, self.stats)
            runtime.add_workers(self.poller)
        if settings.serve.enabled:
            self.backend = IntelBackend(self.intel, settings.serve)
            app, self.gate = create_app(self.backend, settings.serve)
            tls = server_tls(settings.serve.cert_file, settings.serve.key_file)
            self.server = TaxiiServer(app, settings.serve.host, settings.serve.port, tls)
            self.folder = IntelFolder(self.intel_queue, self.intel)
            runtime.add_workers(self.server, self.folder)
        self._register_metrics(runtime.metrics)
        if self.server is not None:
            snapshot = timedelta(days=settings.serve.snapshot_days)
            runtime.subscribe_until_stop(TOPIC_INDICATOR, self.intel_queue, snapshot=snapshot)
            logger.info(
                "serving the bus's intel as TAXII 2.1 collection %s at %s%s/ (%s)",
                settings.serve.collection_id,
                self.server.url,
                settings.serve.api_root,
                "basic auth" if settings.serve.users else "no authentication",
            )

    def _register_metrics(self, metrics: Metrics) -> None:
        stats = self.stats
        if self.poller is not None:
            metrics.counter(APP_RECEIVED, lambda: stats.received, plugin=PLUGIN)
            metrics.counter(APP_REJECTED, lambda: stats.rejected, plugin=PLUGIN)
            metrics.counter(SKIPPED, "Polled STIX objects that are not intel", lambda: stats.skipped, plugin=PLUGIN)
            metrics.counter(POLLS, "TAXII polls that read every collection", lambda: stats.polls, plugin=PLUGIN)
            metrics.counter(POLL_ERRORS, "TAXII polls that failed", lambda: stats.errors, plugin=PLUGIN)
            metrics.gauge(POLL_OK, "1 while the last TAXII poll succeeded", lambda: int(stats.healthy), plugin=PLUGIN)
        if self.backend is not None:
            backend, gate = self.backend, self.gate
            metrics.gauge(
                SERVED, "Indicators in the served collection", lambda: len(self.intel.served()), plugin=PLUGIN
            )
            metrics.counter(SERVE_REQUESTS, "TAXII object requests served", lambda: backend.requests, plugin=PLUGIN)
            metrics.counter(SERVE_REFUSED, "TAXII requests with bad credentials", lambda: gate.refused, plugin=PLUGIN)
            metrics.gauge(QUEUE_DEPTH, self.intel_queue.qsize, queue=PLUGIN)

    @threatbus.app
    def snapshot(self, snapshot_request: SnapshotRequest, result_queue: queue.SimpleQueue[Message]) -> None:
        """Answers nothing: polled intel is published as it arrives and kept by the bus's intel history.

        The served collection holds other apps' intel; answering from it
        would send it back to them.
        """
        logger.debug("TAXII app does not answer snapshot %s", snapshot_request.snapshot_id)


__all__ = ["TaxiiApp"]
