"""KvRouter cost model and selection, plus the load-blind policies and the factory."""

from __future__ import annotations

import random
from collections import Counter
from typing import Any

import pytest

from dynamo_backend_common.kv.hashing import block_hashes
from dynamo_backend_common.protocols.kv import (
    KvCacheEvent,
    KvStored,
    LoadSnapshot,
    RouterEvent,
    StoredBlock,
)
from dynamo_backend_common.router import (
    KvIndexer,
    KvRouter,
    KvRouterConfig,
    NoWorkersAvailable,
    Random,
    RoundRobin,
    RoutingPolicy,
    WorkerKey,
    make_policy,
    prompt_hashes,
)

BS = 16
A, B, C = (1, 0), (2, 0), (3, 0)


def make_router(
    *workers: WorkerKey, seed: int = 0, **cfg: Any
) -> tuple[KvRouter, dict[WorkerKey, int]]:
    router = KvRouter(KvIndexer(), KvRouterConfig(block_size=BS, **cfg), random.Random(seed))
    for w in workers:
        router.add_worker(w)
    return router, dict.fromkeys(workers, 0)


def cache(router: KvRouter, ids: dict[WorkerKey, int], w: WorkerKey, tokens: list[int]) -> None:
    """Worker ``w`` publishes that it cached ``tokens``' full blocks."""
    hs = block_hashes(tokens, BS)
    data = KvStored(blocks=[StoredBlock(h) for h in hs])
    router.apply_event(RouterEvent(w[0], KvCacheEvent(ids[w], data, w[1])))
    ids[w] += 1


def snapshot(w: WorkerKey, used: int, total: int = 1000) -> LoadSnapshot:
    return LoadSnapshot(worker_id=w[0], dp_rank=w[1], kv_used_blocks=used, kv_total_blocks=total)


PROMPT = list(range(10 * BS))  # 10 full blocks


def test_equal_loads_longest_prefix_wins() -> None:
    router, ids = make_router(A, B, C)
    cache(router, ids, A, PROMPT[: 3 * BS])
    cache(router, ids, B, PROMPT[: 7 * BS])
    cache(router, ids, C, PROMPT[: 5 * BS] + [99_999] * BS)  # diverges at block 5
    for w in (A, B, C):
        router.update_load(snapshot(w, used=50))
    d = router.select(PROMPT)
    assert d.worker == B
    assert (d.overlap_blocks, d.prompt_blocks, d.request_blocks) == (7, 10, 10)
    # logit = weight * (prompt - overlap) + decode blocks + the request's own 10 new blocks
    assert d.logits == {A: 7 + 50 + 10, B: 3 + 50 + 10, C: 5 + 50 + 10}


def test_partial_block_not_hashed_but_counted_as_load() -> None:
    router, _ = make_router(A)
    d = router.select([*PROMPT, 1, 2, 3])
    assert (d.prompt_blocks, d.request_blocks) == (10, 11)


def test_overloaded_worker_avoided_despite_overlap() -> None:
    router, ids = make_router(A, B)
    cache(router, ids, A, PROMPT[: 8 * BS])
    router.update_load(snapshot(A, used=500))
    router.update_load(snapshot(B, used=10))
    d = router.select(PROMPT)
    assert d.worker == B and d.overlap_blocks == 0
    assert d.logits[A] == 2 + 500 + 10 and d.logits[B] == 10 + 10 + 10
    # With a light load the same overlap wins.
    router.update_load(snapshot(A, used=12))
    assert router.select(PROMPT).worker == A


def test_overlap_weight_zero_is_pure_load_balancing() -> None:
    router, ids = make_router(A, B, overlap_score_weight=0.0)
    cache(router, ids, A, PROMPT)
    router.update_load(snapshot(A, used=11))
    router.update_load(snapshot(B, used=10))
    d = router.select(PROMPT)
    assert d.worker == B and d.logits == {A: 11 + 10, B: 10 + 10}


def test_ties_broken_at_random_and_reproducibly() -> None:
    router, _ = make_router(A, B, C, seed=7)
    picks = [router.select(PROMPT).worker for _ in range(300)]
    counts = Counter(picks)
    assert set(counts) == {A, B, C}
    assert min(counts.values()) > 60  # ~100 each
    again, _ = make_router(A, B, C, seed=7)
    assert [again.select(PROMPT).worker for _ in range(300)] == picks


def distinct(i: int) -> list[int]:
    """A 10-block prompt sharing no block with PROMPT or another ``distinct(j)``."""
    return [100_000 + i, *PROMPT[1:]]


def test_no_kv_events_behaves_like_least_loaded() -> None:
    router, _ = make_router(A, B, C)
    sent = []
    for i in range(30):
        d = router.select(distinct(i))
        router.request_started(d)
        sent.append(d)
    # 30 equal requests spread evenly by the router's own in-flight accounting.
    assert Counter(d.worker for d in sent) == {A: 10, B: 10, C: 10}
    assert router.load(A).inflight_requests == 10 and router.load(A).inflight_blocks == 100
    for d in sent:
        if d.worker == A:
            router.request_finished(d)
    assert router.load(A).inflight_blocks == 0
    assert router.select(PROMPT).worker == A  # now the least loaded


def test_request_tracking_is_idempotent_and_snapshot_aware() -> None:
    router, _ = make_router(A, B)
    router.update_load(snapshot(A, used=0))
    d = router.select(PROMPT, candidates=[A])
    router.request_started(d)
    router.request_started(d)
    assert router.load(A).decode_blocks == 10
    # A snapshot taken after routing already counts the request: no double counting.
    router.update_load(snapshot(A, used=10))
    assert router.load(A).decode_blocks == 10
    d2 = router.select(distinct(1), candidates=[A])
    router.request_started(d2)
    assert router.load(A).decode_blocks == 20  # snapshot + routed since
    router.request_finished(d2)
    router.request_finished(d2)
    assert router.load(A).decode_blocks == 10
    # The worker reports it is idle, but this router still has a request there.
    router.update_load(snapshot(A, used=0))
    assert router.load(A).decode_blocks == 10
    router.request_finished(d)
    assert router.load(A).decode_blocks == 0
    assert router.load(A).inflight_requests == 0


def test_burst_between_snapshots_is_spread() -> None:
    router, ids = make_router(A, B)
    cache(router, ids, A, PROMPT[: 8 * BS])
    router.update_load(snapshot(A, used=0))
    router.update_load(snapshot(B, used=0))
    workers = []
    for i in range(10):  # a shared 8-block prefix, then 2 blocks of each request's own
        d = router.select(PROMPT[: 8 * BS] + [200_000 + i] * 2 * BS)
        router.request_started(d)
        workers.append(d.worker)
    # The cached one first, and again: it only adds 2 blocks per request (A's logits go
    # 2+0+10 then (2+2)+10+2, against B's 10+0+10) ...
    assert workers[:2] == [A] * 2
    # ... but not every request herds onto it before the next snapshot.
    assert B in workers


def test_shared_blocks_in_flight_count_once() -> None:
    router, _ = make_router(A, B)
    tails = [PROMPT[: 8 * BS] + [300_000 + i] * (2 * BS + 3) for i in range(3)]
    sent = [router.select(t, candidates=[A]) for t in tails]
    for d in sent:
        router.request_started(d)
    # 8 shared blocks once, plus 2 full and 1 partial block per request.
    assert router.load(A).inflight_blocks == 8 + 3 * 3
    assert router.load(A).inflight_requests == 3
    # A request with the same prefix adds only its own blocks on A, all 11 on B.
    d = router.select(PROMPT[: 8 * BS] + [400_000] * (2 * BS + 3))
    # prefill (no KV events, so all 10 blocks, plus 3 x 10 queued on A) + in use + its own
    assert d.logits[A] == 10 + 30 + 17 + 3
    assert d.logits[B] == 10 + 0 + 0 + 11
    for done in sent:  # first tokens: the queued prefill is done
        router.prefill_done(done)
        router.prefill_done(done)
    assert router.load(A).prefill_blocks == 0
    d = router.select(PROMPT[: 8 * BS] + [400_000] * (2 * BS + 3))
    assert d.logits[A] == 10 + 0 + 17 + 3
    for d in sent:
        router.request_finished(d)
    assert router.load(A).inflight_blocks == 0 and router.load(A).inflight_requests == 0


def test_temperature_samples_and_prefers_better_workers() -> None:
    router, ids = make_router(A, B, C, seed=1, temperature=0.5)
    cache(router, ids, A, PROMPT[: 9 * BS])
    cache(router, ids, B, PROMPT[: 5 * BS])
    counts = Counter(router.select(PROMPT).worker for _ in range(2000))
    assert set(counts) == {A, B, C}  # it does sample
    assert counts[A] > counts[B] > counts[C]
    # Logits 1, 5, 10 normalise to 0, 4/9, 1; weights exp(0), exp(-8/9), exp(-2): P(A) ~ 0.647.
    assert 0.60 < counts[A] / 2000 < 0.69
    low_t, ids2 = make_router(A, B, C, seed=1, temperature=0.01)
    cache(low_t, ids2, A, PROMPT[: 9 * BS])
    assert {low_t.select(PROMPT).worker for _ in range(200)} == {A}


def test_candidates_filter() -> None:
    router, ids = make_router(A, B)
    cache(router, ids, A, PROMPT)
    d = router.select(PROMPT, candidates=[B, B])
    assert d.worker == B and set(d.logits) == {B} and d.overlap_blocks == 0
    # A candidate that was never added is allowed (e.g. from the frontend's instance list).
    d = router.select(PROMPT, candidates=[C, B])
    assert set(d.logits) == {B, C}
    with pytest.raises(NoWorkersAvailable):
        router.select(PROMPT, candidates=[])


def test_no_workers_raises() -> None:
    router, _ = make_router()
    with pytest.raises(NoWorkersAvailable):
        router.select(PROMPT)


def test_remove_worker_drops_everything() -> None:
    router, ids = make_router(A, B)
    cache(router, ids, A, PROMPT)
    d = router.select(PROMPT)
    router.request_started(d)
    assert d.worker == A
    router.remove_worker(A)
    assert router.workers == [B]
    assert router.indexer.find_matches(block_hashes(PROMPT, BS)) == {}
    assert router.load(A).inflight_requests == 0
    router.request_finished(d)  # a late finish for a departed worker is harmless
    assert router.select(PROMPT).worker == B


def test_busy_threshold_excludes_unless_all_busy() -> None:
    for threshold, expected in ((None, A), (0.9, B)):
        router, ids = make_router(A, B, busy_threshold=threshold)
        cache(router, ids, A, PROMPT)
        router.update_load(snapshot(A, used=95, total=100))  # logit 0 + 95
        router.update_load(snapshot(B, used=90, total=100))  # logit 10 + 90
        assert router.select(PROMPT).worker == expected  # A is above 90 % usage
    router.update_load(snapshot(B, used=99, total=100))
    d = router.select(PROMPT)
    assert d.worker == A and set(d.logits) == {A, B}  # everyone busy: back to the cost


def test_precomputed_hashes_match() -> None:
    router, ids = make_router(A, B)
    cache(router, ids, B, PROMPT)
    hs = prompt_hashes(router.config, PROMPT)
    d = router.select(PROMPT, block_hashes=hs)
    assert d.worker == B and d.overlap_blocks == 10


def test_config_validation() -> None:
    with pytest.raises(ValueError):
        KvRouterConfig(block_size=0)
    with pytest.raises(ValueError):
        KvRouterConfig(block_size=16, temperature=-1)
    with pytest.raises(ValueError):
        KvRouterConfig(block_size=16, overlap_score_weight=-0.5)


# -- load-blind policies and the factory ---------------------------------------------------------


def test_round_robin_cycles() -> None:
    rr = RoundRobin()
    for w in (A, B, C):
        rr.add_worker(w)
    assert [rr.select(PROMPT).worker for _ in range(6)] == [A, B, C, A, B, C]
    rr.remove_worker(B)
    assert {rr.select(PROMPT).worker for _ in range(4)} == {A, C}
    assert rr.select(PROMPT, candidates=[B]).worker == B
    with pytest.raises(NoWorkersAvailable):
        RoundRobin().select(PROMPT)


def test_random_policy_is_seedable_and_covers_all() -> None:
    picks = [Random(random.Random(3)).select(PROMPT, [A, B, C]).worker for _ in range(3)]
    assert len(set(picks)) == 1  # same seed, same first pick
    r = Random(random.Random(3))
    counts = Counter(r.select(PROMPT, [A, B, C]).worker for _ in range(600))
    assert set(counts) == {A, B, C} and min(counts.values()) > 150


def test_make_policy() -> None:
    kv = make_policy("kv", block_size=BS, temperature=0.2, seed=1)
    assert isinstance(kv, KvRouter) and kv.config.temperature == 0.2
    assert isinstance(make_policy("round-robin", block_size=BS), RoundRobin)
    assert isinstance(make_policy("random", seed=2), Random)
    for p in (kv, RoundRobin(), Random()):
        assert isinstance(p, RoutingPolicy)
    assert {make_policy(n, block_size=BS).name for n in ("kv", "random", "round_robin")} == {
        "kv",
        "random",
        "round_robin",
    }
    with pytest.raises(ValueError, match="unknown routing policy"):
        make_policy("fastest_guess")
    with pytest.raises(ValueError, match="block_size"):
        make_policy("kv")
    with pytest.raises(TypeError):
        make_policy("random", temperature=1.0)


def test_policies_share_the_driving_sequence() -> None:
    """The frontend's call sequence works on every policy."""
    for name in ("round_robin", "random", "kv"):
        p = make_policy(name, block_size=BS, seed=0)
        p.add_worker(A)
        p.update_load(snapshot(A, used=1))
        p.apply_event(RouterEvent(1, KvCacheEvent(0, KvStored(blocks=[StoredBlock(5)]))))
        d = p.select(PROMPT)
        p.request_started(d)
        p.request_finished(d)
        assert d.worker == A
        p.remove_worker(A)
        with pytest.raises(NoWorkersAvailable):
            p.select(PROMPT)


def test_queued_prefill_spreads_simultaneous_arrivals() -> None:
    router, _ = make_router(A, B)
    first = router.select(distinct(1))
    router.request_started(first)
    router.update_load(snapshot(A if first.worker == A else B, used=0))
    # Without the queued prefill both workers would look equal (the snapshot says idle).
    second = router.select(distinct(2))
    assert second.worker != first.worker
    assert second.logits[first.worker] == 10 + 10 + 10 + 10  # prefill + queued + in use + own
    router.prefill_done(first)
    router.request_finished(first)
    assert router.load(first.worker).prefill_blocks == 0


def test_finished_request_frees_its_blocks_before_the_next_snapshot() -> None:
    router, _ = make_router(A, B)
    d = router.select(PROMPT, candidates=[A])
    router.request_started(d)
    router.update_load(snapshot(A, used=10))  # taken while d runs: it counts d's 10 blocks
    assert router.load(A).decode_blocks == 10
    router.request_finished(d)
    # The snapshot is stale now: A is idle, so a next turn is not pushed to B.
    assert router.load(A).decode_blocks == 0
    router.update_load(snapshot(A, used=0))  # the next snapshot agrees
    assert router.load(A).decode_blocks == 0
