"""Snapshots answered by the bus from its intel log (in-memory backbone), in-process."""

import queue
from datetime import datetime, timedelta, timezone

import orjson
import pytest
from testbus import running_bus

import threatbus
from threatbus import snapshots
from threatbus.config import section, validate
from threatbus.data import Indicator, SnapshotEnvelope, SnapshotRequest, SnapshotType, decode
from threatbus.errors import ConfigError
from threatbus.history import FOLD_BATCH, HistorySettings, LogAnswerer, fold, fold_in_batches, validators
from threatbus.snapshots import SnapshotEnd
from threatbus.testing import assert_nothing_more, get_within, indicator, settings_from, sighting, wait_until
from threatbus_inmem import InMemoryBackbone
from threatbus_inmem.intel_log import MemoryLog

NOW = datetime(2026, 11, 30, 12, 0, tzinfo=timezone.utc)


def stamp(at: datetime) -> str:
    return at.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def version(ident: str, modified: datetime, **extra) -> Indicator:
    return indicator(
        "1.2.3.4",
        id=ident,
        created=stamp(modified - timedelta(days=1)),
        modified=stamp(modified),
        valid_from=stamp(modified - timedelta(days=1)),
        **extra,
    )


def entries(*messages, at=NOW - timedelta(hours=1)):
    return [(at.timestamp(), m) for m in messages]


def window(days=7):
    return (NOW - timedelta(days=days)).timestamp(), NOW.timestamp()


# ---- the fold ------------------------------------------------------------


def test_fold_keeps_the_latest_version_and_leaves_out_removed_revoked_and_expired():
    a_old = version("indicator--00000000-0000-4000-8000-00000000000a", NOW - timedelta(days=3))
    a_new = version("indicator--00000000-0000-4000-8000-00000000000a", NOW - timedelta(days=2))
    removed = version("indicator--00000000-0000-4000-8000-00000000000b", NOW - timedelta(days=2))
    removal = version(
        "indicator--00000000-0000-4000-8000-00000000000b", NOW - timedelta(days=1), x_threatbus_update="REMOVE"
    )
    revoked = version("indicator--00000000-0000-4000-8000-00000000000c", NOW - timedelta(days=1), revoked=True)
    expired = version(
        "indicator--00000000-0000-4000-8000-00000000000d",
        NOW - timedelta(days=2),
        valid_until=stamp(NOW - timedelta(hours=2)),
    )
    live = version(
        "indicator--00000000-0000-4000-8000-00000000000e",
        NOW - timedelta(days=2),
        valid_until=stamp(NOW + timedelta(days=2)),
    )
    # The newer version of a first, the older after it: arrival order must not matter.
    log = entries(a_new, a_old, removed, removal, revoked, expired, live, sighting())
    result = fold(log, SnapshotType.INDICATOR, *window())
    assert sorted(m.payload["id"][-1] for m in result) == ["a", "e"]
    assert next(m for m in result if m.payload["id"].endswith("a")) == a_new


def test_fold_skips_entries_before_the_period_and_other_kinds():
    early = indicator("9.9.9.9")
    inside = indicator("8.8.8.8")
    seen = sighting()
    log = [
        ((NOW - timedelta(days=2)).timestamp(), early),
        ((NOW - timedelta(hours=1)).timestamp(), inside),
        (NOW.timestamp(), seen),
    ]
    assert fold(log, SnapshotType.INDICATOR, *window(1)) == [inside]
    assert fold(log, SnapshotType.SIGHTING, *window(1)) == [seen]


def test_fold_survives_garbage_timestamps_the_structure_check_lets_through():
    bad = Indicator(
        {"type": "indicator", "id": "indicator--x", "pattern": "p", "pattern_type": "stix", "modified": "x"}
    )
    good = indicator("7.7.7.7")
    bad_twice = Indicator({**bad.payload, "modified": "y"})
    unreadable_expiry = indicator("7.7.7.8", valid_until="soon")
    log = entries(bad, good, bad_twice, unreadable_expiry)
    assert fold(log, SnapshotType.INDICATOR, *window(1)) == [good]


# ---- the in-memory log ---------------------------------------------------


def history_settings(**history):
    """HistorySettings as a backbone builds them: from its validated section with these ``history`` keys."""
    settings = settings_from({"plugins": {"backbones": {"inmem": {"history": history}}}})
    validate(settings, validators("plugins.backbones.inmem"))
    return HistorySettings.from_config(section(settings, "backbones", "inmem"))


def test_memory_log_drops_what_is_older_than_max_age():
    log = MemoryLog(history_settings(max_age=1))
    start = NOW.timestamp()
    log.append(indicator("1.1.1.1"), now=start)
    log.append(indicator("2.2.2.2"), now=start + 23 * 3600)
    log.append(indicator("3.3.3.3"), now=start + 25 * 3600)
    assert len(log) == 2
    assert log.evicted == 1


def test_memory_log_keeps_within_max_bytes():
    size = len(indicator("10.0.0.0").encode())  # every 10.0.0.<digit> is as long
    log = MemoryLog(history_settings(max_bytes=size * 3))
    for n in range(10):
        log.append(indicator(f"10.0.0.{n}"))
    assert len(log) == 3
    assert log.bytes <= size * 3
    values = [decode(m).payload["pattern"] for _, m in log.read(NOW - timedelta(days=3650), datetime.now(timezone.utc))]
    assert values[-1] == "[ipv4-addr:value = '10.0.0.9']"


def test_memory_log_lets_an_entry_larger_than_max_bytes_go_at_once():
    log = MemoryLog(history_settings(max_bytes=100))
    log.append(indicator("10.0.3.1", description="x" * 200))
    assert (len(log), log.bytes, log.evicted) == (0, 0, 1)
    log.append(indicator("10.0.3.2"), now=datetime.now(timezone.utc).timestamp())
    assert (len(log), log.evicted) == (0, 2)  # an indicator is some 300 bytes of JSON


def test_memory_log_reads_the_window_only():
    log = MemoryLog(history_settings())
    base = datetime.now(timezone.utc).timestamp()
    messages = [indicator(f"10.0.1.{n}") for n in range(5)]
    for n, message in enumerate(messages):
        log.append(message, now=base - 3600 * (5 - n))  # 5h ago ... 1h ago
    read = list(log.read(datetime.fromtimestamp(base - 3.5 * 3600, timezone.utc), datetime.now(timezone.utc)))
    assert [decode(m) for _, m in read] == messages[2:]
    assert all(isinstance(when, float) for when, _ in read)


def test_memory_log_reports_what_it_holds_and_lets_go_in_metrics():
    size = len(indicator("10.0.2.0").encode())
    config = {"backbones": {"inmem": {"history": {"max_bytes": size * 3}}}}
    with running_bus(plugin_config=config) as bus:
        publish_and_wait(bus, [indicator(f"10.0.2.{n}") for n in range(5)])
        wait_until(lambda: bus.metrics.value("threatbus_inmem_log_evicted") == 2, 5)
        assert bus.metrics.value("threatbus_inmem_log_bytes") == size * 3
        assert bus.metrics.value("threatbus_queue_depth", queue="inmem-log") == 3
        text = bus.metrics.render().decode()
        assert 'threatbus_inmem_log_bytes{node="test-node"}' in text
        assert 'threatbus_inmem_log_evicted_total{node="test-node"}' in text


# ---- snapshots through the bus -------------------------------------------


class HistoryApp:
    """An app that keeps history of its own and answers snapshots from it."""

    def __init__(self, held=()):
        self.held = list(held)
        self.requests = []

    @threatbus.app
    def snapshot(self, snapshot_request, result_queue):
        self.requests.append(snapshot_request)
        for item in self.held:
            result_queue.put(SnapshotEnvelope.wrap(snapshot_request, item))


def publish_and_wait(bus, messages):
    sink = queue.Queue()
    bus.subscribe("stix2", sink)
    for message in messages:
        bus.publish_queue.put(message)
    for _ in messages:
        get_within(sink)
    bus.unsubscribe("stix2", sink)


def drain_snapshot(sink, timeout=10.0):
    """Envelopes until the end marker; returns (envelopes, marker)."""
    envelopes = []
    while True:
        item = get_within(sink, timeout)
        if isinstance(item, SnapshotEnd):
            return envelopes, item
        if isinstance(item, SnapshotEnvelope):
            envelopes.append(item)


def test_snapshot_is_answered_from_the_log_without_any_app_keeping_history():
    with running_bus() as bus:
        first, second = indicator("1.1.1.1"), indicator("2.2.2.2")
        publish_and_wait(bus, [first, second, sighting()])
        sink = queue.Queue()
        ids = bus.subscribe("stix2/indicator", sink, snapshot=timedelta(days=1), snapshot_end=True)
        envelopes, end = drain_snapshot(sink)
        assert {e.stix for e in envelopes} == {first, second}
        assert {e.snapshot_id for e in envelopes} == set(ids)
        assert end == SnapshotEnd(ids[0], SnapshotType.INDICATOR, 2)
        assert_nothing_more(sink)


def test_snapshot_folds_versions_and_removals():
    with running_bus() as bus:
        ident = "indicator--00000000-0000-4000-8000-0000000000f1"
        old = version(ident, NOW - timedelta(days=2))
        new = version(ident, NOW - timedelta(days=1))
        gone = version("indicator--00000000-0000-4000-8000-0000000000f2", NOW - timedelta(days=2))
        gone_removal = version(
            "indicator--00000000-0000-4000-8000-0000000000f2", NOW - timedelta(days=1), x_threatbus_update="REMOVE"
        )
        publish_and_wait(bus, [old, new, gone, gone_removal])
        sink = queue.Queue()
        bus.subscribe("stix2/indicator", sink, snapshot=timedelta(days=1), snapshot_end=True)
        envelopes, end = drain_snapshot(sink)
        assert [e.stix for e in envelopes] == [new]
        assert end.count == 1


def test_answers_that_repeat_what_the_log_sent_are_dropped():
    held = indicator("3.3.3.3")
    extra = indicator("4.4.4.4")
    app = HistoryApp(held=[held, extra])
    with running_bus(apps={"history": app}) as bus:
        publish_and_wait(bus, [held])
        sink = queue.Queue()
        ids = bus.subscribe("stix2/indicator", sink, snapshot=timedelta(days=1), snapshot_end=True)
        wait_until(lambda: app.requests, what="the request reaching the app with its own history")
        assert app.requests[0].snapshot_id == ids[0]
        got = []
        while len(got) < 2:
            item = get_within(sink)
            if isinstance(item, SnapshotEnvelope):
                got.append(item.stix)
        assert sorted(m.payload["pattern"] for m in got) == sorted([held.payload["pattern"], extra.payload["pattern"]])
        wait_until(lambda: bus.snapshots.duplicates == 1, what="the repeated answer dropped")
        rest = []
        while True:
            try:
                rest.append(sink.get(timeout=0.3))
            except queue.Empty:
                break
        assert not [r for r in rest if isinstance(r, SnapshotEnvelope)]


def test_no_end_marker_unless_asked():
    with running_bus() as bus:
        publish_and_wait(bus, [indicator("5.5.5.5")])
        sink = queue.Queue()
        bus.subscribe("stix2/indicator", sink, snapshot=timedelta(days=1))
        assert isinstance(get_within(sink), SnapshotEnvelope)
        assert_nothing_more(sink, within=0.5)


def test_history_disabled_answers_nothing_but_still_ends():
    config = {"backbones": {"inmem": {"history": {"enabled": False}}}}
    with running_bus(backbones={"inmem": InMemoryBackbone()}, plugin_config=config) as bus:
        publish_and_wait(bus, [indicator("6.6.6.6")])
        sink = queue.Queue()
        ids = bus.subscribe("stix2/indicator", sink, snapshot=timedelta(days=1), snapshot_end=True)
        assert get_within(sink) == SnapshotEnd(ids[0], SnapshotType.INDICATOR, 0)


@pytest.mark.parametrize(("key", "value"), [("max_age", 0), ("max_age", "30"), ("max_bytes", -1), ("enabled", "yes")])
def test_bad_history_keys_are_config_errors_naming_the_key(key, value):
    config = {"backbones": {"inmem": {"history": {key: value}}}}
    with (
        pytest.raises(ConfigError, match=f"history.{key}"),
        running_bus(backbones={"inmem": InMemoryBackbone()}, plugin_config=config),
    ):
        pass


def test_a_bounded_requester_gets_a_large_snapshot_whole():
    with running_bus() as bus:
        intel = [indicator(f"10.7.{n // 250}.{n % 250}") for n in range(500)]
        publish_and_wait(bus, intel)
        sink = queue.Queue(maxsize=10)  # far smaller than the answer: the log's answer waits for room
        bus.subscribe("stix2/indicator", sink, snapshot=timedelta(days=1), snapshot_end=True)
        envelopes, end = drain_snapshot(sink)
        assert len(envelopes) == end.count == 500
        assert {e.stix.id for e in envelopes} == {m.id for m in intel}


def test_an_indicator_from_the_log_is_removed_at_its_valid_until():
    with running_bus() as bus:
        now = datetime.now(timezone.utc)
        soon = indicator("10.8.0.1", valid_until=stamp(now + timedelta(seconds=2)))
        publish_and_wait(bus, [soon])
        sink = queue.Queue()
        bus.subscribe("stix2/indicator", sink, snapshot=timedelta(days=1), snapshot_end=True)
        envelopes, _ = drain_snapshot(sink)
        assert [e.stix.id for e in envelopes] == [soon.id]
        removal = get_within(sink, 10)
        assert removal.id == soon.id and removal.payload.get("x_threatbus_update") == "REMOVE"


# ---- the log as JSON text: parsed by the fold, sent on as it came -----------


def test_fold_reads_json_text_and_leaves_out_what_is_no_message():
    good = indicator("7.7.0.1")
    text = good.encode()
    reasons = []
    log = entries(
        text,
        b"not json",
        b"[1, 2]",
        b'{"type": "nothing"}',
        b'{"type": "indicator", "id": "indicator--00000000-0000-4000-8000-0000000000b1"}',  # no pattern
        sighting().encode(),  # another kind: left out, but it is a message
        b'{"type": "indicator", "id": ["not", "a", "string"], "pattern": "p", "pattern_type": "stix"}',
    )
    result = fold(log, SnapshotType.INDICATOR, *window(1), skipped=reasons.append)
    assert result == [good]
    assert result[0].encode() is text  # the logged text is sent on, never encoded again
    assert len(reasons) == 5
    assert reasons[0].startswith("not valid JSON") and reasons.count("not a Threat Bus message") == 2
    assert {"indicator: 'id' must be a non-empty string", "indicator: 'pattern' must be a non-empty string"} < set(
        reasons
    )


def test_fold_of_text_orders_versions_and_an_invalid_newer_version_does_not_win():
    ident = "indicator--00000000-0000-4000-8000-0000000000b2"
    older = version(ident, NOW - timedelta(days=2))
    newer_invalid = {**version(ident, NOW - timedelta(days=1)).payload, "pattern": ""}
    other_old = version("indicator--00000000-0000-4000-8000-0000000000b3", NOW - timedelta(days=2))
    other_new = version("indicator--00000000-0000-4000-8000-0000000000b3", NOW - timedelta(days=1))
    log = entries(older.encode(), orjson.dumps(newer_invalid), other_new.encode(), other_old)  # text and messages
    skipped = []
    result = fold(log, SnapshotType.INDICATOR, *window(), skipped=skipped.append)
    assert sorted(m.payload["id"] for m in result) == [ident, other_new.id]
    assert older in result and other_new in result
    assert len(skipped) == 1


def test_fold_in_batches_hands_out_lists_of_the_given_size_and_stops_when_asked():
    log = entries(*(indicator(f"10.9.{n // 250}.{n % 250}").encode() for n in range(1203)))
    sizes = [len(batch) for batch in fold_in_batches(log, SnapshotType.INDICATOR, *window(1), size=500)]
    assert sizes == [500, 500, 203]
    asked = []
    stopped = list(
        fold_in_batches(log, SnapshotType.INDICATOR, *window(1), stopped=lambda: asked.append(1) or len(asked) > 1)
    )
    assert stopped == [] and len(asked) == 2  # asked every 1,024 entries: at the first and at entry 1,024


def test_a_log_answer_counts_what_it_left_out_in_one_warning(caplog):
    good = indicator("7.7.0.2")
    request = SnapshotRequest.create(SnapshotType.INDICATOR, timedelta(days=1))
    delivered, finished = [], []
    now = datetime.now(timezone.utc).timestamp()
    answerer = LogAnswerer(
        lambda _since, _until: [(now, b"garbage"), (now, good.encode()), (now, b"{}"), (now, b"[]")],
        lambda _request, batches: delivered.extend(stix for batch in batches for stix in batch),
        finished.append,
    )
    answerer.start()
    try:
        answerer.submit(request)
        wait_until(lambda: finished, what="the answer")
    finally:
        answerer.stop()
        answerer.join(5)
    assert delivered == [good] and finished == [request]
    assert answerer.skipped == 3
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "left out 3 log entries" in warnings[0]


# ---- the answer handed over in batches ---------------------------------------


class BatchRequester:
    """A requester queue that takes batches of answers, at most ``room`` per call; ``room=0``: never any."""

    def __init__(self, room):
        self.room = room
        self.items = []
        self.calls = 0

    def put_nowait(self, item):
        if self.room == 0:
            raise queue.Full
        self.items.append(item)

    def put_answers(self, request, answers, timeout=None):
        self.calls += 1
        taken = answers[: self.room]
        self.items.extend(SnapshotEnvelope.wrap(request, answer) for answer in taken)
        return len(taken)


def test_a_requester_that_takes_batches_gets_the_whole_answer_in_few_hand_overs():
    with running_bus() as bus:
        intel = [indicator(f"10.10.{n // 250}.{n % 250}") for n in range(1200)]
        publish_and_wait(bus, intel)
        requester = BatchRequester(room=300)
        ids = bus.subscribe("stix2/indicator", requester, snapshot=timedelta(days=1), snapshot_end=True)
        wait_until(lambda: requester.items and isinstance(requester.items[-1], SnapshotEnd), what="the end marker")
        envelopes = requester.items[:-1]
        assert [e.stix.id for e in envelopes] == [m.id for m in intel]  # in order, each once
        assert {e.snapshot_id for e in envelopes} == set(ids)
        assert requester.items[-1].count == 1200
        assert requester.calls <= 2 * -(-1200 // FOLD_BATCH)  # a batch in one or two calls, not one per object


def test_a_batch_requester_that_takes_nothing_loses_the_answer_but_still_gets_the_end(monkeypatch, caplog):
    monkeypatch.setattr(snapshots, "LOG_ANSWER_PUT_TIMEOUT", 0.3)
    with running_bus() as bus:
        publish_and_wait(bus, [indicator(f"10.11.0.{n}") for n in range(3)])
        requester = BatchRequester(room=0)
        requester.put_nowait = requester.items.append  # only the end marker gets in
        bus.subscribe("stix2/indicator", requester, snapshot=timedelta(days=1), snapshot_end=True)
        wait_until(lambda: requester.items, what="the end marker")
        assert isinstance(requester.items[0], SnapshotEnd)
    assert any("lost 3 object(s)" in r.getMessage() for r in caplog.records)


def test_envelopes_of_the_log_answer_equal_wrapped_ones_and_keep_the_logged_text():
    request = SnapshotRequest.create(SnapshotType.INDICATOR, timedelta(days=1))
    stix = decode(indicator("7.7.0.3").encode())
    lazy = SnapshotEnvelope.wrap_all(request, [stix])[0]
    eager = SnapshotEnvelope.wrap(request, stix)
    assert type(lazy) is SnapshotEnvelope
    assert lazy.body_text() == (Indicator, stix.encode()) and lazy.body_text()[1] is stix.encode()
    assert eager.body_text() == lazy.body_text()
    assert decode(eager.encode()).body_text() == lazy.body_text()
    assert lazy == eager and hash(lazy) == hash(eager) and repr(lazy) == repr(eager)
    assert lazy.stix == stix and lazy.snapshot_id == request.snapshot_id and lazy.dedup_key == eager.dedup_key
    assert decode(lazy.encode()) == eager
    with pytest.raises(AttributeError, match="nothing"):
        _ = lazy.nothing
