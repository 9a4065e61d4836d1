"""Disaggregated prefill/decode across processes: mocker worker subprocesses in the prefill and
decode roles (``dynamo-backend worker --engine mocker --disaggregation-mode ...``) moving KV
over the mocker's simulated transfer, behind the real HTTP frontend (in this process), driven by
the official ``openai`` client; file discovery with the ZMQ event plane, and etcd with NATS.

What each test proves is read from the processes' own ``/metrics`` (the mocker's transfer
counters, the worker's request counts) and the frontend's: both of Dynamo's paths, the
fall-back, cancellation on each hop, a SIGTERMed prefill worker finishing its transfers (no
decode reads a freed block), and the failures (prefill killed mid-transfer, decode killed after
prefill, a prefill result that no longer decodes) ending in a completion or a typed error,
never a hang, with nothing left held.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from dynamo_backend_common.fixtures import tiny_model_dir
from dynamo_backend_common.frontend.http import HttpServer
from dynamo_backend_common.frontend.model_manager import WorkerEntry
from dynamo_backend_common.frontend.server import Frontend, FrontendConfig
from tests.integration.test_worker_process import WorkerProcess

pytestmark = pytest.mark.integration

MODEL = "disagg-m"
TIMEOUT = 30.0
TINY = str(tiny_model_dir())
MESSAGES: Any = [{"role": "user", "content": "Explain the KV cache of a transformer in a few "
                  "words, then say what a prefill worker does and why decode is separate."}]


class Stack:
    """The frontend in this process, worker processes around it."""

    def __init__(self, discovery: str, events: str, **frontend: Any) -> None:
        self.discovery = discovery
        self.events = events
        self.namespace = f"dg{uuid.uuid4().hex[:10]}"
        self.options = frontend
        self.procs: list[WorkerProcess] = []
        self.by_id: dict[int, WorkerProcess] = {}

    async def __aenter__(self) -> Stack:
        self.frontend = Frontend(FrontendConfig(
            port=0, discovery=self.discovery, events=self.events, namespace=self.namespace,
            **self.options))
        await self.frontend.start()
        self.server = HttpServer(self.frontend.app, "127.0.0.1", 0)
        await self.server.start()
        self.client = openai.AsyncOpenAI(base_url=self.server.url + "/v1", api_key="x",
                                         max_retries=0, timeout=TIMEOUT)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.server.stop()
        await self.frontend.close()
        for p in self.procs:
            await p.close()

    async def worker(self, role: str, *mocker: str) -> tuple[WorkerProcess, WorkerEntry]:
        """Start a mocker worker in ``role``; return it once the frontend sees it."""
        before = set(self._pool(role))
        proc = WorkerProcess([
            "--engine", "mocker", "--model-path", TINY, "--served-model-name", MODEL,
            "--discovery", self.discovery, "--events", self.events,
            "--namespace", self.namespace, "--system-port", "0",
            "--graceful-shutdown-grace-secs", "0", "--disaggregation-mode", role,
            "--", "--block-size", "4", "--vocab-size", "200", *mocker],
            # No canary: its requests would mix with the ones each test counts and times.
            env={"DYN_HEALTH_CHECK_ENABLED": "false"})
        self.procs.append(proc)
        await proc.start()
        try:
            await self.frontend.models.wait_for(lambda: bool(set(self._pool(role)) - before),
                                                timeout=TIMEOUT)
        except TimeoutError:
            raise AssertionError(f"{role} worker did not register:\n{proc.log}") from None
        (iid,) = set(self._pool(role)) - before
        self.by_id[iid] = proc
        return proc, self._pool(role)[iid]

    async def stop(self, worker: WorkerEntry) -> None:
        """SIGTERM ``worker``'s process; return once it exited and the frontend dropped it."""
        proc = self.by_id[worker.instance_id]
        proc.send(signal.SIGTERM)
        assert await proc.wait_exit() == 0, proc.log
        role = worker.card.worker_type
        await self.frontend.models.wait_for(
            lambda: worker.instance_id not in self._pool(role), timeout=TIMEOUT)

    def _pool(self, role: str) -> dict[int, WorkerEntry]:
        models = self.frontend.models
        entry = (models.prefill if role == "prefill" else models).models.get(MODEL)
        return dict(entry.workers) if entry is not None else {}

    async def chat(self, max_tokens: int = 8, stream: bool = False) -> int:
        """One chat completion; its completion tokens."""
        if stream:
            chunks = await self.client.chat.completions.create(
                model=MODEL, messages=MESSAGES, max_tokens=max_tokens, stream=True,
                stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
            n = -1
            async for c in chunks:
                if c.usage is not None:
                    n = c.usage.completion_tokens
            return n
        r = await self.client.chat.completions.create(
            model=MODEL, messages=MESSAGES, max_tokens=max_tokens,
            extra_body={"ignore_eos": True})
        assert r.usage is not None
        return r.usage.completion_tokens

    async def frontend_metrics(self) -> Metrics:
        async with httpx.AsyncClient(base_url=self.server.url, timeout=10) as h:
            return Metrics((await h.get("/metrics")).text)


class Metrics:
    def __init__(self, text: str) -> None:
        self.text = text
        self.samples = [(s.name, s.labels, s.value)
                        for fam in text_string_to_metric_families(text) for s in fam.samples]

    def __call__(self, name: str, **labels: str) -> float:
        """The sum of ``name``'s samples with these labels (0 when there is none)."""
        return sum(v for n, lab, v in self.samples
                   if n == name and all(lab.get(k) == x for k, x in labels.items()))


async def metrics(worker: WorkerEntry) -> Metrics:
    assert worker.info.status_url is not None
    async with httpx.AsyncClient(base_url=worker.info.status_url, timeout=10,
                                 trust_env=False) as h:
        return Metrics((await h.get("/metrics")).text)


async def until(fetch: Callable[[], Any], pred: Callable[[Any], bool],
                timeout: float = TIMEOUT) -> Any:
    """Poll HTTP state that has no push signal (a worker's /metrics) until ``pred`` holds."""
    deadline = time.monotonic() + timeout
    while True:
        value = await fetch()
        if pred(value):
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not reached in {timeout}s; last: "
                                 f"{getattr(value, 'text', value)!s:.3000}")
        await asyncio.sleep(0.05)


TRANSFERS = "dynamo_mocker_kv_transfers_total"
HOLDS = "dynamo_mocker_kv_holds"
FREED_READS = "dynamo_mocker_kv_freed_block_reads_total"


@pytest.fixture(params=["file", "etcd"])
def planes(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, str]:
    if request.param == "file":
        return f"file://{tmp_path / 'discovery'}", "zmq://"
    etcd = request.getfixturevalue("etcd_url").replace("http://", "etcd://")
    return etcd, request.getfixturevalue("nats_url")


@pytest.fixture
def file_planes(tmp_path: Path) -> tuple[str, str]:
    return f"file://{tmp_path / 'discovery'}", "zmq://"


@pytest.mark.parametrize("path", ["standard", "bootstrap"])
async def test_prefill_then_decode_on_both_paths(planes: tuple[str, str], path: str) -> None:
    async with Stack(*planes, router_mode="kv") as st:
        _, decode = await st.worker("decode")
        # Decode workers alone serve the model aggregated (the fall-back), prefilling locally.
        assert await st.chat() == 8
        extra = ["--bootstrap"] if path == "bootstrap" else []
        _, prefill = await st.worker("prefill", *extra)
        assert bool(prefill.card.runtime_config.disaggregated_endpoint) == (path == "bootstrap")
        results = await asyncio.gather(*(st.chat(stream=i % 2 == 0) for i in range(6)))
        assert results == [8] * 6
        fm = await st.frontend_metrics()
        assert fm("dynamo_frontend_disagg_requests_total", path=path) == 6
        assert fm("dynamo_frontend_disagg_requests_total", path="aggregated_fallback") == 1
        d = await metrics(decode)
        assert d(TRANSFERS, role="decode", outcome="completed") == 6
        assert d(TRANSFERS, role="decode", outcome="local_prefill") == 1
        assert d(TRANSFERS, role="decode", outcome="recomputed") == 0
        p = await until(lambda: metrics(prefill), lambda m: m(HOLDS) == 0)
        assert p(TRANSFERS, role="prefill", outcome="completed") == 6
        assert p(FREED_READS) == 0


async def test_cancelling_each_hop_releases_everything(file_planes: tuple[str, str]) -> None:
    async with Stack(*file_planes) as st:
        # Slow steps on both sides, so a client can leave during either hop.
        _, prefill = await st.worker("prefill", "--speedup-ratio", "1",
                                     "--prefill-base-ms", "2000")
        _, decode = await st.worker("decode", "--speedup-ratio", "1",
                                    "--decode-base-ms", "200")
        # Hop 1: the client leaves while its prompt is prefilled.
        call = asyncio.ensure_future(st.chat(max_tokens=50, stream=True))
        await until(lambda: metrics(prefill),
                    lambda m: m("dynamo_component_inflight_requests") == 1)
        call.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await call
        p = await until(lambda: metrics(prefill), lambda m: m(
            "dynamo_component_requests_finished_total", status="cancelled") == 1)
        assert p(HOLDS) == 0  # a cancelled prefill holds nothing
        d = await metrics(decode)
        assert d(TRANSFERS, role="decode") == 0  # the decode hop never started
        # Hop 2: the client leaves while the decode worker streams.
        stream = await st.client.chat.completions.create(
            model=MODEL, messages=MESSAGES, max_tokens=50, stream=True,
            extra_body={"ignore_eos": True})
        async for _ in stream:
            break  # the first token arrived: the KV was pulled, decode runs
        await stream.close()
        d = await until(lambda: metrics(decode), lambda m: m(
            "dynamo_component_requests_finished_total", status="cancelled") == 1)
        assert d(TRANSFERS, role="decode", outcome="completed") == 1
        p = await until(lambda: metrics(prefill), lambda m: m(HOLDS) == 0)
        assert p(TRANSFERS, role="prefill", outcome="completed") == 1


async def test_sigterm_of_a_prefill_worker_finishes_its_transfers(
        file_planes: tuple[str, str]) -> None:
    async with Stack(*file_planes) as st:
        # Long transfers (0.3 s per block of 4 tokens): shutdown starts while they run.
        proc, prefill = await st.worker("prefill", "--speedup-ratio", "1",
                                        "--kv-transfer-ms-per-block", "300")
        _, decode = await st.worker("decode", "--speedup-ratio", "100",
                                    "--kv-load-failure", "fail")
        calls = [asyncio.ensure_future(st.chat()) for _ in range(4)]
        await until(lambda: metrics(prefill), lambda m: m(HOLDS) == 4)
        proc.send(signal.SIGTERM)  # every prompt is prefilled, no pull has finished
        assert await asyncio.wait_for(asyncio.gather(*calls), TIMEOUT) == [8] * 4
        assert await proc.wait_exit() == 0, proc.log
        d = await metrics(decode)
        assert d(TRANSFERS, role="decode", outcome="completed") == 4
        assert d(TRANSFERS, role="decode", outcome="failed") == 0
        assert "waiting" in proc.log  # the drain said what it waited for


async def test_prefill_killed_mid_transfer_recomputes_or_fails_typed(
        file_planes: tuple[str, str]) -> None:
    async with Stack(*file_planes) as st:
        proc, _ = await st.worker("prefill", "--speedup-ratio", "1",
                                  "--kv-transfer-ms-per-block", "1000")
        _, recompute = await st.worker("decode", "--speedup-ratio", "100")
        call = asyncio.ensure_future(st.chat())
        await until(lambda: metrics(recompute),
                    lambda m: m("dynamo_mocker_kv_pulls_in_flight") == 1)
        proc.send(signal.SIGKILL)
        assert await asyncio.wait_for(call, TIMEOUT) == 8  # recomputed locally
        d = await metrics(recompute)
        assert d(TRANSFERS, role="decode", outcome="recomputed") == 1
        # The same crash against a decode worker that must not recompute: a typed 502.
        await proc.wait_exit()
        proc2, _ = await st.worker("prefill", "--speedup-ratio", "1",
                                   "--kv-transfer-ms-per-block", "1000")
        await st.stop(recompute)
        _, strict = await st.worker("decode", "--speedup-ratio", "100",
                                    "--kv-load-failure", "fail")
        call = asyncio.ensure_future(st.chat())
        await until(lambda: metrics(strict),
                    lambda m: m("dynamo_mocker_kv_pulls_in_flight") == 1)
        proc2.send(signal.SIGKILL)
        with pytest.raises(openai.APIStatusError) as ei:
            await asyncio.wait_for(call, TIMEOUT)
        assert ei.value.status_code == 502 and ei.value.code == "Disconnected"
        assert "KV pull" in ei.value.message
        s = await metrics(strict)
        assert s(TRANSFERS, role="decode", outcome="failed") == 1


async def test_decode_killed_after_prefill_frees_the_hold_and_fails_typed(
        file_planes: tuple[str, str]) -> None:
    async with Stack(*file_planes) as st:
        _, prefill = await st.worker("prefill", "--kv-hold-timeout-s", "1")
        dproc, decode = await st.worker("decode", "--speedup-ratio", "1",
                                        "--decode-base-ms", "500")
        call = asyncio.ensure_future(st.chat(max_tokens=40))
        await until(lambda: metrics(decode),
                    lambda m: m("dynamo_component_inflight_requests") == 1)
        dproc.send(signal.SIGKILL)
        with pytest.raises(openai.APIStatusError) as ei:
            await asyncio.wait_for(call, TIMEOUT)
        assert ei.value.status_code in (502, 503)
        # Nothing is left held on the prefill worker.
        p = await until(lambda: metrics(prefill), lambda m: m(HOLDS) == 0)
        assert p(FREED_READS) == 0


async def test_a_prefill_result_that_no_longer_decodes(file_planes: tuple[str, str]) -> None:
    """The prefill worker's hold expired before the decode worker pulled it: a decode worker
    that must not recompute answers a typed 400 that says so; one that may, recomputes."""
    async with Stack(*file_planes) as st:
        # A hold of 1 ms: gone before any decode worker can reach it.
        _, prefill = await st.worker("prefill", "--kv-hold-timeout-s", "0.001")
        _, strict = await st.worker("decode", "--kv-load-failure", "fail")
        with pytest.raises(openai.BadRequestError) as ei:
            await st.chat(max_tokens=3)
        assert "expired" in str(ei.value) or "unknown" in str(ei.value)
        p = await until(lambda: metrics(prefill), lambda m: m(HOLDS) == 0)
        assert p(TRANSFERS, role="prefill", outcome="expired") == 1
        assert (await metrics(strict))(TRANSFERS, role="decode", outcome="failed") == 1
        await st.stop(strict)
        _, lenient = await st.worker("decode")
        assert await st.chat(max_tokens=3) == 3
        assert (await metrics(lenient))(TRANSFERS, role="decode", outcome="recomputed") == 1
