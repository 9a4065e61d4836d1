"""MockerEngine: streaming, prefix caching and KV events, eviction, cancellation, DP ranks,
snapshots, the cost model, the CLI, and the conformance kit."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from dynamo_backend_common import (
    ComponentSnapshot,
    DynamoError,
    FinishReason,
    GenerateContext,
    LLMEngineOutput,
    MetricsCtx,
    PreprocessedRequest,
    PushKvEventSource,
    SamplingOptions,
    StopConditions,
)
from dynamo_backend_common.engines.mocker import (
    CostModel,
    KvManager,
    MockerArgs,
    MockerEngine,
    Scheduler,
    SchedulerConfig,
    Sequence,
    StopRules,
)
from dynamo_backend_common.errors import BackendError
from dynamo_backend_common.kv.hashing import block_hashes, local_block_hashes
from dynamo_backend_common.protocols.common import RoutingHints
from dynamo_backend_common.protocols.kv import KvRemoved, KvStored, RouterEvent
from dynamo_backend_common.router import KvIndexer
from dynamo_backend_common.runtime.context import Context
from dynamo_backend_common.runtime.metrics import EngineMetrics
from dynamo_backend_common.runtime.publishers import KvEventPublisher, SnapshotPublisher
from dynamo_backend_common.testing import mock_context, run_conformance

BS = 16
FAST: dict[str, Any] = {"speedup_ratio": 0, "check_invariants": True}


def req(
    tokens: list[int],
    max_tokens: int | None = 8,
    *,
    dp_rank: int | None = None,
    seed: int | None = None,
    **stop: Any,
) -> PreprocessedRequest:
    return PreprocessedRequest(
        token_ids=tokens,
        stop_conditions=StopConditions(max_tokens=max_tokens, **stop),
        sampling_options=SamplingOptions(seed=seed),
        routing=RoutingHints(dp_rank=dp_rank) if dp_rank is not None else None,
    )


async def collect(stream: AsyncIterator[LLMEngineOutput]) -> list[LLMEngineOutput]:
    return [c async for c in stream]


def tokens_of(chunks: list[LLMEngineOutput]) -> list[int]:
    return [t for c in chunks for t in c.token_ids]


class Events:
    """Captures each rank's KV events through the engine's push sources."""

    def __init__(self) -> None:
        self.by_rank: dict[int, list[RouterEvent]] = {}

    async def attach(self, engine: MockerEngine) -> None:
        for source in await engine.kv_event_sources():
            assert isinstance(source, PushKvEventSource)
            sink = self.by_rank.setdefault(source.dp_rank, []).append
            source.on_ready(KvEventPublisher(42, source.dp_rank, sink))

    def stored(self, rank: int = 0) -> list[KvStored]:
        return [e.event.data for e in self.by_rank[rank] if isinstance(e.event.data, KvStored)]

    def removed(self, rank: int = 0) -> list[int]:
        return [
            h
            for e in self.by_rank[rank]
            if isinstance(e.event.data, KvRemoved)
            for h in e.event.data.block_hashes
        ]

    def stored_hashes(self, rank: int = 0) -> list[int]:
        return [b.block_hash for s in self.stored(rank) for b in s.blocks]


class SignalingContext(Context):
    """A context that tells the test when the engine registered its stop callback (i.e. the
    request is inside the engine), so tests wait on an event instead of sleeping."""

    __slots__ = ("attached", "gen")

    def __init__(self) -> None:
        super().__init__()
        self.attached = asyncio.Event()
        self.gen = GenerateContext(self)

    def add_stop_callback(self, callback: Callable[[Context], None]) -> None:
        super().add_stop_callback(callback)
        self.attached.set()


@pytest.fixture
async def engine() -> AsyncIterator[MockerEngine]:
    e = MockerEngine(**FAST)
    await e.start(1)
    yield e
    await e.cleanup()


async def started(**kwargs: Any) -> MockerEngine:
    e = MockerEngine(**{**FAST, **kwargs})
    await e.start(1)
    return e


# -- streaming -------------------------------------------------------------------------------
async def test_streams_max_tokens_then_length_with_usage(engine: MockerEngine) -> None:
    chunks = await collect(engine.generate(req(list(range(40)), 12), mock_context()))
    assert all(c.finish_reason is None for c in chunks[:-1])
    terminal = chunks[-1]
    assert terminal.finish_reason == FinishReason.LENGTH
    assert len(tokens_of(chunks)) == 12
    u = terminal.completion_usage
    assert u is not None
    assert (u.prompt_tokens, u.completion_tokens, u.total_tokens) == (40, 12, 52)
    assert u.prompt_tokens_details is not None and u.prompt_tokens_details.cached_tokens == 0
    assert engine.kv_stats().used_blocks == 0


async def test_default_max_tokens_comes_from_args() -> None:
    e = await started(max_tokens=5)
    try:
        chunks = await collect(e.generate(req([1, 2, 3], None), mock_context()))
        assert len(tokens_of(chunks)) == 5
    finally:
        await e.cleanup()


async def test_tokens_are_deterministic_per_seed_and_in_vocab() -> None:
    e = await started(vocab_size=50)
    try:
        a = tokens_of(await collect(e.generate(req([1, 2], 30, seed=7), mock_context())))
        b = tokens_of(await collect(e.generate(req([9, 9, 9], 30, seed=7), mock_context())))
        c = tokens_of(await collect(e.generate(req([1, 2], 30, seed=8), mock_context())))
        assert a == b and a != c
        assert all(0 <= t < 50 for t in a + c)
        # Without a seed, the request id picks it: same id, same tokens.
        d1 = tokens_of(await collect(e.generate(req([1], 20), mock_context("same"))))
        d2 = tokens_of(await collect(e.generate(req([1], 20), mock_context("same"))))
        assert d1 == d2
    finally:
        await e.cleanup()


async def test_eos_ids_are_never_sampled_and_eos_rate_stops() -> None:
    e = await started(vocab_size=4, eos_rate=1.0)
    try:
        r = PreprocessedRequest(
            token_ids=[1], eos_token_ids=[0, 1, 2], stop_conditions=StopConditions(max_tokens=20)
        )
        chunks = await collect(e.generate(r, mock_context()))
        assert chunks[-1].finish_reason == FinishReason.EOS and tokens_of(chunks) == []
        r = PreprocessedRequest(
            token_ids=[1],
            eos_token_ids=[0, 1, 2],
            stop_conditions=StopConditions(max_tokens=20, ignore_eos=True),
        )
        chunks = await collect(e.generate(r, mock_context()))
        assert chunks[-1].finish_reason == FinishReason.LENGTH
        assert tokens_of(chunks) == [3] * 20  # the only id that is not an eos id
    finally:
        await e.cleanup()


async def test_stop_token_ids_hidden_and_visible() -> None:
    e = await started(vocab_size=3)
    try:
        chunks = await collect(
            e.generate(req([5], 50, seed=1, stop_token_ids_hidden=[2]), mock_context())
        )
        end = chunks[-1]
        assert end.finish_reason == FinishReason.STOP and end.stop_reason == 2
        assert 2 not in tokens_of(chunks)
        assert end.completion_usage is not None
        assert end.completion_usage.completion_tokens == len(tokens_of(chunks))
        chunks = await collect(e.generate(req([5], 50, seed=1, stop_token_ids=[2]), mock_context()))
        assert chunks[-1].finish_reason == FinishReason.STOP
        assert tokens_of(chunks)[-1] == 2
        assert tokens_of(chunks).count(2) == 1
    finally:
        await e.cleanup()


async def test_max_tokens_zero_is_a_single_length_terminal(engine: MockerEngine) -> None:
    chunks = await collect(engine.generate(req([1, 2, 3], 0), mock_context()))
    assert len(chunks) == 1 and chunks[0].finish_reason == FinishReason.LENGTH
    assert chunks[0].completion_usage is not None
    assert chunks[0].completion_usage.completion_tokens == 0


async def test_output_stops_at_the_context_length() -> None:
    e = await started(context_length=20)
    try:
        chunks = await collect(e.generate(req(list(range(15)), 100), mock_context()))
        assert chunks[-1].finish_reason == FinishReason.LENGTH
        assert len(tokens_of(chunks)) == 5
    finally:
        await e.cleanup()


@pytest.mark.parametrize(
    ("request_", "what"),
    [
        (req([]), "empty"),
        (req(list(range(8192))), "no room"),
        (req([1], dp_rank=3), "dp_rank"),
    ],
)
async def test_invalid_requests_raise_invalid_argument(
    request_: PreprocessedRequest, what: str
) -> None:
    engine = await started(context_length=8192)
    try:
        with pytest.raises(DynamoError) as info:
            await collect(engine.generate(request_, mock_context()))
        assert info.value.kind is BackendError.InvalidArgument, what
    finally:
        await engine.cleanup()


async def test_without_a_context_length_the_kv_capacity_is_the_limit() -> None:
    engine = MockerEngine(**FAST, num_gpu_blocks=4, block_size=4)
    cfg = await engine.start(1)
    try:
        assert cfg.context_length is None  # the card says 0, as Dynamo's mocker's does
        with pytest.raises(DynamoError, match="KV capacity 16"):
            await collect(engine.generate(req(list(range(16))), mock_context()))
        chunks = await collect(engine.generate(req(list(range(10)), 100), mock_context()))
        assert len(tokens_of(chunks)) == 6  # 10 + 6 = 16 tokens of KV
    finally:
        await engine.cleanup()


async def test_lifecycle_errors_are_engine_shutdown() -> None:
    e = MockerEngine(**FAST)
    with pytest.raises(DynamoError) as info:
        await collect(e.generate(req([1]), mock_context()))
    assert info.value.kind is BackendError.EngineShutdown
    await e.start(1)
    with pytest.raises(DynamoError) as info:
        await e.start(1)
    assert info.value.kind is BackendError.EngineShutdown
    await e.cleanup()
    await e.cleanup()  # idempotent
    with pytest.raises(DynamoError) as info:
        await collect(e.generate(req([1]), mock_context()))
    assert info.value.kind is BackendError.EngineShutdown


async def test_cleanup_without_start_is_a_no_op() -> None:
    e = MockerEngine()
    await e.cleanup()
    assert e.kv_stats().used_blocks == 0


async def test_engine_config_reports_the_args() -> None:
    e = MockerEngine(
        model_name="m", num_gpu_blocks=100, block_size=8, max_num_seqs=3,
        max_num_batched_tokens=64, dp_size=2, context_length=512, speedup_ratio=0,
    )
    try:
        cfg = await e.start(9)
        cfg.validate()
        assert (cfg.model, cfg.served_model_name, cfg.context_length) == ("m", "m", 512)
        assert (cfg.kv_cache_block_size, cfg.total_kv_blocks) == (8, 100)
        assert (cfg.max_num_seqs, cfg.max_num_batched_tokens, cfg.data_parallel_size) == (3, 64, 2)
    finally:
        await e.cleanup()


# -- prefix caching and KV events ------------------------------------------------------------
async def test_stored_events_carry_router_block_hashes(engine: MockerEngine) -> None:
    events = Events()
    await events.attach(engine)
    prompt = list(range(100, 164))  # 4 full blocks
    await collect(engine.generate(req(prompt, 1), mock_context()))
    stored = events.stored()
    assert len(stored) == 1
    assert stored[0].parent_hash is None
    assert [b.block_hash for b in stored[0].blocks] == block_hashes(prompt, BS)
    assert [b.tokens_hash for b in stored[0].blocks] == local_block_hashes(prompt, BS)
    assert all(e.event.dp_rank == 0 and e.worker_id == 42 for e in events.by_rank[0])
    ids = [e.event.event_id for e in events.by_rank[0]]
    assert ids == list(range(len(ids)))


async def test_second_request_hits_the_prefix_cache_and_stores_nothing_new(
    engine: MockerEngine,
) -> None:
    events = Events()
    await events.attach(engine)
    prompt = list(range(1000, 1070))  # 4 full blocks + 6 tokens
    first = await collect(engine.generate(req(prompt, 4), mock_context()))
    n_events = len(events.by_rank[0])
    second = await collect(engine.generate(req(prompt, 4), mock_context()))
    u1, u2 = first[-1].completion_usage, second[-1].completion_usage
    assert u1 is not None and u2 is not None
    assert u1.prompt_tokens_details is not None and u2.prompt_tokens_details is not None
    assert u1.prompt_tokens_details.cached_tokens == 0
    assert u2.prompt_tokens_details.cached_tokens == 64
    # The shared blocks are not stored again (the output differs, so its blocks may be new).
    later = {b.block_hash for s in events.stored()[n_events:] for b in s.blocks}
    assert later.isdisjoint(block_hashes(prompt, BS))
    assert engine.scheduler().hit_rate == pytest.approx(64 / 140)


async def test_diverging_prompt_stores_its_new_blocks_after_the_shared_parent(
    engine: MockerEngine,
) -> None:
    events = Events()
    await events.attach(engine)
    a = list(range(64))
    b = a[:32] + list(range(500, 532))
    await collect(engine.generate(req(a, 1), mock_context()))
    await collect(engine.generate(req(b, 1), mock_context()))
    last = events.stored()[-1]
    hb = block_hashes(b, BS)
    assert last.parent_hash == block_hashes(a, BS)[1] == hb[1]
    assert [x.block_hash for x in last.blocks] == hb[2:]


async def test_decode_fills_and_publishes_blocks_continuing_the_chain(
    engine: MockerEngine,
) -> None:
    events = Events()
    await events.attach(engine)
    prompt = list(range(20))  # 1 full block + 4 tokens
    chunks = await collect(engine.generate(req(prompt, 30), mock_context()))
    full = prompt + tokens_of(chunks)  # 50 tokens; the last one's KV is never computed
    expected = block_hashes(full[:49], BS)  # 3 full blocks
    assert events.stored_hashes() == expected
    parents = [s.parent_hash for s in events.stored()]
    assert parents == [None, expected[0], expected[1]]


async def test_router_indexer_matches_what_the_mocker_cached(engine: MockerEngine) -> None:
    indexer = KvIndexer()
    for source in await engine.kv_event_sources():
        assert isinstance(source, PushKvEventSource)
        source.on_ready(KvEventPublisher(7, source.dp_rank, indexer.apply))
    prompt = list(range(3000, 3050))
    await collect(engine.generate(req(prompt, 1), mock_context()))
    assert indexer.find_matches(block_hashes(prompt, BS)) == {(7, 0): 3}


async def test_eviction_emits_removed_events_tail_first() -> None:
    e = await started(num_gpu_blocks=4, block_size=4)
    try:
        events = Events()
        await events.attach(e)
        a = list(range(12))  # 3 blocks
        await collect(e.generate(req(a, 1), mock_context()))
        assert e.kv_stats() == (0, 3, 1, 4)
        b = list(range(100, 112))  # needs 3 blocks: 1 free + 2 evicted
        await collect(e.generate(req(b, 1), mock_context()))
        ha = block_hashes(a, 4)
        assert events.removed() == [ha[2], ha[1]]  # a's tail is evicted first
        assert e.kv_manager().cached_hashes() == {ha[0], *block_hashes(b, 4)}
        assert e.kv_stats().used_blocks == 0
    finally:
        await e.cleanup()


async def test_preemption_under_a_tiny_cache_still_completes_every_request() -> None:
    e = await started(num_gpu_blocks=6, block_size=4, max_num_seqs=4)
    try:
        prompts = [[i] * 5 + list(range(i * 10, i * 10 + 3)) for i in range(4)]
        results = await asyncio.gather(
            *(collect(e.generate(req(p, 12), mock_context())) for p in prompts)
        )
        assert all(r[-1].finish_reason == FinishReason.LENGTH for r in results)
        assert all(len(tokens_of(r)) == 12 for r in results)
        assert e.scheduler().num_preemptions > 0
        assert e.kv_stats().used_blocks == 0
    finally:
        await e.cleanup()


async def test_no_prefix_caching_means_no_hits_and_no_events() -> None:
    e = await started(enable_prefix_caching=False)
    try:
        assert await e.kv_event_sources() == []
        prompt = list(range(64))
        for _ in range(2):
            chunks = await collect(e.generate(req(prompt, 2), mock_context()))
            u = chunks[-1].completion_usage
            assert u is not None and u.prompt_tokens_details is not None
            assert u.prompt_tokens_details.cached_tokens == 0
        assert e.kv_stats() == (0, 0, 16384, 16384)
    finally:
        await e.cleanup()


# -- cancellation and every exit path freeing blocks -----------------------------------------
async def test_cancellation_mid_stream_ends_cancelled_and_frees_blocks_at_once(
    engine: MockerEngine,
) -> None:
    ctx = mock_context()
    stream = engine.generate(req(list(range(64)), 1000), ctx)
    first = await anext(stream)
    assert first.finish_reason is None
    assert engine.kv_stats().used_blocks > 0
    ctx.stop_generating()
    assert engine.kv_stats().used_blocks == 0  # freed by the stop, before the stream resumes
    rest = await collect(stream)
    assert len(rest) == 1 and rest[0].finish_reason == FinishReason.CANCELLED
    u = rest[0].completion_usage
    assert u is not None and u.completion_tokens == len(tokens_of([first, *rest]))
    assert engine.num_active_requests() == 0


async def test_cancellation_is_prompt_with_real_pacing() -> None:
    # 1000 tokens at ~12 ms each would take 12 s: the stop must not wait for them.
    e = await started(speedup_ratio=1.0)
    try:
        ctx = mock_context()
        stream = e.generate(req(list(range(32)), 1000), ctx)
        await anext(stream)
        ctx.stop_generating()
        async with asyncio.timeout(2):
            rest = await collect(stream)
        assert rest[-1].finish_reason == FinishReason.CANCELLED
    finally:
        await e.cleanup()


async def test_consumer_dropping_the_stream_frees_blocks(engine: MockerEngine) -> None:
    stream = engine.generate(req(list(range(40)), 1000), mock_context())
    await anext(stream)
    assert engine.kv_stats().used_blocks > 0
    await stream.aclose()  # type: ignore[attr-defined]
    assert engine.kv_stats().used_blocks == 0
    assert engine.num_active_requests() == 0


async def test_abort_frees_blocks_and_ends_the_stream_cancelled(engine: MockerEngine) -> None:
    ctx = mock_context("to-abort")
    stream = engine.generate(req(list(range(40)), 1000), ctx)
    await anext(stream)
    await engine.abort(ctx.inner)
    assert engine.kv_stats().used_blocks == 0
    rest = await collect(stream)
    assert rest[-1].finish_reason == FinishReason.CANCELLED


async def test_request_cancelled_while_waiting_never_gets_blocks() -> None:
    e = await started(max_num_seqs=1)
    try:
        busy = e.generate(req(list(range(16)), 1000), mock_context())
        await anext(busy)
        ctx = SignalingContext()
        queued = e.generate(req(list(range(100, 116)), 10), ctx.gen)
        task = asyncio.ensure_future(collect(queued))
        await ctx.attached.wait()  # the request is queued behind `busy`
        assert e.num_active_requests() == 2 and e.scheduler().waiting
        ctx.stop_generating()
        out = await task
        assert out[-1].finish_reason == FinishReason.CANCELLED
        u = out[-1].completion_usage
        assert u is not None and u.completion_tokens == 0 and u.prompt_tokens_details is None
        await busy.aclose()  # type: ignore[attr-defined]
        assert e.kv_stats().used_blocks == 0
    finally:
        await e.cleanup()


async def test_cleanup_ends_live_streams_cancelled_and_stops_the_loop() -> None:
    e = await started()
    ctx = mock_context()
    stream = e.generate(req(list(range(16)), 1000), ctx)
    await anext(stream)
    await e.cleanup()
    assert ctx.is_stopped()
    rest = await collect(stream)
    assert rest[-1].finish_reason == FinishReason.CANCELLED
    assert all(r.task is None for r in e._ranks)
    assert e.kv_stats().used_blocks == 0


async def test_drain_waits_for_running_requests(engine: MockerEngine) -> None:
    ctxs = [SignalingContext() for _ in range(5)]
    tasks = [
        asyncio.ensure_future(collect(engine.generate(req([i] * 20, 20), c.gen)))
        for i, c in enumerate(ctxs)
    ]
    for c in ctxs:
        await c.attached.wait()
    assert engine.num_active_requests() == 5
    await asyncio.wait_for(engine.drain(), 5)
    assert engine.num_active_requests() == 0
    results = await asyncio.gather(*tasks)
    assert [len(tokens_of(r)) for r in results] == [20] * 5


# -- data-parallel ranks and snapshots -------------------------------------------------------
async def test_dp_ranks_have_their_own_cache_and_events() -> None:
    e = await started(dp_size=2)
    try:
        sources = await e.kv_event_sources()
        assert [s.dp_rank for s in sources] == [0, 1]
        assert [s.dp_rank for s in await e.kv_event_sources()] == [0, 1]
        events = Events()
        await events.attach(e)
        prompt = list(range(32))
        await collect(e.generate(req(prompt, 1, dp_rank=1), mock_context()))
        assert events.by_rank[0] == []
        assert events.stored_hashes(1) == block_hashes(prompt, BS)
        # Unrouted requests spread over the (idle) ranks in rotation.
        await collect(e.generate(req(list(range(50, 82)), 1), mock_context()))
        await collect(e.generate(req(list(range(90, 122)), 1), mock_context()))
        assert events.by_rank[0] and len(events.by_rank[1]) == 2
        for rank, evs in events.by_rank.items():
            assert all(ev.event.dp_rank == rank for ev in evs)
        assert e.kv_stats(0).cached_blocks == 2 and e.kv_stats(1).cached_blocks == 4
    finally:
        await e.cleanup()


def metrics_ctx() -> MetricsCtx:
    return MetricsCtx(model="m", component="c", model_load_time_seconds=0.0,
                      metrics=EngineMetrics())


async def test_snapshots_follow_usage_and_hit_rate() -> None:
    e = await started(dp_size=2, snapshot_interval_ms=0)
    try:
        bindings = await e.setup_metrics(metrics_ctx())
        assert bindings.dp_ranks == [0, 1] and bindings.on_publisher_ready is not None
        snaps: list[ComponentSnapshot] = []
        bindings.on_publisher_ready(SnapshotPublisher([0, 1], snaps.append))
        assert [(s.dp_rank, s.kv_used_blocks, s.kv_cache_hit_rate) for s in snaps] == [
            (0, 0, None),
            (1, 0, None),
        ]
        prompt = list(range(64))
        await collect(e.generate(req(prompt, 8, dp_rank=1), mock_context()))
        rank1 = [s for s in snaps if s.dp_rank == 1]
        assert max(s.kv_used_blocks for s in rank1) >= 5
        assert rank1[-1].kv_used_blocks == 0 and rank1[-1].kv_cache_hit_rate == 0.0
        assert all(s.kv_total_blocks == 16384 for s in snaps)
        busiest = max(rank1, key=lambda s: s.kv_used_blocks)
        assert busiest.gpu_cache_usage == pytest.approx(busiest.kv_used_blocks / 16384)
        await collect(e.generate(req(prompt, 8, dp_rank=1), mock_context()))
        assert [s for s in snaps if s.dp_rank == 1][-1].kv_cache_hit_rate == pytest.approx(
            48 / 128
        )
        assert all(s.kv_cache_hit_rate is None for s in snaps if s.dp_rank == 0)
    finally:
        await e.cleanup()


async def test_snapshots_are_throttled_and_the_last_change_still_arrives() -> None:
    e = await started(snapshot_interval_ms=100)
    try:
        bindings = await e.setup_metrics(metrics_ctx())
        snaps: list[ComponentSnapshot] = []
        settled = asyncio.Event()

        def sink(s: ComponentSnapshot) -> None:
            snaps.append(s)
            if s.kv_used_blocks == 0 and s.kv_cache_hit_rate is not None:
                settled.set()

        assert bindings.on_publisher_ready is not None
        bindings.on_publisher_ready(SnapshotPublisher([0], sink))
        await collect(e.generate(req(list(range(64)), 50), mock_context()))
        steps = e.scheduler().num_steps
        async with asyncio.timeout(5):
            await settled.wait()  # published when the throttle interval ends
        assert len(snaps) < steps  # 51 steps changed usage; the throttle coalesced them
    finally:
        await e.cleanup()


async def test_an_unchanged_snapshot_is_republished_on_the_heartbeat() -> None:
    e = await started(snapshot_heartbeat_ms=20)
    try:
        bindings = await e.setup_metrics(metrics_ctx())
        snaps: list[ComponentSnapshot] = []
        three = asyncio.Event()

        def sink(s: ComponentSnapshot) -> None:
            snaps.append(s)
            if len(snaps) >= 3:
                three.set()

        assert bindings.on_publisher_ready is not None
        bindings.on_publisher_ready(SnapshotPublisher([0], sink))
        async with asyncio.timeout(5):
            await three.wait()  # the initial snapshot, then heartbeats of the idle rank
        assert len(set(snaps)) == 1 and snaps[0].kv_used_blocks == 0
    finally:
        await e.cleanup()

    quiet = await started(snapshot_heartbeat_ms=0)
    try:
        qb = await quiet.setup_metrics(metrics_ctx())
        assert qb.on_publisher_ready is not None
        qb.on_publisher_ready(SnapshotPublisher([0], lambda s: None))
        rank = quiet._ranks[0]
        assert rank._snapshot_delay(1e9) is None  # no heartbeat: an idle rank stays silent
    finally:
        await quiet.cleanup()


# -- timing ----------------------------------------------------------------------------------
def test_cost_model_formula() -> None:
    c = CostModel(
        prefill_base_ms=5, prefill_ms_per_token=0.1, prefill_ms_per_token_sq=0.001,
        decode_base_ms=10, decode_ms_per_seq=0.5,
    )
    assert c.step_ms(0, 0, 0) == 0
    assert c.step_ms(100, 100 * 100, 0) == pytest.approx(5 + 10 + 10)
    assert c.step_ms(0, 0, 4) == pytest.approx(10 + 2)
    assert c.step_ms(100, 10_000, 4) == pytest.approx(25 + 12)
    d = CostModel()
    assert 10 <= d.step_ms(0, 0, 1) <= 20  # a decode step at small batch


async def test_step_durations_follow_the_cost_model(engine: MockerEngine) -> None:
    await collect(engine.generate(req(list(range(40)), 4), mock_context()))
    c = CostModel()
    steps = engine.step_stats()
    assert [(s.prefill_tokens, s.decode_seqs) for s in steps] == [(40, 0), (0, 1), (0, 1), (0, 1)]
    assert steps[0].duration_s == pytest.approx(c.step_ms(40, 1600, 0) / 1000)
    assert steps[1].duration_s == pytest.approx(c.step_ms(0, 0, 1) / 1000)
    assert engine.scheduler().sim_time_s == pytest.approx(sum(s.duration_s for s in steps))


async def test_decode_steps_batch_concurrent_requests(engine: MockerEngine) -> None:
    await asyncio.gather(
        *(collect(engine.generate(req([i] * 8, 10), mock_context())) for i in range(4))
    )
    steps = engine.step_stats()
    assert max(s.decode_seqs for s in steps) == 4
    assert len(steps) < 4 * 10  # shared steps, not one per request per token


async def test_chunked_prefill_splits_long_prompts_over_the_budget() -> None:
    e = await started(max_num_batched_tokens=32)
    try:
        await collect(e.generate(req(list(range(100)), 2), mock_context()))
        assert [s.prefill_tokens for s in e.step_stats()][:4] == [32, 32, 32, 4]
    finally:
        await e.cleanup()
    e = await started(max_num_batched_tokens=32, enable_chunked_prefill=False)
    try:
        with pytest.raises(DynamoError) as info:
            await collect(e.generate(req(list(range(100)), 2), mock_context()))
        assert info.value.kind is BackendError.InvalidArgument
    finally:
        await e.cleanup()


async def test_speedup_ratio_scales_wall_time_from_the_simulated_clock() -> None:
    # Lower bound only: pacing never runs ahead of simulated_time / speedup.
    e = await started(speedup_ratio=20.0)
    try:
        t0 = time.perf_counter()
        await collect(e.generate(req(list(range(16)), 24), mock_context()))
        wall = time.perf_counter() - t0
        sim = e.scheduler().sim_time_s
        assert sim > 0.25  # 24 steps of >= 12 ms
        assert wall >= 0.8 * sim / 20
    finally:
        await e.cleanup()


# -- scheduler unit checks -------------------------------------------------------------------
def test_scheduler_admits_fcfs_within_max_num_seqs() -> None:
    kv = KvManager(64, 4)
    sched = Scheduler(kv, SchedulerConfig(max_num_seqs=2), check_invariants=True)
    seqs = [
        Sequence(f"r{i}", [i] * 6, StopRules(max_tokens=3, max_len=256), block_size=4, seed=i,
                 vocab_size=100)
        for i in range(3)
    ]
    for s in seqs:
        sched.add(s)
    sched.step()
    assert [s.request_id for s in sched.running] == ["r0", "r1"]
    while sched.has_work():
        sched.step()
    assert all(s.finish_reason == FinishReason.LENGTH and len(s.outbox) == 3 for s in seqs)
    assert kv.stats().used_blocks == 0


# -- CLI -------------------------------------------------------------------------------------
def test_from_args_parses_every_flag() -> None:
    e = MockerEngine.from_args([
        "--model-name", "x", "--num-gpu-blocks", "10", "--block-size", "8",
        "--max-num-seqs", "3", "--max-num-batched-tokens", "99", "--speedup-ratio", "0",
        "--dp-size", "2", "--max-tokens", "7", "--vocab-size", "11", "--context-length", "64",
        "--no-enable-prefix-caching", "--no-enable-chunked-prefill", "--eos-rate", "0.5",
        "--seed", "3", "--snapshot-interval-ms", "5", "--decode-base-ms", "1",
        "--decode-ms-per-seq", "2", "--prefill-base-ms", "3", "--prefill-ms-per-token", "4",
        "--prefill-ms-per-token-sq", "5",
    ])
    a = e.args
    assert (a.model_name, a.num_gpu_blocks, a.block_size, a.max_num_seqs) == ("x", 10, 8, 3)
    assert (a.max_num_batched_tokens, a.speedup_ratio, a.dp_size, a.max_tokens) == (99, 0, 2, 7)
    assert (a.vocab_size, a.context_length, a.eos_rate, a.seed) == (11, 64, 0.5, 3)
    assert not a.enable_prefix_caching and not a.enable_chunked_prefill
    assert a.cost_model() == CostModel(3, 4, 5, 1, 2)
    assert e.dp_size == 2 and MockerArgs.from_args([]) == MockerArgs()


def test_help_explains_the_flags(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        MockerArgs.from_args(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--num-gpu-blocks", "--speedup-ratio", "--dp-size", "--decode-base-ms"):
        assert flag in out


def test_bad_flags_exit_with_a_message(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        MockerArgs.from_args(["--block-size", "0"])
    assert "block_size must be positive" in capsys.readouterr().err
    with pytest.raises(DynamoError) as info:
        MockerArgs(speedup_ratio=-1)
    assert info.value.kind is BackendError.InvalidArgument


# -- conformance -----------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs", [{}, {"dp_size": 2}, {"speedup_ratio": 50.0}])
async def test_conformance(kwargs: dict[str, Any]) -> None:
    report = await run_conformance(lambda: MockerEngine(**{**FAST, **kwargs}))
    assert report.ok, str(report)
    assert not report.skipped
