"""The event plane: fire-and-forget pub/sub for KV events and load snapshots.

``open_event_plane(url)`` picks the backend from a URL:

- ``None``, ``""``, ``memory://`` or ``memory://NAME``: in-process; every plane opened with the
  same name in one process shares one bus (tests, single-process setups).
- ``nats://HOST:PORT[,nats://HOST:PORT...]`` (also ``tls://``): NATS core pub/sub.
- ``zmq://`` or ``zmq://HOST``: direct ZMQ PUB/SUB between processes, no server, in NVIDIA
  Dynamo 1.6.1's form (4-frame messages, ``EventChannel`` / ``EventSource`` discovery records):
  publishers are found through ``discovery`` (required), see :mod:`.zmq_plane`.

The contract every backend keeps is in :mod:`.base`. Subjects follow Dynamo's NATS layout:
``namespace.{ns}.component.{comp}.{topic}`` with ``ns`` and ``comp`` percent-encoded
(:mod:`.subjects`). Payloads are opaque bytes to every plane; the KV ones are Dynamo's
(``protocols.kv.encode_kv_events`` / ``encode_load``) on every plane.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .base import (
    DEFAULT_MAX_PENDING,
    EventPlane,
    Message,
    SubjectPattern,
    Subscription,
    validate_subject,
)
from .dynamo_wire import EVENT_CHANNELS_PREFIX, EVENT_SOURCES_PREFIX
from .memory import MemoryEventPlane
from .nats_plane import NatsEventPlane
from .subjects import (
    KV_EVENTS_TOPIC,
    KV_METRICS_TOPIC,
    component_subject,
    decode_segment,
    encode_segment,
    kv_events_subject,
    kv_metrics_subject,
    parse_component_subject,
)
from .zmq_plane import DEFAULT_ENDPOINT, ZmqEventPlane

if TYPE_CHECKING:
    from ..discovery import Discovery

__all__ = [
    "DEFAULT_ENDPOINT",
    "DEFAULT_MAX_PENDING",
    "EVENT_CHANNELS_PREFIX",
    "EVENT_SOURCES_PREFIX",
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
    "decode_segment",
    "default_event_url",
    "encode_segment",
    "kv_events_subject",
    "kv_metrics_subject",
    "open_event_plane",
    "parse_component_subject",
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

_FORMS = "memory://[NAME], nats://HOST:PORT[,...] or zmq://[HOST]"


def open_event_plane(
    url: str | None,
    *,
    discovery: Discovery | None = None,
    endpoint: str = DEFAULT_ENDPOINT,
) -> EventPlane:
    """A not-yet-started :class:`EventPlane` for ``url`` (see the module docstring).

    ``endpoint`` is the endpoint whose scope the ZMQ plane announces its channels in (a worker
    passes its own; other planes ignore it). ``zmq://`` binds on ``$DYN_EVENT_PLANE_HOST``, else
    127.0.0.1; ``zmq://HOST`` on HOST. Raises :class:`ValueError` for a malformed or unsupported
    URL, or ``zmq://`` without a ``discovery``; nothing is connected here.
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
        host = rest.strip("/")
        if any(c in host for c in "/?#@ ") or host.count(":") == 1:
            raise ValueError(f"event plane URL {url!r}: expected zmq:// or zmq://HOST (no port)")
        return ZmqEventPlane(discovery, host=host or None, endpoint=endpoint)
    raise ValueError(f"unsupported event plane URL scheme {scheme!r} in {url!r}; expected {_FORMS}")
