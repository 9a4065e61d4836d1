"""NVIDIA Dynamo 1.6.1's ZMQ event plane on the wire: discovery records and message frames.

Measured on a real Dynamo 1.6.1 (``tests/golden/dynamo-1.6.1/{zmq,discovery}``).

Discovery (JSON values, compact):

- ``v1/event_channels/namespace/{ns}/component/{comp}/endpoint/{ep}/topic/{topic}/{pub:x}`` ->
  :class:`EventChannel`: one per publishing PUB socket (one socket per topic); ``instance_id`` is
  the *publisher* id (random, < 2**53), not the worker's.
- ``v1/event_sources/<same>`` -> :class:`EventSource`, for ``kv-events`` only: which worker (and
  dp rank) the publisher's KV events belong to. Dynamo's KV router checks this attribution; its
  optional ``recovery_target`` names a worker endpoint that replays events (we serve none, so
  we leave it out: Dynamo then logs "KV source is live-only" and routes on live events).

A message is four ZMQ frames::

    [topic (UTF-8), publisher_id (u64 BE), sequence (u64 BE, +1 per message per publisher),
     0x01 | u32 BE length | msgpack EventEnvelope]
    EventEnvelope = {"publisher_id", "sequence", "published_at" (ms since the epoch), "topic",
                     "payload": bin (the event, msgpack)}
"""

from __future__ import annotations

import secrets
import time
from typing import Any, Final

import msgspec

from ...errors import ProtocolError

__all__ = [
    "EVENT_CHANNELS_PREFIX",
    "EVENT_SOURCES_PREFIX",
    "FRAME_VERSION",
    "EndpointRef",
    "EventChannel",
    "EventEnvelope",
    "EventScope",
    "EventSource",
    "EventSourceMetadata",
    "EventTransport",
    "WorkerRef",
    "channel_key",
    "decode_channel",
    "decode_frames",
    "encode_frames",
    "encode_record",
    "random_publisher_id",
    "source_key",
]

#: Discovery prefix of :class:`EventChannel` records.
EVENT_CHANNELS_PREFIX: Final = "v1/event_channels/"
#: Discovery prefix of :class:`EventSource` records.
EVENT_SOURCES_PREFIX: Final = "v1/event_sources/"
#: First byte of the envelope frame.
FRAME_VERSION: Final = 1


# -- discovery records ----------------------------------------------------------------------------
class EndpointRef(msgspec.Struct, frozen=True):
    namespace: str
    component: str
    name: str


class EventScope(msgspec.Struct, frozen=True):
    """Where a channel publishes; Dynamo writes ``{"kind": "endpoint", "endpoint": {...}}``."""

    kind: str = "endpoint"
    endpoint: EndpointRef | None = None


class EventTransport(msgspec.Struct, frozen=True):
    """``{"kind": "Zmq", "config": {"endpoint": "tcp://host:port"}}``."""

    kind: str
    config: dict[str, Any] = msgspec.field(default_factory=dict)

    @classmethod
    def zmq(cls, address: str) -> EventTransport:
        return cls("Zmq", {"endpoint": address})

    @property
    def zmq_address(self) -> str | None:
        """The PUB address to connect to, for a ZMQ transport."""
        if self.kind.lower() != "zmq":
            return None
        address = self.config.get("endpoint")
        return address if isinstance(address, str) and address else None


class EventChannel(msgspec.Struct, frozen=True, tag_field="type", tag="EventChannel"):
    scope: EventScope
    topic: str
    #: The publisher id (frame 1 of every message), not a worker id.
    instance_id: int
    transport: EventTransport


class WorkerRef(msgspec.Struct, frozen=True):
    worker_id: int
    dp_rank: int = 0


class EventSourceMetadata(msgspec.Struct, frozen=True, omit_defaults=True):
    kv_state_endpoint: EndpointRef
    worker: WorkerRef
    publisher_id: int
    #: Dynamo's recovery endpoint (an Endpoint record); we never write one.
    recovery_target: dict[str, Any] | None = None


class EventSource(msgspec.Struct, frozen=True, tag_field="type", tag="EventSource"):
    scope: EventScope
    topic: str
    publisher_id: int
    metadata: EventSourceMetadata


def _key(prefix: str, namespace: str, component: str, endpoint: str, topic: str,
         publisher_id: int) -> str:
    return (f"{prefix}namespace/{namespace}/component/{component}/endpoint/{endpoint}"
            f"/topic/{topic}/{publisher_id:x}")


def channel_key(namespace: str, component: str, endpoint: str, topic: str,
                publisher_id: int) -> str:
    """Discovery key of an :class:`EventChannel`."""
    return _key(EVENT_CHANNELS_PREFIX, namespace, component, endpoint, topic, publisher_id)


def source_key(namespace: str, component: str, endpoint: str, topic: str,
               publisher_id: int) -> str:
    """Discovery key of an :class:`EventSource` (same shape as the channel's)."""
    return _key(EVENT_SOURCES_PREFIX, namespace, component, endpoint, topic, publisher_id)


def encode_record(record: EventChannel | EventSource) -> bytes:
    """The record as Dynamo writes it: compact JSON, no trailing newline."""
    return msgspec.json.encode(record)


_CHANNEL_DECODER = msgspec.json.Decoder(EventChannel)


def decode_channel(value: bytes | bytearray | memoryview) -> EventChannel:
    """Parse an :class:`EventChannel` value; raises :class:`ProtocolError` when it is not one."""
    try:
        return _CHANNEL_DECODER.decode(value)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise ProtocolError(f"invalid EventChannel record: {exc}") from None


def random_publisher_id() -> int:
    """A random non-zero publisher id below 2**53 (JSON-safe, like Dynamo's)."""
    while True:
        value = secrets.randbits(53)
        if value:
            return value


# -- message frames -------------------------------------------------------------------------------
class EventEnvelope(msgspec.Struct, frozen=True):
    publisher_id: int
    sequence: int
    published_at: int
    topic: str
    payload: bytes


_ENCODER = msgspec.msgpack.Encoder()
_ENVELOPE_DECODER = msgspec.msgpack.Decoder(EventEnvelope)


def encode_frames(topic: str, publisher_id: int, sequence: int, payload: bytes,
                  published_at: int | None = None) -> list[bytes]:
    """The four frames of one message; ``published_at`` (ms) defaults to now."""
    if published_at is None:
        published_at = time.time_ns() // 1_000_000
    body = _ENCODER.encode(EventEnvelope(publisher_id, sequence, published_at, topic, payload))
    return [topic.encode(), publisher_id.to_bytes(8, "big"), sequence.to_bytes(8, "big"),
            b"\x01" + len(body).to_bytes(4, "big") + body]


def decode_frames(frames: list[bytes]) -> tuple[str, int, int, EventEnvelope]:
    """``(topic, publisher_id, sequence, envelope)`` of one message.

    Raises :class:`ProtocolError` naming the problem: a frame count other than 4, id frames
    that are not 8 bytes, a version byte other than 1, a length that does not match, an
    envelope that does not decode or disagrees with the frames.
    """
    if len(frames) != 4:
        raise ProtocolError(f"expected 4 frames, got {len(frames)}")
    f_topic, f_pub, f_seq, f_env = frames
    if len(f_pub) != 8 or len(f_seq) != 8:
        raise ProtocolError(f"publisher id / sequence frames must be 8 bytes, got "
                            f"{len(f_pub)} / {len(f_seq)}")
    if len(f_env) < 5:
        raise ProtocolError(f"envelope frame too short ({len(f_env)} bytes)")
    if f_env[0] != FRAME_VERSION:
        raise ProtocolError(f"unknown envelope frame version {f_env[0]}")
    size = int.from_bytes(f_env[1:5], "big")
    if size != len(f_env) - 5:
        raise ProtocolError(f"envelope length {size} but {len(f_env) - 5} bytes follow")
    try:
        topic = bytes(f_topic).decode()
        env = _ENVELOPE_DECODER.decode(memoryview(f_env)[5:])
    except (UnicodeDecodeError, msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise ProtocolError(f"undecodable envelope: {exc}") from None
    publisher_id = int.from_bytes(f_pub, "big")
    sequence = int.from_bytes(f_seq, "big")
    if (env.publisher_id, env.sequence, env.topic) != (publisher_id, sequence, topic):
        raise ProtocolError(
            f"envelope ({env.publisher_id:x}, {env.sequence}, {env.topic!r}) disagrees with "
            f"the frames ({publisher_id:x}, {sequence}, {topic!r})")
    return topic, publisher_id, sequence, env

