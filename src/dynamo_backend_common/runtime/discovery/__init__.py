"""Discovery: where workers register and frontends find them. One interface, four backends.

``open_discovery(url)`` picks the backend from a URL:

- ``memory://`` or ``memory://NAME``: process-local; objects opened with the same name in one
  process share one store (tests, single-process setups).
- ``file://`` (root ``$DYN_FILE_KV`` or ``$TMPDIR/dynamo_store_kv``) or ``file:///ABS/DIR``:
  a shared directory in **NVIDIA Dynamo's file-store layout** (:class:`FileDiscovery`), so our
  processes and Dynamo 1.6.1 frontends/workers on one machine see each other. Liveness is an
  mtime touched every few seconds; a SIGKILLed process disappears after Dynamo's 10 s TTL.
  The default.
- ``file+lease://`` or ``file+lease:///ABS/DIR``: the project's private directory layout
  (:class:`LeaseFileDiscovery`): one lease file per process plus pid checks, so a SIGKILLed
  local process disappears at the next poll. Invisible to Dynamo.
- ``etcd://HOST:PORT[,HOST:PORT...]``, also ``http://HOST:PORT`` / ``https://HOST:PORT``
  (each comma-separated item may carry its own ``http(s)://``): etcd v3, in Dynamo's etcd
  layout (full key = ``bucket/key``, raw value, lease-bound, create-if-absent txn).

``open_discovery(None)`` (or an empty URL) follows, in this order of precedence:

1. ``$DYN_DISCOVERY``: one of the URLs above (this project's own variable);
2. ``$DYN_DISCOVERY_BACKEND`` (Dynamo's selector): ``file`` (root ``$DYN_FILE_KV``, else
   ``$TMPDIR/dynamo_store_kv``), ``etcd`` (``$ETCD_ENDPOINTS``, a comma list, default
   ``http://localhost:2379``) or ``mem`` / ``memory``; any other value is a ``ValueError``;
3. the file default, ``file://`` (Dynamo's own default is etcd; ours needs no server).

The lease TTL is the ``ttl`` argument, else ``$DYN_DISCOVERY_TTL``, else 10 s; etcd also
honours Dynamo's ``$ETCD_LEASE_TTL`` after ``$DYN_DISCOVERY_TTL``. The contract every backend
keeps is in :mod:`.base`.
"""

from __future__ import annotations

import os

from .base import DEFAULT_TTL, Discovery, DiscoveryError, DiscoveryEvent
from .etcd import EtcdDiscovery
from .file import FileDiscovery, default_file_root
from .file_lease import LeaseFileDiscovery
from .memory import MemoryDiscovery

__all__ = [
    "DEFAULT_TTL",
    "Discovery",
    "DiscoveryError",
    "DiscoveryEvent",
    "EtcdDiscovery",
    "FileDiscovery",
    "LeaseFileDiscovery",
    "MemoryDiscovery",
    "default_file_root",
    "open_backend",
    "open_discovery",
    "parse_etcd_endpoints",
]

_FORMS = (
    "memory://[NAME], file://[/ABS/DIR], file+lease://[/ABS/DIR] or etcd://HOST:PORT[,HOST:PORT]"
)
#: ``$DYN_DISCOVERY_BACKEND`` values (Dynamo's names; ``memory`` is ours for ``mem``).
DISCOVERY_BACKENDS = ("file", "etcd", "mem", "memory")
_ETCD_DEFAULT_ENDPOINTS = "http://localhost:2379"
_ETCD_DEFAULT_PORT = 2379


def open_discovery(url: str | None = None, *, ttl: float | None = None) -> Discovery:
    """A not-yet-started :class:`Discovery` for ``url`` (see the module docstring).

    ``ttl`` is the lease TTL in seconds (default ``$DYN_DISCOVERY_TTL``, else 10).
    Raises :class:`ValueError` for a malformed or unsupported URL or ``$DYN_DISCOVERY_BACKEND``;
    nothing is connected here.
    """
    if url is None or not url.strip():
        url = os.environ.get("DYN_DISCOVERY", "").strip()
        if not url:
            backend = os.environ.get("DYN_DISCOVERY_BACKEND", "").strip()
            return open_backend(backend, ttl=ttl) if backend else FileDiscovery(ttl=ttl)
    url = url.strip()
    scheme, sep, rest = url.partition("://")
    scheme = scheme.lower()
    if not sep:
        raise ValueError(f"discovery URL {url!r} has no scheme; expected {_FORMS}")
    if scheme == "memory":
        return MemoryDiscovery(rest, ttl=ttl)
    if scheme in ("file", "file+lease"):
        cls: type[FileDiscovery] | type[LeaseFileDiscovery]
        cls = FileDiscovery if scheme == "file" else LeaseFileDiscovery
        if rest == "":
            return cls(ttl=ttl)
        if rest.startswith("localhost/"):
            rest = rest[len("localhost") :]
        if not rest.startswith("/"):
            raise ValueError(
                f"file discovery URL {url!r} must be {scheme}:// or {scheme}:///ABSOLUTE/DIR "
                "(a host or relative path is not supported)"
            )
        return cls(rest, ttl=ttl)
    if scheme in ("etcd", "http", "https"):
        return EtcdDiscovery(parse_etcd_endpoints(url), ttl=ttl)
    raise ValueError(f"unsupported discovery URL scheme {scheme!r} in {url!r}; expected {_FORMS}")


def open_backend(backend: str, *, ttl: float | None = None) -> Discovery:
    """Dynamo's ``DYN_DISCOVERY_BACKEND`` / ``--discovery-backend`` name as a :class:`Discovery`.

    ``file``: :class:`FileDiscovery` at ``$DYN_FILE_KV`` (else ``$TMPDIR/dynamo_store_kv``);
    ``etcd``: :class:`EtcdDiscovery` on ``$ETCD_ENDPOINTS`` (comma list, default
    ``http://localhost:2379``); ``mem`` or ``memory``: the process-local default store.
    """
    name = backend.strip().lower()
    if name == "file":
        return FileDiscovery(ttl=ttl)
    if name == "etcd":
        endpoints = os.environ.get("ETCD_ENDPOINTS", "").strip() or _ETCD_DEFAULT_ENDPOINTS
        try:
            parsed = parse_etcd_endpoints("etcd://" + endpoints)
        except ValueError as exc:
            raise ValueError(f"bad ETCD_ENDPOINTS {endpoints!r}: {exc}") from None
        return EtcdDiscovery(parsed, ttl=ttl)
    if name in ("mem", "memory"):
        return MemoryDiscovery("", ttl=ttl)
    raise ValueError(
        f"unknown discovery backend {backend!r} (DYN_DISCOVERY_BACKEND); expected one of "
        f"{', '.join(DISCOVERY_BACKENDS)}"
    )


def parse_etcd_endpoints(url: str) -> list[str]:
    """``etcd://a:1,b:2`` or ``http://a:1,http://b:2`` -> ``["http://a:1", "http://b:2"]``.

    A missing port means 2379; ``https`` is kept per item (``etcd://`` means ``http``).
    """
    scheme, sep, rest = url.strip().partition("://")
    scheme = scheme.lower()
    if not sep or scheme not in ("etcd", "http", "https"):
        raise ValueError(f"not an etcd URL: {url!r}; expected etcd://HOST:PORT[,HOST:PORT]")
    endpoints = []
    for raw in rest.split(","):
        item = raw.strip()
        item_scheme = "https" if scheme == "https" else "http"
        for prefix in ("http://", "https://"):
            if item.lower().startswith(prefix):
                item_scheme, item = prefix[:-3], item[len(prefix) :]
        item = item.rstrip("/")
        host, port = _split_host_port(item, url)
        endpoints.append(f"{item_scheme}://{host}:{port}")
    return endpoints


def _split_host_port(item: str, url: str) -> tuple[str, int]:
    if not item or any(c in item for c in "/?#@ "):
        raise ValueError(f"bad etcd endpoint {item!r} in {url!r}; expected HOST:PORT")
    if item.startswith("["):  # [ipv6]:port
        host, bracket, tail = item.partition("]")
        host += bracket
        port_text = tail[1:] if tail.startswith(":") else ""
        if tail and not tail.startswith(":"):
            raise ValueError(f"bad etcd endpoint {item!r} in {url!r}; expected [IPV6]:PORT")
    else:
        host, _, port_text = item.partition(":")
    if not host or host == "[]":
        raise ValueError(f"bad etcd endpoint {item!r} in {url!r}: empty host")
    if not port_text:
        return host, _ETCD_DEFAULT_PORT
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"bad etcd endpoint {item!r} in {url!r}: port must be 1-65535")
    return host, int(port_text)
