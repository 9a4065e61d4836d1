"""Real worker processes (``python -m dynamo_backend_common.cli worker ...``), found through
discovery and driven over the request plane, exactly as a frontend does.

Every wait is event driven with a deadline: the discovery watch for registration, the process's
stderr lines for what happened inside it, the process exit for shutdown. The only polls are
on HTTP state that has no other signal (``/health`` after the canary ran).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Protocol

import httpx
import msgspec
import pytest
from prometheus_client.parser import text_string_to_metric_families

from dynamo_backend_common import (
    Context,
    DynamoError,
    FinishReason,
    LLMEngineOutput,
    PreprocessedRequest,
    StopConditions,
)
from dynamo_backend_common.errors import BackendError
from dynamo_backend_common.protocols.codec import from_msgpack, to_msgpack
from dynamo_backend_common.protocols.discovery import (
    INSTANCES_PREFIX,
    MODELS_PREFIX,
    InstanceInfo,
    ModelCard,
    instance_key,
)
from dynamo_backend_common.protocols.kv import KvStored, decode_kv_events, decode_load
from dynamo_backend_common.runtime.discovery import Discovery, open_discovery
from dynamo_backend_common.runtime.events import (
    kv_events_subject,
    kv_metrics_subject,
    open_event_plane,
)
from dynamo_backend_common.runtime.transport.dispatch import WorkerClient

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
ENGINE = f"{REPO / 'tests' / 'worker_engines.py'}:LifecycleEngine"
TIMEOUT = 20.0


class WorkerProcess:
    """One ``dynamo-backend worker`` subprocess; its stderr (the log) is read line by line."""

    def __init__(self, argv: Sequence[str], env: dict[str, str] | None = None) -> None:
        self.argv = [sys.executable, "-m", "dynamo_backend_common.cli", "worker", *argv]
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.lines: list[str] = []
        self.proc: asyncio.subprocess.Process | None = None
        self._reader: asyncio.Task[None] | None = None
        self._changed = asyncio.Event()
        self._eof = False

    async def start(self) -> WorkerProcess:
        self.proc = await asyncio.create_subprocess_exec(
            *self.argv, cwd=REPO, env=self.env,
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        self._reader = asyncio.create_task(self._read())
        return self

    async def _read(self) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        async for raw in self.proc.stderr:
            self.lines.append(raw.decode(errors="replace").rstrip("\n"))
            self._changed.set()
        self._eof = True
        self._changed.set()

    @property
    def log(self) -> str:
        return "\n".join(self.lines[-60:])

    async def wait_line(self, needle: str, timeout: float = TIMEOUT, count: int = 1) -> str:
        """The ``count``-th log line containing ``needle`` (waits on the process output)."""
        async with asyncio.timeout(timeout):
            while True:
                found = [line for line in self.lines if needle in line]
                if len(found) >= count:
                    return found[count - 1]
                if self._eof:
                    raise AssertionError(f"worker exited before logging {needle!r}:\n{self.log}")
                self._changed.clear()
                await self._changed.wait()

    def send(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    async def wait_exit(self, timeout: float = TIMEOUT) -> int:
        assert self.proc is not None and self._reader is not None
        try:
            code = await asyncio.wait_for(self.proc.wait(), timeout)
        except TimeoutError:
            raise AssertionError(f"worker still running after {timeout}s:\n{self.log}") from None
        await asyncio.wait_for(self._reader, 5)
        return code

    async def close(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()
        if self._reader is not None:
            await asyncio.gather(self._reader, return_exceptions=True)


class Spawn(Protocol):
    async def __call__(self, *argv: str, env: dict[str, str] | None = None) -> WorkerProcess:
        ...


@pytest.fixture
async def spawn() -> AsyncIterator[Spawn]:
    """``await spawn(*worker_flags, env={...})``: a started worker, killed at test end."""
    procs: list[WorkerProcess] = []

    async def start(*argv: str, env: dict[str, str] | None = None) -> WorkerProcess:
        proc = WorkerProcess(argv, env)
        procs.append(proc)
        return await proc.start()

    yield start
    await asyncio.gather(*(p.close() for p in procs))


def ns() -> str:
    """A namespace of one test: shared discovery stores must not mix tests' workers."""
    return f"t{uuid.uuid4().hex[:12]}"


def etcd_form(url: str) -> str:
    """``http://host:port`` (the fixture's form) -> ``etcd://host:port`` (the worker flag's)."""
    return "etcd://" + url.partition("://")[2]


async def wait_instance(disc: Discovery, namespace: str, worker: WorkerProcess,
                        timeout: float = TIMEOUT) -> InstanceInfo:
    """The worker's ``InstanceInfo`` once it is fully registered (a discovery watch, not a
    poll). The model card is written after the instance, so its arrival means both are there.
    """
    watch = disc.watch_prefix(f"{MODELS_PREFIX}{namespace}/")
    exited = asyncio.ensure_future(worker.wait_exit(timeout))

    async def first_put() -> InstanceInfo:
        async for ev in watch:
            if ev.kind == "put" and ev.value is not None:
                card = msgspec.json.decode(ev.value, type=ModelCard)
                key = instance_key(card.namespace, card.component, card.endpoint,
                                   card.instance_id)
                found = await disc.get_prefix(key)
                return msgspec.json.decode(found[key], type=InstanceInfo)
        raise AssertionError("discovery watch ended")

    found = asyncio.ensure_future(first_put())
    try:
        done, _ = await asyncio.wait([found, exited], timeout=timeout,
                                     return_when=asyncio.FIRST_COMPLETED)
        if found in done:
            return found.result()
        if exited in done:
            raise AssertionError(f"worker exited ({exited.result()}) before registering:\n"
                                 f"{worker.log}")
        raise AssertionError(f"worker not registered after {timeout}s:\n{worker.log}")
    finally:
        for t in (found, exited):
            t.cancel()
        await asyncio.gather(found, exited, return_exceptions=True)
        await watch.aclose()


def gen_request(n: int, prompt: Sequence[int] = (1, 2, 3)) -> bytes:
    return to_msgpack(PreprocessedRequest(token_ids=list(prompt),
                                          stop_conditions=StopConditions(max_tokens=n)))


async def collect(client: WorkerClient, info: InstanceInfo, payload: bytes,
                  ctx: Context | None = None) -> list[LLMEngineOutput]:
    out = []
    async for raw in client.stream(info, payload, ctx):
        out.append(from_msgpack(raw, LLMEngineOutput))
    return out


def tokens(chunks: list[LLMEngineOutput]) -> list[int]:
    return [t for c in chunks for t in c.token_ids]


def events_of(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


# -- discovery backends -----------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["file", "etcd"])
async def test_client_streams_from_a_worker_found_through_discovery(
    backend: str, spawn: Spawn, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    if backend == "etcd":
        url = etcd_form(request.getfixturevalue("etcd_url"))
    else:
        url = f"file://{tmp_path / 'kv'}"
    namespace = ns()
    worker: WorkerProcess = await spawn(
        "--engine", "echo", "--discovery", url, "--namespace", namespace,
        "--served-model-name", "echo-it", "--graceful-shutdown-grace-secs", "0")
    disc = open_discovery(url)
    client = WorkerClient()
    try:
        info = await wait_instance(disc, namespace, worker)
        assert info.namespace == namespace and info.endpoint == "generate"
        cards = await disc.get_prefix(f"v1/mdc/{namespace}/")
        (card,) = [msgspec.json.decode(v, type=ModelCard) for v in cards.values()]
        assert card.display_name == "echo-it" and card.instance_id == info.instance_id
        chunks = await collect(client, info, gen_request(5, [7, 8, 9]))
        assert tokens(chunks) == [7, 8, 9, 7, 8]
        assert chunks[-1].finish_reason == FinishReason.LENGTH
        worker.send(signal.SIGTERM)
        assert await worker.wait_exit() == 0
        # A clean exit removes the registration.
        assert await disc.get_prefix(f"{INSTANCES_PREFIX}{namespace}/") == {}
    finally:
        await client.close()
        await disc.close()


# -- cancellation -----------------------------------------------------------------------------


async def test_client_stop_reaches_engine_abort_once_and_ends_cancelled(
    spawn: Spawn, tmp_path: Path
) -> None:
    url, namespace, events = f"file://{tmp_path / 'kv'}", ns(), tmp_path / "events"
    worker: WorkerProcess = await spawn(
        "--engine", ENGINE, "--discovery", url, "--namespace", namespace,
        "--graceful-shutdown-grace-secs", "0",
        "--", "--events-file", str(events), "--delay-ms", "20", "--tokens", "1000")
    disc = open_discovery(url)
    client = WorkerClient()
    try:
        info = await wait_instance(disc, namespace, worker)
        ctx = Context()
        chunks: list[LLMEngineOutput] = []
        async for raw in client.stream(info, gen_request(1000), ctx):
            chunks.append(from_msgpack(raw, LLMEngineOutput))
            if len(chunks) == 2:
                ctx.stop_generating()
        assert chunks[-1].finish_reason == FinishReason.CANCELLED
        assert len(tokens(chunks)) < 100  # stopped long before the 1000 tokens
        await worker.wait_line(f"lifecycle: abort {ctx.id}")
        worker.send(signal.SIGTERM)
        assert await worker.wait_exit() == 0
        lines = events_of(events)
        assert lines.count(f"abort {ctx.id}") == 1
        assert [x for x in lines if x.startswith("abort")] == [f"abort {ctx.id}"]
    finally:
        await client.close()
        await disc.close()


# -- graceful shutdown ------------------------------------------------------------------------


async def test_sigterm_with_50_streams_in_flight_loses_none(
    spawn: Spawn, tmp_path: Path
) -> None:
    url, namespace, events = f"file://{tmp_path / 'kv'}", ns(), tmp_path / "events"
    n_tokens, n_streams = 40, 50
    worker: WorkerProcess = await spawn(
        "--engine", ENGINE, "--discovery", url, "--namespace", namespace,
        "--graceful-shutdown-grace-secs", "0.2",
        "--", "--events-file", str(events), "--delay-ms", "30")
    disc = open_discovery(url)
    client = WorkerClient()
    try:
        info = await wait_instance(disc, namespace, worker)
        first = [asyncio.Event() for _ in range(n_streams)]

        async def one(i: int) -> list[LLMEngineOutput]:
            out = []
            async for raw in client.stream(info, gen_request(n_tokens)):
                out.append(from_msgpack(raw, LLMEngineOutput))
                first[i].set()
            return out

        tasks = [asyncio.create_task(one(i)) for i in range(n_streams)]
        # Every stream has produced a token (so all 50 are in flight) when the signal lands.
        await asyncio.wait_for(asyncio.gather(*(e.wait() for e in first)), TIMEOUT)
        assert not any(t.done() for t in tasks)
        worker.send(signal.SIGTERM)
        results = await asyncio.wait_for(asyncio.gather(*tasks), TIMEOUT)
        for chunks in results:
            assert tokens(chunks) == list(range(n_tokens))
            assert chunks[-1].finish_reason == FinishReason.LENGTH
        assert await worker.wait_exit() == 0
        assert events_of(events) == ["start", "drain", "cleanup"]
        await worker.wait_line("shutdown stage inflight completed")
        # Unregistered first: the key was gone before the streams finished.
        assert await disc.get_prefix(f"{INSTANCES_PREFIX}{namespace}/") == {}
    finally:
        await client.close()
        await disc.close()


async def test_failed_start_runs_cleanup_and_exits_nonzero(
    spawn: Spawn, tmp_path: Path
) -> None:
    url, events = f"file://{tmp_path / 'kv'}", tmp_path / "events"
    worker: WorkerProcess = await spawn(
        "--engine", ENGINE, "--discovery", url, "--namespace", ns(),
        "--", "--events-file", str(events), "--fail-start")
    code = await worker.wait_exit()
    assert code != 0
    assert "boom: injected start failure" in "\n".join(worker.lines)
    assert events_of(events) == ["start", "cleanup"]
    assert await open_discovery(url).get_prefix(INSTANCES_PREFIX) == {}


# -- crash: lease expiry ----------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["etcd", "file", "file+lease"])
async def test_sigkill_removes_the_entry_within_the_lease_ttl(
    backend: str, spawn: Spawn, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    ttl, namespace = 2.0, ns()
    if backend == "etcd":
        client_url = request.getfixturevalue("etcd_url")
        url = etcd_form(client_url)
    else:
        client_url = url = f"{backend}://{tmp_path / 'kv'}"
    # Dynamo's file store expires a file 10 s after its last touch, whatever our TTL.
    limit = 10.0 + 2.0 if backend == "file" else ttl + 2.0
    worker: WorkerProcess = await spawn(
        "--engine", "echo", "--discovery", url, "--namespace", namespace,
        env={"DYN_DISCOVERY_TTL": str(ttl)})
    disc = open_discovery(client_url)
    try:
        info = await wait_instance(disc, namespace, worker)
        key = f"{INSTANCES_PREFIX}{namespace}/backend/generate/{info.instance_id:x}"
        card_key = f"v1/mdc/{namespace}/backend/generate/{info.instance_id:x}"
        watch = disc.watch_prefix(key)
        cards = disc.watch_prefix(card_key)
        assert (await asyncio.wait_for(anext(watch), TIMEOUT)).kind == "put"  # snapshot
        assert (await asyncio.wait_for(anext(cards), TIMEOUT)).kind == "put"
        worker.send(signal.SIGKILL)
        assert await worker.wait_exit() == -signal.SIGKILL
        killed = time.monotonic()
        # Nothing deletes them but the lease: on etcd they expire at most one TTL after the
        # last renewal (etcd checks expiry every ~0.5 s; slack for a loaded machine, still far
        # below the default 10 s TTL); Dynamo's file store expires each file 10 s after its
        # own last touch (so the two may go a moment apart); our lease file store sees the
        # dead pid at its next scan.
        for w, k in ((watch, key), (cards, card_key)):
            ev = await asyncio.wait_for(anext(w), limit + 3)
            gone_after = time.monotonic() - killed
            await w.aclose()
            assert ev.kind == "delete" and ev.key == k
            assert gone_after <= limit, (k, gone_after)
        assert await disc.get_prefix(f"v1/mdc/{namespace}/") == {}
    finally:
        await disc.close()


# -- status server: metrics and health --------------------------------------------------------


async def test_metrics_and_health_of_a_serving_worker(
    spawn: Spawn, tmp_path: Path
) -> None:
    url, namespace = f"file://{tmp_path / 'kv'}", ns()
    canary = {"token_ids": [5, 5], "stop_conditions": {"max_tokens": 3}}
    worker: WorkerProcess = await spawn(
        "--engine", ENGINE, "--discovery", url, "--namespace", namespace,
        "--system-port", "0", "--graceful-shutdown-grace-secs", "0",
        env={"DYN_HEALTH_CHECK_PAYLOAD": json.dumps(canary)})
    disc = open_discovery(url)
    client = WorkerClient()
    try:
        info = await wait_instance(disc, namespace, worker)
        assert info.status_url is not None
        async with httpx.AsyncClient(base_url=info.status_url, trust_env=False) as http:
            # The canary runs right after registration; /health has no other signal.
            deadline = time.monotonic() + TIMEOUT
            while True:
                health = await http.get("/health")
                body = health.json()
                if body.get("canary") == "ok" or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.05)
            assert health.status_code == 200, body
            assert body["status"] == "ready" and body["canary"] == "ok"
            # The override payload (max_tokens 3), not the engine's (none): 3 chunks.
            assert body["canary_chunks"] == 3
            assert (await http.get("/live")).status_code == 200

            chunks = await collect(client, info, gen_request(4))
            assert len(tokens(chunks)) == 4
            text = (await http.get("/metrics")).text
        samples = {}
        for fam in text_string_to_metric_families(text):
            for s in fam.samples:
                samples[(s.name, tuple(sorted(s.labels.items())))] = s.value

        def value(name: str, **labels: str) -> float:
            hits = [v for (n, lab), v in samples.items()
                    if n == name and set(labels.items()) <= set(lab)]
            assert hits, f"{name}{labels} missing from /metrics:\n{text}"
            return sum(hits)

        assert value("dynamo_component_model_load_time_seconds") >= 0
        assert value("dynamo_component_cleanup_time_seconds") == 0  # not shut down yet
        assert value("dynamo_component_drain_time_seconds") == 0
        # One request plus at least one canary went through the same adapter.
        assert value("dynamo_component_requests_total") >= 2
        assert value("dynamo_component_requests_finished_total", status="success") >= 2
        assert value("dynamo_component_output_tokens_total") >= 4 + 3
        assert value("dynamo_component_inflight_requests") == 0
        assert value("dynamo_component_time_to_first_token_seconds_count") >= 2
        assert any(dict(lab).get("worker_id") == f"{info.instance_id:x}"
                   for (_, lab) in samples)
    finally:
        await client.close()
        await disc.close()


# -- engine controls --------------------------------------------------------------------------


async def test_engine_control_over_request_plane_and_http(
    spawn: Spawn, tmp_path: Path
) -> None:
    url, namespace = f"file://{tmp_path / 'kv'}", ns()
    worker: WorkerProcess = await spawn(
        "--engine", ENGINE, "--discovery", url, "--namespace", namespace,
        "--graceful-shutdown-grace-secs", "0")
    disc = open_discovery(url)
    client = WorkerClient()
    try:
        info = await wait_instance(disc, namespace, worker)
        cards = await disc.get_prefix(f"v1/mdc/{namespace}/")
        (card,) = [msgspec.json.decode(v, type=ModelCard) for v in cards.values()]
        assert card.runtime_config.supported_controls == ["echo", "stats"]

        async def control(name: str, body: object) -> object:
            payload = to_msgpack({"control": name, "body": body})
            items = [msgspec.msgpack.decode(raw) async for raw in
                     client.stream(info, payload, endpoint="engine_control")]
            assert len(items) == 1
            return items[0]

        assert await control("echo", {"x": [1, 2]}) == {"status": "ok", "echo": {"x": [1, 2]}}
        with pytest.raises(DynamoError) as err:
            await control("no_such_control", None)
        assert err.value.kind is BackendError.InvalidArgument
        assert "unknown engine control 'no_such_control'" in err.value.message
        assert "echo" in err.value.message  # names what is supported

        assert info.status_url is not None
        async with httpx.AsyncClient(base_url=info.status_url, trust_env=False) as http:
            ok = await http.post("/engine/control", json={"control": "echo", "body": "hi"})
            assert ok.status_code == 200 and ok.json() == {"status": "ok", "echo": "hi"}
            bad = await http.post("/engine/control", json={"control": "nope"})
            assert bad.status_code == 400
            assert bad.json()["kind"] == "InvalidArgument"
            assert "unknown engine control 'nope'" in bad.json()["message"]
            garbage = await http.post("/engine/control", content=b"{not json")
            assert garbage.status_code == 400
    finally:
        await client.close()
        await disc.close()


# -- KV events on NATS ------------------------------------------------------------------------


async def test_mocker_worker_publishes_kv_events_and_load_on_nats(
    spawn: Spawn, tmp_path: Path, nats_url: str
) -> None:
    url, namespace = f"file://{tmp_path / 'kv'}", ns()
    async with open_event_plane(nats_url) as plane:
        sub = plane.subscribe(kv_events_subject(namespace, "backend"))
        load = plane.subscribe(kv_metrics_subject(namespace, "backend"))
        await sub.ready()
        await load.ready()
        worker: WorkerProcess = await spawn(
            "--engine", "mocker", "--discovery", url, "--events", nats_url,
            "--namespace", namespace, "--graceful-shutdown-grace-secs", "0",
            "--", "--speedup-ratio", "0", "--block-size", "4")
        disc = open_discovery(url)
        client = WorkerClient()
        try:
            info = await wait_instance(disc, namespace, worker)
            prompt = list(range(100, 116))  # 4 full blocks
            chunks = await collect(client, info, gen_request(2, prompt))
            assert chunks[-1].finish_reason is not None
            msg = await asyncio.wait_for(anext(sub), TIMEOUT)
            # Dynamo's kv-events payload: a list of RouterEvent.
            events, unknown = decode_kv_events(msg.payload)
            assert unknown == 0 and events
            event = events[0]
            assert event.worker_id == info.instance_id
            assert isinstance(event.event.data, KvStored)
            assert len(event.event.data.blocks) >= 4
            # The engine's load snapshots (declared in setup_metrics) go out on the same plane.
            snap = decode_load((await asyncio.wait_for(anext(load), TIMEOUT)).payload)
            assert snap.worker_id == info.instance_id and snap.dp_rank == 0
            assert snap.kv_total_blocks is not None and snap.kv_total_blocks > 0
        finally:
            await client.close()
            await disc.close()


# -- forced exits -----------------------------------------------------------------------------


async def test_second_signal_exits_70_at_once(spawn: Spawn, tmp_path: Path) -> None:
    url, namespace = f"file://{tmp_path / 'kv'}", ns()
    worker: WorkerProcess = await spawn(
        "--engine", ENGINE, "--discovery", url, "--namespace", namespace,
        "--graceful-shutdown-grace-secs", "30")
    disc = open_discovery(url)
    try:
        await wait_instance(disc, namespace, worker)
        worker.send(signal.SIGTERM)
        await worker.wait_line("shutdown stage unregister")  # now in its 30 s router grace
        t0 = time.monotonic()
        worker.send(signal.SIGINT)
        assert await worker.wait_exit() == 70
        assert time.monotonic() - t0 < 5
        assert any("received again" in line for line in worker.lines)
    finally:
        await disc.close()


async def test_watchdog_force_exits_70_when_shutdown_overruns_its_budget(
    spawn: Spawn, tmp_path: Path
) -> None:
    url, namespace, events = f"file://{tmp_path / 'kv'}", ns(), tmp_path / "events"
    worker: WorkerProcess = await spawn(
        "--engine", ENGINE, "--discovery", url, "--namespace", namespace,
        "--graceful-shutdown-grace-secs", "0",
        "--", "--events-file", str(events), "--cleanup", "block",
        env={"DYN_WORKER_SHUTDOWN_TOTAL_TIMEOUT_SECS": "0.5"})
    disc = open_discovery(url)
    try:
        await wait_instance(disc, namespace, worker)
        t0 = time.monotonic()
        worker.send(signal.SIGTERM)
        # cleanup() blocks the event loop: only the watchdog thread can end the process, at
        # budget (0.5 s) + the 5 s cleanup reserve.
        assert await worker.wait_exit() == 70
        assert 5.0 <= time.monotonic() - t0 < 15
        assert events_of(events)[-1] == "cleanup"
        assert any("forcing exit" in line for line in worker.lines)
    finally:
        await disc.close()
