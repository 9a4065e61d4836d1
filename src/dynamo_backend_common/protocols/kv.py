"""KV-cache events and load snapshots as they travel on the event plane.

A worker publishes :class:`RouterEvent` s (one per cache change, ``event_id`` strictly increasing
per worker and dp_rank) so routers can index which blocks each worker holds. ``block_hash`` is
the chained hash of the block's tokens and every token before it (see ``kv.hashing``), so a
router can compute the same value from a prompt; ``parent_hash`` links a stored run of blocks to
the block before it.
"""

from __future__ import annotations

from typing import Annotated

import msgspec

# msgspec checks the u64 upper bound itself when decoding.
U64 = Annotated[int, msgspec.Meta(ge=0)]
U32 = Annotated[int, msgspec.Meta(ge=0, le=2**32 - 1)]


class StoredBlock(msgspec.Struct, frozen=True, omit_defaults=True):
    block_hash: U64
    tokens_hash: U64 | None = None


class KvStored(msgspec.Struct, tag="stored", frozen=True, omit_defaults=True):
    blocks: list[StoredBlock]
    parent_hash: U64 | None = None
    token_ids: list[U32] | None = None
    block_size: U32 | None = None


class KvRemoved(msgspec.Struct, tag="removed", frozen=True):
    block_hashes: list[U64]


class KvCleared(msgspec.Struct, tag="cleared", frozen=True):
    pass


KvEventData = KvStored | KvRemoved | KvCleared


class KvCacheEvent(msgspec.Struct, frozen=True):
    event_id: U64
    data: KvEventData
    dp_rank: U32 = 0


class RouterEvent(msgspec.Struct, frozen=True, omit_defaults=True):
    """A KV cache event stamped with the publishing worker's id."""

    worker_id: U64
    event: KvCacheEvent
    storage_tier: str = "device"


class LoadSnapshot(msgspec.Struct, frozen=True, omit_defaults=True):
    """Per-rank load signal for routers (published on every ``SnapshotPublisher.publish``)."""

    worker_id: U64
    dp_rank: U32
    kv_used_blocks: U64
    kv_total_blocks: U64
    gpu_cache_usage: float = 0.0
    kv_cache_hit_rate: float | None = None
    num_requests_running: U32 | None = None
    num_requests_waiting: U32 | None = None
