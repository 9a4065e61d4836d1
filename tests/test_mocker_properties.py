"""Property tests of the mocker's KV accounting: random request mixes with shared prefixes, random
cancellations and drops, and tiny caches that force eviction and preemption must always

- end with zero used blocks (every block free or cached-evictable),
- never drive a refcount negative (the managers check their invariants after every operation),
- publish KV events that, replayed, give exactly the set of hashed blocks in the cache.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass

from hypothesis import HealthCheck, event, given, settings, target
from hypothesis import strategies as st

from dynamo_backend_common import FinishReason, PreprocessedRequest, StopConditions
from dynamo_backend_common.engine import GenerateContext, PushKvEventSource
from dynamo_backend_common.engines.mocker import (
    KvManager,
    MockerEngine,
    Scheduler,
    SchedulerConfig,
    Sequence,
    StopRules,
)
from dynamo_backend_common.protocols.kv import (
    KvCleared,
    KvEventData,
    KvRemoved,
    KvStored,
    RouterEvent,
)
from dynamo_backend_common.runtime.context import Context
from dynamo_backend_common.runtime.publishers import KvEventPublisher

PROPS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


class Replay:
    """The cache contents as a subscriber sees them; rejects impossible event sequences."""

    def __init__(self) -> None:
        self.blocks: set[int] = set()
        self.removals = 0

    def apply(self, data: KvEventData) -> None:
        if isinstance(data, KvStored):
            for b in data.blocks:
                assert b.block_hash not in self.blocks, "stored twice without a removal"
                self.blocks.add(b.block_hash)
        elif isinstance(data, KvRemoved):
            for h in data.block_hashes:
                assert h in self.blocks, "removed a block that was never stored"
                self.blocks.remove(h)
                self.removals += 1
        else:
            assert isinstance(data, KvCleared)
            self.blocks.clear()

    def apply_router_event(self, event: RouterEvent) -> None:
        self.apply(event.event.data)


# A few shared "system prompts" so random requests really share prefixes.
BASES = [[7] * 40, list(range(40)), [3, 1, 4, 1, 5, 9, 2, 6] * 5]


@st.composite
def prompts(draw: st.DrawFn, max_len: int) -> list[int]:
    base = BASES[draw(st.integers(0, len(BASES) - 1))]
    # Mostly prompts well under the capacity, so several sequences run and grow together.
    longest = draw(st.sampled_from([max_len // 3, max_len // 2, max_len - 1]))
    shared = draw(st.integers(0, min(len(base), longest)))
    tail = draw(st.lists(st.integers(0, 5), max_size=max(0, min(8, longest - shared))))
    prompt = base[:shared] + tail
    return prompt or [1]


@dataclass
class Cache:
    num_blocks: int
    block_size: int
    max_num_seqs: int
    budget: int
    chunked: bool

    @property
    def max_len(self) -> int:
        return self.num_blocks * self.block_size


caches = st.builds(
    Cache,
    num_blocks=st.integers(3, 12),
    block_size=st.integers(1, 4),
    max_num_seqs=st.integers(1, 6),
    budget=st.integers(4, 24),
    chunked=st.booleans(),
)


# -- scheduler level: synchronous, every interleaving of add / step / remove -----------------
@PROPS
@given(cache=caches, data=st.data())
def test_scheduler_accounting_and_events_match(cache: Cache, data: st.DataObject) -> None:
    replay = Replay()
    kv = KvManager(cache.num_blocks, cache.block_size, sink=replay.apply)
    sched = Scheduler(
        kv,
        SchedulerConfig(
            max_num_seqs=cache.max_num_seqs,
            max_num_batched_tokens=cache.budget,
            chunked_prefill=cache.chunked,
        ),
        check_invariants=True,
    )
    live: list[Sequence] = []
    finished: list[Sequence] = []
    removed: set[int] = set()
    ops = data.draw(
        st.lists(
            st.sampled_from(["add", "add", "step", "step", "step", "remove"]),
            min_size=8,
            max_size=60,
        )
    )
    for i, op in enumerate(ops):
        if op == "add":
            prompt = data.draw(prompts(cache.max_len))
            if not cache.chunked and len(prompt) > cache.budget:
                continue  # the engine rejects these up front
            seq = Sequence(
                f"r{i}",
                prompt,
                StopRules(max_tokens=data.draw(st.integers(1, 24)), max_len=cache.max_len),
                block_size=cache.block_size,
                seed=i,
                vocab_size=1000,
            )
            sched.add(seq)
            live.append(seq)
        elif op == "step":
            finished += sched.apply(sched.schedule())
        elif live:
            victim = live[data.draw(st.integers(0, len(live) - 1))]
            if sched.remove(victim):
                removed.add(id(victim))
        assert all(refs >= 0 for refs in kv._blocks.values())
    # Run what is left to completion (bounded: every step makes progress).
    for _ in range(10_000):
        if not sched.has_work():
            break
        finished += sched.apply(sched.schedule())
    assert not sched.has_work()
    target(float(sched.num_preemptions), label="preemptions")  # steer towards pressure
    event(f"preempted: {sched.num_preemptions > 0}")
    event(f"evicted: {replay.removals > 0}")
    assert kv.stats().used_blocks == 0
    assert kv.private_blocks == 0
    assert replay.blocks == kv.cached_hashes()
    for seq in finished:
        assert id(seq) not in removed
        expected = min(seq.rules.max_tokens, cache.max_len - seq.prompt_len)
        assert seq.finish_reason == FinishReason.LENGTH
        assert len(seq.outbox) == expected


# -- engine level: concurrent streams, random stops, drops and aborts ------------------------
@dataclass
class Plan:
    prompt: list[int]
    max_tokens: int
    #: What the consumer does after ``after`` chunks: read on, stop ctx, drop, or abort.
    action: str
    after: int


def plans(max_len: int) -> st.SearchStrategy[Plan]:
    return st.builds(
        Plan,
        prompt=prompts(max_len),
        max_tokens=st.integers(1, 24),
        action=st.sampled_from(["finish", "finish", "stop", "drop", "abort"]),
        after=st.integers(1, 3),
    )


async def consume(engine: MockerEngine, plan: Plan, i: int) -> FinishReason | None:
    ctx = GenerateContext(Context(f"req-{i}"))
    request = PreprocessedRequest(
        token_ids=plan.prompt, stop_conditions=StopConditions(max_tokens=plan.max_tokens)
    )
    stream = engine.generate(request, ctx)
    n = 0
    last: FinishReason | None = None
    try:
        async for chunk in stream:
            last = chunk.finish_reason
            n += 1
            if n == plan.after and last is None:
                if plan.action == "stop":
                    ctx.stop_generating()
                elif plan.action == "drop":
                    return None
                elif plan.action == "abort":
                    ctx.stop_generating()
                    await engine.abort(ctx.inner)
    finally:
        await stream.aclose()  # type: ignore[attr-defined]
    return last


async def run_engine(cache: Cache, dp_size: int, batch: list[Plan]) -> None:
    engine = MockerEngine(
        num_gpu_blocks=cache.num_blocks,
        block_size=cache.block_size,
        max_num_seqs=cache.max_num_seqs,
        max_num_batched_tokens=cache.budget,
        enable_chunked_prefill=True,
        context_length=cache.max_len,
        dp_size=dp_size,
        speedup_ratio=0,
        check_invariants=True,
    )
    replays = [Replay() for _ in range(dp_size)]
    for source in await engine.kv_event_sources():
        assert isinstance(source, PushKvEventSource)
        sink: Callable[[RouterEvent], None] = replays[source.dp_rank].apply_router_event
        source.on_ready(KvEventPublisher(1, source.dp_rank, sink))
    await engine.start(1)
    try:
        ends = await asyncio.wait_for(
            asyncio.gather(*(consume(engine, p, i) for i, p in enumerate(batch))), 20
        )
        for plan, end in zip(batch, ends, strict=True):
            if plan.action == "finish":
                assert end == FinishReason.LENGTH
            elif plan.action in ("stop", "abort") and end is not None:
                assert end in (FinishReason.CANCELLED, FinishReason.LENGTH)
        assert engine.num_active_requests() == 0
        event(f"preempted: {any(engine.scheduler(r).num_preemptions for r in range(dp_size))}")
        event(f"evicted: {any(r.removals for r in replays)}")
        event(f"cancelled: {FinishReason.CANCELLED in ends}")
        for rank in range(dp_size):
            kv = engine.kv_manager(rank)
            kv.check_invariants()
            assert engine.kv_stats(rank).used_blocks == 0
            assert replays[rank].blocks == kv.cached_hashes()
    finally:
        await engine.cleanup()


@PROPS
@given(cache=caches, dp_size=st.integers(1, 2), data=st.data())
def test_engine_streams_free_every_block_and_events_match(
    cache: Cache, dp_size: int, data: st.DataObject
) -> None:
    batch = data.draw(st.lists(plans(cache.max_len), min_size=1, max_size=10))
    asyncio.run(run_engine(cache, dp_size, batch))
