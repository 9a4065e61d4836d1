"""The engine contract's helpers and defaults (the seed's unit tests, ported, and more)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from types import MappingProxyType

import pytest

from dynamo_backend_common import (
    HEALTH_CHECK_KEY,
    ComponentSnapshot,
    DynamoError,
    EngineConfig,
    EngineMetrics,
    FinishReason,
    GenerateContext,
    KvEventPublisher,
    LLMEngine,
    LLMEngineOutput,
    MetricsBindings,
    MetricsCtx,
    PreprocessedRequest,
    PushKvEventSource,
    SnapshotPublisher,
    ZmqKvEventSource,
    chunk,
    usage,
)
from dynamo_backend_common.errors import BackendError
from dynamo_backend_common.protocols import U32_MAX, KvCleared, RouterEvent
from dynamo_backend_common.testing import mock_context


# -- the seed's four tests --------------------------------------------------------------------
def test_chunk_token_sets_only_token_ids() -> None:
    c = chunk.token(42)
    assert c.token_ids == [42]
    assert c.finish_reason is None
    assert c.completion_usage is None
    assert c == LLMEngineOutput(token_ids=[42])  # nothing else set


def test_ext_with_tokens_and_with_usage() -> None:
    terminal = LLMEngineOutput.length().with_tokens([1, 2, 3]).with_usage(usage(10, 3))
    assert terminal.token_ids == [1, 2, 3]
    assert terminal.finish_reason == FinishReason.LENGTH
    assert terminal.completion_usage is not None
    assert terminal.completion_usage.total_tokens == 13


def test_usage_sums_totals() -> None:
    assert usage(7, 11).total_tokens == 18


def test_usage_saturates_on_overflow() -> None:
    u = usage(U32_MAX, 10)
    assert u.total_tokens == U32_MAX
    assert (u.prompt_tokens, u.completion_tokens) == (U32_MAX, 10)


# -- output helpers ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (LLMEngineOutput.stop, FinishReason.STOP),
        (LLMEngineOutput.length, FinishReason.LENGTH),
        (LLMEngineOutput.cancelled, FinishReason.CANCELLED),
    ],
)
def test_terminal_constructors(make: type[LLMEngineOutput], reason: FinishReason) -> None:
    out = make()  # type: ignore[call-arg]
    assert out.finish_reason == reason and out.is_terminal
    assert out.token_ids == [] and out.completion_usage is None


def test_error_constructor_carries_the_message() -> None:
    out = LLMEngineOutput.error("engine fell over")
    assert out.finish_reason is not None and out.finish_reason.is_error
    assert out.finish_reason.message == "engine fell over" and out.is_terminal


def test_with_helpers_return_new_objects() -> None:
    base = LLMEngineOutput.stop()
    with_tokens = base.with_tokens([5])
    with_usage = with_tokens.with_usage(usage(1, 1))
    assert with_tokens is not base and with_usage is not with_tokens
    assert base.token_ids == [] and base.completion_usage is None  # original untouched
    assert with_tokens.completion_usage is None
    assert with_usage.token_ids == [5] and with_usage.finish_reason == FinishReason.STOP
    ids = [9]
    copied = base.with_tokens(ids)
    ids.append(10)
    assert copied.token_ids == [9]  # the list is copied, not aliased


def test_chunk_tokens_helper() -> None:
    assert chunk.tokens(iter([1, 2])).token_ids == [1, 2]


def test_usage_rejects_negative_counts() -> None:
    with pytest.raises(ValueError):
        usage(-1, 0)


def test_health_check_key() -> None:
    assert HEALTH_CHECK_KEY == "_HEALTH_CHECK"


# -- LLMEngine defaults -----------------------------------------------------------------------
class MinimalEngine(LLMEngine):
    async def start(self, worker_id: int) -> EngineConfig:
        return EngineConfig(model="m")

    async def generate(
        self, request: PreprocessedRequest, ctx: GenerateContext
    ) -> AsyncIterator[LLMEngineOutput]:
        yield LLMEngineOutput.stop()

    async def cleanup(self) -> None:
        return None


def test_engine_requires_start_generate_cleanup() -> None:
    class Incomplete(LLMEngine):
        async def start(self, worker_id: int) -> EngineConfig:
            return EngineConfig(model="m")

    with pytest.raises(TypeError, match="abstract"):
        Incomplete()  # type: ignore[abstract]


async def test_engine_defaults_match_the_seed() -> None:
    engine = MinimalEngine()
    await engine.abort(mock_context().inner)  # no-op defaults: they must not raise
    await engine.drain()
    assert await engine.kv_event_sources() == []
    metrics_ctx = MetricsCtx(
        model="m", component="c", model_load_time_seconds=0.1, metrics=EngineMetrics()
    )
    bindings = await engine.setup_metrics(metrics_ctx)
    assert isinstance(bindings, MetricsBindings)
    assert bindings.dp_ranks == [] and bindings.on_publisher_ready is None
    assert await engine.health_check_payload() is None
    assert await engine.supported_controls() == []
    assert await engine.engine_control("flush_cache", {"x": 1}) == {
        "status": "error",
        "message": "unsupported engine control: flush_cache",
    }


# -- GenerateContext --------------------------------------------------------------------------
async def test_notify_first_token_is_idempotent_in_decode_mode() -> None:
    ctx = mock_context(decode=True)
    event = ctx._first_token
    assert isinstance(event, asyncio.Event) and not event.is_set()
    ctx.notify_first_token()
    ctx.notify_first_token()
    assert event.is_set() and ctx.is_decode


async def test_notify_first_token_is_a_noop_off_decode() -> None:
    ctx = mock_context()
    ctx.notify_first_token()  # must not raise
    assert not ctx.is_decode


def test_metadata_is_read_only_and_a_copy() -> None:
    source = {"traceparent": "00-abc"}
    ctx = mock_context(metadata=source)
    source["traceparent"] = "changed"
    assert ctx.metadata == {"traceparent": "00-abc"}
    assert isinstance(ctx.metadata, MappingProxyType)
    with pytest.raises(TypeError):
        ctx.metadata["x"] = "y"  # type: ignore[index]


async def test_generate_context_delegates_to_the_runtime_context() -> None:
    ctx = mock_context("r-1")
    assert ctx.id == "r-1" == ctx.inner.id
    ctx.stop_generating()
    assert ctx.inner.is_stopped() and ctx.is_stopped() and not ctx.is_killed()
    await asyncio.wait_for(ctx.stopped(), 1.0)
    ctx.kill()
    assert ctx.inner.is_killed() and ctx.is_killed()
    await asyncio.wait_for(ctx.killed(), 1.0)


# -- EngineConfig -----------------------------------------------------------------------------
def test_engine_config_defaults() -> None:
    cfg = EngineConfig(model="org/model")
    assert cfg.served_model_name is None and cfg.context_length is None
    assert cfg.kv_cache_block_size is None and cfg.total_kv_blocks is None
    assert cfg.data_parallel_size is None and cfg.bootstrap_host is None
    assert cfg.runtime_data == {} and cfg.runtime_data is not EngineConfig(model="x").runtime_data
    assert cfg.display_name == "org/model"
    assert EngineConfig(model="m", served_model_name="pub").display_name == "pub"
    cfg.validate()  # a minimal config is valid


def test_engine_config_validate_lists_every_problem() -> None:
    cfg = EngineConfig(
        model=" ",
        context_length=0,
        data_parallel_start_rank=-1,
        bootstrap_host="h",
        kv_cache_block_size=-16,
    )
    with pytest.raises(DynamoError) as info:
        cfg.validate()
    assert info.value.kind is BackendError.InvalidArgument
    for word in ("model", "context_length", "kv_cache_block_size", "start_rank", "bootstrap"):
        assert word in info.value.message


def test_engine_config_validate_rejects_bad_port() -> None:
    with pytest.raises(DynamoError, match="bootstrap_port"):
        EngineConfig(model="m", bootstrap_host="h", bootstrap_port=70000).validate()
    EngineConfig(model="m", bootstrap_host="h", bootstrap_port=8998).validate()


# -- KV event sources -------------------------------------------------------------------------
def test_kv_event_sources_expose_dp_rank() -> None:
    zmq = ZmqKvEventSource("tcp://127.0.0.1:5557", "kv", dp_rank=2)
    push = PushKvEventSource(lambda publisher: None, dp_rank=3)
    assert [s.dp_rank for s in (zmq, push)] == [2, 3]
    assert ZmqKvEventSource("tcp://x").dp_rank == 0
    assert "dp_rank=2" in repr(zmq) and "dp_rank=3" in repr(push)


# -- publishers -------------------------------------------------------------------------------
async def test_kv_event_ids_start_at_zero_and_increase() -> None:
    events: list[RouterEvent] = []
    loop = asyncio.get_running_loop()
    pub = KvEventPublisher(worker_id=7, dp_rank=1, sink=events.append, loop=loop)
    pub.publish_stored([11, 12], parent_hash=10)
    pub.publish_removed([11])
    pub.publish_cleared()
    assert [e.event.event_id for e in events] == [0, 1, 2]
    assert {(e.worker_id, e.event.dp_rank) for e in events} == {(7, 1)}
    assert isinstance(events[2].event.data, KvCleared)


async def test_kv_events_from_a_thread_hop_onto_the_loop_in_order() -> None:
    n = 200
    loop = asyncio.get_running_loop()
    loop_thread = threading.get_ident()
    events: list[RouterEvent] = []
    threads_seen: set[int] = set()
    all_in = asyncio.Event()

    def sink(event: RouterEvent) -> None:
        threads_seen.add(threading.get_ident())
        events.append(event)
        if len(events) == n:
            all_in.set()

    pub = KvEventPublisher(worker_id=1, dp_rank=0, sink=sink, loop=loop)

    def producer() -> None:
        for i in range(n):
            pub.publish_removed([i])

    thread = threading.Thread(target=producer)
    thread.start()
    await asyncio.wait_for(all_in.wait(), 5.0)
    thread.join()
    assert threads_seen == {loop_thread}
    assert [e.event.event_id for e in events] == list(range(n))
    assert [e.event.data.block_hashes for e in events] == [[i] for i in range(n)]  # type: ignore[union-attr]


async def test_closed_publisher_drops_events() -> None:
    events: list[RouterEvent] = []
    pub = KvEventPublisher(0, 0, events.append, loop=asyncio.get_running_loop())
    pub.close()
    pub.publish_cleared()
    assert events == []


async def test_snapshot_publisher_rejects_undeclared_ranks() -> None:
    seen: list[ComponentSnapshot] = []
    pub = SnapshotPublisher([0, 1], seen.append, loop=asyncio.get_running_loop())
    with pytest.raises(ValueError, match="dp_rank 5"):
        pub.publish(5, ComponentSnapshot(kv_used_blocks=1))
    assert seen == []
    pub.publish(1, ComponentSnapshot(kv_used_blocks=3, kv_total_blocks=10, dp_rank=0))
    # The snapshot is stamped with the rank it was published for.
    assert seen == [ComponentSnapshot(kv_used_blocks=3, kv_total_blocks=10, dp_rank=1)]
    assert seen[0].kv_cache_hit_rate is None  # tri-state: "not measured"


async def test_notify_first_token_from_a_thread_wakes_the_loop() -> None:
    from dynamo_backend_common import Context, GenerateContext

    first = asyncio.Event()
    gctx = GenerateContext(Context(), first)
    t = threading.Thread(target=gctx.notify_first_token)
    t.start()
    await asyncio.wait_for(first.wait(), 5)
    t.join(5)
    assert first.is_set() and gctx.is_decode
