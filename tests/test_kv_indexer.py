"""KvIndexer: event application, worker departure, gap policy and a model-based property test."""

from __future__ import annotations

import logging
import time

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dynamo_backend_common.kv.hashing import block_hashes
from dynamo_backend_common.protocols.kv import (
    KvCacheEvent,
    KvCleared,
    KvEventData,
    KvRemoved,
    KvStored,
    RouterEvent,
    StoredBlock,
    decode_kv_events,
    encode_kv_events,
)
from dynamo_backend_common.router import KvIndexer, WorkerKey
from dynamo_backend_common.runtime.publishers import KvEventPublisher

BS = 4


def ev(
    worker: int, event_id: int, data: KvEventData, dp_rank: int = 0, tier: str = "device"
) -> RouterEvent:
    return RouterEvent(
        worker_id=worker,
        event=KvCacheEvent(event_id=event_id, data=data, dp_rank=dp_rank),
        storage_tier=tier,
    )


def stored(hashes: list[int], parent: int | None = None) -> KvStored:
    return KvStored(blocks=[StoredBlock(h) for h in hashes], parent_hash=parent)


def prompt(n_blocks: int, start: int = 0) -> list[int]:
    return list(range(start, start + n_blocks * BS))


def test_stored_removed_cleared() -> None:
    idx = KvIndexer()
    hs = block_hashes(prompt(4), BS)
    idx.apply(ev(1, 0, stored(hs)))
    idx.apply(ev(2, 0, stored(hs[:2])))
    assert idx.find_matches(hs) == {(1, 0): 4, (2, 0): 2}
    assert idx.num_blocks == 4 and idx.num_workers == 2

    idx.apply(ev(1, 1, KvRemoved(block_hashes=[hs[2]])))
    # Holding block 3 without block 2 does not count: the prefix stops at the first miss.
    assert idx.find_matches(hs) == {(1, 0): 2, (2, 0): 2}
    assert idx.worker_blocks((1, 0)) == {hs[0], hs[1], hs[3]}

    idx.apply(ev(2, 1, KvCleared()))
    assert idx.find_matches(hs) == {(1, 0): 2}
    assert idx.worker_blocks((2, 0)) == set()
    assert idx.num_blocks == 3  # hs[0], hs[1], hs[3] on worker 1


def test_find_matches_edge_cases() -> None:
    idx = KvIndexer()
    assert idx.find_matches([]) == {}
    hs = block_hashes(prompt(3), BS)
    assert idx.find_matches(hs) == {}
    idx.apply(ev(7, 0, stored(hs[1:])))  # orphan blocks: no first block, no prefix
    assert idx.find_matches(hs) == {}
    assert idx.find_matches(hs[:1]) == {}
    idx.apply(ev(7, 1, stored(hs[:1])))
    assert idx.find_matches(hs) == {(7, 0): 3}
    other = block_hashes(prompt(3, start=1000), BS)
    assert idx.find_matches(other) == {}


def test_dp_ranks_are_separate_workers() -> None:
    idx = KvIndexer()
    hs = block_hashes(prompt(3), BS)
    idx.apply(ev(1, 0, stored(hs), dp_rank=0))
    idx.apply(ev(1, 0, stored(hs[:1]), dp_rank=1))  # same event id, other rank: not a duplicate
    assert idx.find_matches(hs) == {(1, 0): 3, (1, 1): 1}
    idx.remove_worker(1, dp_rank=1)
    assert idx.find_matches(hs) == {(1, 0): 3}
    idx.apply(ev(1, 1, stored(hs[:2]), dp_rank=1))
    idx.remove_worker(1)  # all ranks
    assert idx.find_matches(hs) == {}
    assert idx.num_workers == 0 and idx.num_blocks == 0


def test_worker_departure_drops_entries_and_event_ids() -> None:
    idx = KvIndexer()
    hs = block_hashes(prompt(5), BS)
    idx.apply(ev(1, 0, stored(hs)))
    idx.apply(ev(2, 0, stored(hs)))
    idx.remove_worker(1)
    assert idx.find_matches(hs) == {(2, 0): 5}
    assert idx.worker_blocks((1, 0)) == set()
    # A restarted worker with the same id starts a fresh stream at 0: not a gap, not a duplicate.
    idx.apply(ev(1, 0, stored(hs[:1])))
    assert idx.gaps == 0
    assert idx.find_matches(hs) == {(2, 0): 5, (1, 0): 1}
    idx.remove_worker(99)  # unknown: no-op
    assert idx.num_workers == 2


def test_slot_reuse_after_departure() -> None:
    idx = KvIndexer()
    hs = block_hashes(prompt(2), BS)
    for w in range(5):
        idx.apply(ev(w, 0, stored(hs)))
    idx.remove_worker(2)
    idx.apply(ev(10, 0, stored(hs[:1])))  # takes worker 2's freed slot
    assert idx.find_matches(hs) == {(0, 0): 2, (1, 0): 2, (3, 0): 2, (4, 0): 2, (10, 0): 1}


def test_duplicate_and_old_events_are_ignored() -> None:
    idx = KvIndexer()
    hs = block_hashes(prompt(2), BS)
    idx.apply(ev(1, 0, stored(hs)))
    idx.apply(ev(1, 1, KvRemoved(block_hashes=[hs[1]])))
    idx.apply(ev(1, 0, stored(hs)))  # replay of event 0 must not resurrect hs[1]
    idx.apply(ev(1, 1, KvRemoved(block_hashes=[hs[1]])))
    assert idx.worker_blocks((1, 0)) == {hs[0]}
    assert idx.gaps == 0


def test_gap_default_policy_drops_worker_and_restarts(caplog: pytest.LogCaptureFixture) -> None:
    idx = KvIndexer()
    hs = block_hashes(prompt(4), BS)
    idx.apply(ev(1, 0, stored(hs[:2])))
    idx.apply(ev(2, 0, stored(hs)))
    with caplog.at_level(logging.WARNING):
        idx.apply(ev(1, 5, stored(hs[2:], parent=hs[1])))  # events 1..4 lost
    assert idx.gaps == 1
    assert "expected event 1, got 5" in caplog.text
    # Stale entries dropped; the gap event itself is applied as the new baseline.
    assert idx.worker_blocks((1, 0)) == set(hs[2:])
    assert idx.find_matches(hs) == {(2, 0): 4}
    idx.apply(ev(1, 6, stored(hs[:2])))  # continues from 5 without another gap
    assert idx.gaps == 1
    assert idx.find_matches(hs) == {(1, 0): 4, (2, 0): 4}
    assert idx.worker_blocks((2, 0)) == set(hs)  # other workers untouched


def test_gap_custom_callback_replaces_default() -> None:
    seen: list[tuple[WorkerKey, int, int]] = []
    idx = KvIndexer(on_gap=lambda key, exp, got: seen.append((key, exp, got)))
    hs = block_hashes(prompt(3), BS)
    idx.apply(ev(3, 10, stored(hs[:1]), dp_rank=2))  # first event seen: any id is fine
    idx.apply(ev(3, 12, stored(hs[1:2]), dp_rank=2))
    assert seen == [((3, 2), 11, 12)]
    # The callback chose not to drop anything.
    assert idx.find_matches(hs) == {(3, 2): 2}


def test_other_storage_tiers_are_ignored() -> None:
    idx = KvIndexer()
    hs = block_hashes(prompt(2), BS)
    idx.apply(ev(1, 0, stored(hs), tier="host_pinned"))
    assert idx.find_matches(hs) == {}
    idx.apply(ev(1, 7, stored(hs)))  # device stream's first event: no gap from the other tier
    assert idx.gaps == 0 and idx.find_matches(hs) == {(1, 0): 2}
    all_tiers = KvIndexer(storage_tier=None)
    all_tiers.apply(ev(1, 0, stored(hs), tier="disk"))
    assert all_tiers.find_matches(hs) == {(1, 0): 2}


def test_events_from_publisher_roundtrip_msgpack() -> None:
    """Events as a worker publishes them, after a trip through Dynamo's kv-events wire format,
    index as expected."""
    idx = KvIndexer()
    wire: list[bytes] = []
    pub = KvEventPublisher(worker_id=42, dp_rank=1, sink=lambda e: wire.append(
        encode_kv_events([e])))
    tokens = prompt(6)
    hs = block_hashes(tokens, BS)
    pub.publish_stored(hs[:3])
    pub.publish_stored(hs[3:], parent_hash=hs[2])
    pub.publish_removed([hs[5]])
    for raw in wire:
        (event,), unknown = decode_kv_events(raw)
        assert unknown == 0
        idx.apply(event)
    assert idx.find_matches(block_hashes(tokens, BS)) == {(42, 1): 5}
    cleared = encode_kv_events([RouterEvent(42, KvCacheEvent(3, KvCleared(), 1))])
    assert msgspec.msgpack.decode(cleared)[0]["event"]["data"] == "cleared"
    for event in decode_kv_events(cleared)[0]:
        idx.apply(event)
    assert idx.find_matches(hs) == {}


# -- property test: the index equals the union of the simulated workers' caches ------------------

_op = st.tuples(
    st.integers(0, 3),  # worker
    st.sampled_from(["store", "store", "store", "remove", "clear"]),
    st.integers(0, 5),  # which prefix family
    st.integers(1, 6),  # how many blocks
    st.integers(0, 9),  # 0: the event is lost in transit
)


@settings(max_examples=150, deadline=None)
@given(ops=st.lists(_op, max_size=80))
def test_index_matches_simulated_caches(ops: list[tuple[int, str, int, int, int]]) -> None:
    """Workers keep their own caches and publish every change; some events are lost.

    A model of the gap policy predicts the index exactly: on the first event after a loss the
    worker's entries are dropped and the stream restarts. Workers that lost nothing are indexed
    exactly as their caches, and prefix matches agree with a direct walk of the caches.
    """
    families = [block_hashes(list(range(f * 1000, f * 1000 + 6 * BS)), BS) for f in range(6)]
    idx = KvIndexer()
    caches: dict[int, set[int]] = {w: set() for w in range(4)}
    model: dict[int, set[int]] = {w: set() for w in range(4)}
    next_id = dict.fromkeys(range(4), 0)
    seen_any: set[int] = set()
    pending_loss: set[int] = set()
    lossy: set[int] = set()
    gaps = 0
    for w, kind, fam, n, loss in ops:
        if kind == "store":
            hs = families[fam][:n]
            data: KvEventData = stored(hs)
        elif kind == "remove":
            hs = families[fam][n - 1 :]  # evict a tail, as an LRU would
            data = KvRemoved(block_hashes=hs)
        else:
            hs = []
            data = KvCleared()
        eid = next_id[w]
        next_id[w] += 1
        targets = [caches[w]]
        if loss != 0:  # delivered: the indexer sees it
            if w in pending_loss:  # the default gap policy drops the worker's entries first
                model[w].clear()
                pending_loss.discard(w)
                gaps += 1
            targets.append(model[w])
        for state in targets:
            if kind == "store":
                state |= set(hs)
            elif kind == "remove":
                state -= set(hs)
            else:
                state.clear()
        if loss == 0:
            lossy.add(w)
            if w in seen_any:  # without a baseline the indexer cannot notice the loss
                pending_loss.add(w)
            continue
        seen_any.add(w)
        idx.apply(ev(w, eid, data))

    assert idx.gaps == gaps
    for w in range(4):
        assert idx.worker_blocks((w, 0)) == model[w]
        if w not in lossy:
            assert model[w] == caches[w]
    for family in families:
        expected = {}
        for w in range(4):
            depth = 0
            while depth < len(family) and family[depth] in model[w]:
                depth += 1
            if depth:
                expected[(w, 0)] = depth
        assert idx.find_matches(family) == expected
    assert idx.num_blocks == len(set().union(*model.values()))


def test_find_matches_is_fast() -> None:
    """16 workers x 100k blocks; a 256-block prompt matched on all of them in well under 1 ms."""
    idx = KvIndexer()
    shared = block_hashes(list(range(256 * 16)), 16)
    per_worker = 100_000
    for w in range(16):
        idx._store((w, 0), shared[: 16 * (w + 1)])  # worker w caches 16*(w+1) prompt blocks
        base = (w + 1) << 40
        idx._store((w, 0), range(base, base + per_worker - len(shared)))
    assert idx.num_workers == 16
    assert idx.find_matches(shared) == {(w, 0): 16 * (w + 1) for w in range(16)}
    n = 200
    t0 = time.perf_counter()
    for _ in range(n):
        idx.find_matches(shared)
    per_call = (time.perf_counter() - t0) / n
    assert per_call < 1e-3, per_call
