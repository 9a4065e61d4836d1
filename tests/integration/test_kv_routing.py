"""The whole KV routing path across processes: a mocker worker subprocess (``dynamo-backend
worker``, file discovery) publishes KV events and load snapshots on a real event plane (ZMQ
with no server, or NATS), and an in-process frontend (ModelManager + Router + EngineClient)
indexes them and routes a repeated prompt back to the cached prefix."""

from __future__ import annotations

import contextlib
import random
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from dynamo_backend_common import Context, PreprocessedRequest, StopConditions
from dynamo_backend_common.frontend.engine_client import EngineClient
from dynamo_backend_common.frontend.model_manager import ModelManager
from dynamo_backend_common.frontend.routing import Router
from dynamo_backend_common.kv.hashing import block_hashes
from dynamo_backend_common.runtime.discovery import open_discovery
from dynamo_backend_common.runtime.events import open_event_plane

pytestmark = pytest.mark.integration

MODEL = "m"
TIMEOUT = 20.0


@contextlib.asynccontextmanager
async def frontend(discovery_url: str, events_url: str) -> AsyncIterator[EngineClient]:
    discovery = open_discovery(discovery_url)
    await discovery.start()
    events = open_event_plane(events_url, discovery=discovery)
    await events.start()
    models = ModelManager(discovery)
    await models.start()
    router = Router(models, "kv", events=events, seed=0)
    client = EngineClient(models, router)
    try:
        yield client
    finally:
        await client.close()
        await router.close()
        await models.close()
        await events.close()
        await discovery.close()


async def generate(client: EngineClient, tokens: list[int]) -> int:
    request = PreprocessedRequest(token_ids=tokens, stop_conditions=StopConditions(max_tokens=2))
    n = 0
    async for chunk in client.generate(MODEL, request, Context()):
        n += len(chunk.token_ids)
    return n


def start(argv: list[str], log_path: Path) -> subprocess.Popen[bytes]:
    with open(log_path, "wb") as log:
        return subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)


def tokens(seed: int, n: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(1000) for _ in range(n)]


@pytest.mark.parametrize("plane", ["zmq", "nats"])
async def test_kv_routing_across_processes(
    plane: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    events_url = "zmq://" if plane == "zmq" else request.getfixturevalue("nats_url")
    discovery_url = f"file://{tmp_path / 'discovery'}"
    log_path = tmp_path / "worker.log"
    argv = [
        sys.executable, "-m", "dynamo_backend_common.cli", "worker", "--engine", "mocker",
        "--discovery", discovery_url, "--events", events_url, "--served-model-name", MODEL,
        "--graceful-shutdown-grace-secs", "0",
        "--", "--speedup-ratio", "0", "--block-size", "4",
    ]  # fmt: skip
    proc = start(argv, log_path)
    try:
        async with frontend(discovery_url, events_url) as client:
            router, models = client.router, client.models
            await models.wait_for_model(MODEL, timeout=TIMEOUT)
            (iid,) = models.models[MODEL].workers
            # Subscriptions reach publishers a moment after they are made (ZMQ's slow joiner,
            # NATS's SUB round trip): send probe prompts until their KV events and a load
            # snapshot arrive (each probe runs for two steps, so the worker's load changes and
            # it publishes a snapshot without waiting for its heartbeat).
            deadline = time.monotonic() + TIMEOUT
            seed = 100

            def heard() -> bool:
                return router.events_applied > 0 and router.load((iid, 0)) is not None

            while not heard():
                assert time.monotonic() < deadline, log_path.read_text()[-3000:]
                await generate(client, tokens(seed, 8))
                seed += 1
                with contextlib.suppress(TimeoutError):
                    await router.wait_for(heard, timeout=0.5)

            prompt = tokens(1, 40)  # 10 blocks of 4 tokens
            hashes = block_hashes(prompt, 4)
            assert await generate(client, prompt) == 2
            await router.wait_for(
                lambda: router.indexer.find_matches(hashes) == {(iid, 0): 10}, TIMEOUT)
            assert await generate(client, prompt) == 2
            last = router.last
            assert last is not None
            assert (last.worker.instance_id, last.decision.overlap_blocks) == (iid, 10)

            # The worker shuts down: it leaves discovery and the index forgets it.
            proc.terminate()
            await router.wait_for(lambda: (iid, 0) not in router.indexer.workers(), TIMEOUT)
            assert MODEL not in models.models
        assert proc.wait(TIMEOUT) == 0, log_path.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
