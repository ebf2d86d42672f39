"""Appending to the log in sub-entry batches: many messages under one publishing id.

A stream entry may hold a batch of records (the stream protocol's sub-entry
batching). The broker then stores, confirms and hands to consumers one
entry per batch instead of one per message, while every record keeps an
offset of its own. Measured on this machine against plain confirmed
batches: a third less CPU in the publishing client and about half in the
broker, and one confirm per batch instead of per message.

rstream offers it only behind a buffer it flushes every half second
(``send_sub_entry``), too slow for the bus, and builds a batch by repeated
``bytes`` concatenation. So this module hands rstream a batch ready to send
through its internal ``_send_batch_async``; where an rstream release lacks
it, ``SubEntryPublisher.open`` returns None and the transport publishes plain
batches.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

logger = logging.getLogger(__name__)

# Bytes of records per sub-entry: well inside the 1 MiB frames brokers and clients agree on by default.
SUB_ENTRY_BYTES = 256 * 1024


class SubEntryPublisher:
    """Sends lists of AMQP-encoded entries as sub-entry batches; one publishing id per batch."""

    def __init__(self, producer: Any, notification: Any, codec_base: type) -> None:
        self._producer = producer
        self._notification = notification
        self._codec = _records_codec(codec_base)

    @classmethod
    def open(cls, producer: Any) -> SubEntryPublisher | None:
        """The publisher for ``producer``, or None when this rstream cannot send sub-entries directly."""
        try:
            from rstream.compression import ICompressionCodec
            from rstream.producer import _MessageNotification
        except ImportError:
            return None
        if not callable(getattr(producer, "_send_batch_async", None)):
            return None
        return cls(producer, _MessageNotification, ICompressionCodec)

    @staticmethod
    def split(entries: Sequence[bytes]) -> list[slice]:
        """``entries`` in order, cut into batches of at most ``SUB_ENTRY_BYTES`` (an entry larger alone)."""
        cuts: list[slice] = []
        start = size = 0
        for index, entry in enumerate(entries):
            if index > start and size + len(entry) + 4 > SUB_ENTRY_BYTES:
                cuts.append(slice(start, index))
                start, size = index, 0
            size += len(entry) + 4
        if start < len(entries):
            cuts.append(slice(start, len(entries)))
        return cuts

    async def send(self, stream: str, records: list[bytes], on_confirm: Callable[[Any], None]) -> int | None:
        """Send ``records`` as one sub-entry; its publishing id (``on_confirm`` gets its status), None if not sent.

        rstream sends nothing once its producer is closing.
        """
        ids = await self._producer._send_batch_async(
            stream, [self._notification(entry=self._codec(records), callback=on_confirm, publisher_name=None)]
        )
        return ids[0] if ids else None


def _records_codec(base: type) -> type:
    """rstream's codec interface over records sent uncompressed, joined once."""

    class Records(base):  # type: ignore[misc, valid-type]
        def __init__(self, records: list[bytes]) -> None:
            self.buffer = b"".join(len(record).to_bytes(4, "big") + record for record in records)
            self.count = len(records)

        def compress(self, messages: Sequence[Any]) -> None:
            raise NotImplementedError  # built in __init__

        def uncompress(self, compressed_data: bytes, uncompressed_data_size: int) -> bytes:
            return compressed_data

        def compressed_size(self) -> int:
            return len(self.buffer)

        def uncompressed_size(self) -> int:
            return len(self.buffer)

        def messages_count(self) -> int:
            return self.count

        def compression_type(self) -> int:
            return 0  # none

        def data(self) -> bytes:
            return self.buffer

    return Records
