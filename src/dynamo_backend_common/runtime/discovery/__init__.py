"""Discovery: where workers register and frontends find them. One interface, three backends.

``open_discovery(url)`` picks the backend from a URL:

- ``memory://`` or ``memory://NAME``: process-local; objects opened with the same name in one
  process share one store (tests, single-process setups).
- ``file://`` (root ``$DYN_FILE_KV`` or ``$TMPDIR/dynamo_store_kv``) or ``file:///ABS/DIR``:
  a shared directory; processes on one machine see each other. The default.
- ``etcd://HOST:PORT[,HOST:PORT...]``, also ``http://HOST:PORT`` / ``https://HOST:PORT``
  (each comma-separated item may carry its own ``http(s)://``): etcd v3.
- ``None``: ``$DYN_DISCOVERY`` if set (same forms), else the file default.

The contract every backend keeps is in :mod:`.base`.
"""

from __future__ import annotations

import os

from .base import DEFAULT_TTL, Discovery, DiscoveryError, DiscoveryEvent
from .etcd import EtcdDiscovery
from .file import FileDiscovery, default_file_root
from .memory import MemoryDiscovery

__all__ = [
    "DEFAULT_TTL",
    "Discovery",
    "DiscoveryError",
    "DiscoveryEvent",
    "EtcdDiscovery",
    "FileDiscovery",
    "MemoryDiscovery",
    "default_file_root",
    "open_discovery",
    "parse_etcd_endpoints",
]

_FORMS = "memory://[NAME], file://[/ABS/DIR] or etcd://HOST:PORT[,HOST:PORT]"
_ETCD_DEFAULT_PORT = 2379


def open_discovery(url: str | None = None, *, ttl: float | None = None) -> Discovery:
    """A not-yet-started :class:`Discovery` for ``url`` (see the module docstring).

    ``ttl`` is the lease TTL in seconds (default ``$DYN_DISCOVERY_TTL``, else 10).
    Raises :class:`ValueError` for a malformed or unsupported URL; nothing is connected here.
    """
    if url is None:
        url = os.environ.get("DYN_DISCOVERY") or None
    if url is None or not url.strip():
        return FileDiscovery(ttl=ttl)
    url = url.strip()
    scheme, sep, rest = url.partition("://")
    scheme = scheme.lower()
    if not sep:
        raise ValueError(f"discovery URL {url!r} has no scheme; expected {_FORMS}")
    if scheme == "memory":
        return MemoryDiscovery(rest, ttl=ttl)
    if scheme == "file":
        if rest == "":
            return FileDiscovery(ttl=ttl)
        if rest.startswith("localhost/"):
            rest = rest[len("localhost") :]
        if not rest.startswith("/"):
            raise ValueError(
                f"file discovery URL {url!r} must be file:// or file:///ABSOLUTE/DIR "
                "(a host or relative path is not supported)"
            )
        return FileDiscovery(rest, ttl=ttl)
    if scheme in ("etcd", "http", "https"):
        return EtcdDiscovery(parse_etcd_endpoints(url), ttl=ttl)
    raise ValueError(f"unsupported discovery URL scheme {scheme!r} in {url!r}; expected {_FORMS}")


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
