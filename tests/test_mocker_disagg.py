"""The mocker's disaggregated roles: prefill holds + transfer server, decode pulls.

Two (or more) ``MockerEngine`` instances in one process, real TCP sockets on 127.0.0.1; every
wait is on an event (``KvTransferServer.wait_until``, task completion) with a timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import msgspec
import pytest

from dynamo_backend_common import (
    DynamoError,
    FinishReason,
    GenerateContext,
    LLMEngineOutput,
    MetricsCtx,
    PreprocessedRequest,
    PushKvEventSource,
    StopConditions,
)
from dynamo_backend_common.engines.mocker import KvManager, MockerArgs, MockerEngine
from dynamo_backend_common.engines.mocker.disagg import KvTransferServer
from dynamo_backend_common.errors import BackendError
from dynamo_backend_common.kv.hashing import block_hashes
from dynamo_backend_common.protocols.common import BootstrapInfo, PrefillResult
from dynamo_backend_common.protocols.kv import RouterEvent
from dynamo_backend_common.runtime.context import Context
from dynamo_backend_common.runtime.metrics import EngineMetrics
from dynamo_backend_common.runtime.publishers import KvEventPublisher
from dynamo_backend_common.testing import mock_context
from dynamo_backend_common.worker.config import DisaggregationMode

BS = 16
FAST: dict[str, Any] = {"speedup_ratio": 0, "check_invariants": True}
# Real pacing for the transfer only: steps cost nothing, a block takes 100 ms to transfer.
SLOW_TRANSFER: dict[str, Any] = {
    "speedup_ratio": 1.0, "check_invariants": True, "kv_transfer_ms_per_block": 100.0,
    "prefill_base_ms": 0.0, "prefill_ms_per_token": 0.0, "prefill_ms_per_token_sq": 0.0,
    "decode_base_ms": 0.0, "decode_ms_per_seq": 0.0,
}
WAIT = 5.0
PROMPT = list(range(100, 140))  # 2 full blocks + a partial one


def req(
    tokens: list[int],
    max_tokens: int | None = 8,
    *,
    params: Any = None,
    bootstrap: BootstrapInfo | None = None,
    **stop: Any,
) -> PreprocessedRequest:
    return PreprocessedRequest(
        token_ids=tokens,
        stop_conditions=StopConditions(max_tokens=max_tokens, **stop),
        prefill_result=None if params is None else PrefillResult(disaggregated_params=params),
        bootstrap_info=bootstrap,
    )


async def collect(stream: AsyncIterator[LLMEngineOutput]) -> list[LLMEngineOutput]:
    return [c async for c in stream]


def tokens_of(chunks: list[LLMEngineOutput]) -> list[int]:
    return [t for c in chunks for t in c.token_ids]


@contextlib.asynccontextmanager
async def engines(*configs: dict[str, Any]) -> AsyncIterator[list[MockerEngine]]:
    """Started engines, one per config (``FAST`` underneath), cleaned up at the end."""
    started: list[MockerEngine] = []
    try:
        for cfg in configs:
            e = MockerEngine(**{**FAST, **cfg})
            await e.start(len(started) + 1)
            started.append(e)
        yield started
    finally:
        for e in started:
            await e.cleanup()


PREFILL: dict[str, Any] = {"disaggregation_mode": "prefill"}
DECODE: dict[str, Any] = {"disaggregation_mode": "decode"}


def server(e: MockerEngine) -> KvTransferServer:
    assert e.transfer_server is not None
    return e.transfer_server


async def prefill_params(e: MockerEngine, prompt: list[int] = PROMPT) -> dict[str, Any]:
    chunks = await collect(e.generate(req(prompt, 8), mock_context()))
    params = chunks[-1].disaggregated_params
    assert isinstance(params, dict)
    return params


def prefill_tokens(e: MockerEngine) -> int:
    return sum(s.prefill_tokens for s in e.step_stats())


def kv_sink(e: MockerEngine, on_event: Callable[[RouterEvent], None]) -> None:
    """Route rank 0's KV events to ``on_event`` (as the worker would hand a publisher)."""
    source = e._sources[0]
    assert isinstance(source, PushKvEventSource)
    source.on_ready(KvEventPublisher(1, 0, on_event))


# -- standard path ----------------------------------------------------------------------------
async def test_standard_path_end_to_end() -> None:
    async with engines(PREFILL, DECODE) as (prefill, decode):
        chunks = await collect(prefill.generate(req(PROMPT, 8), mock_context()))
        # The prefill: one token, length, usage, and the handle of a hold.
        assert tokens_of(chunks) == chunks[-1].token_ids and len(chunks[-1].token_ids) == 1
        terminal = chunks[-1]
        assert terminal.finish_reason == FinishReason.LENGTH
        u = terminal.completion_usage
        assert u is not None and (u.prompt_tokens, u.completion_tokens) == (len(PROMPT), 1)
        params = terminal.disaggregated_params
        assert isinstance(params, dict)
        msgspec.json.encode(params)  # JSON-able
        ts = server(prefill)
        assert params["completed_tokens"] == terminal.token_ids
        assert (params["transfer_host"], params["transfer_port"]) == ("127.0.0.1", ts.port)
        assert (params["num_blocks"], params["block_size"], params["prompt_len"]) == (3, BS, 40)
        assert ts.holds() == [params["mocker_handle"]]
        # The blocks outlive the request: pinned, not freed.
        assert prefill.kv_stats().used_blocks == 3 and prefill.kv_manager().pinned_blocks == 3

        first = asyncio.Event()
        ctx = GenerateContext(Context(), first)
        stream = decode.generate(req(PROMPT, 8, params=params), ctx)
        head = await stream.__anext__()
        assert first.is_set()  # notified when the pull finished, before any chunk
        out = [head, *await collect(stream)]
        assert tokens_of(out)[0] == params["completed_tokens"][0]
        assert len(tokens_of(out)) == 8  # prefill token + 7 decode tokens = max_tokens
        assert out[-1].finish_reason == FinishReason.LENGTH
        du = out[-1].completion_usage
        assert du is not None and (du.prompt_tokens, du.completion_tokens) == (40, 8)
        assert all(c.disaggregated_params is None for c in out)
        # The decode worker computed no prompt token: it decoded from the pulled KV.
        assert decode.step_stats() and prefill_tokens(decode) == 0
        assert sum(s.decode_seqs for s in decode.step_stats()) == 7
        assert set(block_hashes(PROMPT, BS)) <= decode.kv_manager().cached_hashes()
        assert decode.kv_stats().used_blocks == 0
        # The hold was released by the pull.
        assert ts.num_holds == 0 and prefill.kv_stats().used_blocks == 0
        assert prefill.kv_manager().pinned_blocks == 0
        assert (prefill.kv_transfers.completed, decode.kv_transfers.completed) == (1, 1)
        assert prefill.kv_transfers.freed_block_reads == 0
        prefill.kv_manager().check_invariants()
        decode.kv_manager().check_invariants()


async def test_decode_applies_the_stop_rules_to_the_prefill_token() -> None:
    async with engines(PREFILL, DECODE) as (prefill, decode):
        params = await prefill_params(prefill)
        tok = params["completed_tokens"][0]
        out = await collect(decode.generate(req(PROMPT, 8, params=params, stop_token_ids=[tok]),
                                            mock_context(decode=True)))
        assert tokens_of(out) == [tok] and out[-1].finish_reason == FinishReason.STOP
        assert decode.step_stats() == []  # finished by the pulled token alone


async def test_pulls_reuse_a_connection_and_cleanup_closes_it_quietly(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with engines(PREFILL, DECODE) as (prefill, decode):
        for _ in range(3):
            params = await prefill_params(prefill)
            await collect(decode.generate(req(PROMPT, 2, params=params), mock_context()))
        assert decode.kv_transfers.completed == 3
        assert decode._puller is not None and len(decode._puller._open) == 1
        # The prefill side closes first, with the decode's idle connection still open.
        with caplog.at_level(logging.WARNING):
            await prefill.cleanup()
            await decode.cleanup()
        assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text


async def test_a_pulled_handle_cannot_be_pulled_twice() -> None:
    async with engines(PREFILL, DECODE, {**DECODE, "kv_load_failure": "fail"}) as (
        prefill, decode, strict,
    ):
        params = await prefill_params(prefill)
        await collect(decode.generate(req(PROMPT, 4, params=params), mock_context()))
        with pytest.raises(DynamoError) as info:
            await collect(strict.generate(req(PROMPT, 4, params=params), mock_context()))
        assert info.value.kind is BackendError.InvalidArgument
        assert "already_pulled" in info.value.message


async def test_a_reply_for_another_prompt_is_refused() -> None:
    async with engines(PREFILL, {**DECODE, "kv_load_failure": "fail"}) as (prefill, decode):
        params = await prefill_params(prefill)
        other = [t + 1 for t in PROMPT]
        with pytest.raises(DynamoError) as info:
            await collect(decode.generate(req(other, 4, params=params), mock_context()))
        assert info.value.kind is BackendError.InvalidArgument
        assert "different prompt" in info.value.message


# -- bootstrap path ---------------------------------------------------------------------------
async def test_bootstrap_path_decode_sent_before_prefill_finishes() -> None:
    prefill = MockerEngine(**{**FAST, **PREFILL, "bootstrap": True})
    cfg = await prefill.start(1)
    try:
        async with engines({**DECODE, "kv_load_failure": "fail"}) as (decode,):
            assert cfg.bootstrap_host == "127.0.0.1" and cfg.bootstrap_port == server(prefill).port
            cfg.validate()
            info = BootstrapInfo(bootstrap_host=cfg.bootstrap_host,
                                 bootstrap_port=cfg.bootstrap_port, bootstrap_room=7)
            decoding = asyncio.ensure_future(
                collect(decode.generate(req(PROMPT, 6, bootstrap=info), mock_context()))
            )
            ts = server(prefill)
            # The decode pull is parked on room 7 before the prefill even started.
            await ts.wait_until(lambda: ts.room_waiters(7) == 1, WAIT)
            assert not decoding.done()
            chunks = await collect(prefill.generate(req(PROMPT, 1, bootstrap=info),
                                                    mock_context()))
            assert chunks[-1].disaggregated_params["bootstrap_room"] == 7
            out = await asyncio.wait_for(decoding, WAIT)
            assert tokens_of(out)[0] == chunks[-1].token_ids[0] and len(tokens_of(out)) == 6
            assert prefill_tokens(decode) == 0
            assert ts.num_holds == 0 and ts.room_waiters(7) == 0
            assert decode.kv_transfers.completed == 1
    finally:
        await prefill.cleanup()


async def test_bootstrap_room_of_a_cancelled_prefill_fails_the_waiting_pull() -> None:
    async with engines({**PREFILL, "bootstrap": True},
                       {**DECODE, "kv_load_failure": "fail"}) as (prefill, decode):
        ts = server(prefill)
        info = BootstrapInfo(bootstrap_host="127.0.0.1", bootstrap_port=ts.port,
                             bootstrap_room=9)
        decoding = asyncio.ensure_future(
            collect(decode.generate(req(PROMPT, 4, bootstrap=info), mock_context()))
        )
        await ts.wait_until(lambda: ts.room_waiters(9) == 1, WAIT)
        stopped = mock_context()
        stopped.stop_generating()
        chunks = await collect(prefill.generate(req(PROMPT, 1, bootstrap=info), stopped))
        assert chunks[-1].finish_reason == FinishReason.CANCELLED
        with pytest.raises(DynamoError) as err:
            await asyncio.wait_for(decoding, WAIT)  # at once, not after the hold timeout
        assert err.value.kind is BackendError.InvalidArgument
        assert "room_failed" in err.value.message
        assert ts.num_holds == 0 and prefill.kv_stats().used_blocks == 0


async def test_without_bootstrap_the_prefill_advertises_no_endpoint() -> None:
    async with engines(PREFILL, {}) as (prefill, agg):
        assert server(prefill).port > 0
        assert agg.transfer_server is None
    for mode in ("prefill", "agg"):
        e = MockerEngine(**FAST, disaggregation_mode=mode)
        try:
            cfg = await e.start(1)
            assert (cfg.bootstrap_host, cfg.bootstrap_port) == (None, None)
        finally:
            await e.cleanup()


# -- holds ------------------------------------------------------------------------------------
@pytest.mark.parametrize("caching", [True, False])
async def test_an_unpulled_hold_expires_and_is_freed(caching: bool) -> None:
    cfg = {**PREFILL, "kv_hold_timeout_s": 0.2, "enable_prefix_caching": caching}
    async with engines(cfg, {**DECODE, "kv_load_failure": "fail"}) as (prefill, decode):
        params = await prefill_params(prefill)
        ts = server(prefill)
        total = prefill.kv_stats().total
        assert ts.num_holds == 1 and prefill.kv_stats().free_blocks < total
        await ts.wait_until(lambda: ts.num_holds == 0, WAIT)
        assert prefill.kv_transfers.expired == 1
        assert prefill.kv_stats().used_blocks == 0 and prefill.kv_manager().available() == total
        if not caching:
            assert prefill.kv_stats().free_blocks == total
        with pytest.raises(DynamoError) as info:
            await collect(decode.generate(req(PROMPT, 4, params=params), mock_context()))
        assert info.value.kind is BackendError.InvalidArgument
        assert "expired" in info.value.message


async def test_a_health_check_prefill_holds_nothing() -> None:
    async with engines(PREFILL) as (prefill,):
        ts = server(prefill)
        payload = await prefill.health_check_payload()
        canary = msgspec.convert(payload, PreprocessedRequest)
        assert canary.health_check
        out = await collect(prefill.generate(canary, mock_context()))
        assert out[-1].finish_reason == FinishReason.LENGTH
        assert out[-1].disaggregated_params is None and ts.num_holds == 0



async def test_prefill_cancelled_after_its_kv_was_computed_holds_nothing() -> None:
    async with engines(PREFILL) as (prefill,):
        ctx = mock_context()
        # The prompt's stored event comes from the very step that samples its one token: the
        # stop lands after the blocks were pinned, before the stream could yield the terminal.
        kv_sink(prefill, lambda ev: asyncio.get_running_loop().call_soon(ctx.stop_generating))
        out = await collect(prefill.generate(req(list(range(33)), 1), ctx))
        assert out[-1].finish_reason == FinishReason.CANCELLED
        assert out[-1].disaggregated_params is None
        assert server(prefill).num_holds == 0
        assert prefill.kv_stats().used_blocks == 0 and prefill.kv_manager().pinned_blocks == 0


async def test_chunked_prefill_cancelled_midway_holds_nothing() -> None:
    async with engines({**PREFILL, "max_num_batched_tokens": BS}) as (prefill,):
        ctx = mock_context()
        stores: list[int] = []

        def on_event(ev: RouterEvent) -> None:
            stores.append(1)
            if len(stores) == 1:
                asyncio.get_running_loop().call_soon(ctx.stop_generating)

        kv_sink(prefill, on_event)
        out = await collect(prefill.generate(req(list(range(5 * BS)), 1), ctx))
        assert out[-1].finish_reason == FinishReason.CANCELLED
        assert len(stores) < 5  # stopped before the whole prompt was computed
        assert server(prefill).num_holds == 0 and prefill.kv_stats().used_blocks == 0


async def test_prefill_caps_max_tokens_at_one() -> None:
    async with engines(PREFILL) as (prefill,):
        for max_tokens in (None, 1, 50):
            out = await collect(prefill.generate(req(PROMPT, max_tokens, min_tokens=10),
                                                 mock_context()))
            assert len(tokens_of(out)) == 1 and out[-1].finish_reason == FinishReason.LENGTH
            u = out[-1].completion_usage
            assert u is not None and u.completion_tokens == 1
            assert out[-1].disaggregated_params is not None
        assert server(prefill).num_holds == 3


# -- failed pulls -----------------------------------------------------------------------------
@pytest.mark.parametrize("policy", ["recompute", "fail"])
async def test_pull_of_an_unknown_handle(policy: str) -> None:
    async with engines(PREFILL, {**DECODE, "kv_load_failure": policy}) as (prefill, decode):
        params = {**await prefill_params(prefill), "mocker_handle": "0" * 32}
        stream = decode.generate(req(PROMPT, 8, params=params), mock_context())
        if policy == "fail":
            with pytest.raises(DynamoError) as info:
                await collect(stream)
            assert info.value.kind is BackendError.InvalidArgument
            assert "unknown_handle" in info.value.message and "0" * 32 in info.value.message
            assert decode.kv_transfers.failed == 1 and decode.step_stats() == []
        else:
            out = await collect(stream)
            assert len(tokens_of(out)) == 8 and out[-1].finish_reason == FinishReason.LENGTH
            assert decode.kv_transfers.recomputed == 1
            assert prefill_tokens(decode) == len(PROMPT)  # prefilled locally
        assert prefill.kv_transfers.failed == 1
        assert server(prefill).num_holds == 1  # the real hold is untouched
        assert decode.kv_stats().used_blocks == 0


@pytest.mark.parametrize("policy", ["recompute", "fail"])
async def test_prefill_worker_gone(policy: str) -> None:
    async with engines(PREFILL, {**DECODE, "kv_load_failure": policy}) as (prefill, decode):
        params = await prefill_params(prefill)
        await prefill.cleanup()
        await prefill.cleanup()  # idempotent
        assert prefill.kv_stats().used_blocks == 0  # cleanup freed the hold
        stream = decode.generate(req(PROMPT, 8, params=params), mock_context())
        if policy == "fail":
            with pytest.raises(DynamoError) as info:
                await collect(stream)
            assert info.value.kind is BackendError.Disconnected
            assert "connection" in info.value.message
            assert f"127.0.0.1:{params['transfer_port']}" in info.value.message
        else:
            out = await collect(stream)
            assert len(tokens_of(out)) == 8
            assert decode.kv_transfers.recomputed == 1 and prefill_tokens(decode) == len(PROMPT)
        assert decode.kv_stats().used_blocks == 0


async def test_foreign_disaggregated_params_follow_the_failure_policy() -> None:
    async with engines({**DECODE, "kv_load_failure": "fail"}, DECODE) as (strict, lenient):
        params = {"kv_transfer_params": {"remote_engine_id": "x"}}
        with pytest.raises(DynamoError) as info:
            await collect(strict.generate(req(PROMPT, 4, params=params), mock_context()))
        assert info.value.kind is BackendError.InvalidArgument
        assert "not a mocker KV handle" in info.value.message
        out = await collect(lenient.generate(req(PROMPT, 4, params=params), mock_context()))
        assert len(tokens_of(out)) == 4 and lenient.kv_transfers.recomputed == 1


async def test_pull_timeout_is_typed_and_the_abandoned_hold_waits_again() -> None:
    async with engines({**PREFILL, **SLOW_TRANSFER, "kv_transfer_ms_per_block": 2000.0},
                       {**DECODE, "kv_load_failure": "fail", "kv_pull_timeout_s": 0.2}) as (
        prefill, decode,
    ):
        params = await prefill_params(prefill)
        ts = server(prefill)
        handle = params["mocker_handle"]
        with pytest.raises(DynamoError) as info:
            await collect(decode.generate(req(PROMPT, 4, params=params), mock_context()))
        assert info.value.kind is BackendError.ResponseTimeout
        # The prefill side sees the puller leave mid-transfer: the hold is pullable again.
        await ts.wait_until(lambda: ts.hold_state(handle) == "waiting", WAIT)
        assert prefill.kv_transfers.failed == 1 and prefill.kv_transfers.completed == 0


class AttachedContext(Context):
    """Tells the test when the engine registered its stop callback (the request is on a
    rank), so tests wait on an event instead of sleeping."""

    __slots__ = ("attached", "gen")

    def __init__(self) -> None:
        super().__init__()
        self.attached = asyncio.Event()
        self.gen = GenerateContext(self, asyncio.Event())

    def add_stop_callback(self, callback: Callable[[Context], None]) -> None:
        super().add_stop_callback(callback)
        self.attached.set()


async def test_decode_pulls_only_once_its_scheduler_admits_the_request() -> None:
    paced = {**DECODE, "max_num_seqs": 1, "speedup_ratio": 1.0, "decode_base_ms": 20.0}
    async with engines(PREFILL, paced) as (prefill, decode):
        params = await prefill_params(prefill)
        ts = server(prefill)
        handle = params["mocker_handle"]
        busy, queued = AttachedContext(), AttachedContext()
        first = asyncio.ensure_future(
            collect(decode.generate(req(list(range(300, 320)), 10_000), busy.gen))
        )
        await busy.attached.wait()
        second = asyncio.ensure_future(
            collect(decode.generate(req(PROMPT, 4, params=params), queued.gen))
        )
        await queued.attached.wait()
        # The only slot is taken: the request waits in the queue, holding no block, and its
        # KV stays on the prefill worker.
        sched = decode.scheduler()
        assert [s.request_id for s in sched.waiting] == [queued.id]
        assert sched.loading == [] and decode.kv_transfers.in_flight == 0
        assert ts.hold_state(handle) == "waiting"
        busy.stop_generating()
        assert (await asyncio.wait_for(first, WAIT))[-1].finish_reason == FinishReason.CANCELLED
        out = await asyncio.wait_for(second, WAIT)
        assert tokens_of(out)[0] == params["completed_tokens"][0] and len(tokens_of(out)) == 4
        assert ts.num_holds == 0 and decode.kv_transfers.completed == 1


async def test_decode_stopped_while_queued_never_pulls() -> None:
    paced = {**DECODE, "max_num_seqs": 1, "speedup_ratio": 1.0, "decode_base_ms": 20.0}
    async with engines(PREFILL, paced) as (prefill, decode):
        params = await prefill_params(prefill)
        busy, queued = AttachedContext(), AttachedContext()
        first = asyncio.ensure_future(
            collect(decode.generate(req(list(range(300, 320)), 10_000), busy.gen))
        )
        await busy.attached.wait()
        second = asyncio.ensure_future(
            collect(decode.generate(req(PROMPT, 4, params=params), queued.gen))
        )
        await queued.attached.wait()
        queued.stop_generating()
        out = await asyncio.wait_for(second, WAIT)
        assert out[-1].finish_reason == FinishReason.CANCELLED and tokens_of(out) == []
        busy.stop_generating()
        await asyncio.wait_for(first, WAIT)
        assert decode.kv_transfers.completed == 0 and decode.kv_stats().used_blocks == 0
        assert server(prefill).num_holds == 1  # unpulled: it waits for its expiry


# -- local prefill on decode ------------------------------------------------------------------
@pytest.mark.parametrize("params", [None, {}, "absent"])
async def test_decode_without_a_handle_prefills_locally(params: Any) -> None:
    async with engines(DECODE) as (decode,):
        request = req(PROMPT, 5) if params == "absent" else req(PROMPT, 5, params=params)
        if params is None:
            request = msgspec.structs.replace(request, prefill_result=PrefillResult())
        out = await collect(decode.generate(request, mock_context()))
        assert len(tokens_of(out)) == 5
        assert decode.kv_transfers.local_prefill == 1
        assert prefill_tokens(decode) == len(PROMPT)


async def test_health_payloads_per_role() -> None:
    agg, prefill, decode = (MockerEngine(**FAST, disaggregation_mode=m)
                            for m in ("agg", "prefill", "decode"))
    assert "prefill_result" not in await agg.health_check_payload()
    assert "prefill_result" not in await prefill.health_check_payload()
    payload = await decode.health_check_payload()
    assert payload["prefill_result"] == {"disaggregated_params": {}}
    await decode.start(1)
    try:
        out = await collect(decode.generate(msgspec.convert(payload, PreprocessedRequest),
                                            mock_context(decode=True)))
        assert out[-1].finish_reason == FinishReason.LENGTH
        assert decode.kv_transfers.local_prefill == 0  # a canary is not traffic
    finally:
        await decode.cleanup()


# -- cancellation -----------------------------------------------------------------------------
async def test_decode_stopped_during_its_pull_finishes_it_then_ends_cancelled() -> None:
    async with engines({**PREFILL, **SLOW_TRANSFER}, DECODE) as (prefill, decode):
        prompt = list(range(64))  # 4 blocks: a 400 ms transfer
        params = await prefill_params(prefill, prompt)
        ts = server(prefill)
        handle = params["mocker_handle"]
        ctx = mock_context(decode=True)
        decoding = asyncio.ensure_future(
            collect(decode.generate(req(prompt, 8, params=params), ctx))
        )
        await ts.wait_until(lambda: ts.hold_state(handle) == "transferring", WAIT)
        assert decode.kv_stats().used_blocks == 4  # landing blocks for the incoming KV
        ctx.stop_generating()
        await decode.abort(ctx.inner)  # harmless mid-pull
        # The KV is still arriving: its landing blocks stay allocated until the pull ends.
        assert ts.hold_state(handle) == "transferring"
        assert decode.kv_stats().used_blocks == 4
        out = await asyncio.wait_for(decoding, WAIT)
        assert out[-1].finish_reason == FinishReason.CANCELLED and tokens_of(out) == []
        # The pull ran to completion (not abandoned): the prefill freed the hold at once.
        assert prefill.kv_transfers.completed == 1 and prefill.kv_transfers.failed == 0
        assert ts.num_holds == 0 and prefill.kv_stats().used_blocks == 0
        assert decode.kv_stats().used_blocks == 0 and decode.step_stats() == []
        await decode.abort(ctx.inner)
        await prefill.abort(ctx.inner)


async def test_a_stopped_request_whose_pull_fails_ends_cancelled_not_failed() -> None:
    async with engines({**PREFILL, **SLOW_TRANSFER},
                       {**DECODE, "kv_load_failure": "fail"}) as (prefill, decode):
        params = await prefill_params(prefill)
        ts = server(prefill)
        ctx = mock_context(decode=True)
        decoding = asyncio.ensure_future(
            collect(decode.generate(req(PROMPT, 8, params=params), ctx))
        )
        await ts.wait_until(lambda: ts.hold_state(params["mocker_handle"]) == "transferring",
                            WAIT)
        ctx.stop_generating()
        await prefill.cleanup()  # breaks the transfer's connection
        out = await asyncio.wait_for(decoding, WAIT)
        assert out[-1].finish_reason == FinishReason.CANCELLED
        assert decode.kv_transfers.failed == 1 and decode.kv_stats().used_blocks == 0


async def test_a_loading_request_takes_a_max_num_seqs_slot() -> None:
    async with engines({**PREFILL, **SLOW_TRANSFER},
                       {**DECODE, "max_num_seqs": 1}) as (prefill, decode):
        ts = server(prefill)
        one = await prefill_params(prefill)
        other_prompt = list(range(200, 240))
        two = await prefill_params(prefill, other_prompt)
        a = asyncio.ensure_future(collect(decode.generate(req(PROMPT, 3, params=one),
                                                          mock_context())))
        await ts.wait_until(lambda: ts.hold_state(one["mocker_handle"]) == "transferring", WAIT)
        queued = AttachedContext()
        b = asyncio.ensure_future(collect(decode.generate(req(other_prompt, 3, params=two),
                                                          queued.gen)))
        await queued.attached.wait()
        assert [s.request_id for s in decode.scheduler().waiting] == [queued.id]
        assert decode.kv_transfers.in_flight == 1
        assert ts.hold_state(two["mocker_handle"]) == "waiting"
        outs = await asyncio.wait_for(asyncio.gather(a, b), WAIT)
        assert [len(tokens_of(o)) for o in outs] == [3, 3]
        assert decode.kv_transfers.completed == 2 and ts.num_holds == 0


async def test_abort_of_a_finished_prefill_keeps_its_hold() -> None:
    async with engines(PREFILL) as (prefill,):
        ctx = mock_context()
        await collect(prefill.generate(req(PROMPT, 1), ctx))
        await prefill.abort(ctx.inner)
        assert server(prefill).num_holds == 1


# -- drain ------------------------------------------------------------------------------------
async def test_drain_waits_for_a_pending_hold_until_it_is_pulled() -> None:
    async with engines(PREFILL, DECODE) as (prefill, decode):
        params = await prefill_params(prefill)
        draining = asyncio.ensure_future(prefill.drain())
        done, _ = await asyncio.wait([draining], timeout=0.05)
        assert not done  # a hold is pending
        await collect(decode.generate(req(PROMPT, 4, params=params), mock_context()))
        await asyncio.wait_for(draining, WAIT)
        assert server(prefill).num_holds == 0


async def test_drain_with_nothing_held_returns_at_once() -> None:
    async with engines(PREFILL, DECODE) as (prefill, decode):
        coro = prefill.drain()
        with pytest.raises(StopIteration):
            coro.send(None)  # completed without suspending once
        params = await prefill_params(prefill)
        await collect(decode.generate(req(PROMPT, 4, params=params), mock_context()))
        coro = prefill.drain()
        with pytest.raises(StopIteration):
            coro.send(None)


# -- the freed-block check --------------------------------------------------------------------
@pytest.mark.parametrize("caching", [True, False])
async def test_a_held_block_freed_behind_the_holds_back_is_detected(caching: bool) -> None:
    cfg = {**PREFILL, "enable_prefix_caching": caching}
    async with engines(cfg, {**DECODE, "kv_load_failure": "fail"}) as (prefill, decode):
        params = await prefill_params(prefill)
        ts = server(prefill)
        pin = ts.pin(params["mocker_handle"])
        assert pin is not None and pin.num_blocks == 3
        kv = prefill.kv_manager()
        assert kv.verify(pin) == []
        victim = pin.blocks[0][0]
        assert kv.force_free(victim)
        assert kv.verify(pin) == [victim]
        with pytest.raises(DynamoError) as info:
            await collect(decode.generate(req(PROMPT, 4, params=params), mock_context()))
        assert info.value.kind is BackendError.Unknown and "freed" in info.value.message
        assert prefill.kv_transfers.freed_block_reads == 1
        assert ts.num_holds == 0 and kv.stats().used_blocks == 0
        kv.check_invariants()


def test_kv_pin_generations_detect_reuse() -> None:
    kv = KvManager(4, BS)
    assert kv.allocate(2)
    kv.commit([(11, 1)], None)  # one hashed block, one private
    pin = kv.pin([11], 1)
    assert kv.stats().used_blocks == 2 and kv.pinned_blocks == 2
    assert not kv.allocate(3)  # pinned blocks are not evictable
    assert kv.force_free(11) and kv.verify(pin) == [11]
    assert kv.allocate(1)
    kv.commit([(11, 1)], None)  # the same hash, a new allocation
    assert kv.verify(pin) == [11]
    kv.unpin(pin)
    kv.unpin(pin)  # idempotent
    assert kv.pinned_blocks == 0 and kv.stats().used_blocks == 1
    kv.check_invariants()
    kv.release([11], 0)
    assert kv.stats().used_blocks == 0
    kv.check_invariants()


# -- metrics and args -------------------------------------------------------------------------
def _metrics_ctx() -> MetricsCtx:
    return MetricsCtx(model="m", component="c", model_load_time_seconds=0.0,
                      metrics=EngineMetrics())


async def test_metrics_exposition() -> None:
    async with engines(PREFILL, DECODE, {}) as (prefill, decode, agg):
        contexts = [_metrics_ctx() for _ in range(3)]
        for e, c in zip((prefill, decode, agg), contexts, strict=True):
            await e.setup_metrics(c)
        params = await prefill_params(prefill)
        ts = server(prefill)
        text = contexts[0].metrics.render()
        assert 'dynamo_mocker_kv_held_blocks{role="prefill"} 3.0' in text
        assert 'dynamo_mocker_kv_holds{role="prefill"} 1.0' in text
        await collect(decode.generate(req(PROMPT, 4, params=params), mock_context()))
        await collect(decode.generate(req(PROMPT, 4), mock_context()))
        assert ts.num_holds == 0
        text = contexts[0].metrics.render()
        assert 'dynamo_mocker_kv_transfers_total{outcome="completed",role="prefill"} 1.0' in text
        assert 'dynamo_mocker_kv_transfers_total{outcome="expired",role="prefill"} 0.0' in text
        assert 'dynamo_mocker_kv_freed_block_reads_total{role="prefill"} 0.0' in text
        assert 'dynamo_mocker_kv_transfer_seconds_count{role="prefill"} 1.0' in text
        assert 'dynamo_mocker_kv_held_blocks{role="prefill"} 0.0' in text
        text = contexts[1].metrics.render()
        assert 'dynamo_mocker_kv_transfers_total{outcome="completed",role="decode"} 1.0' in text
        assert ('dynamo_mocker_kv_transfers_total{outcome="local_prefill",role="decode"} 1.0'
                in text)
        assert 'dynamo_mocker_kv_pulls_in_flight{role="decode"} 0.0' in text
        assert contexts[2].metrics.render() == ""  # aggregated: nothing new


def test_disaggregation_mode_arg(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DYN_DISAGGREGATION_MODE", raising=False)
    assert MockerArgs.from_args([]).role is DisaggregationMode.AGGREGATED
    assert MockerArgs.from_args(["--disaggregation-mode", "agg"]).disaggregation_mode == (
        "aggregated")
    a = MockerArgs.from_args([
        "--disaggregation-mode", "prefill", "--transfer-host", "127.0.0.2", "--bootstrap",
        "--kv-hold-timeout-s", "3", "--kv-transfer-ms-per-block", "0.5",
        "--kv-pull-timeout-s", "4", "--kv-load-failure", "fail",
    ])
    assert a.role is DisaggregationMode.PREFILL and a.transfer_host == "127.0.0.2"
    assert (a.bootstrap, a.kv_hold_timeout_s, a.kv_transfer_ms_per_block) == (True, 3.0, 0.5)
    assert (a.kv_pull_timeout_s, a.kv_load_failure) == (4.0, "fail")
    monkeypatch.setenv("DYN_DISAGGREGATION_MODE", "decode")
    assert MockerArgs.from_args([]).role is DisaggregationMode.DECODE
    assert MockerEngine.from_args([]).role is DisaggregationMode.DECODE
    assert MockerArgs.from_args(["--disaggregation-mode", "aggregated"]).disaggregation_mode == (
        "aggregated")
    assert MockerArgs(disaggregation_mode=DisaggregationMode.DECODE).disaggregation_mode == (
        "decode")
    d = MockerArgs()
    assert (d.kv_hold_timeout_s, d.kv_transfer_ms_per_block, d.kv_pull_timeout_s) == (
        30.0, 0.2, 30.0)
    assert (d.transfer_host, d.bootstrap, d.kv_load_failure) == ("127.0.0.1", False, "recompute")
    for bad in ({"disaggregation_mode": "encode"}, {"kv_load_failure": "retry"},
                {"kv_hold_timeout_s": 0}, {"kv_transfer_ms_per_block": -1}):
        with pytest.raises(DynamoError) as info:
            MockerArgs(**bad)
        assert info.value.kind is BackendError.InvalidArgument


async def test_a_transfer_server_that_cannot_bind_fails_start_and_cleans_up() -> None:
    e = MockerEngine(**FAST, **PREFILL, transfer_host="192.0.2.1")  # TEST-NET: not ours
    with pytest.raises(DynamoError) as info:
        await e.start(1)
    assert info.value.kind is BackendError.InvalidArgument and "192.0.2.1" in info.value.message
    await e.cleanup()
    await e.cleanup()


def test_transfer_time_follows_the_speedup_ratio() -> None:
    assert MockerArgs(kv_transfer_ms_per_block=2.0, speedup_ratio=4.0).transfer_s_per_block == (
        0.0005)
    assert MockerArgs(kv_transfer_ms_per_block=2.0, speedup_ratio=0).transfer_s_per_block == 0
    assert MockerArgs(kv_transfer_ms_per_block=0, speedup_ratio=1).transfer_s_per_block == 0
