"""The bus: both plugin managers, the core's routing hooks and the lifecycle."""

from __future__ import annotations

import contextlib
import logging
import queue
from collections.abc import Iterable, Iterator, Mapping
from datetime import datetime, timedelta
from typing import Any

import pluggy

from threatbus import appspecs, backbonespecs, config, policy
from threatbus.backlog import Backlog
from threatbus.data import TOPIC_SNAPSHOT_ENVELOPE, TOPIC_SNAPSHOT_REQUEST, Message, SnapshotRequest
from threatbus.deadletters import DeadLetters
from threatbus.errors import ConfigError, PluginError
from threatbus.expiry import ExpirySchedule, ExpiryWorker
from threatbus.history import LogEntry
from threatbus.metrics import EXPIRY_REMOVALS, EXPIRY_SCHEDULED, QUEUE_DEPTH, Metrics
from threatbus.node import Node
from threatbus.observability import ObservabilityServer
from threatbus.plugins import APP_GROUP, BACKBONE_GROUP
from threatbus.routing import RoutedBackbone, Sink
from threatbus.snapshots import SnapshotRouter
from threatbus.worker import stop_workers

logger = logging.getLogger(__name__)


def _manager(project: str, specs: object, plugins: Mapping[str, object]) -> pluggy.PluginManager:
    manager = pluggy.PluginManager(project)
    manager.add_hookspecs(specs)
    for name, plugin in plugins.items():
        try:
            manager.register(plugin, name=name)
        except (pluggy.PluginValidationError, ValueError) as err:
            raise PluginError(f"plugin '{name}' does not fit the {project} hooks: {err}") from err
    try:
        manager.check_pending()
    except pluggy.PluginValidationError as err:
        raise PluginError(f"{project}: {err}") from err
    return manager


@contextlib.contextmanager
def _naming(kind: str, name: str, hook: str) -> Iterator[None]:
    """Turn an unexpected error of a plugin's hook into a ``PluginError`` that names the plugin."""
    try:
        yield
    except (PluginError, ConfigError):
        raise
    except Exception as err:
        raise PluginError(f"{kind} plugin '{name}' failed in {hook}: {err}") from err


class Bus:
    """One Threat Bus node: a backbone, the apps, and the routing between them.

    Plugin objects are given by name; ``plugins.load`` makes them from entry
    points, tests pass them in directly.
    """

    def __init__(
        self,
        settings: Any,
        apps: Mapping[str, object],
        backbones: Mapping[str, object],
        node: Node | None = None,
    ) -> None:
        self.settings = settings
        self.node = node or Node.create()
        self.apps = _manager(APP_GROUP, appspecs, apps)
        self.backbones = _manager(BACKBONE_GROUP, backbonespecs, backbones)
        # SimpleQueue: its C implementation hands over ~30x faster than queue.Queue.
        self.publish_queue: queue.SimpleQueue[Message] = queue.SimpleQueue()
        self.metrics = Metrics(self.node.name)
        self.metrics.gauge(QUEUE_DEPTH, self.publish_queue.qsize, queue="publish")
        self.backlog = Backlog(self.publish_queue)
        self.expiry = ExpirySchedule()
        self.expiry_worker: ExpiryWorker | None = None
        self.metrics.gauge(EXPIRY_SCHEDULED, lambda: len(self.expiry))
        self.metrics.counter(EXPIRY_REMOVALS, lambda: self.expiry.removals)
        self.snapshots = SnapshotRouter(self.publish_queue, self._ask_apps, expiry=self.expiry, read_log=self._read_log)
        self._started: list[tuple[pluggy.PluginManager, str]] = []
        self.http: ObservabilityServer | None = None

    # ---- configuration -------------------------------------------------

    def configure(self) -> None:
        """Validate the whole config, applying defaults. Raises ``ConfigError``."""
        names = [name for name, _ in self.backbones.list_name_plugin()]
        if len(names) != 1:
            found = ", ".join(names) or "none"
            raise ConfigError(
                f"plugins.backbones: configure exactly one backbone (found: {found}); "
                "use inmem for a single node or rabbitmq to share intel between nodes. "
                "Each backbone already delivers to every local subscriber, so two would deliver everything twice"
            )
        validators = config.core_validators()
        validators.extend(policy.node_validators(self.plugin_names(self.apps), self.plugin_names(self.backbones)))
        for manager in (self.backbones, self.apps):
            for plugin_validators in manager.hook.config_validators():
                validators.extend(plugin_validators or [])
        config.validate(self.settings, validators)

    # ---- lifecycle -----------------------------------------------------

    def start(self) -> None:
        """Start the backbone, the core's workers, then the apps, in that order.

        If anything fails to start, what already started is stopped again and
        ``PluginError`` is raised. The metrics and health endpoints (if
        configured) start first, so a port in use stops the start at once.
        """
        self._start_http()
        try:
            for name, backbone in self.backbones.list_name_plugin():
                self._attach_expiry(name, backbone)
                self._run_backbone(name, backbone)
            if self.expiry_worker is not None:
                self.expiry_worker.start()
            self.snapshots.start()
            for topic in (TOPIC_SNAPSHOT_REQUEST, TOPIC_SNAPSHOT_ENVELOPE):
                self.backbones.hook.subscribe(topic=topic, queue=self.snapshots.inbox)
            # Apps answering a large snapshot pace themselves on it (the router hands answers on one by one).
            self.backlog.watch(self.snapshots.inbox)
            for name, app in self.apps.list_name_plugin():
                self._run_app(name, app)
        except Exception as err:
            self.stop()
            if isinstance(err, (PluginError, ConfigError)):
                raise
            raise PluginError(f"failed to start: {err}") from err
        logger.info(
            "node '%s' started: backbone %s, apps %s",
            self.node.name,
            ", ".join(self.plugin_names(self.backbones)),
            ", ".join(self.plugin_names(self.apps)) or "none",
        )

    # Typed wrappers of the hook calls: each calls one plugin and names it when it fails.

    def _run_backbone(self, name: str, backbone: object) -> None:
        logger.debug("starting backbone plugin '%s'", name)
        # A plugin whose run raised may have started threads: stop it too.
        self._started.append((self.backbones, name))
        with _naming("backbone", name, "run"):
            self._only(self.backbones, backbone, "run")(
                config=config.section(self.settings, "backbones", name),
                publish_queue=self.publish_queue,
                inq=self.publish_queue,
                node=self.node,
                metrics=self.metrics,
            )

    def _run_app(self, name: str, app: object) -> None:
        logger.debug("starting app plugin '%s'", name)
        self._started.append((self.apps, name))
        with _naming("app", name, "run"):
            self._only(self.apps, app, "run")(
                config=config.section(self.settings, "apps", name),
                publish_queue=self.publish_queue,
                **self._app_subscription(name),
                node=self.node,
                metrics=self.metrics,
                backlog=self.backlog,
            )

    def _snapshot_app(self, name: str, app: object, request: SnapshotRequest, requester: Sink | None) -> None:
        # An app's filter wraps its queues (policy.AppGate): the app knows its own queue, not the wrapper.
        while isinstance(requester, policy.FilteredSink):
            requester = requester.sink
        with _naming("app", name, "snapshot"):
            self._only(self.apps, app, "snapshot")(
                snapshot_request=request,
                result_queue=self.publish_queue,
                local=requester is not None,
                requester=requester,
            )

    @staticmethod
    def _only(manager: pluggy.PluginManager, plugin: object, hook: str) -> Any:
        others = [p for p in manager.get_plugins() if p is not plugin]
        return manager.subset_hook_caller(hook, remove_plugins=others)

    def stop(self) -> None:
        """Stop apps, then the core's workers, then the backbone; each on its own."""
        while self._started and self._started[-1][0] is self.apps:
            self._stop_one(*self._started.pop())
        stop_workers([w for w in (self.snapshots, self.expiry_worker) if w is not None])
        while self._started:
            self._stop_one(*self._started.pop())
        self._stop_http()

    def _attach_expiry(self, name: str, backbone: object) -> None:
        # Expiry works on the router's local deliveries: every backbone built on
        # RoutedBackbone gets it, and no message crosses the backbone for it.
        if not isinstance(backbone, RoutedBackbone):
            logger.warning("backbone '%s' has no TopicRouter: indicators are not removed at valid_until", name)
            return
        backbone.router.expiry = self.expiry
        self.expiry_worker = ExpiryWorker(self.expiry, backbone.router.deliver_to)

    def _stop_one(self, manager: pluggy.PluginManager, name: str) -> None:
        plugin = manager.get_plugin(name)
        try:
            self._only(manager, plugin, "stop")()
            logger.debug("stopped plugin '%s'", name)
        except Exception:
            logger.exception("plugin '%s' failed to stop cleanly", name)

    def _start_http(self) -> None:
        http = self.settings.get("http") or {}
        if http.get("port") is None:
            logger.debug("metrics and health endpoints off (set http.port to turn them on)")
            return
        self.http = ObservabilityServer(
            self.metrics,
            self.health,
            self.node,
            host=http.get("host") or "127.0.0.1",
            port=http["port"],
            dead_letters=self.dead_letters,
        )
        self.http.start()

    def _stop_http(self) -> None:
        if self.http is not None:
            stop_workers([self.http])
            self.http = None

    # ---- what apps call ------------------------------------------------

    def subscribe(
        self, topic: str, queue: Sink, snapshot: timedelta = timedelta(0), snapshot_end: bool = False
    ) -> list[str]:
        """Subscribe ``queue`` to ``topic`` on the backbone; request a snapshot if asked."""
        logger.debug("subscribe %s (snapshot %s)", topic, snapshot)
        self.backbones.hook.subscribe(topic=topic, queue=queue)
        self.backlog.watch(queue)
        if snapshot > timedelta(0):
            return self.snapshots.request(topic, queue, snapshot, snapshot_end=snapshot_end)
        return []

    def unsubscribe(self, topic: str, queue: Sink) -> None:
        logger.debug("unsubscribe %s", topic)
        self.backbones.hook.unsubscribe(topic=topic, queue=queue)
        self.backlog.forget(queue)
        self.snapshots.forget(queue)

    def _app_subscription(self, name: str) -> dict[str, Any]:
        """The app's subscribe and unsubscribe: the bus's own, behind the app's filter if it has one."""
        key = f"plugins.apps.{name}"
        app_filter = policy.Filter.from_config(self.settings.get(key), key, allow_list=True)
        if app_filter is None:
            return {"subscribe": self.subscribe, "unsubscribe": self.unsubscribe}
        stats = policy.FilterStats()
        stats.register(self.metrics, plugin=name, rule="app")
        gate = policy.AppGate(app_filter, stats, self.subscribe, self.unsubscribe)
        logger.info("app '%s' receives only what passes its filter %s", name, app_filter.spec)
        return {"subscribe": gate.subscribe, "unsubscribe": gate.unsubscribe}

    def _ask_apps(self, request: SnapshotRequest, requester: Sink | None) -> None:
        # Each app on its own: one failing plugin must not keep the others from answering.
        for name, app in self.apps.list_name_plugin():
            try:
                self._snapshot_app(name, app, request, requester)
            except Exception:
                logger.exception("app plugin '%s' failed to answer snapshot %s", name, request.snapshot_id)

    def _read_log(self, since: datetime, until: datetime) -> Iterable[LogEntry] | None:
        # Called from the core's log answerer thread; None when the backbone keeps no log.
        return self.backbones.hook.history(since=since, until=until)

    # ---- introspection -------------------------------------------------

    @staticmethod
    def plugin_names(manager: pluggy.PluginManager) -> list[str]:
        return [name for name, _ in manager.list_name_plugin()]

    def health(self) -> dict[str, Any]:
        """The backbone's view of its own state (see ``backbonespecs.health``)."""
        return self.backbones.hook.health() or {}

    def dead_letters(self) -> DeadLetters | None:
        """The dead letters the running backbone keeps in the node (``backbonespecs.dead_letters``)."""
        return self.backbones.hook.dead_letters()

    def dead_letter_admin(self) -> DeadLetters:
        """A store of this node's dead letters for ``threatbus dlq`` (the node runs in another process)."""
        name, backbone = self.backbones.list_name_plugin()[0]
        http = self.settings.get("http") or {}
        url = None
        if http.get("port"):
            host = http.get("host") or "127.0.0.1"
            host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)  # listening everywhere: ask locally
            url = f"http://[{host}]:{http['port']}" if ":" in host else f"http://{host}:{http['port']}"
        store = self._only(self.backbones, backbone, "dead_letter_admin")(
            config=config.section(self.settings, "backbones", name), node=self.node, http_url=url
        )
        if store is None:
            raise ConfigError(f"plugins.backbones.{name}: this backbone keeps no dead letters")
        return store
