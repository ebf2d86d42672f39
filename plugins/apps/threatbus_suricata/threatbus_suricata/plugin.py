"""The Suricata app plugin's hooks: indicators become detections, alerts become sightings.

Settings in ``settings``, detection sync (files, dataset commands, reloads)
in ``detections``, EVE alerts to sightings in ``alerts``.
"""

from __future__ import annotations

import logging
import queue
from typing import Any

import threatbus
from threatbus.app_plugin import AppPlugin, AppRuntime
from threatbus.data import TOPIC_INDICATOR, Message, SnapshotRequest, SnapshotType
from threatbus.delivery import DeliveryQueue
from threatbus.errors import PluginError
from threatbus.expiry import ExpiryWorker, hand_to
from threatbus.metrics import APP_RECEIVED, APP_REJECTED, DELIVERED, Metrics
from threatbus.routing import Sink
from threatbus_suricata.alerts import Alerts, EveWorker
from threatbus_suricata.answers import SnapshotAnswers
from threatbus_suricata.detections import DetectionSync, DetectionWorker
from threatbus_suricata.eve import LogFollower
from threatbus_suricata.settings import NAME, PREFIX, SuricataSettings, validators
from threatbus_suricata.store import DetectionStore, ForeignFile
from threatbus_suricata.suricata_socket import SuricataSocket

logger = logging.getLogger(__name__)


class SuricataApp(AppPlugin):
    """Connects Threat Bus to Suricata (see README.md)."""

    def __init__(self) -> None:
        super().__init__()
        self.store: DetectionStore | None = None
        self.socket: SuricataSocket | None = None
        self.sync: DetectionSync | None = None
        self.alerts: Alerts | None = None
        # Unbounded; acknowledged once the rules/dataset files hold the change (detections.DetectionSync).
        self.inbox = DeliveryQueue()
        self.answers: SnapshotAnswers | None = None

    @property
    def stop_timeout(self) -> float:
        # A worker may be inside a socket command: it ends within the socket's timeout.
        return max(5.0, (self.socket.timeout if self.socket else 0) + 3)

    def validators(self) -> list[Any]:
        return validators()

    def start(self, runtime: AppRuntime) -> None:
        settings = SuricataSettings.from_config(runtime.config)
        rules_file = settings.rules_file
        self.store = DetectionStore(
            rules_file, settings.mapping, settings.sid_min, settings.sid_max, settings.dataset_command_limit
        )
        try:
            loaded = self.store.load()
        except OSError as err:
            raise PluginError(f"{PREFIX}: cannot read rules file {rules_file}: {err}") from err
        except ForeignFile as err:
            raise PluginError(f"{PREFIX}.rules_file: {err}") from None
        self.socket = SuricataSocket(settings.socket, timeout=settings.socket_timeout)
        self.sync = DetectionSync(settings, self.store, self.socket, self.inbox)
        self.alerts = Alerts(self.store, runtime.publish_queue)
        self._register_metrics(runtime.metrics)
        self.sync.expire_held()

        self.answers = SnapshotAnswers(self.store, runtime.backlog)
        runtime.add_workers(
            DetectionWorker(self.sync, self.inbox), ExpiryWorker(self.sync.expiry, hand_to), self.answers
        )
        eve = settings.eve
        if eve:
            follower = LogFollower(eve, from_start=settings.eve_from_start)
            try:
                follower.begin()  # alerts written from now on are not missed
            except OSError as err:
                raise PluginError(f"{PREFIX}: cannot read EVE log {eve}: {err}") from err
            runtime.add_workers(EveWorker(self.alerts, follower))
        runtime.subscribe_until_stop(TOPIC_INDICATOR, self.inbox, settings.snapshot)
        logger.info(
            "suricata app running on node '%s': %d detections from %s (mode %s), command socket %s, EVE %s",
            runtime.node.name,
            loaded,
            rules_file,
            settings.mapping.mode,
            settings.socket,
            eve or "not followed",
        )

    def release(self, stuck: list[str]) -> None:
        if self.socket is not None:
            self.socket.close()
        if self.store is not None and not stuck:  # a stuck worker may still read the entries' texts
            self.store.close()

    @threatbus.app
    def snapshot(
        self, snapshot_request: SnapshotRequest, result_queue: queue.SimpleQueue[Message], requester: Sink | None
    ) -> None:
        """Answer indicator snapshots with the held active indicators modified within the period."""
        if (
            self.answers is None
            or snapshot_request.snapshot_type is not SnapshotType.INDICATOR
            or requester is self.inbox  # our own request
        ):
            return
        # In the app's own thread: the bus's snapshot router must go on handing the answers on meanwhile.
        self.answers.requests.put((snapshot_request, result_queue))

    def _register_metrics(self, metrics: Metrics) -> None:
        sync, alerts = self.sync, self.alerts
        assert sync is not None and alerts is not None
        metrics.counter(APP_RECEIVED, lambda: alerts.sightings, plugin=NAME)
        metrics.counter(APP_REJECTED, lambda: alerts.bad_lines + sync.unsupported, plugin=NAME)
        metrics.counter(DELIVERED, lambda: sync.indicators, plugin=NAME)
        metrics.gauge(
            "threatbus_suricata_detections", "Indicators Suricata detects", lambda: len(self.store or ()), plugin=NAME
        )
        metrics.counter("threatbus_suricata_reloads", "Rule reloads requested", lambda: sync.reloads, plugin=NAME)
        metrics.counter(
            "threatbus_suricata_dataset_commands",
            "dataset-add/remove commands",
            lambda: sync.dataset_commands,
            plugin=NAME,
        )
        metrics.counter(
            "threatbus_suricata_socket_errors",
            "Failed talks with the command socket",
            lambda: sync.socket_errors,
            plugin=NAME,
        )
        metrics.counter(
            "threatbus_suricata_unmapped_alerts",
            "Alerts of Threat Bus rules without a held indicator",
            lambda: alerts.unmapped_alerts,
            plugin=NAME,
        )
