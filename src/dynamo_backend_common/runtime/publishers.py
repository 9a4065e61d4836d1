"""Framework-built publishers that engines drive: KV events and per-rank load snapshots.

The worker constructs them and hands them to the engine (``PushKvEventSource.on_ready``,
``MetricsBindings.on_publisher_ready``); the engine calls ``publish*`` from any thread. Calls made
off the owning event loop hop onto it, so sinks always run on the loop, in call order.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING

from ..kv.hashing import local_block_hashes
from ..protocols.kv import (
    KvCacheEvent,
    KvCleared,
    KvEventData,
    KvRemoved,
    KvStored,
    RouterEvent,
    StoredBlock,
)
from .loop import call_on_loop

if TYPE_CHECKING:
    from ..protocols.load import ComponentSnapshot


class _LoopBound:
    """Runs a callable on the owning loop, directly when already there."""

    def __init__(self, loop: asyncio.AbstractEventLoop | None) -> None:
        self._loop = loop
        self._thread = threading.get_ident() if loop is not None else None
        self._closed = False

    def _dispatch(self, fn: Callable[[], None]) -> None:
        if self._closed:
            return
        if not call_on_loop(self._loop, fn, loop_thread=self._thread):
            self._closed = True  # loop closed during shutdown: nothing left to deliver to

    def close(self) -> None:
        """Stop delivering; later ``publish`` calls are dropped silently (shutdown)."""
        self._closed = True


class KvEventPublisher(_LoopBound):
    """Publishes one data-parallel rank's KV cache changes.

    ``event_id`` increases by one per event, starting at 0, so subscribers detect gaps.
    """

    def __init__(
        self,
        worker_id: int,
        dp_rank: int,
        sink: Callable[[RouterEvent], None],
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        super().__init__(loop)
        self.worker_id = worker_id
        self.dp_rank = dp_rank
        self._sink = sink
        self._ids = itertools.count()
        self._lock = threading.Lock()

    def publish(self, data: KvEventData) -> None:
        with self._lock:  # event ids are assigned in call order, across threads
            event = RouterEvent(
                worker_id=self.worker_id,
                event=KvCacheEvent(event_id=next(self._ids), data=data, dp_rank=self.dp_rank),
            )
            self._dispatch(lambda: self._sink(event))

    def publish_stored(
        self,
        block_hashes: Sequence[int],
        *,
        parent_hash: int | None = None,
        tokens_hashes: Sequence[int] | None = None,
        token_ids: Sequence[int] | None = None,
        block_size: int | None = None,
        start_position: int | None = None,
    ) -> None:
        """Blocks ``block_hashes`` (in sequence order, following ``parent_hash``) are now cached.

        ``tokens_hashes`` are the blocks' own token hashes (``kv.hashing.local_block_hashes``),
        which Dynamo's router indexes by; without them they are computed from ``token_ids`` (the
        tokens of exactly these blocks, ``block_size`` each), else the block hashes stand in
        (see :class:`~dynamo_backend_common.protocols.kv.StoredBlock`). Token ids are not sent.
        """
        n = len(block_hashes)
        if tokens_hashes is None and token_ids is not None:
            if block_size is None or block_size <= 0 or len(token_ids) != n * block_size:
                raise ValueError(
                    f"token_ids must hold exactly {n} blocks of block_size tokens "
                    f"(got {len(token_ids)} tokens, block_size {block_size})")
            tokens_hashes = local_block_hashes(token_ids, block_size)
        if tokens_hashes is not None and len(tokens_hashes) != n:
            raise ValueError("tokens_hashes must have one entry per block hash")
        blocks = [
            StoredBlock(h, tokens_hashes[i] if tokens_hashes is not None else None)
            for i, h in enumerate(block_hashes)
        ]
        self.publish(KvStored(blocks=blocks, parent_hash=parent_hash,
                              start_position=start_position))

    def publish_removed(self, block_hashes: Iterable[int]) -> None:
        """Blocks ``block_hashes`` were evicted."""
        self.publish(KvRemoved(block_hashes=list(block_hashes)))

    def publish_cleared(self) -> None:
        """The whole cache of this rank was reset."""
        self.publish(KvCleared())


class SnapshotPublisher(_LoopBound):
    """Takes per-rank :class:`ComponentSnapshot` s and forwards each to the framework's sinks
    (Prometheus gauges and the router load signal), atomically per call.
    """

    def __init__(
        self,
        dp_ranks: Sequence[int],
        sink: Callable[[ComponentSnapshot], None],
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        super().__init__(loop)
        self.dp_ranks = frozenset(dp_ranks)
        self._sink = sink

    def publish(self, rank: int, snapshot: ComponentSnapshot) -> None:
        """Publish ``snapshot`` for ``rank``, which must be one of the declared ``dp_ranks``."""
        if rank not in self.dp_ranks:
            raise ValueError(f"dp_rank {rank} was not declared in MetricsBindings.dp_ranks")
        if snapshot.dp_rank != rank:
            from dataclasses import replace

            snapshot = replace(snapshot, dp_rank=rank)
        self._dispatch(lambda: self._sink(snapshot))
