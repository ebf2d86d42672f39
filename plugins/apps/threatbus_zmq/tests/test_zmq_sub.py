"""The receiver's check of one frame, without sockets."""

from __future__ import annotations

import queue

import pytest

from threatbus.data import Indicator
from threatbus.testing import indicator
from threatbus_zmq.sub import ReceiverWorker


@pytest.mark.parametrize("until", ["2026-02-30T00:00:00Z", "2099-01-01T00:00:00Z\n"])
def test_an_impossible_valid_until_is_rejected_and_counted(until):
    # It once escaped as a ValueError from the expiry check and ended the receiver thread.
    receiver = ReceiverWorker(None, queue.SimpleQueue())  # type: ignore[arg-type]
    bad = Indicator({**indicator().payload, "valid_until": until})
    assert receiver.accept(b"stix2/indicator " + bad.encode()) is None
    assert (receiver.rejected, receiver.expired) == (1, 0)
    good = indicator(valid_until="2099-01-01T00:00:00Z")
    accepted = receiver.accept(b"stix2/indicator " + good.encode())
    assert accepted is not None and accepted.payload == good.payload
