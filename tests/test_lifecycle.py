"""The core's one definition of an indicator's lifecycle (threatbus.lifecycle)."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from threatbus.lifecycle import (
    Change,
    IntelState,
    as_removal,
    epoch_of,
    expires_at,
    is_active,
    is_older,
    is_removal,
    parse_timestamp,
)

NOW = datetime(2026, 11, 30, 12, 0, tzinfo=timezone.utc)
ID = "indicator--8e2e2d2b-17d4-4cbf-938f-98ee46b3cd3f"


def version(modified: str, **extra: object) -> dict[str, object]:
    return {
        "type": "indicator",
        "id": ID,
        "created": "2026-11-01T00:00:00.000Z",
        "modified": modified,
        "pattern": "[ipv4-addr:value = '6.6.6.6']",
        "pattern_type": "stix",
        "valid_from": "2026-11-01T00:00:00.000Z",
        **extra,
    }


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2026-11-30T12:00:00Z", datetime(2026, 11, 30, 12, tzinfo=timezone.utc)),
        ("2026-11-30T12:00:00.5Z", datetime(2026, 11, 30, 12, 0, 0, 500000, tzinfo=timezone.utc)),
        ("2026-11-30T12:00:00.123456789Z", datetime(2026, 11, 30, 12, 0, 0, 123456, tzinfo=timezone.utc)),
        ("2016-12-31T23:59:60Z", datetime(2016, 12, 31, 23, 59, 59, tzinfo=timezone.utc)),
    ],
)
def test_parse_timestamp_reads_every_stix_precision(text: str, expected: datetime) -> None:
    assert parse_timestamp(text) == expected


@pytest.mark.parametrize("text", ["2026-11-30", "2026-11-30T12:00:00", "2026-11-30T12:00:00.Z", "2026-11-30 12:00:00Z"])
def test_parse_timestamp_refuses_other_text(text: str) -> None:
    with pytest.raises(ValueError, match="not a STIX timestamp"):
        parse_timestamp(text)


def test_precision_does_not_change_the_order_of_versions() -> None:
    # As strings "…00Z" sorts after "…00.500Z"; as times it is earlier.
    state = IntelState()
    state.apply(version("2026-11-30T10:00:00Z"))
    assert state.apply(version("2026-11-30T10:00:00.500Z")).change is Change.REPLACED


def test_active_until_valid_until() -> None:
    indicator = version("2026-11-30T10:00:00Z", valid_until="2026-11-30T12:00:01Z")
    assert expires_at(indicator) == NOW + timedelta(seconds=1)
    assert is_active(indicator, NOW)
    assert not is_active(indicator, NOW + timedelta(seconds=1))
    assert is_active(version("2026-11-30T10:00:00Z"), NOW + timedelta(days=3650))


def test_removal_and_revocation_are_removals_and_delivered_as_remove() -> None:
    removal = version("2026-11-30T10:00:00Z", x_threatbus_update="REMOVE")
    revoked = version("2026-11-30T10:00:00Z", revoked=True)
    assert is_removal(removal) and is_removal(revoked)
    assert not is_removal(version("2026-11-30T10:00:00Z", x_threatbus_update="EDIT"))
    assert as_removal(revoked)["x_threatbus_update"] == "REMOVE"
    assert "x_threatbus_update" not in revoked  # the input is left as it was
    assert as_removal(removal) is removal


def test_newer_version_replaces_older_is_stale() -> None:
    state = IntelState()
    assert state.apply(version("2026-11-30T10:00:00Z")).change is Change.ADDED
    newer = version("2026-11-30T11:00:00Z", pattern="[ipv4-addr:value = '7.7.7.7']")
    applied = state.apply(newer)
    assert applied.change is Change.REPLACED
    assert applied.previous is not None and applied.previous["pattern"] == "[ipv4-addr:value = '6.6.6.6']"
    assert state.apply(version("2026-11-30T10:30:00Z")).change is Change.STALE
    assert state.apply(version("2026-11-30T11:00:00Z")).change is Change.STALE  # same version again
    assert list(state.active(NOW)) == [newer]


def test_remove_at_the_same_version_wins_and_a_newer_version_comes_back() -> None:
    state = IntelState()
    state.apply(version("2026-11-30T10:00:00Z"))
    removed = state.apply(version("2026-11-30T10:00:00Z", x_threatbus_update="REMOVE"))
    assert removed.change is Change.REMOVED and removed.previous is not None
    assert list(state.active(NOW)) == []
    assert state.apply(version("2026-11-30T09:00:00Z")).change is Change.STALE
    assert state.apply(version("2026-11-30T11:00:00Z")).change is Change.ADDED


def test_revocation_is_final() -> None:
    state = IntelState()
    state.apply(version("2026-11-30T10:00:00Z"))
    assert state.apply(version("2026-11-30T11:00:00Z", revoked=True)).change is Change.REMOVED
    assert state.apply(version("2026-11-30T12:00:00Z")).change is Change.STALE
    assert list(state.active(NOW)) == []


def test_removal_of_unknown_indicator_is_remembered() -> None:
    state = IntelState()
    assert state.apply(version("2026-11-30T11:00:00Z", x_threatbus_update="REMOVE")).change is Change.IGNORED_REMOVAL
    assert state.apply(version("2026-11-30T10:00:00Z")).change is Change.STALE
    assert ID in state


def test_expired_indicators_are_not_active_and_pruned() -> None:
    state = IntelState()
    state.apply(version("2026-11-30T10:00:00Z", valid_until="2026-11-30T11:00:00Z"))
    other = version("2026-11-30T10:00:00Z") | {"id": "indicator--00000000-0000-4000-8000-000000000000"}
    state.apply(other)
    assert list(state.active(NOW)) == [other]
    assert state.prune(NOW) == 1
    assert len(state) == 1 and ID not in state


@pytest.mark.parametrize(
    "text",
    [
        "2026-11-30T12:00:00Z",
        "2026-11-30T12:00:00.5Z",
        "2026-11-30T12:00:00.123456789Z",
        "2016-12-31T23:59:60Z",
        "1999-02-28T23:59:59.999999Z",
    ],
)
def test_epoch_of_agrees_with_parse_timestamp(text: str) -> None:
    assert epoch_of(text) == parse_timestamp(text).timestamp()


@pytest.mark.parametrize(
    "text",
    [
        "2026-11-30",
        "2026-11-30T12:00:00",
        "2026-11-30T12:00:00.Z",
        "2026-11-30T25:00:00Z",
        "2026-13-30T12:00:00Z",
        "2026-11-30T1a:00:00Z",
    ],
)
def test_epoch_of_refuses_other_text(text: str) -> None:
    with pytest.raises(ValueError):
        epoch_of(text)


def test_is_older_compares_times_and_puts_missing_stamps_first() -> None:
    assert is_older("2026-11-30T10:00:00Z", "2026-11-30T10:00:00.500Z")
    assert not is_older("2026-11-30T10:00:00.500Z", "2026-11-30T10:00:00Z")
    assert not is_older("2026-11-30T10:00:00Z", "2026-11-30T10:00:00.000Z")
    assert is_older("", "2026-11-30T10:00:00Z") and not is_older("2026-11-30T10:00:00Z", "")
    assert is_older("garbage-a", "garbage-b")  # held from before validation: as text
