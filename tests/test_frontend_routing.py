"""In-process stack: real workers (request plane on 127.0.0.1) found through memory discovery,
the frontend's ModelManager, Router and EngineClient."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import random
import uuid
from collections.abc import AsyncIterator
from typing import Any

import msgspec
import pytest
from prometheus_client import CollectorRegistry

from dynamo_backend_common import Context, PreprocessedRequest, StopConditions
from dynamo_backend_common.engine import (
    ComponentSnapshot,
    EngineConfig,
    KvEventSource,
    MetricsBindings,
    MetricsCtx,
    PushKvEventSource,
)
from dynamo_backend_common.engines.echo import EchoEngine
from dynamo_backend_common.engines.mocker import MockerEngine
from dynamo_backend_common.frontend.engine_client import EngineClient
from dynamo_backend_common.frontend.model_manager import ModelManager
from dynamo_backend_common.frontend.routing import Router
from dynamo_backend_common.kv.hashing import block_hashes, local_block_hashes
from dynamo_backend_common.protocols.codec import from_msgpack, to_msgpack
from dynamo_backend_common.protocols.common import LLMEngineOutput, RoutingHints
from dynamo_backend_common.protocols.kv import (
    KvCacheEvent,
    KvStored,
    LoadSnapshot,
    RouterEvent,
    StoredBlock,
    decode_kv_events,
    encode_kv_events,
    encode_load,
)
from dynamo_backend_common.runtime.discovery import open_discovery
from dynamo_backend_common.runtime.events import (
    kv_events_subject,
    kv_metrics_subject,
    open_event_plane,
)
from dynamo_backend_common.runtime.publishers import KvEventPublisher, SnapshotPublisher
from dynamo_backend_common.worker import Worker
from dynamo_backend_common.worker.config import ShutdownConfig, WorkerConfig


def _config(bus: str, name: str) -> WorkerConfig:
    return WorkerConfig(
        discovery=f"memory://{bus}", events=f"memory://{bus}", served_model_name=name,
        status_port=None, shutdown=ShutdownConfig(total_secs=5, router_grace_secs=0),
    )


class Stack:
    def __init__(self, mode: str, bus: str, **router_kw: Any) -> None:
        self.bus = bus
        self.mode = mode
        self.router_kw = router_kw
        self.workers: list[Worker] = []
        self.tasks: list[asyncio.Task[int]] = []

    async def add_worker(self, engine: EchoEngine | MockerEngine, name: str) -> Worker:
        worker = Worker(engine, _config(self.bus, name))
        self.workers.append(worker)
        self.tasks.append(asyncio.create_task(worker.run()))
        await asyncio.wait_for(worker.ready.wait(), 10)
        return worker

    async def __aenter__(self) -> Stack:
        self.discovery = open_discovery(f"memory://{self.bus}")
        await self.discovery.start()
        self.events = open_event_plane(f"memory://{self.bus}")
        await self.events.start()
        self.models = ModelManager(self.discovery)
        await self.models.start()
        self.router = Router(self.models, self.mode, events=self.events, seed=1, **self.router_kw)
        self.client = EngineClient(self.models, self.router)
        return self

    async def __aexit__(self, *exc: object) -> None:
        for w in self.workers:
            w.request_shutdown("test")
        codes = await asyncio.wait_for(asyncio.gather(*self.tasks), 20)
        await self.client.close()
        await self.router.close()
        await self.models.close()
        await self.events.close()
        await self.discovery.close()
        assert codes == [0] * len(codes)

    async def collect(self, model: str, request: PreprocessedRequest) -> list[int]:
        out: list[int] = []
        stream: AsyncIterator[object] = self.client.generate(model, request, Context())
        async for chunk in stream:
            out.extend(chunk.token_ids)  # type: ignore[attr-defined]
        return out

    async def send_to(self, instance_id: int, request: PreprocessedRequest) -> list[int]:
        """Serve ``request`` on one chosen worker, bypassing the router (to warm its cache)."""
        worker = next(w for e in self.models.models.values() for i, w in e.workers.items()
                      if i == instance_id)
        out: list[int] = []
        stream = self.client.transport.stream(worker.info, to_msgpack(request), Context())
        try:
            async for raw in stream:
                out.extend(from_msgpack(raw, LLMEngineOutput).token_ids)
        finally:
            await stream.aclose()
        return out

    def publish_kv(self, event: RouterEvent) -> None:
        """Publish a KV event as a worker of the default namespace/component would."""
        self.events.publish(kv_events_subject("dynamo", "backend"), encode_kv_events([event]))


async def test_round_robin_spreads_requests_over_two_workers() -> None:
    async with Stack("round_robin", uuid.uuid4().hex) as stack:
        engines = [EchoEngine(), EchoEngine()]
        for e in engines:
            await stack.add_worker(e, "echo-rr")
        await stack.models.wait_for_model("echo-rr", workers=2, timeout=10)
        req = PreprocessedRequest(token_ids=[5, 6, 7], stop_conditions=StopConditions(max_tokens=3))
        for _ in range(6):
            assert await stack.collect("echo-rr", req) == [5, 6, 7]
        ids = {w.worker_id for w in stack.workers}
        assert stack.router.decisions == {("echo-rr", i): 3 for i in ids}


async def test_kv_mode_sends_a_repeated_prefix_to_the_worker_that_cached_it() -> None:
    async with Stack("kv", uuid.uuid4().hex) as stack:
        for _ in range(3):
            await stack.add_worker(
                MockerEngine(speedup_ratio=0, block_size=4, num_gpu_blocks=256), "mock-kv")
        await stack.models.wait_for_model("mock-kv", workers=3, timeout=10)
        prompt = list(range(100, 140))  # 10 full blocks
        req = PreprocessedRequest(token_ids=prompt, stop_conditions=StopConditions(max_tokens=2))
        await stack.collect("mock-kv", req)
        (first,) = [iid for (_, iid), n in stack.router.decisions.items() if n]
        await stack.router.wait_for_events(1, timeout=5)
        for _ in range(5):
            await stack.collect("mock-kv", req)
        assert stack.router.decisions == {("mock-kv", first): 6}


# -- kv mode ----------------------------------------------------------------------------------

MODEL = "mock-kv"


def _mocker(**kw: Any) -> MockerEngine:
    kw.setdefault("speedup_ratio", 0)
    kw.setdefault("num_gpu_blocks", 256)
    return MockerEngine(block_size=4, snapshot_interval_ms=0, **kw)


def _request(tokens: list[int], max_tokens: int = 2, dp_rank: int | None = None
             ) -> PreprocessedRequest:
    return PreprocessedRequest(
        token_ids=tokens, stop_conditions=StopConditions(max_tokens=max_tokens),
        routing=RoutingHints(dp_rank=dp_rank) if dp_rank is not None else None)


def _tokens(seed: int, n: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(1000) for _ in range(n)]


async def _kv_stack(stack: Stack, workers: int, **mocker_kw: Any) -> list[int]:
    """Add ``workers`` mocker workers of MODEL; their instance ids once the frontend sees them."""
    added = [await stack.add_worker(_mocker(**mocker_kw), MODEL) for _ in range(workers)]
    await stack.models.wait_for_model(MODEL, workers=len(stack.workers), timeout=10)
    return [w.worker_id for w in added if w.worker_id is not None]


def _sample(registry: CollectorRegistry, name: str, **labels: str) -> float:
    value = registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


async def test_kv_picks_the_longest_cached_prefix_when_loads_are_equal() -> None:
    registry = CollectorRegistry()
    async with Stack("kv", uuid.uuid4().hex, registry=registry) as stack:
        ids = await _kv_stack(stack, 3)
        prompt = _tokens(1, 40)  # 10 blocks
        hashes = block_hashes(prompt, 4)
        cached = dict(zip(ids, (2, 6, 4), strict=True))
        for iid, n in cached.items():  # warm each worker with its own prefix length
            await stack.send_to(iid, _request(prompt[: 4 * n]))
        want = {(iid, 0): n for iid, n in cached.items()}

        def settled() -> bool:
            idle = all((load := stack.router.load((i, 0))) is not None
                       and load.kv_used_blocks == 0 for i in ids)
            return idle and stack.router.indexer.find_matches(hashes) == want

        await stack.router.wait_for(settled, timeout=5)
        best = ids[1]
        assert await stack.collect(MODEL, _request(prompt)) != []
        last = stack.router.last
        assert last is not None
        assert (last.worker.instance_id, last.decision.overlap_blocks) == (best, 6)
        assert last.decision.prompt_blocks == 10
        # Cost = overlap_weight * blocks to prefill + blocks in use (none) + its own 10 blocks.
        assert last.decision.logits == {(i, 0): float(10 - n + 10) for i, n in cached.items()}
        labels = {"model": MODEL, "worker_id": f"{best:x}", "dp_rank": "0"}
        assert _sample(registry, "dynamo_frontend_router_overlap_blocks_total", **labels) == 6
        assert _sample(registry, "dynamo_frontend_router_prompt_blocks_total", **labels) == 10
        assert _sample(registry, "dynamo_frontend_router_decisions_total",
                       policy="kv", **labels) == 1
        assert _sample(registry, "dynamo_frontend_router_kv_events_total", result="applied") > 0


@pytest.mark.parametrize(
    ("knobs", "why"),
    [({}, "cost"), ({"overlap_weight": 100.0, "busy_threshold": 0.1}, "busy_threshold")],
)
async def test_kv_avoids_a_loaded_worker_despite_its_cached_prefix(
    knobs: dict[str, Any], why: str
) -> None:
    async with Stack("kv", uuid.uuid4().hex, **knobs) as stack:
        # Real time (speedup 1: 12 ms per decode step), so long requests stay running.
        (busy,) = await _kv_stack(stack, 1, speedup_ratio=1.0, num_gpu_blocks=128)
        prompt = _tokens(2, 40)  # 10 blocks, cached on `busy` below
        await stack.collect(MODEL, _request(prompt))
        await stack.router.wait_for(
            lambda: stack.router.indexer.find_matches(block_hashes(prompt, 4)) == {(busy, 0): 10},
            timeout=5)
        # Three long requests (8 prompt blocks each) keep `busy` loaded.
        ctxs = [Context() for _ in range(3)]
        started = [asyncio.Event() for _ in ctxs]

        async def long_request(i: int) -> None:
            stream = stack.client.generate(MODEL, _request(_tokens(10 + i, 32), 400), ctxs[i])
            async for _ in stream:
                started[i].set()

        tasks = [asyncio.create_task(long_request(i)) for i in range(3)]
        try:
            await asyncio.wait_for(asyncio.gather(*(e.wait() for e in started)), 10)
            (idle,) = await _kv_stack(stack, 1)  # a second, idle worker joins
            if why == "busy_threshold":  # needs the loaded worker's capacity: a snapshot
                await stack.router.wait_for(
                    lambda: (s := stack.router.load((busy, 0))) is not None
                    and s.kv_used_blocks >= 24, timeout=5)
            await stack.collect(MODEL, _request(prompt))
            last = stack.router.last
            assert last is not None and last.worker.instance_id == idle, last.decision
            if why == "cost":  # busy: 0 to prefill + >= 24 in use + 10; idle: 10 + 0 + 10
                assert last.decision.logits[(idle, 0)] == 20
                assert last.decision.logits[(busy, 0)] >= 34
            else:  # the busy worker was not even a candidate
                assert set(last.decision.logits) == {(idle, 0)}
        finally:
            for ctx in ctxs:
                ctx.stop_generating()
            await asyncio.wait_for(asyncio.gather(*tasks), 10)


async def test_kv_dp_ranks_are_targets_and_the_rank_reaches_the_engine() -> None:
    registry = CollectorRegistry()
    async with Stack("kv", uuid.uuid4().hex, registry=registry) as stack:
        engine = _mocker(dp_size=2)
        await stack.add_worker(engine, MODEL)
        await stack.models.wait_for_model(MODEL, timeout=10)
        (iid,) = [w.worker_id for w in stack.workers]
        assert iid is not None
        p, q = _tokens(3, 40), _tokens(4, 40)
        await stack.collect(MODEL, _request(p))
        last = stack.router.last
        assert last is not None
        rank = last.dp_rank
        other = 1 - rank
        hp, hq = block_hashes(p, 4), block_hashes(q, 4)
        # The chosen rank served it: its cache holds the prompt, the other rank's does not.
        assert set(hp) <= engine.kv_manager(rank).cached_hashes()
        assert not engine.kv_manager(other).cached_hashes() & set(hp)
        await stack.router.wait_for(
            lambda: stack.router.indexer.find_matches(hp) == {(iid, rank): 10}, timeout=5)
        # Warm q on the other rank directly; the index keeps one entry per rank.
        await stack.send_to(iid, _request(q, dp_rank=other))
        await stack.router.wait_for(
            lambda: stack.router.indexer.find_matches(hq) == {(iid, other): 10}, timeout=5)
        assert stack.router.indexer.worker_blocks((iid, rank)).isdisjoint(hq)
        for prompt, want in ((q, other), (p, rank), (q, other)):
            await stack.collect(MODEL, _request(prompt))
            last = stack.router.last
            assert last is not None
            assert (last.dp_rank, last.decision.overlap_blocks) == (want, 10)
        for r, n in ((rank, 2), (other, 2)):
            assert _sample(registry, "dynamo_frontend_router_decisions_total", model=MODEL,
                           policy="kv", worker_id=f"{iid:x}", dp_rank=str(r)) == n


async def test_kv_worker_leaving_drops_its_entries_and_late_events() -> None:
    async with Stack("kv", uuid.uuid4().hex) as stack:
        leaving, staying = await _kv_stack(stack, 2)
        p, q = _tokens(5, 40), _tokens(6, 40)
        await stack.send_to(leaving, _request(p))
        await stack.send_to(staying, _request(q))
        index = stack.router.indexer
        await stack.router.wait_for(
            lambda: index.find_matches(block_hashes(p, 4)) == {(leaving, 0): 10}
            and index.find_matches(block_hashes(q, 4)) == {(staying, 0): 10}, timeout=5)
        stack.workers[0].request_shutdown("test")
        assert await asyncio.wait_for(stack.tasks[0], 10) == 0
        await stack.router.wait_for(lambda: (leaving, 0) not in index.workers(), timeout=10)
        assert index.find_matches(block_hashes(p, 4)) == {}
        assert index.find_matches(block_hashes(q, 4)) == {(staying, 0): 10}
        # An event it published while leaving, delivered late, must not resurrect it.
        stack.publish_kv(RouterEvent(worker_id=leaving, event=KvCacheEvent(
            event_id=10_000, data=KvStored(blocks=[StoredBlock(block_hash=7)]))))
        await stack.router.wait_for(lambda: stack.router.events_ignored == 1, timeout=5)
        assert (leaving, 0) not in index.workers()
        # Requests now go to the remaining worker.
        await stack.collect(MODEL, _request(p))
        last = stack.router.last
        assert last is not None and last.worker.instance_id == staying


async def test_kv_event_gap_drops_the_workers_entries(caplog: pytest.LogCaptureFixture) -> None:
    registry = CollectorRegistry()
    async with Stack("kv", uuid.uuid4().hex, registry=registry) as stack:
        await _kv_stack(stack, 1)  # the router subscribes to the component's events
        index = stack.router.indexer
        other = 0x4242  # a worker rank whose events we write by hand
        p = _tokens(7, 40)
        hashes = block_hashes(p, 4)

        def stored(event_id: int, blocks: list[int]) -> RouterEvent:
            data = KvStored(blocks=[StoredBlock(block_hash=h) for h in blocks])
            return RouterEvent(worker_id=other, event=KvCacheEvent(event_id=event_id, data=data))

        stack.publish_kv(stored(0, hashes[:5]))
        stack.publish_kv(stored(1, hashes[5:]))
        await stack.router.wait_for(lambda: index.find_matches(hashes) == {(other, 0): 10}, 5)
        # Events 2..4 were lost: the router cannot know what they stored or removed.
        with caplog.at_level(logging.WARNING, "dynamo_backend_common.frontend"):
            stack.publish_kv(stored(5, [7]))
            await stack.router.wait_for(lambda: stack.router.kv_event_gaps == 1, timeout=5)
        assert "KV event gap from worker 4242 rank 0 (expected event 2, got 5" in caplog.text
        assert index.worker_blocks((other, 0)) == {7}  # old entries dropped, new baseline kept
        assert _sample(registry, "dynamo_frontend_router_kv_event_gaps_total") == 1
        stack.publish_kv(stored(6, hashes[:3]))  # the stream goes on from the new baseline
        await stack.router.wait_for(lambda: index.find_matches(hashes) == {(other, 0): 3}, 5)
        assert stack.router.kv_event_gaps == 1


class _KvEchoEngine(EchoEngine):
    """An echo engine with a KV publisher and a load publisher the test drives by hand."""

    def __init__(self) -> None:
        super().__init__()
        self.kv: KvEventPublisher | None = None
        self.load: SnapshotPublisher | None = None

    async def start(self, worker_id: int) -> EngineConfig:
        cfg = await super().start(worker_id)
        return dataclasses.replace(cfg, kv_cache_block_size=4, total_kv_blocks=64)

    async def kv_event_sources(self) -> list[KvEventSource]:
        return [PushKvEventSource(self._set_kv)]

    def _set_kv(self, publisher: KvEventPublisher) -> None:
        self.kv = publisher

    async def setup_metrics(self, ctx: MetricsCtx) -> MetricsBindings:
        return MetricsBindings(dp_ranks=[0], on_publisher_ready=self._set_load)

    def _set_load(self, publisher: SnapshotPublisher) -> None:
        self.load = publisher


async def test_worker_publishes_dynamo_formats_and_batches_events_of_one_moment() -> None:
    """The worker's publishing path: KV events produced together go out as one Dynamo list
    message; loads are Dynamo's ActiveLoad with our kv_total_blocks."""
    bus = uuid.uuid4().hex
    async with Stack("round_robin", bus) as stack:
        kv_sub = stack.events.subscribe(kv_events_subject("dynamo", "backend"))
        load_sub = stack.events.subscribe(kv_metrics_subject("dynamo", "backend"))
        engine = _KvEchoEngine()
        worker = await stack.add_worker(engine, "kv-echo")
        assert engine.kv is not None and engine.load is not None
        hashes = block_hashes(list(range(12)), 4)
        engine.kv.publish_stored(hashes[:2], token_ids=list(range(8)), block_size=4)
        engine.kv.publish_stored(hashes[2:], parent_hash=hashes[1])
        engine.kv.publish_removed(hashes[2:])
        msg = await asyncio.wait_for(anext(kv_sub), 5)
        plain = msgspec.msgpack.decode(msg.payload)
        assert [e["event"]["event_id"] for e in plain] == [0, 1, 2]  # one message, three events
        assert list(plain[0]["event"]["data"]) == ["stored"]
        assert plain[0]["event"]["data"]["stored"]["blocks"][1]["tokens_hash"] == (
            local_block_hashes(list(range(8)), 4)[1])
        assert plain[2]["event"]["data"] == {"removed": {"block_hashes": hashes[2:]}}
        events, unknown = decode_kv_events(msg.payload)
        assert unknown == 0 and {e.worker_id for e in events} == {worker.worker_id}
        engine.kv.publish_cleared()
        msg = await asyncio.wait_for(anext(kv_sub), 5)
        assert msgspec.msgpack.decode(msg.payload)[0]["event"]["data"] == "cleared"

        engine.load.publish(0, ComponentSnapshot(kv_used_blocks=3, kv_total_blocks=64,
                                                 gpu_cache_usage=0.05))
        msg = await asyncio.wait_for(anext(load_sub), 5)
        assert msgspec.msgpack.decode(msg.payload) == {
            "worker_id": worker.worker_id, "dp_rank": 0, "active_decode_blocks": None,
            "active_prefill_tokens": None, "kv_used_blocks": 3, "kv_total_blocks": 64}


async def test_kv_router_takes_a_dynamo_workers_capacity_from_its_card() -> None:
    """A load without kv_total_blocks (Dynamo's ActiveLoad) gets the card's total_kv_blocks,
    so the busy threshold works for Dynamo workers too."""
    async with Stack("kv", uuid.uuid4().hex, busy_threshold=0.5) as stack:
        await stack.add_worker(
            MockerEngine(speedup_ratio=0, block_size=4, num_gpu_blocks=100), "mock-cap")
        await stack.models.wait_for_model("mock-cap", workers=1, timeout=10)
        (iid,) = stack.models.models["mock-cap"].workers
        stack.events.publish(kv_metrics_subject("dynamo", "backend"), encode_load(
            LoadSnapshot(worker_id=iid, kv_used_blocks=70)))
        await stack.router.wait_for(
            lambda: (snap := stack.router.load((iid, 0))) is not None
            and snap.kv_used_blocks == 70, timeout=5)
        snap = stack.router.load((iid, 0))
        assert snap is not None and snap.kv_total_blocks == 100
