"""Which discovery, event and request plane: our URL flags, Dynamo's backend-name flags and its
environment (``DYN_DISCOVERY_BACKEND``, ``ETCD_ENDPOINTS``, ``DYN_EVENT_PLANE``, ``NATS_SERVER``,
``DYN_REQUEST_PLANE``), shared by the worker and frontend command lines."""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from typing import Any, Final

__all__ = ["DISCOVERY_BACKENDS", "EVENT_PLANES", "REQUEST_PLANES", "add_plane_args",
           "discovery_url_for_backend", "event_url_for_plane", "resolve_discovery",
           "resolve_events"]

#: Request-plane protocols a worker can serve (see :attr:`WorkerConfig.request_plane`).
REQUEST_PLANES: Final = ("tcp", "mux")
DISCOVERY_BACKENDS: Final = ("file", "etcd", "mem")
EVENT_PLANES: Final = ("zmq", "nats")


def discovery_url_for_backend(backend: str) -> str:
    """Dynamo's ``--discovery-backend`` / ``DYN_DISCOVERY_BACKEND`` name as our discovery URL:
    ``file`` (root ``DYN_FILE_KV``), ``etcd`` (``ETCD_ENDPOINTS``, default
    ``http://localhost:2379``) or ``mem``."""
    name = backend.strip().lower()
    if name == "file":
        return "file://"
    if name == "etcd":
        # etcd://A,B takes items with or without http(s):// (ETCD_ENDPOINTS is written both ways).
        return "etcd://" + (os.environ.get("ETCD_ENDPOINTS", "").strip() or "localhost:2379")
    if name in ("mem", "memory"):
        return "memory://"
    raise ValueError(f"unknown discovery backend {backend!r}; expected one of "
                     f"{', '.join(DISCOVERY_BACKENDS)}")


def event_url_for_plane(plane: str) -> str:
    """Dynamo's ``--event-plane`` / ``DYN_EVENT_PLANE`` name as our event-plane URL: ``zmq``
    (PUB sockets on ``DYN_EVENT_PLANE_HOST``, default 127.0.0.1) or ``nats``
    (``NATS_SERVER``, default ``nats://localhost:4222``)."""
    name = plane.strip().lower()
    if name == "zmq":
        host = os.environ.get("DYN_EVENT_PLANE_HOST", "").strip()
        return f"zmq://{host}" if host and host != "0.0.0.0" else "zmq://"
    if name == "nats":
        return os.environ.get("NATS_SERVER", "").strip() or "nats://localhost:4222"
    raise ValueError(f"unknown event plane {plane!r}; expected one of {', '.join(EVENT_PLANES)}")


def resolve_discovery(url: str | None, backend: str | None) -> str | None:
    """``--discovery URL`` beats ``--discovery-backend NAME``; ``None`` leaves the choice to
    :func:`~dynamo_backend_common.runtime.discovery.open_discovery` (``DYN_DISCOVERY``, then
    ``DYN_DISCOVERY_BACKEND``, then ``file://``)."""
    if url and url.strip():
        return url.strip()
    if backend and backend.strip():
        return discovery_url_for_backend(backend)
    return None


def resolve_events(url: str | None, plane: str | None) -> str | None:
    """``--events URL`` beats ``--event-plane NAME`` (``DYN_EVENT_PLANE``); ``None`` = the
    default next to the discovery (``zmq://``, or in-process beside ``memory://``)."""
    if url and url.strip():
        return url.strip()
    if plane and plane.strip():
        return event_url_for_plane(plane)
    return None


def _choice(allowed: Sequence[str]) -> Any:
    def parse(value: str) -> str:
        v = value.strip().lower()
        if v == "memory" and "mem" in allowed:
            v = "mem"
        if v not in allowed:
            raise argparse.ArgumentTypeError(
                f"expected one of {', '.join(allowed)}, got {value!r}")
        return v

    return parse


def add_plane_args(
    g: argparse._ArgumentGroup | argparse.ArgumentParser, *, request_plane: bool = True
) -> None:
    """Dynamo's plane-selection flags, with Dynamo's environment fallbacks (a frontend speaks
    every request plane, so it takes no ``--request-plane``)."""
    g.add_argument("--discovery-backend", type=_choice(DISCOVERY_BACKENDS),
                   default=os.environ.get("DYN_DISCOVERY_BACKEND", "").strip() or None,
                   help="Dynamo's discovery selector: file (root DYN_FILE_KV) | etcd "
                        "(ETCD_ENDPOINTS) | mem; --discovery URL beats it "
                        "[DYN_DISCOVERY_BACKEND]")
    g.add_argument("--event-plane", type=_choice(EVENT_PLANES),
                   default=os.environ.get("DYN_EVENT_PLANE", "").strip() or None,
                   help="Dynamo's event-plane selector: zmq (DYN_EVENT_PLANE_HOST) | nats "
                        "(NATS_SERVER); --events URL beats it [DYN_EVENT_PLANE]")
    if not request_plane:
        return
    g.add_argument("--request-plane", type=_choice(REQUEST_PLANES),
                   default=os.environ.get("DYN_REQUEST_PLANE", "").strip() or "tcp",
                   help="tcp = Dynamo 1.6.1's TCP request plane (default) | mux = our "
                        "private multiplexed protocol [DYN_REQUEST_PLANE]")
