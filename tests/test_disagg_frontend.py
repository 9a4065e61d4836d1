"""Disaggregated prefill/decode through the real HTTP frontend and real workers (request plane
on 127.0.0.1, memory discovery), driven by the official ``openai`` client: the prefill router's
two paths, the pools, the fall-back, failures, cancellation of each hop, the decode worker's
deferred abort. Scripted engines make every hop observable; the mocker's roles (a simulated KV
transfer) are covered by tests/test_mocker_disagg.py and tests/integration/test_disagg.py."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import httpx
import openai
import pytest

from dynamo_backend_common import (
    DynamoError,
    EngineConfig,
    FinishReason,
    GenerateContext,
    LLMEngine,
    LLMEngineOutput,
    PreprocessedRequest,
    usage,
)
from dynamo_backend_common.errors import BackendError
from dynamo_backend_common.fixtures import tiny_model_dir
from dynamo_backend_common.runtime.context import Context
from dynamo_backend_common.worker import Worker
from dynamo_backend_common.worker.config import DisaggregationMode, ShutdownConfig, WorkerConfig
from tests.test_frontend_http import Stack

MODEL_DIR = str(tiny_model_dir())
NAME = "disagg"
PREFILL_TOKEN = 41
MESSAGES: Any = [{"role": "user", "content": "Tell me about Paris."}]


class PrefillEngine(LLMEngine):
    """A prefill role: one token and a handle. ``hold`` (set) blocks before the token;
    ``fail`` raises that error kind instead."""

    def __init__(self, *, bootstrap: bool = False, fail: BackendError | None = None,
                 params_on_token: bool = False) -> None:
        self.bootstrap = bootstrap
        self.fail = fail
        self.params_on_token = params_on_token  # as Dynamo's prefill mocker sends them
        self.requests: list[PreprocessedRequest] = []
        self.ids: list[str] = []
        self.hold: asyncio.Event | None = None
        self.started = asyncio.Event()
        self.stopped = asyncio.Event()
        self.aborted = asyncio.Event()

    async def start(self, worker_id: int) -> EngineConfig:
        if self.bootstrap:
            return EngineConfig(model="p", context_length=2048, bootstrap_host="127.0.0.1",
                                bootstrap_port=7)
        return EngineConfig(model="p", context_length=2048)

    async def generate(self, request: PreprocessedRequest, ctx: GenerateContext
                       ) -> AsyncIterator[LLMEngineOutput]:
        self.requests.append(request)
        self.ids.append(ctx.id)
        self.started.set()
        if self.fail is not None:
            raise DynamoError(self.fail, "scripted prefill failure")
        if self.hold is not None:
            stop = asyncio.ensure_future(ctx.stopped())
            held = asyncio.ensure_future(self.hold.wait())
            await asyncio.wait([stop, held], return_when=asyncio.FIRST_COMPLETED)
            stop.cancel()
            held.cancel()
            if ctx.is_stopped():
                self.stopped.set()
                yield LLMEngineOutput.cancelled()
                return
        params = {"handle": len(self.requests), "prompt_len": len(request.token_ids)}
        if self.params_on_token:
            yield LLMEngineOutput(token_ids=[PREFILL_TOKEN], disaggregated_params=params)
            yield LLMEngineOutput(token_ids=[], finish_reason=FinishReason.LENGTH,
                                  completion_usage=usage(len(request.token_ids), 1))
            return
        yield LLMEngineOutput(
            token_ids=[PREFILL_TOKEN], finish_reason=FinishReason.LENGTH,
            disaggregated_params=params, completion_usage=usage(len(request.token_ids), 1))

    async def abort(self, ctx: Context) -> None:
        self.aborted.set()

    async def cleanup(self) -> None:
        pass


class DecodeEngine(LLMEngine):
    """A decode role: the prefill's token first (when there was a remote prefill), then 100,
    101, ... up to max_tokens. ``pull`` (set) is awaited before the first token, as a KV pull
    would be; ``hang`` blocks after the first token until stopped."""

    def __init__(self) -> None:
        self.requests: list[PreprocessedRequest] = []
        self.ids: list[str] = []
        self.pull: asyncio.Event | None = None
        self.pulling = asyncio.Event()
        self.hang = False
        self.first_sent = asyncio.Event()
        self.stopped = asyncio.Event()
        self.aborts: list[bool] = []  # per abort: had the pull finished?
        self.aborted = asyncio.Event()
        self.stop_seen = asyncio.Event()  # the stop reached generate during the pull
        self.pulled = False

    async def start(self, worker_id: int) -> EngineConfig:
        return EngineConfig(model="d", context_length=2048)

    async def generate(self, request: PreprocessedRequest, ctx: GenerateContext
                       ) -> AsyncIterator[LLMEngineOutput]:
        self.requests.append(request)
        self.ids.append(ctx.id)
        remote = request.prefill_result is not None or request.bootstrap_info is not None
        if self.pull is not None:
            self.pulling.set()
            watch = asyncio.ensure_future(ctx.stopped())
            watch.add_done_callback(lambda _: self.stop_seen.set())
            await self.pull.wait()  # a KV pull is not abandoned half way
            watch.cancel()
            self.pulled = True
            ctx.notify_first_token()
        if ctx.is_stopped():
            self.stopped.set()
            yield LLMEngineOutput.cancelled()
            return
        max_tokens = request.stop_conditions.max_tokens or 4
        tokens = ([PREFILL_TOKEN] if remote else []) + list(range(100, 100 + max_tokens))
        tokens = tokens[:max_tokens]
        yield LLMEngineOutput(token_ids=tokens[:1])
        self.first_sent.set()
        if self.hang:
            await ctx.stopped()
            self.stopped.set()
            yield LLMEngineOutput.cancelled()
            return
        if len(tokens) > 1:
            yield LLMEngineOutput(token_ids=tokens[1:])
        yield LLMEngineOutput(token_ids=[], finish_reason=FinishReason.LENGTH,
                              completion_usage=usage(len(request.token_ids), len(tokens)))

    async def abort(self, ctx: Context) -> None:
        self.aborts.append(self.pulled)
        self.aborted.set()

    async def cleanup(self) -> None:
        pass


class DisaggStack(Stack):
    def __init__(self, **frontend: Any) -> None:
        super().__init__(**frontend)
        # The workers' event plane, for kv mode.
        self.frontend_options.setdefault("events", f"memory://{self.bus}")

    async def add(self, engine: LLMEngine, mode: str) -> Worker:
        cfg = WorkerConfig(discovery=f"memory://{self.bus}", events=f"memory://{self.bus}",
                           served_model_name=NAME, model_path=MODEL_DIR, status_port=None,
                           shutdown=ShutdownConfig(total_secs=5, router_grace_secs=0),
                           disaggregation_mode=DisaggregationMode.parse(mode))
        worker = Worker(engine, cfg)
        self.workers.append(worker)
        self.tasks.append(asyncio.create_task(worker.run()))
        await asyncio.wait_for(worker.ready.wait(), 10)
        models = self.frontend.models
        pool = models.prefill if mode == "prefill" else models
        await models.wait_for(lambda: worker.worker_id in getattr(
            pool.models.get(NAME), "workers", {}), timeout=10)
        return worker

    def client(self) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=self.url + "/v1", api_key="x", max_retries=0)

    async def metrics(self) -> str:
        async with httpx.AsyncClient(base_url=self.url, timeout=10) as h:
            return (await h.get("/metrics")).text


def _sample(text: str, name: str, **labels: str) -> float:
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    for line in text.splitlines():
        if line.startswith(f"{name}{{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no sample {name}{{{want}}} in /metrics")


async def test_standard_path_prefills_then_decodes_with_the_prefill_result() -> None:
    prefill, decode = PrefillEngine(), DecodeEngine()
    async with DisaggStack() as st:
        await st.add(prefill, "prefill")
        await st.add(decode, "decode")
        r = await st.client().chat.completions.create(model=NAME, messages=MESSAGES,
                                                      max_tokens=4)
        # The prefill hop: the user's prompt, one token, routed to that worker.
        assert len(prefill.requests) == 1
        p = prefill.requests[0]
        assert p.stop_conditions.max_tokens == 1 and p.prefill_result is None
        # The decode hop continues from the prefill worker's handle.
        assert len(decode.requests) == 1
        d = decode.requests[0]
        assert d.token_ids == p.token_ids and d.stop_conditions.max_tokens == 4
        assert d.prefill_result is not None
        assert d.prefill_result.disaggregated_params == {"handle": 1,
                                                         "prompt_len": len(p.token_ids)}
        assert d.routing is not None and d.routing.prefill_worker_id == st.workers[0].worker_id
        # Usage is the user's request as the decode worker counted it.
        assert r.usage is not None and r.usage.completion_tokens == 4
        assert r.usage.prompt_tokens == len(p.token_ids)
        text = await st.metrics()
        assert _sample(text, "dynamo_frontend_disagg_requests_total", model=NAME,
                       path="standard") == 1
        assert _sample(text, "dynamo_frontend_worker_requests_total", model=NAME,
                       role="prefill") == 1
        assert _sample(text, "dynamo_frontend_worker_requests_total", model=NAME,
                       role="decode") == 1
        assert _sample(text, "dynamo_frontend_prefill_duration_seconds_count",
                       model=NAME) == 1


async def test_params_on_an_earlier_chunk_than_the_terminal_are_taken() -> None:
    prefill, decode = PrefillEngine(params_on_token=True), DecodeEngine()
    async with DisaggStack() as st:
        await st.add(prefill, "prefill")
        await st.add(decode, "decode")
        await st.client().completions.create(model=NAME, prompt="hello", max_tokens=3)
        d = decode.requests[0]
        assert d.prefill_result is not None
        assert d.prefill_result.disaggregated_params == {
            "handle": 1, "prompt_len": len(prefill.requests[0].token_ids)}


async def test_prefill_workers_are_a_separate_pool_without_an_openai_surface() -> None:
    prefill, decode = PrefillEngine(), DecodeEngine()
    async with DisaggStack() as st:
        await st.add(prefill, "prefill")
        client = st.client()
        # Served by a prefill worker only: not a model, and the worker gets nothing.
        assert [m.id for m in (await client.models.list()).data] == []
        with pytest.raises(openai.NotFoundError):
            await client.chat.completions.create(model=NAME, messages=MESSAGES, max_tokens=2)
        assert prefill.requests == []
        await st.add(decode, "decode")
        assert [m.id for m in (await client.models.list()).data] == [NAME]
        for _ in range(3):
            await client.completions.create(model=NAME, prompt="hello", max_tokens=3)
        # Every prefill request was a prefill (max_tokens 1); every decode one had a result.
        assert len(prefill.requests) == 3
        assert all(r.stop_conditions.max_tokens == 1 for r in prefill.requests)
        assert all(r.prefill_result is not None for r in decode.requests)


async def test_decode_hop_avoids_aggregated_workers_of_the_model() -> None:
    prefill, decode, agg = PrefillEngine(), DecodeEngine(), DecodeEngine()
    async with DisaggStack() as st:
        await st.add(prefill, "prefill")
        await st.add(decode, "decode")
        await st.add(agg, "agg")
        for _ in range(4):
            await st.client().completions.create(model=NAME, prompt="hi", max_tokens=2)
        assert len(decode.requests) == 4 and agg.requests == []


async def test_bootstrap_path_sends_decode_while_prefill_runs() -> None:
    prefill, decode = PrefillEngine(bootstrap=True), DecodeEngine()
    prefill.hold = asyncio.Event()
    async with DisaggStack() as st:
        await st.add(prefill, "prefill")
        await st.add(decode, "decode")
        decode.pull = asyncio.Event()
        call = asyncio.ensure_future(st.client().chat.completions.create(
            model=NAME, messages=MESSAGES, max_tokens=3))
        # The decode request arrives while the prefill is still held: concurrent hops.
        await asyncio.wait_for(decode.pulling.wait(), 10)
        assert prefill.started.is_set() and not prefill.hold.is_set()
        prefill.hold.set()
        decode.pull.set()
        r = await asyncio.wait_for(call, 10)
        assert r.usage is not None and r.usage.completion_tokens == 3
        p, d = prefill.requests[0], decode.requests[0]
        assert p.bootstrap_info is not None and p.bootstrap_info == d.bootstrap_info
        assert (p.bootstrap_info.bootstrap_host, p.bootstrap_info.bootstrap_port) == (
            "127.0.0.1", 7)
        assert d.prefill_result is None and p.stop_conditions.max_tokens == 1
        # One request id on both hops (Dynamo's mocker names a handoff by it, too).
        assert prefill.ids[0] == decode.ids[0]
        # A second request gets a fresh room.
        await st.client().completions.create(model=NAME, prompt="again", max_tokens=2)
        rooms = {r.bootstrap_info.bootstrap_room for r in decode.requests if r.bootstrap_info}
        assert len(rooms) == 2
        assert _sample(await st.metrics(), "dynamo_frontend_disagg_requests_total",
                       model=NAME, path="bootstrap") == 2


async def test_no_prefill_worker_falls_back_to_aggregated_or_fails_when_enforced() -> None:
    decode = DecodeEngine()
    async with DisaggStack() as st:
        await st.add(decode, "decode")
        r = await st.client().completions.create(model=NAME, prompt="hi", max_tokens=3)
        assert r.usage is not None and r.usage.completion_tokens == 3
        assert decode.requests[0].prefill_result is None  # prefilled locally
        assert _sample(await st.metrics(), "dynamo_frontend_disagg_requests_total",
                       model=NAME, path="aggregated_fallback") == 1
    async with DisaggStack(enforce_disagg=True) as st:
        decode = DecodeEngine()
        await st.add(decode, "decode")
        with pytest.raises(openai.APIStatusError) as ei:
            await st.client().completions.create(model=NAME, prompt="hi", max_tokens=3)
        assert ei.value.status_code == 503
        assert "no prefill worker" in str(ei.value)
        assert decode.requests == []


async def test_a_failing_prefill_worker_is_skipped_for_another() -> None:
    broken, good, decode = (PrefillEngine(fail=BackendError.CannotConnect), PrefillEngine(),
                            DecodeEngine())
    async with DisaggStack() as st:
        await st.add(broken, "prefill")
        await st.add(good, "prefill")
        await st.add(decode, "decode")
        for _ in range(4):  # round robin: at least half start on the broken one
            r = await st.client().completions.create(model=NAME, prompt="x", max_tokens=2)
            assert r.usage is not None and r.usage.completion_tokens == 2
        assert len(broken.requests) >= 2 and len(good.requests) == 4
        assert all(d.prefill_result is not None for d in decode.requests)
        assert _sample(await st.metrics(), "dynamo_frontend_prefill_errors_total",
                       model=NAME, kind="CannotConnect") == len(broken.requests)


async def test_a_prefill_error_that_is_not_the_worker_s_fault_ends_the_request() -> None:
    bad, decode = PrefillEngine(fail=BackendError.InvalidArgument), DecodeEngine()
    async with DisaggStack() as st:
        await st.add(bad, "prefill")
        await st.add(decode, "decode")
        with pytest.raises(openai.BadRequestError) as ei:
            await st.client().completions.create(model=NAME, prompt="x", max_tokens=2)
        assert "scripted prefill failure" in str(ei.value)
        assert decode.requests == []
        assert _sample(await st.metrics(), "dynamo_frontend_disagg_requests_total",
                       model=NAME, path="failed") == 1


async def test_cancelling_during_the_standard_prefill_stops_the_prefill_hop() -> None:
    prefill, decode = PrefillEngine(), DecodeEngine()
    prefill.hold = asyncio.Event()
    async with DisaggStack() as st:
        await st.add(prefill, "prefill")
        await st.add(decode, "decode")
        # The response starts with the first token, so the client leaves before any header.
        call = asyncio.ensure_future(st.client().chat.completions.create(
            model=NAME, messages=MESSAGES, max_tokens=3, stream=True))
        await asyncio.wait_for(prefill.started.wait(), 10)
        call.cancel()  # the client leaves while the prompt is prefilled
        await asyncio.wait_for(prefill.stopped.wait(), 10)
        await asyncio.wait_for(prefill.aborted.wait(), 10)
        assert decode.requests == []  # no decode hop for a request that is gone


async def test_cancelling_during_decode_stops_both_bootstrap_hops() -> None:
    prefill, decode = PrefillEngine(bootstrap=True), DecodeEngine()
    prefill.hold = asyncio.Event()  # the prefill stream is still open while decode streams
    decode.hang = True
    async with DisaggStack() as st:
        await st.add(prefill, "prefill")
        await st.add(decode, "decode")
        stream = await st.client().chat.completions.create(
            model=NAME, messages=MESSAGES, max_tokens=5, stream=True)
        await asyncio.wait_for(decode.first_sent.wait(), 10)
        await stream.close()
        await asyncio.wait_for(decode.stopped.wait(), 10)
        await asyncio.wait_for(prefill.stopped.wait(), 10)


async def test_decode_abort_waits_for_the_kv_pull() -> None:
    """DeferredAbort: a decode request stopped while it pulls KV has ``abort`` called only
    after the pull ended (the first-token signal), never during it."""
    prefill, decode = PrefillEngine(), DecodeEngine()
    async with DisaggStack() as st:
        await st.add(prefill, "prefill")
        worker = await st.add(decode, "decode")
        decode.pull = asyncio.Event()
        call = asyncio.ensure_future(st.client().chat.completions.create(
            model=NAME, messages=MESSAGES, max_tokens=3, stream=True))
        await asyncio.wait_for(decode.pulling.wait(), 10)
        call.cancel()
        await asyncio.wait_for(decode.stop_seen.wait(), 10)
        adapter = worker._adapter
        assert adapter is not None and adapter.deferred_aborts == 1
        assert decode.aborts == []  # stopped mid-pull: the abort waits
        decode.pull.set()
        await asyncio.wait_for(decode.stopped.wait(), 10)
        await asyncio.wait_for(decode.aborted.wait(), 10)
        assert decode.aborts == [True]  # it ran once, after the pull


async def test_decode_canary_carries_an_empty_prefill_result() -> None:
    class Canary(DecodeEngine):
        async def health_check_payload(self) -> dict[str, Any] | None:
            return {"token_ids": [1], "stop_conditions": {"max_tokens": 1}}

    engine = Canary()
    async with DisaggStack() as st:
        await st.add(engine, "decode")
        worker = st.workers[0]
        await worker.run_canary()
        assert engine.requests and engine.requests[-1].prefill_result is not None
        assert engine.requests[-1].prefill_result.disaggregated_params == {}


async def test_kv_mode_sends_a_repeated_prompt_to_the_prefill_worker_that_cached_it() -> None:
    """The prefill pool is routed KV-aware on the prefill workers' own KV events (two mocker
    prefill workers, one decode worker, in this process)."""
    from dynamo_backend_common.engines.mocker import MockerEngine

    fast: dict[str, Any] = {"speedup_ratio": 0.0, "block_size": 4, "vocab_size": 200}
    async with DisaggStack(router_mode="kv") as st:
        for _ in range(2):
            await st.add(MockerEngine(**fast, disaggregation_mode="prefill"), "prefill")
        await st.add(MockerEngine(**fast, disaggregation_mode="decode"), "decode")
        router = st.frontend.prefill_router
        assert router is not None
        prompt = "Paris is the capital of France and a large city with many museums. " * 4
        for _ in range(3):
            r = await st.client().completions.create(model=NAME, prompt=prompt, max_tokens=3)
            assert r.usage is not None and r.usage.completion_tokens == 3
            # The next request must find this one's blocks in the prefill router's index.
            await router.wait_for(lambda: router.events_applied > 0, timeout=10)
        chosen = {iid for (_, iid), n in router.decisions.items() if n}
        assert len(chosen) == 1, router.decisions  # round robin would have used both
        assert router.last is not None and router.last.decision.overlap_blocks > 0


@pytest.mark.parametrize("mode", ["direct", "kv"])
async def test_a_named_worker_is_the_decode_worker(mode: str) -> None:
    """Direct routing (the x-worker-instance-id header) picks the decode worker; the prefill
    pool is routed on its own (round robin in direct mode)."""
    prefill, decodes = PrefillEngine(), [DecodeEngine(), DecodeEngine()]
    async with DisaggStack(router_mode=mode) as st:
        await st.add(prefill, "prefill")
        workers = [await st.add(d, "decode") for d in decodes]
        target = workers[1].worker_id
        assert target is not None
        client = st.client().with_options(
            default_headers={"x-worker-instance-id": str(target)})
        for _ in range(2):
            r = await client.completions.create(model=NAME, prompt="hi", max_tokens=2)
            assert r.usage is not None and r.usage.completion_tokens == 2
        assert len(prefill.requests) == 2
        assert decodes[0].requests == [] and len(decodes[1].requests) == 2
