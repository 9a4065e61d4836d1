"""In-process stack: real workers (request plane on 127.0.0.1) found through memory discovery,
the frontend's ModelManager, Router and EngineClient."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

from dynamo_backend_common import Context, PreprocessedRequest, StopConditions
from dynamo_backend_common.config import ShutdownConfig, WorkerConfig
from dynamo_backend_common.echo import EchoEngine
from dynamo_backend_common.frontend.engine_client import EngineClient
from dynamo_backend_common.frontend.model_manager import ModelManager
from dynamo_backend_common.frontend.routing import Router
from dynamo_backend_common.mocker import MockerEngine
from dynamo_backend_common.runtime.discovery import open_discovery
from dynamo_backend_common.runtime.events import open_event_plane
from dynamo_backend_common.worker import Worker


def _config(bus: str, name: str) -> WorkerConfig:
    return WorkerConfig(
        discovery=f"memory://{bus}", events=f"memory://{bus}", served_model_name=name,
        status_port=None, shutdown=ShutdownConfig(total_secs=5, router_grace_secs=0),
    )


class Stack:
    def __init__(self, mode: str, bus: str) -> None:
        self.bus = bus
        self.mode = mode
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
        self.router = Router(self.models, self.mode, events=self.events, seed=1)
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
