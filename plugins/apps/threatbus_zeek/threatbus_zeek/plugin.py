"""The Zeek app plugin's hooks: settings in ``settings``, the connection in ``link``.

Indicators from the bus become Zeek events that add or remove intel items
(see ``mapping``); ``intel_match`` events from Zeek become sightings on the
bus. The Zeek side is ``scripts/threatbus.zeek`` in this package.
"""

from __future__ import annotations

import logging
import queue
from pathlib import Path
from typing import Any

import threatbus
from threatbus.app_plugin import AppPlugin, AppRuntime
from threatbus.data import TOPIC_INDICATOR, Indicator, Message, SnapshotRequest
from threatbus.delivery import DeliveryQueue
from threatbus.errors import PluginError
from threatbus.expiry import ExpirySchedule, ExpiryWorker, hand_to
from threatbus.metrics import QUEUE_DEPTH, SUBSCRIBERS, Metrics
from threatbus_zeek.link import INTEL_TOPIC, MATCH_TOPIC, ZeekLink, ZeekStats
from threatbus_zeek.mapping import ZeekIntel
from threatbus_zeek.settings import PLUGIN, PREFIX, ZeekSettings, validators
from threatbus_zeek.state import ZeekIntelState

logger = logging.getLogger(__name__)

SKIPPED = "threatbus_zeek_skipped"  # counter: indicators Zeek cannot express
ZEEK_ERRORS = "threatbus_zeek_errors"  # counter: error messages Zeek sent back
CONNECTS = "threatbus_zeek_connects"  # counter: successful (re)connections


def script_path() -> Path:
    """The Zeek script to load into Zeek (``zeek ... <path>``)."""
    return Path(__file__).with_name("scripts") / "threatbus.zeek"


class ZeekApp(AppPlugin):
    """Threat Bus app plugin ``zeek``: bridges the bus and Zeek's Intel framework."""

    def __init__(self) -> None:
        super().__init__()
        self.stats = ZeekStats()
        self.intel_queue: DeliveryQueue | None = None
        self.link: ZeekLink | None = None
        self.expiry_worker: ExpiryWorker | None = None

    def validators(self) -> list[Any]:
        return validators()

    def start(self, runtime: AppRuntime) -> None:
        settings = ZeekSettings.from_config(runtime.config)
        # Acknowledged once sent to Zeek: a node killed meanwhile gets it again from the backbone.
        self.intel_queue = DeliveryQueue(maxsize=settings.queue_size)
        self._register_metrics(runtime.metrics, self.intel_queue)
        state, expiry, stale = self._restore(settings, self.intel_queue)
        self.link = ZeekLink(
            settings, self.intel_queue, runtime.publish_queue, runtime.subscribe, self.stats, state, expiry, stale
        )
        self.expiry_worker = ExpiryWorker(expiry, hand_to)
        runtime.add_workers(self.link, self.expiry_worker)
        # Subscribe before connecting: intel arriving while Zeek is away waits in the queue.
        runtime.subscribe_until_stop(TOPIC_INDICATOR, self.intel_queue)
        logger.info("Zeek app started: connecting to %s, Zeek module %s", settings.uri, settings.module_namespace)

    @staticmethod
    def _restore(
        settings: ZeekSettings, intel_queue: DeliveryQueue
    ) -> tuple[ZeekIntelState, ExpirySchedule, list[ZeekIntel]]:
        """The state a previous run left (``state_file``), what expired since, and the expiry of the rest."""
        # Without a file the indicators are not kept, only what Zeek was given (a million may be).
        state, expiry = ZeekIntelState(keep_payloads=bool(settings.state_file)), ExpirySchedule()
        if not settings.state_file:
            return state, expiry, []
        try:
            loaded = state.load(Path(settings.state_file))
        except OSError as err:
            raise PluginError(f"{PREFIX}.state_file: cannot read {settings.state_file}: {err}") from err
        stale = state.drop_expired()
        for payload in state.payloads():
            if "valid_until" in payload:
                expiry.observe(Indicator(payload), (intel_queue,))
        if loaded:
            logger.info(
                "Zeek state from %s: %d indicators, %d of them expired while the node was down",
                settings.state_file,
                loaded,
                len(stale),
            )
        return state, expiry, stale

    def _register_metrics(self, metrics: Metrics, intel_queue: DeliveryQueue) -> None:
        stats = self.stats
        stats.register(metrics, plugin=PLUGIN)
        metrics.gauge(SUBSCRIBERS, lambda: int(stats.connected), plugin=PLUGIN)
        metrics.gauge(QUEUE_DEPTH, intel_queue.qsize, queue=PLUGIN)
        metrics.counter(
            SKIPPED, "Indicators Zeek's Intel framework cannot express", lambda: stats.skipped, plugin=PLUGIN
        )
        metrics.counter(ZEEK_ERRORS, "Error messages Zeek sent back", lambda: stats.zeek_errors, plugin=PLUGIN)
        metrics.counter(CONNECTS, "Successful connections to Zeek", lambda: stats.connects, plugin=PLUGIN)

    @threatbus.app
    def snapshot(self, snapshot_request: SnapshotRequest, result_queue: queue.SimpleQueue[Message]) -> None:
        """Answers nothing: Zeek keeps no intel history that Threat Bus could query.

        Zeek's Intel framework holds only the current intel, in memory, and
        its matches are published as sightings as they happen; there is no
        store of past indicators or sightings to replay for a snapshot.
        """
        logger.debug("Zeek has no history to answer snapshot %s", snapshot_request.snapshot_id)


__all__ = ["INTEL_TOPIC", "MATCH_TOPIC", "ZeekApp", "ZeekSettings", "script_path"]
