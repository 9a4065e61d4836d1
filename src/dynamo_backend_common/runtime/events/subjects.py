"""Event-plane subjects: ``namespace.{ns}.component.{comp}.{topic}`` (Dynamo's NATS layout).

``ns`` and ``comp`` are percent-encoded (every UTF-8 byte outside ``[A-Za-z0-9_-]`` as ``%XX``,
Dynamo's rule), so a name with dots or spaces stays one subject token. The ZMQ plane maps such a
subject to Dynamo's (scope, topic) pair and back (:func:`parse_component_subject`).
"""

from __future__ import annotations

from typing import Final
from urllib.parse import unquote_to_bytes

__all__ = [
    "KV_EVENTS_TOPIC",
    "KV_METRICS_TOPIC",
    "component_subject",
    "decode_segment",
    "encode_segment",
    "kv_events_subject",
    "kv_metrics_subject",
    "parse_component_subject",
]

#: Topic of KV event messages (Dynamo's name): lists of ``RouterEvent``.
KV_EVENTS_TOPIC: Final = "kv-events"
#: Topic of load messages (Dynamo's name): ``ActiveLoad`` / ``LoadSnapshot``.
KV_METRICS_TOPIC: Final = "kv_metrics"

_SAFE = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-")


def encode_segment(segment: str) -> str:
    """Percent-encode every UTF-8 byte outside ``[A-Za-z0-9_-]`` as ``%XX`` (Dynamo's rule),
    so a name with dots or spaces stays one subject token."""
    if segment and all(ord(c) < 128 and ord(c) in _SAFE for c in segment):
        return segment
    return "".join(chr(b) if b in _SAFE else f"%{b:02X}" for b in segment.encode())


def decode_segment(segment: str) -> str:
    """Inverse of :func:`encode_segment`."""
    if "%" not in segment:
        return segment
    return unquote_to_bytes(segment).decode(errors="replace")


def component_subject(namespace: str, component: str, topic: str) -> str:
    """``namespace.{ns}.component.{comp}.{topic}`` with ``ns`` and ``comp`` encoded."""
    return f"namespace.{encode_segment(namespace)}.component.{encode_segment(component)}.{topic}"


def parse_component_subject(subject: str) -> tuple[str, str, str] | None:
    """``(namespace, component, topic)`` of a :func:`component_subject`, else ``None``."""
    parts = subject.split(".", 4)
    if len(parts) != 5 or parts[0] != "namespace" or parts[2] != "component":
        return None
    if not parts[1] or not parts[3] or not parts[4]:
        return None
    return decode_segment(parts[1]), decode_segment(parts[3]), parts[4]


def kv_events_subject(namespace: str, component: str) -> str:
    """Where a component's workers publish KV events (lists of ``RouterEvent``)."""
    return component_subject(namespace, component, KV_EVENTS_TOPIC)


def kv_metrics_subject(namespace: str, component: str) -> str:
    """Where a component's workers publish load (``LoadSnapshot``, Dynamo's ActiveLoad)."""
    return component_subject(namespace, component, KV_METRICS_TOPIC)
