"""The event plane: fire-and-forget pub/sub for KV events and load snapshots.

``open_event_plane(url)`` picks the backend from a URL:

- ``None``, ``""``, ``memory://`` or ``memory://NAME``: in-process; every plane opened with the
  same name in one process shares one bus (tests, single-process setups).
- ``nats://HOST:PORT[,nats://HOST:PORT...]`` (also ``tls://``): NATS core pub/sub.
- ``zmq://`` or ``zmq://HOST``: direct ZMQ PUB/SUB between processes, no server; publishers are
  found through ``discovery`` (required), see :mod:`.zmq_plane`.

The contract every backend keeps is in :mod:`.base`. Subjects follow Dynamo's NATS layout:
``namespace.{ns}.component.{comp}.{topic}`` with ``ns`` and ``comp`` percent-encoded.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

from .base import (
    DEFAULT_MAX_PENDING,
    EventPlane,
    Message,
    SubjectPattern,
    Subscription,
    validate_subject,
)
from .memory import MemoryEventPlane
from .nats_plane import NatsEventPlane
from .zmq_plane import EVENT_CHANNELS_PREFIX, ZmqEventPlane

if TYPE_CHECKING:
    from ..discovery import Discovery

__all__ = [
    "DEFAULT_MAX_PENDING",
    "EVENT_CHANNELS_PREFIX",
    "KV_EVENTS_TOPIC",
    "KV_METRICS_TOPIC",
    "EventPlane",
    "MemoryEventPlane",
    "Message",
    "NatsEventPlane",
    "SubjectPattern",
    "Subscription",
    "ZmqEventPlane",
    "component_subject",
    "default_event_url",
    "encode_segment",
    "kv_events_subject",
    "kv_metrics_subject",
    "open_event_plane",
    "validate_subject",
]


def default_event_url(discovery: Discovery | None) -> str | None:
    """The event plane to use when none is configured: in-process next to in-memory discovery
    (everything lives in one process), ``zmq://`` otherwise (works across processes with no
    server, publishers found through discovery)."""
    from ..discovery import MemoryDiscovery

    if discovery is None or isinstance(discovery, MemoryDiscovery):
        return None
    return "zmq://"

#: Topic of :class:`~dynamo_backend_common.protocols.kv.RouterEvent` messages (Dynamo's name).
KV_EVENTS_TOPIC: Final = "kv-events"
#: Topic of :class:`~dynamo_backend_common.protocols.kv.LoadSnapshot` messages (Dynamo's name).
KV_METRICS_TOPIC: Final = "kv_metrics"

_SAFE = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-")
_FORMS = "memory://[NAME], nats://HOST:PORT[,...] or zmq://[HOST]"


def encode_segment(segment: str) -> str:
    """Percent-encode every UTF-8 byte outside ``[A-Za-z0-9_-]`` as ``%XX`` (Dynamo's rule),
    so a name with dots or spaces stays one subject token."""
    if segment and all(ord(c) < 128 and ord(c) in _SAFE for c in segment):
        return segment
    return "".join(chr(b) if b in _SAFE else f"%{b:02X}" for b in segment.encode())


def component_subject(namespace: str, component: str, topic: str) -> str:
    """``namespace.{ns}.component.{comp}.{topic}`` with ``ns`` and ``comp`` encoded."""
    return f"namespace.{encode_segment(namespace)}.component.{encode_segment(component)}.{topic}"


def kv_events_subject(namespace: str, component: str) -> str:
    """Where a component's workers publish msgpack ``RouterEvent`` s."""
    return component_subject(namespace, component, KV_EVENTS_TOPIC)


def kv_metrics_subject(namespace: str, component: str) -> str:
    """Where a component's workers publish msgpack ``LoadSnapshot`` s."""
    return component_subject(namespace, component, KV_METRICS_TOPIC)


def open_event_plane(url: str | None, *, discovery: Discovery | None = None) -> EventPlane:
    """A not-yet-started :class:`EventPlane` for ``url`` (see the module docstring).

    Raises :class:`ValueError` for a malformed or unsupported URL, or ``zmq://`` without a
    ``discovery``; nothing is connected here.
    """
    url = (url or "").strip()
    if not url:
        return MemoryEventPlane()
    scheme, sep, rest = url.partition("://")
    scheme = scheme.lower()
    if not sep:
        raise ValueError(f"event plane URL {url!r} has no scheme; expected {_FORMS}")
    if scheme == "memory":
        return MemoryEventPlane(rest)
    if scheme in ("nats", "tls"):
        servers = [s.strip() for s in url.split(",") if s.strip()]
        servers = [s if "://" in s else f"{scheme}://{s}" for s in servers]
        if any(not s.partition("://")[2] for s in servers):
            raise ValueError(f"event plane URL {url!r}: empty NATS server address")
        return NatsEventPlane(servers)
    if scheme == "zmq":
        if discovery is None:
            raise ValueError("the zmq:// event plane needs a discovery to announce publishers")
        host = rest.strip("/") or "127.0.0.1"
        if any(c in host for c in "/?#@ ") or host.count(":") == 1:
            raise ValueError(f"event plane URL {url!r}: expected zmq:// or zmq://HOST (no port)")
        return ZmqEventPlane(discovery, host=host)
    raise ValueError(f"unsupported event plane URL scheme {scheme!r} in {url!r}; expected {_FORMS}")
