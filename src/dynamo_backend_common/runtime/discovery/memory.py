"""Process-local discovery (``memory://[name]``): for tests and single-process deployments.

All :class:`MemoryDiscovery` objects opened with the same name in one process share one store.
Watches are event driven: a change is pushed to every matching watcher's queue in the same
synchronous step that applies it, so ordering is exact and nothing polls. The "lease" is the
object itself: closing it removes the keys it still owns (another object may have overwritten
one, and then that key is no longer this object's to remove). ``lease_lost`` is never set.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator

from .base import Discovery, DiscoveryEvent, random_instance_id

__all__ = ["MemoryDiscovery"]

_Queue = asyncio.Queue[DiscoveryEvent | None]


class _Store:
    """One named store: entries with their owner, and the active watchers."""

    def __init__(self) -> None:
        self.data: dict[str, tuple[bytes, int]] = {}
        self.watchers: dict[_Queue, str] = {}

    def _notify(self, event: DiscoveryEvent) -> None:
        for queue, prefix in self.watchers.items():
            if event.key.startswith(prefix):
                queue.put_nowait(event)

    def put(self, key: str, value: bytes, owner: int) -> None:
        self.data[key] = (value, owner)
        self._notify(DiscoveryEvent("put", key, value))

    def delete(self, key: str, owner: int | None = None) -> None:
        """Delete ``key``; with ``owner``, only if that owner still holds it."""
        entry = self.data.get(key)
        if entry is None or (owner is not None and entry[1] != owner):
            return
        del self.data[key]
        self._notify(DiscoveryEvent("delete", key, None))

    def snapshot(self, prefix: str) -> dict[str, bytes]:
        return {k: v for k, (v, _) in self.data.items() if k.startswith(prefix)}


_stores: dict[str, _Store] = {}


class MemoryDiscovery(Discovery):
    """In-process :class:`Discovery`; objects with the same ``name`` see each other."""

    def __init__(self, name: str = "", *, ttl: float | None = None) -> None:
        super().__init__(ttl=ttl)
        self.name = name
        self._store = _stores.setdefault(name, _Store())
        self._owned: set[str] = set()
        self._queues: set[_Queue] = set()

    async def start(self) -> None:
        self._check_open()
        if not self._started:
            self._instance_id = random_instance_id()
            self._started = True

    async def put(self, key: str, value: bytes) -> None:
        self._check_started()
        self._store.put(key, bytes(value), self.instance_id)
        self._owned.add(key)

    async def delete(self, key: str) -> None:
        self._check_open()
        self._store.delete(key)
        self._owned.discard(key)

    async def get_prefix(self, prefix: str) -> dict[str, bytes]:
        self._check_open()
        return self._store.snapshot(prefix)

    async def watch_prefix(self, prefix: str) -> AsyncGenerator[DiscoveryEvent, None]:
        if self._closed:
            return
        queue: _Queue = asyncio.Queue()
        # Snapshot and subscription happen in one synchronous step: no change can fall between.
        snapshot = self._store.snapshot(prefix)
        self._store.watchers[queue] = prefix
        self._queues.add(queue)
        try:
            for key in sorted(snapshot):
                yield DiscoveryEvent("put", key, snapshot[key])
            while (event := await queue.get()) is not None:
                yield event
        finally:
            self._store.watchers.pop(queue, None)
            self._queues.discard(queue)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._closing.set()
        if self._instance_id is not None:
            for key in sorted(self._owned):
                self._store.delete(key, owner=self._instance_id)
        self._owned.clear()
        # Watchers first drain the deletes above, then end at the sentinel.
        for queue in self._queues:
            self._store.watchers.pop(queue, None)
            queue.put_nowait(None)
