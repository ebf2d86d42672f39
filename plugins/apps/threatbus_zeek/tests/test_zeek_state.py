"""The zeek app's memory of what it gave Zeek (state.ZeekIntelState), without a connection."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from pathlib import Path

import orjson
import pytest

from threatbus.data import Indicator
from threatbus.lifecycle import as_removal
from threatbus.stix import timestamp
from threatbus.testing import indicator
from threatbus_zeek.mapping import Unsupported
from threatbus_zeek.state import ZeekIntelState


def at(day: int, of: Indicator, value: str | None = None, **extra: object) -> Indicator:
    payload = {**of.payload, "modified": f"2026-11-{day:02d}T00:00:00Z", **extra}
    if value is not None:
        payload["pattern"] = f"[ipv4-addr:value = '{value}']"
    return Indicator(payload)


def events(items):
    return [("remove" if item.remove else "add", item.indicator) for item in items]


def test_versions_replace_remove_and_go_stale():
    state = ZeekIntelState()
    first = at(1, indicator("10.0.0.1"))
    assert events(state.apply(first)) == [("add", "10.0.0.1")]
    assert events(state.apply(at(2, first))) == [("add", "10.0.0.1")]  # same item: an update
    assert events(state.apply(at(3, first, "10.0.0.2"))) == [("remove", "10.0.0.1"), ("add", "10.0.0.2")]
    assert state.apply(at(2, first, "10.0.0.9")) == []  # older: ignored
    # A removal takes out the held item, whatever value it names.
    assert events(state.apply(Indicator(as_removal(at(4, first).payload)))) == [("remove", "10.0.0.2")]
    assert first.id not in state
    # A removal of something it never held names its own value.
    other = indicator("10.0.0.3", x_threatbus_update="REMOVE")
    assert events(state.apply(other)) == [("remove", "10.0.0.3")]


def test_a_new_version_zeek_cannot_express_removes_the_old_item():
    state = ZeekIntelState()
    first = at(1, indicator("10.0.0.1"))
    state.apply(first)
    changed = Indicator({**at(2, first).payload, "pattern": "[ipv4-addr:value = '1.2.3.4'] WITHIN 5 SECONDS"})
    assert events(state.apply(changed)) == [("remove", "10.0.0.1")]
    with pytest.raises(Unsupported):
        state.apply(changed)


def test_the_file_keeps_what_is_held_and_what_expired_comes_out(tmp_path: Path):
    now = datetime.now(timezone.utc)
    state = ZeekIntelState()
    expired = indicator("10.0.1.1", valid_from=timestamp(now - timedelta(days=2)))
    expired.payload["valid_until"] = timestamp(now - timedelta(seconds=1))
    lasting = indicator("10.0.1.2")
    state.apply(expired)
    state.apply(lasting)
    path = tmp_path / "state.jsonl"
    state.save(path)
    path.write_text(path.read_text() + "not json\n")
    again = ZeekIntelState()
    assert again.load(path) == 2
    assert events(again.drop_expired()) == [("remove", "10.0.1.1")]
    assert [item.indicator for item in again.items()] == ["10.0.1.2"]
    assert ZeekIntelState().load(tmp_path / "missing.jsonl") == 0


def test_without_a_file_only_the_items_are_kept_and_with_one_the_json_stays_one_line(tmp_path: Path):
    pretty = indicator("10.0.2.1")
    pretty = Indicator(pretty.payload, raw=orjson.dumps(pretty.payload, option=orjson.OPT_INDENT_2))
    lean = ZeekIntelState(keep_payloads=False)
    assert events(lean.apply(pretty)) == [("add", "10.0.2.1")]
    assert lean.payloads() == [] and lean.drop_expired() == []
    assert events(lean.apply(Indicator(as_removal(pretty.payload)))) == [("remove", "10.0.2.1")]
    kept = ZeekIntelState()
    kept.apply(pretty)
    path = tmp_path / "state.jsonl"
    kept.save(path)
    assert path.read_bytes().count(b"\n") == 1
    again = ZeekIntelState()
    assert again.load(path) == 1 and again.payloads() == [pretty.payload]
