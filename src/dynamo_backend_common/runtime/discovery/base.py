"""The discovery interface: a small KV store whose writes live as long as the writing process.

Every backend (memory, file, etcd) implements :class:`Discovery`. Contract, shared by all:

- ``start()`` obtains the process lease; ``instance_id`` is valid from then on. Reads
  (``get_prefix``, ``watch_prefix``) do not need a lease and work before ``start()``;
  ``put()`` does (it raises :class:`RuntimeError` before ``start()``).
- ``put(key, value)`` is create-or-update, attached to this object's lease: the key disappears
  when the lease ends (``close()``, process death, or TTL expiry when the process stalls).
- ``watch_prefix(prefix)`` first yields every current entry as ``put`` (the snapshot), then the
  live changes; no change between snapshot and live stream is lost. It ends when the iterator
  is closed or the ``Discovery`` is closed.
- ``close()`` deletes the keys this object still owns, ends the lease and every watch. It is
  idempotent; after it every other method raises :class:`RuntimeError` (watches just end).
- ``lease_lost`` is set when the lease could not be kept alive: other processes may already
  consider this one gone, so it should shut down.
"""

from __future__ import annotations

import abc
import asyncio
import math
import os
import secrets
from collections.abc import AsyncGenerator
from types import TracebackType
from typing import Literal, Self

import msgspec

__all__ = [
    "DEFAULT_TTL",
    "Discovery",
    "DiscoveryError",
    "DiscoveryEvent",
    "resolve_ttl",
]

#: Default lease TTL in seconds (Dynamo's too).
DEFAULT_TTL = 10.0


class DiscoveryEvent(msgspec.Struct, frozen=True):
    """One change under a watched prefix; ``value`` is ``None`` exactly for ``"delete"``."""

    kind: Literal["put", "delete"]
    key: str
    value: bytes | None


class DiscoveryError(RuntimeError):
    """The backend failed (unreachable, refused the request, lease gone)."""


def resolve_ttl(ttl: float | None) -> float:
    """``ttl`` if given, else ``$DYN_DISCOVERY_TTL``, else :data:`DEFAULT_TTL`; must be > 0."""
    if ttl is None:
        raw = os.environ.get("DYN_DISCOVERY_TTL", "").strip()
        if raw:
            try:
                ttl = float(raw)
            except ValueError:
                raise ValueError(f"DYN_DISCOVERY_TTL must be a number, got {raw!r}") from None
        else:
            ttl = DEFAULT_TTL
    if not math.isfinite(ttl) or ttl <= 0:
        raise ValueError(f"discovery ttl must be a positive number of seconds, got {ttl!r}")
    return float(ttl)


def random_instance_id() -> int:
    """A random non-zero 62-bit id: unique enough, and fits i64/u64 and msgpack ints."""
    while True:
        value = secrets.randbits(62)
        if value:
            return value


class Discovery(abc.ABC):
    """KV store with a process lease: keys put through it vanish when the process dies or closes.

    Use as ``async with open_discovery(url) as d: ...`` or call :meth:`start` / :meth:`close`.
    All methods must be called from the event loop that called :meth:`start` (or, for read-only
    use, the loop of the first call).
    """

    def __init__(self, *, ttl: float | None = None) -> None:
        #: Lease TTL in seconds; keep-alive runs every ``ttl / 3``.
        self.ttl = resolve_ttl(ttl)
        #: Set if the lease could not be kept alive (the process should shut down).
        self.lease_lost = asyncio.Event()
        self._instance_id: int | None = None
        self._started = False
        self._closed = False
        # Set by close(); watches wait on it so they end promptly.
        self._closing = asyncio.Event()

    # -- identity and state -----------------------------------------------------------------
    @property
    def instance_id(self) -> int:
        """Unique id of this process's lease (< 2**63). Valid after :meth:`start`."""
        if self._instance_id is None:
            raise RuntimeError(f"{type(self).__name__}.instance_id is valid only after start()")
        return self._instance_id

    @property
    def started(self) -> bool:
        return self._started

    @property
    def closed(self) -> bool:
        return self._closed

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"{type(self).__name__} is closed")

    def _check_started(self) -> None:
        self._check_open()
        if not self._started:
            raise RuntimeError(f"{type(self).__name__}.put() needs a lease: call start() first")

    # -- the interface ------------------------------------------------------------------------
    @abc.abstractmethod
    async def start(self) -> None:
        """Connect, grant the lease and start its keep-alive. Idempotent."""

    @abc.abstractmethod
    async def put(self, key: str, value: bytes) -> None:
        """Create or update ``key`` under this object's lease."""

    @abc.abstractmethod
    async def delete(self, key: str) -> None:
        """Delete ``key`` (whoever wrote it). Deleting a missing key is not an error."""

    @abc.abstractmethod
    async def get_prefix(self, prefix: str) -> dict[str, bytes]:
        """Every live entry whose key starts with ``prefix``."""

    @abc.abstractmethod
    def watch_prefix(self, prefix: str) -> AsyncGenerator[DiscoveryEvent, None]:
        """Snapshot of ``prefix`` as ``put`` events, then live changes, until closed.

        Returns an async generator (an ``AsyncIterator`` with ``aclose()``). Nothing is read
        until the first ``__anext__``; the snapshot is taken then.
        """

    @abc.abstractmethod
    async def close(self) -> None:
        """Delete own keys, end the lease and keep-alive, end watches. Idempotent."""

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()
