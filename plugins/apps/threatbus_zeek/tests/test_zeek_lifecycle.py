"""The intel lifecycle at Zeek: expiry, revocation, new versions, reconciliation, restarts."""

from __future__ import annotations

import queue
from datetime import datetime, timedelta, timezone
from typing import Any

from testbus import running_bus

from threatbus.data import Indicator
from threatbus.lifecycle import as_removal
from threatbus.metrics import SUBSCRIBERS
from threatbus.stix import timestamp
from threatbus.testing import indicator, wait_until
from threatbus_zeek import ZeekApp


class ZeekIntel:
    """What Zeek's Intel framework would hold after the events the stand-in received."""

    def __init__(self, zeek: Any) -> None:
        self.zeek = zeek
        self.items: dict[tuple[str, str], set[str]] = {}
        self.events: list[tuple[str, list[Any]]] = []

    def update(self) -> dict[tuple[str, str], set[str]]:
        while True:
            try:
                received = self.zeek.received.get_nowait()
            except queue.Empty:
                return self.items
            name = received.event.name
            args = [arg.to_py() for arg in received.event.args]
            if name.endswith("::add_intels"):  # a batch: the records of the items, each as an add_intel
                for record in args[0]:
                    self._apply(name.removesuffix("s"), record)
            else:
                self._apply(name, args)

    def _apply(self, name: str, args: list[Any]) -> None:
        self.events.append((name, args))
        key = (args[0], args[1])
        if name.endswith("::add_intel"):
            self.items.setdefault(key, set()).add(args[2])
        elif name.endswith("::remove_intel"):
            sources = self.items.get(key, set())
            sources.discard(args[2])
            if not sources:
                self.items.pop(key, None)

    def holds(self, value: str, intel_type: str = "Intel::ADDR") -> bool:
        return (value, intel_type) in self.update()

    def wait_for(self, predicate: Any, what: str, timeout: float = 10.0) -> None:
        wait_until(lambda: predicate(self), timeout=timeout, what=what)


def expiring(value: str, seconds: float) -> Indicator:
    now = datetime.now(timezone.utc)
    return indicator(
        value, valid_from=timestamp(now - timedelta(hours=1)), valid_until=timestamp(now + timedelta(seconds=seconds))
    )


def version(of: Indicator, value: str, step: int = 1, **extra: Any) -> Indicator:
    modified = datetime.now(timezone.utc) + timedelta(seconds=step)
    return Indicator(
        {**of.payload, "pattern": f"[ipv4-addr:value = '{value}']", "modified": timestamp(modified), **extra}
    )


def connected(bus: Any, value: int = 1) -> Any:
    return lambda: bus.metrics.value(SUBSCRIBERS, plugin="zeek") == value


def test_expiry_revocation_and_remove_take_the_item_out(zeek, zeek_config):
    with running_bus(apps={"zeek": ZeekApp()}, plugin_config=zeek_config) as bus:
        zeek.wait_for_client()
        intel = ZeekIntel(zeek)
        expires, revoked, removed = expiring("10.0.0.1", 2), indicator("10.0.0.2"), indicator("10.0.0.3")
        for ind in (expires, revoked, removed):
            bus.publish_queue.put(ind)
        intel.wait_for(lambda z: all(z.holds(v) for v in ("10.0.0.1", "10.0.0.2", "10.0.0.3")), "three items")
        bus.publish_queue.put(version(revoked, "10.0.0.2", revoked=True))
        bus.publish_queue.put(Indicator(as_removal(removed.payload)))
        intel.wait_for(lambda z: not z.holds("10.0.0.2") and not z.holds("10.0.0.3"), "the removals")
        assert intel.holds("10.0.0.1")
        intel.wait_for(lambda z: not z.holds("10.0.0.1"), "the expiry", timeout=6)


def test_a_new_version_with_another_value_replaces_the_item(zeek, zeek_config):
    with running_bus(apps={"zeek": ZeekApp()}, plugin_config=zeek_config) as bus:
        zeek.wait_for_client()
        intel = ZeekIntel(zeek)
        first = indicator("10.0.1.1")
        bus.publish_queue.put(first)
        intel.wait_for(lambda z: z.holds("10.0.1.1"), "the first version")
        second = version(first, "10.0.1.2")
        bus.publish_queue.put(second)
        intel.wait_for(lambda z: z.holds("10.0.1.2") and not z.holds("10.0.1.1"), "the replacement")
        bus.publish_queue.put(first)  # the old version again: ignored
        removal = Indicator(as_removal(second.payload))
        bus.publish_queue.put(removal)
        intel.wait_for(lambda z: not z.update(), "the removal")
        assert ("ThreatBus::add_intel", ["10.0.1.1", "Intel::ADDR", first.id, ""]) not in intel.events[2:]


def test_zeek_away_while_intel_expired_is_reconciled_on_reconnect(zeek, zeek_config, caplog):
    with running_bus(apps={"zeek": ZeekApp()}, plugin_config=zeek_config) as bus:
        zeek.wait_for_client()
        intel = ZeekIntel(zeek)
        short, lasting = expiring("10.0.2.1", 1.5), indicator("10.0.2.2")
        bus.publish_queue.put(short)
        bus.publish_queue.put(lasting)
        intel.wait_for(lambda z: z.holds("10.0.2.1") and z.holds("10.0.2.2"), "both items")
        zeek.stop()  # Zeek keeps its intel (we model it) but misses what happens now
        wait_until(connected(bus, 0), what="the app to notice Zeek went away")
        added_meanwhile = indicator("10.0.2.3")
        bus.publish_queue.put(added_meanwhile)
        wait_until(lambda: bus.expiry.expired == 1, timeout=5, what="the expiry while Zeek is away")
        zeek.start()
        zeek.wait_for_client(timeout=15)
        intel.wait_for(lambda z: set(z.update()) == {("10.0.2.2", "Intel::ADDR"), ("10.0.2.3", "Intel::ADDR")}, "sync")
    assert "reconciled Zeek: 2 added, 1 removed" in caplog.text


def test_state_file_carries_expiry_over_a_node_restart(zeek, zeek_config, tmp_path, caplog):
    zeek_config["apps"]["zeek"]["state_file"] = str(tmp_path / "zeek-state.jsonl")
    intel = ZeekIntel(zeek)
    gone_while_down, expires_later = expiring("10.0.3.1", 1.0), expiring("10.0.3.2", 4.0)
    with running_bus(apps={"zeek": ZeekApp()}, plugin_config=zeek_config) as bus:
        zeek.wait_for_client()
        bus.publish_queue.put(gone_while_down)
        bus.publish_queue.put(expires_later)
        intel.wait_for(lambda z: z.holds("10.0.3.1") and z.holds("10.0.3.2"), "both items")
    assert (tmp_path / "zeek-state.jsonl").read_text().count("\n") == 2
    wait_until(lambda: datetime.now(timezone.utc).timestamp() > _until(gone_while_down), what="the first to expire")
    with running_bus(apps={"zeek": ZeekApp()}, plugin_config=zeek_config):  # a new node process would do the same
        intel.wait_for(lambda z: not z.holds("10.0.3.1") and z.holds("10.0.3.2"), "the expiry while down")
        intel.wait_for(lambda z: not z.holds("10.0.3.2"), "the expiry after the restart", timeout=8)
        late = datetime.now(timezone.utc).timestamp() - _until(expires_later)
        assert late < 1.5
    assert "1 of them expired while the node was down" in caplog.text


def _until(ind: Indicator) -> float:
    return datetime.fromisoformat(ind.payload["valid_until"].replace("Z", "+00:00")).timestamp()


def test_the_link_uses_the_state_and_schedule_the_app_built_though_empty(zeek, zeek_config):
    # Both are falsy while empty: the link once replaced them with defaults of its own (a state that
    # keeps every indicator's JSON, a schedule no expiry worker watches).
    app = ZeekApp()
    with running_bus(apps={"zeek": app}, plugin_config=zeek_config) as bus:
        zeek.wait_for_client()
        assert app.link is not None and app.expiry_worker is not None
        assert app.link.expiry is app.expiry_worker.schedule
        assert not app.link.state.keep_payloads  # no state_file: only what Zeek was given is kept
        bus.publish_queue.put(indicator("10.0.9.1"))
        ZeekIntel(zeek).wait_for(lambda z: z.holds("10.0.9.1"), "the item")
        assert all(held.payload_json is None for held in app.link.state.held.values())
