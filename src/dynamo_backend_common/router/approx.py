"""KV routing without KV events: predict each worker's cache from this router's own decisions.

Dynamo's approximate mode (``--no-kv-events``, ``KvRouterConfig.use_kv_events = false``, its
``ApproxKvIndexer``): when a request is sent to a worker, the prompt's full blocks are assumed
cached there for ``router_ttl_secs`` (Dynamo's default: 120 s); sending the same blocks there
again restarts their clock. A block whose time is up is dropped from the prediction. The bet is
the one Dynamo makes: a request that shares a prefix with one sent to a worker shortly before
finds it in that worker's cache. No event plane is needed, so it works with engines that publish
no KV events. It cannot see evictions, so under cache pressure it overestimates hits until the
TTL runs out.

The prediction is bounded like Dynamo's (``router_max_tree_size``, default 2**20 blocks): when a
recording takes the total above it, the blocks that would expire first are dropped until
``router_prune_target_ratio`` (0.8) of the bound is left.

Within one recording the deepest block expires (and is pruned) first and a block is refreshed
whenever a deeper one is, so each worker's predicted blocks stay prefix-closed: a prompt's walk
through the index never skips a hole.

Not thread-safe: use it from one thread (the event loop).
"""

from __future__ import annotations

import heapq
import itertools
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence

from ..protocols.kv import RouterEvent
from .indexer import KvIndexer, WorkerKey

__all__ = ["ApproxKvIndexer"]


class ApproxKvIndexer(KvIndexer):
    """A :class:`KvIndexer` filled by :meth:`record` (routing decisions), emptied by a TTL.

    Contracts:

    - ``record(key, hashes)`` makes ``find_matches`` report ``hashes`` as cached on ``key`` for
      ``ttl_secs`` from now (a later ``record`` of the same block on the same worker restarts
      its clock);
    - ``find_matches`` never reports a block whose TTL ran out (expiry is checked on every call,
      so no timer task is needed);
    - at most ``max_blocks`` (worker, block) pairs are held; past that the earliest to expire go
      first, down to ``prune_target_ratio * max_blocks``;
    - KV events are ignored (:meth:`apply` is a no-op): this index predicts, it does not listen.
    """

    __slots__ = ("_clock", "_entries", "_max_blocks", "_next_expiry", "_prune_to", "_size",
                 "ttl_secs")

    def __init__(
        self,
        ttl_secs: float = 120.0,
        *,
        max_blocks: int = 2**20,
        prune_target_ratio: float = 0.8,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not ttl_secs > 0:
            raise ValueError(f"ttl_secs must be > 0, got {ttl_secs}")
        if max_blocks <= 0:
            raise ValueError(f"max_blocks must be > 0, got {max_blocks}")
        if not 0.0 <= prune_target_ratio < 1.0:
            raise ValueError(f"prune_target_ratio must be in [0, 1), got {prune_target_ratio}")
        super().__init__(storage_tier=None)
        self.ttl_secs = ttl_secs
        self._clock = clock
        self._max_blocks = max_blocks
        self._prune_to = int(max_blocks * prune_target_ratio)
        # Per worker: block hash -> expiry, in expiry order (a constant TTL and move_to_end on
        # refresh keep insertion order = expiry order).
        self._entries: dict[WorkerKey, OrderedDict[int, float]] = {}
        self._size = 0
        # A lower bound on the earliest expiry held (inf: nothing held).
        self._next_expiry = float("inf")

    @property
    def num_predicted(self) -> int:
        """(worker, block) pairs currently predicted cached (expired ones may still count until
        the next lookup)."""
        return self._size

    def record(self, key: WorkerKey, block_hashes: Sequence[int]) -> None:
        """A request with the prompt blocks ``block_hashes`` (chained hashes, in order) was sent
        to worker ``key``: predict them cached there for the next ``ttl_secs``."""
        if not block_hashes:
            return
        now = self._clock()
        self._expire(now)
        expiry = now + self.ttl_secs
        entries = self._entries.get(key)
        if entries is None:
            entries = self._entries[key] = OrderedDict()
        before = len(entries)
        fresh: list[int] = []
        for h in reversed(block_hashes):  # deepest first, so it also expires first
            if h in entries:
                entries.move_to_end(h)
            else:
                fresh.append(h)
            entries[h] = expiry
        if fresh:
            self._store(key, fresh)
        self._size += len(entries) - before
        if expiry < self._next_expiry:
            self._next_expiry = expiry
        if self._size > self._max_blocks:
            self._prune()

    def find_matches(self, block_hashes: Sequence[int]) -> dict[WorkerKey, int]:
        """As :meth:`KvIndexer.find_matches`, over the predictions still within their TTL."""
        self._expire(self._clock())
        return super().find_matches(block_hashes)

    def apply(self, event: RouterEvent) -> None:
        """Ignored: the approximate index is fed by :meth:`record` only."""

    def clear_worker(self, key: WorkerKey) -> None:
        """Forget the predictions for ``key`` (``remove_worker`` comes through here too)."""
        entries = self._entries.pop(key, None)
        if entries is not None:
            self._size -= len(entries)
        super().clear_worker(key)

    def _expire(self, now: float) -> None:
        if now < self._next_expiry:
            return
        earliest = float("inf")
        for key, entries in list(self._entries.items()):
            gone: list[int] = []
            for h, expiry in entries.items():
                if expiry > now:
                    earliest = min(earliest, expiry)
                    break
                gone.append(h)
            if gone:
                for h in gone:
                    del entries[h]
                self._size -= len(gone)
                self._remove(key, gone)
            if not entries:
                del self._entries[key]
        self._next_expiry = earliest

    def _prune(self) -> None:
        """Drop the pairs that would expire first until ``_prune_to`` are left."""
        excess = self._size - self._prune_to
        # One generator per worker, its key bound now (a generator expression would read
        # the loop variable late and label every victim with the last worker).
        merged = heapq.merge(*(_by_expiry(key, entries) for key, entries in self._entries.items()))
        victims: dict[WorkerKey, list[int]] = {}
        for _, _, key, h in itertools.islice(merged, excess):
            victims.setdefault(key, []).append(h)
        for key, hashes in victims.items():
            entries = self._entries[key]
            for h in hashes:
                del entries[h]
            self._remove(key, hashes)
            if not entries:
                del self._entries[key]
        self._size -= sum(len(v) for v in victims.values())


def _by_expiry(key: WorkerKey, entries: OrderedDict[int, float]
               ) -> Iterator[tuple[float, int, WorkerKey, int]]:
    """``(expiry, position, key, hash)`` of one worker's entries, in expiry order."""
    for seq, (h, expiry) in enumerate(entries.items()):
        yield expiry, seq, key, h
