"""The HTTP frontend in-process: uvicorn on 127.0.0.1 (port 0), workers in the same loop, memory
discovery. Covers what the subprocess tests do not: the API key, models without a model
directory, models coming and going, engine errors with their kind."""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import openai
import pytest

from dynamo_backend_common import (
    DynamoError,
    EngineConfig,
    GenerateContext,
    LLMEngine,
    LLMEngineOutput,
    PreprocessedRequest,
    chunk,
)
from dynamo_backend_common.engines.echo import EchoEngine
from dynamo_backend_common.errors import BackendError
from dynamo_backend_common.fixtures import tiny_model_dir
from dynamo_backend_common.frontend.generation import dynamo_error_to_request_error
from dynamo_backend_common.frontend.http import HttpServer
from dynamo_backend_common.frontend.server import Frontend, FrontendConfig
from dynamo_backend_common.model_dir import ModelDir
from dynamo_backend_common.runtime.discovery import open_discovery
from dynamo_backend_common.worker import Worker
from dynamo_backend_common.worker.config import ShutdownConfig, WorkerConfig


class FailingEngine(LLMEngine):
    """Raises a typed error: before any token for ``max_tokens`` 1, after two tokens else."""

    async def start(self, worker_id: int) -> EngineConfig:
        return EngineConfig(model="failing", context_length=2048)

    async def generate(
        self, request: PreprocessedRequest, ctx: GenerateContext
    ) -> AsyncIterator[LLMEngineOutput]:
        if request.stop_conditions.max_tokens == 1:
            raise DynamoError(BackendError.InvalidArgument, "temperature too spicy")
        yield chunk.token(300)
        yield chunk.token(301)
        raise DynamoError(BackendError.Unknown, "engine fell over")

    async def cleanup(self) -> None:
        pass


class LogprobEngine(LLMEngine):
    """Two tokens with log probabilities and two alternatives each."""

    async def start(self, worker_id: int) -> EngineConfig:
        return EngineConfig(model="lp", context_length=2048)

    async def generate(
        self, request: PreprocessedRequest, ctx: GenerateContext
    ) -> AsyncIterator[LLMEngineOutput]:
        assert request.output_options.logprobs == 2
        top = [[{"token_id": 300, "logprob": -0.1}, {"token_id": 301, "logprob": -2.5}]]
        yield LLMEngineOutput(token_ids=[300], log_probs=[-0.1], top_logprobs=top)
        yield LLMEngineOutput(token_ids=[301], log_probs=[-2.5], top_logprobs=top,
                              finish_reason=LLMEngineOutput.length().finish_reason)

    async def cleanup(self) -> None:
        pass


class SeedEngine(LLMEngine):
    """Emits one token chosen by the request's seed (``300 + seed``), then stops."""

    async def start(self, worker_id: int) -> EngineConfig:
        return EngineConfig(model="seed", context_length=2048)

    async def generate(
        self, request: PreprocessedRequest, ctx: GenerateContext
    ) -> AsyncIterator[LLMEngineOutput]:
        assert request.sampling_options.n is None  # each choice is its own request
        seed = request.sampling_options.seed or 0
        yield LLMEngineOutput(token_ids=[300 + seed],
                              finish_reason=LLMEngineOutput.length().finish_reason)

    async def cleanup(self) -> None:
        pass


class Stack:
    def __init__(self, **frontend: Any) -> None:
        self.bus = uuid.uuid4().hex
        self.frontend_options = frontend
        self.workers: list[Worker] = []
        self.tasks: list[asyncio.Task[int]] = []

    async def __aenter__(self) -> Stack:
        self.discovery = open_discovery(f"memory://{self.bus}")
        await self.discovery.start()
        self.frontend = Frontend(FrontendConfig(port=0, **self.frontend_options),
                                 discovery=self.discovery)
        await self.frontend.start()
        self.server = HttpServer(self.frontend.app, "127.0.0.1", 0)
        await self.server.start()
        self.url = self.server.url
        return self

    async def add_worker(self, engine: LLMEngine, name: str, model_path: str = "",
                         **options: Any) -> Worker:
        cfg = WorkerConfig(discovery=f"memory://{self.bus}", events=f"memory://{self.bus}",
                           served_model_name=name, model_path=model_path, status_port=None,
                           shutdown=ShutdownConfig(total_secs=5, router_grace_secs=0),
                           **options)
        worker = Worker(engine, cfg)
        self.workers.append(worker)
        self.tasks.append(asyncio.create_task(worker.run()))
        await asyncio.wait_for(worker.ready.wait(), 10)
        await self.frontend.models.wait_for_model(name, timeout=10)
        return worker

    async def __aexit__(self, *exc: object) -> None:
        await self.server.stop()
        for w in self.workers:
            w.request_shutdown("test")
        await asyncio.wait_for(asyncio.gather(*self.tasks), 20)
        await self.frontend.close()
        await self.discovery.close()


async def test_api_key_guards_v1_routes_only() -> None:
    async with Stack(api_key="s3cret") as st:
        await st.add_worker(EchoEngine(), "echo", str(tiny_model_dir()))
        async with httpx.AsyncClient(base_url=st.url, timeout=10) as h:
            for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": "s3cret"}):
                r = await h.get("/v1/models", headers=headers)
                assert r.status_code == 401
                assert r.json()["error"]["code"] == "invalid_api_key"
            r = await h.post("/v1/completions", json={"model": "echo", "prompt": "x"})
            assert r.status_code == 401
            assert (await h.get("/health")).status_code == 200
            assert (await h.get("/metrics")).status_code == 200
        client = openai.AsyncOpenAI(base_url=st.url + "/v1", api_key="s3cret", max_retries=0)
        r2 = await client.completions.create(model="echo", prompt="hello", max_tokens=2)
        assert r2.usage is not None and r2.usage.completion_tokens == 2
        bad = openai.AsyncOpenAI(base_url=st.url + "/v1", api_key="nope", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            await bad.models.list()


async def test_model_without_model_dir_gets_a_clear_error() -> None:
    async with Stack() as st:
        await st.add_worker(EchoEngine(), "bare")  # no --model-path
        async with httpx.AsyncClient(base_url=st.url, timeout=10) as h:
            r = await h.post("/v1/chat/completions", json={
                "model": "bare", "messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 400
        err = r.json()["error"]
        assert err["code"] == "model_not_supported" and "--model-path" in err["message"]


async def test_models_come_and_go_with_their_workers() -> None:
    async with Stack() as st:
        client = openai.AsyncOpenAI(base_url=st.url + "/v1", api_key="x", max_retries=0)
        assert [m.id async for m in client.models.list()] == []
        w = await st.add_worker(EchoEngine(), "echo-a", str(tiny_model_dir()))
        assert [m.id async for m in client.models.list()] == ["echo-a"]
        w.request_shutdown("test")
        await asyncio.wait_for(st.tasks[0], 20)

        await st.frontend.models.wait_for(lambda: "echo-a" not in st.frontend.models.models,
                                          timeout=10)
        assert [m.id async for m in client.models.list()] == []
        with pytest.raises(openai.NotFoundError):
            await client.completions.create(model="echo-a", prompt="x")


async def test_engine_errors_keep_their_kind() -> None:
    async with Stack() as st:
        await st.add_worker(FailingEngine(), "failing", str(tiny_model_dir()))
        async with httpx.AsyncClient(base_url=st.url, timeout=10) as h:
            r = await h.post("/v1/completions", json={"model": "failing", "prompt": "x",
                                                      "max_tokens": 1})
            assert r.status_code == 400
            assert r.json()["error"]["code"] == "InvalidArgument"
            assert "spicy" in r.json()["error"]["message"]
            # Streaming: the error before the first token is still a real HTTP status.
            r = await h.post("/v1/completions", json={"model": "failing", "prompt": "x",
                                                      "max_tokens": 1, "stream": True})
            assert r.status_code == 400
            r = await h.post("/v1/completions", json={"model": "failing", "prompt": "x",
                                                      "max_tokens": 5})
            assert r.status_code == 500 and r.json()["error"]["code"] == "Unknown"
            # Mid-stream: an error event, then [DONE].
            r = await h.post("/v1/completions", json={"model": "failing", "prompt": "x",
                                                      "max_tokens": 5, "stream": True})
            assert r.status_code == 200
            events = [e for e in r.text.split("\n\n") if e]
            assert '"code":"Unknown"' in events[-2] and events[-1] == "data: [DONE]"
        client = openai.AsyncOpenAI(base_url=st.url + "/v1", api_key="x", max_retries=0)
        stream = await client.completions.create(model="failing", prompt="x", max_tokens=5,
                                                 stream=True)
        with pytest.raises(openai.APIError, match="engine fell over"):
            async for _ in stream:
                pass


async def test_logprobs_are_rendered_for_chat_and_completions() -> None:
    async with Stack() as st:
        await st.add_worker(LogprobEngine(), "lp", str(tiny_model_dir()))
        client = openai.AsyncOpenAI(base_url=st.url + "/v1", api_key="x", max_retries=0)
        chat = await client.chat.completions.create(
            model="lp", messages=[{"role": "user", "content": "hi"}], logprobs=True,
            top_logprobs=2)
        lp = chat.choices[0].logprobs
        assert lp is not None and lp.content is not None
        assert [t.logprob for t in lp.content] == [-0.1, -2.5]
        assert "".join(t.token for t in lp.content) == chat.choices[0].message.content
        assert [len(t.top_logprobs) for t in lp.content] == [2, 2]
        comp = await client.completions.create(model="lp", prompt="hi", logprobs=2)
        clp = comp.choices[0].logprobs
        assert clp is not None and clp.token_logprobs == [-0.1, -2.5]
        assert clp.text_offset == [0, len(clp.tokens[0])]  # type: ignore[index]
        stream = await client.chat.completions.create(
            model="lp", messages=[{"role": "user", "content": "hi"}], logprobs=True,
            top_logprobs=2, stream=True)
        got = [c.choices[0].logprobs.content for c in [x async for x in stream]
               if c.choices and c.choices[0].logprobs is not None]
        assert [t.logprob for part in got for t in part or []] == [-0.1, -2.5]


async def test_n_choices_get_distinct_seeds_and_errors_fail_the_request() -> None:
    async with Stack() as st:
        await st.add_worker(SeedEngine(), "seed", str(tiny_model_dir()))
        await st.add_worker(FailingEngine(), "failing", str(tiny_model_dir()))
        client = openai.AsyncOpenAI(base_url=st.url + "/v1", api_key="x", max_retries=0)
        r = await client.completions.create(model="seed", prompt="hi", n=3, seed=5)
        md = st.frontend.models.models["seed"]
        tok = (await st.frontend.model_state(md)).model_dir.tokenizer
        assert [c.text for c in r.choices] == [tok.decode([305 + i]) for i in range(3)]
        assert r.usage is not None and r.usage.completion_tokens == 3
        with pytest.raises(openai.InternalServerError):  # one choice fails: the request fails
            await client.completions.create(model="failing", prompt="x", n=2, max_tokens=5)
        stream = await client.completions.create(model="failing", prompt="x", n=2,
                                                 max_tokens=5, stream=True)
        with pytest.raises(openai.APIError, match="engine fell over"):
            async for _ in stream:
                pass


class CountingEngine(EchoEngine):
    """The echo engine, counting the requests with ``max_tokens`` 7 (not the health canary)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    async def generate(
        self, request: PreprocessedRequest, ctx: GenerateContext
    ) -> AsyncIterator[LLMEngineOutput]:
        self.calls += request.stop_conditions.max_tokens == 7
        async for out in super().generate(request, ctx):
            yield out


async def test_client_gone_before_generation_never_reaches_a_worker(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    loading = threading.Event()
    real_load = ModelDir.load

    def slow_load(*args: Any, **kwargs: Any) -> ModelDir:
        loading.set()
        time.sleep(0.5)  # a big tokenizer: the client gives up meanwhile
        return real_load(*args, **kwargs)

    monkeypatch.setattr(ModelDir, "load", staticmethod(slow_load))
    engine = CountingEngine()
    async with Stack() as st:
        await st.add_worker(engine, "count", str(tiny_model_dir()))
        host, port = st.url.removeprefix("http://").rsplit(":", 1)
        _, writer = await asyncio.open_connection(host, int(port))
        body = json.dumps({"model": "count", "prompt": "hi", "max_tokens": 7}).encode()
        writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: t\r\nContent-Type: "
                     b"application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        await writer.drain()
        assert await asyncio.to_thread(loading.wait, 10)
        writer.close()
        await writer.wait_closed()
        async with httpx.AsyncClient(base_url=st.url, timeout=10) as h:
            for _ in range(200):
                metrics = (await h.get("/metrics")).text
                if 'status="cancelled"' in metrics:
                    break
                await asyncio.sleep(0.05)
            assert 'status="cancelled"' in metrics and engine.calls == 0, metrics
            r = await h.post("/v1/completions", json={"model": "count", "prompt": "hi",
                                                      "max_tokens": 7})
            assert r.status_code == 200 and engine.calls == 1


def test_error_kind_to_status() -> None:
    status = {k: dynamo_error_to_request_error(DynamoError(k, "m")).status for k in BackendError}
    assert status[BackendError.InvalidArgument] == 400
    assert status[BackendError.CannotConnect] == 503
    assert status[BackendError.Disconnected] == 502
    assert status[BackendError.ResponseTimeout] == 504
    assert status[BackendError.Unknown] == 500


def test_cli_run_and_frontend_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    from dynamo_backend_common.cli import build_parser, main

    for name in ("DYN_HTTP_HOST", "DYN_HTTP_PORT", "DYN_API_KEY", "DYN_ROUTER_MODE"):
        monkeypatch.delenv(name, raising=False)
    parser = build_parser()
    args, rest = parser.parse_known_args(
        ["run", "--engine", "echo", "--workers", "3", "--port", "0", "--mod", "x",
         "--delay-ms", "5"])
    assert (args.engine, args.workers, args.port, args.model) == ("echo", 3, 0, None)
    assert rest == ["--mod", "x", "--delay-ms", "5"]  # no abbreviation matching: the engine's
    args, rest = parser.parse_known_args(
        ["frontend", "--router-mode", "kv", "--kv-overlap-weight", "2", "--api-key", "k"])
    assert (args.router_mode, args.kv_overlap_weight, args.api_key, args.host, args.port) == (
        "kv", 2.0, "k", "127.0.0.1", 8000)
    with pytest.raises(SystemExit, match="cannot import engine module"):
        main(["run", "--engine", "no_such_module_xyz:Engine"])


def test_run_gives_the_mocker_the_model_vocabulary() -> None:
    from pathlib import Path

    from dynamo_backend_common.cli.launcher import LocalRunConfig, worker_argv

    d = Path("/m")
    argv = worker_argv(LocalRunConfig(engine="mocker", engine_args=["--speedup-ratio", "0"]),
                       d, "m", "file:///x", 1520)
    assert argv[argv.index("--") + 1:] == ["--speedup-ratio", "0", "--vocab-size", "1520"]
    argv = worker_argv(LocalRunConfig(engine="mocker", engine_args=["--vocab-size=9"]),
                       d, "m", "file:///x", 1520)
    assert argv[argv.index("--") + 1:] == ["--vocab-size=9"]
    assert "--" not in worker_argv(LocalRunConfig(engine="echo"), d, "m", "file:///x", 1520)
