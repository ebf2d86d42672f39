"""The ZeroMQ protocol of Threat Bus (WIRE.md), shared by the plugin and the tools.

manage: REQ/REP with JSON objects. pub: the bus publishes one frame per
message, ``<p2p topic><kind> <json>``. sub: apps publish one frame per message,
``<topic> <json>``.
"""

from __future__ import annotations

import secrets
import string

from threatbus.data import TOPIC_SNAPSHOT_ENVELOPE, Indicator, Message, Sighting, SnapshotEnvelope, SnapshotRequest

P2P_TOPIC_LENGTH = 32
_P2P_ALPHABET = string.ascii_lowercase

STATUS_SUCCESS = "success"
STATUS_ERROR = "error"
STATUS_UNKNOWN = "unknown request"

# The kind of the frame that follows the last snapshot object, for clients that asked ("snapshot_end": true).
SNAPSHOT_END_KIND = "snapshotend"

# Frames apps send to the bus's sub socket start with one of these topics.
STIX2_PREFIX = b"stix2/"
ENVELOPE_TOPIC = TOPIC_SNAPSHOT_ENVELOPE.encode()

# The kind the bus appends to the p2p topic on the pub socket, per message class.
KINDS: dict[type[Message], str] = {
    Indicator: "indicator",
    Sighting: "sighting",
    SnapshotRequest: "snapshotrequest",
}


def endpoint(host: str, port: int) -> str:
    """The tcp endpoint of ``host:port``; IPv6 addresses get brackets."""
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"tcp://{host}:{port}"


def new_p2p_topic() -> str:
    """A subscriber's secret topic: 32 lowercase ASCII letters from ``secrets``."""
    return "".join(secrets.choice(_P2P_ALPHABET) for _ in range(P2P_TOPIC_LENGTH))


def is_p2p_topic(value: object) -> bool:
    return (
        isinstance(value, str)
        and len(value) == P2P_TOPIC_LENGTH
        and value.isascii()
        and value.isalpha()
        and value.islower()
    )


def outbound_frame(topic: str, message: Message) -> bytes:
    """The frame an app sends to the bus's sub socket for ``message``."""
    return topic.encode() + b" " + message.encode()


def topic_for(message: Message) -> str:
    """The topic an app uses when it publishes ``message`` to the bus."""
    if isinstance(message, SnapshotEnvelope):
        return TOPIC_SNAPSHOT_ENVELOPE
    return message.topic


def split_pub_frame(frame: bytes) -> tuple[str, str, bytes]:
    """Split a frame of the bus's pub socket into (p2p topic, kind, JSON body).

    Raises ``ValueError`` for a frame that does not follow the protocol.
    """
    head, sep, body = frame.partition(b" ")
    if not sep or len(head) <= P2P_TOPIC_LENGTH:
        raise ValueError(f"not a '<p2p topic><kind> <json>' frame: {frame[:80]!r}")
    p2p, kind = head[:P2P_TOPIC_LENGTH].decode("ascii", "replace"), head[P2P_TOPIC_LENGTH:].decode("ascii", "replace")
    return p2p, kind, body
