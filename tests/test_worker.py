"""The worker in-process: memory discovery and event plane, the real request plane and status
server on 127.0.0.1, :class:`~tests.worker_engines.LifecycleEngine` recording what it is asked.
(``tests/integration/test_worker_process.py`` runs the same worker as real processes.)"""

from __future__ import annotations

import asyncio
import logging
import re
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

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
from dynamo_backend_common.protocols.discovery import InstanceInfo
from dynamo_backend_common.runtime.transport.dispatch import WorkerClient
from dynamo_backend_common.worker import CONTROL_ENDPOINT, EngineAdapter, RequestTracker, Worker
from dynamo_backend_common.worker.config import DisaggregationMode, ShutdownConfig, WorkerConfig
from dynamo_backend_common.worker.metrics import WorkerMetrics
from tests.worker_engines import LifecycleEngine

TIMEOUT = 10.0
TINY_MODEL = Path(__file__).resolve().parents[1] / "src/dynamo_backend_common/_data/tiny-model"
STAGES = ["unregister", "router_grace", "stop_admission", "inflight", "kv_transfer", "cleanup"]


def config(**overrides: Any) -> WorkerConfig:
    bus = uuid.uuid4().hex
    values: dict[str, Any] = {
        "discovery": f"memory://{bus}",
        "events": f"memory://{bus}",
        "status_port": 0,
        "health_check_interval_secs": 3600.0,
        "shutdown": ShutdownConfig(total_secs=10, router_grace_secs=0),
        # Dynamo's plane alone, so these tests drive the path a Dynamo frontend takes (the
        # fast path our frontends take has its own test).
        "mux_fastpath": False,
    }
    values.update(overrides)
    return WorkerConfig(**values)


@asynccontextmanager
async def serving(engine: LifecycleEngine, cfg: WorkerConfig | None = None,
                  *, exit_code: int = 0) -> AsyncIterator[Worker]:
    """A ready worker; shut down (and its exit code checked) on leaving the block."""
    worker = Worker(engine, cfg or config())
    task = asyncio.create_task(worker.run())
    ready = asyncio.ensure_future(worker.ready.wait())
    await asyncio.wait([ready, task], timeout=TIMEOUT, return_when=asyncio.FIRST_COMPLETED)
    ready.cancel()
    assert worker.ready.is_set(), "worker not ready"
    try:
        yield worker
    finally:
        worker.request_shutdown("test")
        assert await asyncio.wait_for(task, TIMEOUT) == exit_code


def info_of(worker: Worker) -> InstanceInfo:
    assert worker.instance_info is not None, "worker not registered"
    return worker.instance_info


def req(n: int, prompt: Sequence[int] = (1, 2, 3)) -> bytes:
    return to_msgpack(PreprocessedRequest(token_ids=list(prompt),
                                          stop_conditions=StopConditions(max_tokens=n)))


async def collect(client: WorkerClient, worker: Worker, payload: bytes,
                  ctx: Context | None = None) -> list[LLMEngineOutput]:
    assert worker.address is not None
    return [from_msgpack(raw, LLMEngineOutput)
            async for raw in client.stream(info_of(worker), payload, ctx)]


def samples(worker: Worker) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    assert worker.metrics is not None
    out = {}
    for fam in text_string_to_metric_families(worker.metrics.render().decode()):
        for s in fam.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def metric(worker: Worker, name: str, **labels: str) -> float:
    want = set(labels.items())
    hits = [v for (n, lab), v in samples(worker).items() if n == name and want <= lab]
    assert hits, f"{name}{labels} not rendered"
    return sum(hits)


async def until(predicate: Any, timeout: float = TIMEOUT) -> None:
    """For state with no event to wait on: re-check every loop turn, up to ``timeout``."""
    async with asyncio.timeout(timeout):
        while not predicate():  # noqa: ASYNC110 - nothing to wait on
            await asyncio.sleep(0.005)


class GatedEngine(LifecycleEngine):
    """``start`` waits for :attr:`release` (so a test can look at the worker before ready)."""

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self.entered = asyncio.Event()
        self.release = asyncio.Event()

    async def start(self, worker_id: int) -> Any:
        self.entered.set()
        await self.release.wait()
        return await super().start(worker_id)


# -- health -----------------------------------------------------------------------------------


async def test_health_is_503_before_ready_200_when_ready_503_once_shutdown_starts() -> None:
    engine = GatedEngine()
    engine.hold = asyncio.Event()
    worker = Worker(engine, config())
    task = asyncio.create_task(worker.run())
    client = WorkerClient()
    try:
        await asyncio.wait_for(engine.entered.wait(), TIMEOUT)
        assert worker.status_port is not None
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{worker.status_port}",
                                     trust_env=False) as http:
            before = await http.get("/health")
            assert before.status_code == 503 and before.json()["status"] == "notready"
            with pytest.raises(DynamoError) as starting:
                await worker.control("echo", None)  # start() has not returned
            assert starting.value.kind is BackendError.EngineShutdown
            assert "starting" in starting.value.message
            assert (await http.get("/live")).status_code == 200
            engine.release.set()
            await asyncio.wait_for(worker.ready.wait(), TIMEOUT)
            ready = await http.get("/health")
            assert ready.status_code == 200 and ready.json()["status"] == "ready"
            # A request held in flight keeps the worker (and its status server) in shutdown.
            held = asyncio.create_task(collect(client, worker, req(2)))
            await until(lambda: engine.requests)
            worker.request_shutdown("test")
            during = await http.get("/health")
            assert during.status_code == 503
            assert during.json()["shutdown"] == "test"
            # Engine controls are closed too: the engine is about to drain and clean up.
            control = await http.post("/engine/control", json={"control": "echo"})
            assert control.status_code == 503
            assert control.json()["kind"] == "EngineShutdown"
            assert "shutting down" in control.json()["message"]
            engine.hold.set()
            assert [c.finish_reason for c in await held][-1] == FinishReason.LENGTH
    finally:
        engine.release.set()
        worker.request_shutdown("test")
        assert await asyncio.wait_for(task, TIMEOUT) == 0
        await client.close()


async def test_failing_canary_marks_the_worker_unhealthy() -> None:
    engine = LifecycleEngine()
    cfg = config(health_check_payload={"token_ids": [666], "stop_conditions": {"max_tokens": 1}})
    async with serving(engine, cfg) as worker:
        await worker.run_canary()
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{worker.status_port}",
                                     trust_env=False) as http:
            health = await http.get("/health")
        assert health.status_code == 503
        body = health.json()
        assert body["canary"] == "failed" and "token 666 is refused" in body["canary_error"]
        # The canary went to the engine flagged as a health check.
        assert engine.requests[-1].health_check is True


async def test_passing_canary_is_counted_and_leaves_nothing_in_flight() -> None:
    engine = LifecycleEngine(canary=True)
    async with serving(engine) as worker:
        await worker.run_canary()
        before = metric(worker, "dynamo_component_requests_finished_total", status="success")
        await worker.run_canary()
        # Closed when the canary returns, and counted as the success it was (it stops reading
        # at the terminal chunk: that is not a dropped request).
        assert worker._tracker.inflight == 0
        assert metric(worker, "dynamo_component_inflight_requests") == 0
        after = metric(worker, "dynamo_component_requests_finished_total", status="success")
        assert after == before + 1
        assert metric(worker, "dynamo_component_requests_finished_total",
                      status="cancelled") == 0


async def test_consumer_stopping_at_the_terminal_chunk_counts_as_success() -> None:
    engine = LifecycleEngine()
    await engine.start(1)
    metrics = WorkerMetrics(namespace="n", component="c", endpoint="e", worker_id="1",
                            model="m")
    tracker = RequestTracker()
    adapter = EngineAdapter(engine, tracker=tracker, metrics=metrics)
    request = PreprocessedRequest(token_ids=[1], stop_conditions=StopConditions(max_tokens=3))
    stream = adapter.generate(request, Context())
    async for out in stream:
        if out.finish_reason is not None:
            break
    await stream.aclose()
    text = metrics.render().decode()
    assert re.search(r'requests_finished_total\{[^}]*status="success"[^}]*\} 1\.0', text), text
    assert tracker.inflight == 0


# -- engine controls --------------------------------------------------------------------------


async def test_unknown_control_is_a_clear_invalid_argument() -> None:
    async with serving(LifecycleEngine()) as worker:
        assert await worker.control("echo", 5) == {"status": "ok", "echo": 5}
        with pytest.raises(DynamoError) as err:
            await worker.control("reboot", None)
        assert err.value.kind is BackendError.InvalidArgument
        assert err.value.message == (
            "unknown engine control 'reboot'; supported: ['echo', 'stats']")
        assert worker.address is not None
        async with WorkerClient() as client:
            with pytest.raises(DynamoError) as wire:
                async for _ in client.stream(info_of(worker), to_msgpack({"control": "reboot"}),
                                             endpoint=CONTROL_ENDPOINT):
                    pass
            assert wire.value.kind is BackendError.InvalidArgument
            assert "unknown engine control 'reboot'" in wire.value.message
            with pytest.raises(DynamoError) as bad:
                async for _ in client.stream(info_of(worker), b"\xc1",
                                             endpoint=CONTROL_ENDPOINT):
                    pass
            assert bad.value.kind is BackendError.InvalidArgument
            assert "bad control request" in bad.value.message


# -- cancellation -----------------------------------------------------------------------------


async def test_plain_connection_drop_never_calls_abort_but_explicit_stop_does() -> None:
    engine = LifecycleEngine(delay_s=0.01)
    async with serving(engine) as worker:
        assert worker.address is not None
        # Dropped: the connection closes mid-stream, no STOP.
        client = WorkerClient()
        stream = client.stream(info_of(worker), req(10_000))
        await anext(stream)
        engine.finished.clear()
        await client.close()
        with pytest.raises(DynamoError) as err:
            async for _ in stream:
                pass
        assert err.value.kind is BackendError.Disconnected
        await asyncio.wait_for(engine.finished.wait(), TIMEOUT)  # generate was closed
        # Explicitly stopped: abort exactly once.
        ctx = Context()
        async with WorkerClient() as client2:
            chunks: list[LLMEngineOutput] = []
            async for raw in client2.stream(info_of(worker), req(10_000), ctx):
                chunks.append(from_msgpack(raw, LLMEngineOutput))
                ctx.stop_generating()
        assert chunks[-1].finish_reason == FinishReason.CANCELLED
    # After shutdown every abort the worker started has run.
    assert [e for e in engine.events if e.startswith("abort")] == [f"abort {ctx.id}"]


# -- decode mode ------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", [DisaggregationMode.DECODE, DisaggregationMode.AGGREGATED])
async def test_decode_mode_fires_the_first_token_signal(mode: DisaggregationMode) -> None:
    engine = LifecycleEngine()
    async with serving(engine, config(disaggregation_mode=mode)) as worker, \
            WorkerClient() as client:
        ctx = Context()
        await collect(client, worker, req(3), ctx)
    if mode is DisaggregationMode.DECODE:
        # Set by the framework on the first token-bearing chunk, before the engine resumed.
        assert engine.first_token_seen == [(ctx.id, True, True)]
    else:
        assert engine.first_token_seen == [(ctx.id, False, None)]


# -- metrics ----------------------------------------------------------------------------------


async def test_request_metrics_count_success_cancelled_and_error() -> None:
    engine = LifecycleEngine(delay_s=0.001)
    async with serving(engine) as worker, WorkerClient() as client:
        assert metric(worker, "dynamo_component_requests_total") == 0
        for _ in range(3):
            assert len(await collect(client, worker, req(4))) == 4
        ctx = Context()
        ctx.stop_generating()  # stopped before it starts: a cancelled terminal at once
        assert (await collect(client, worker, req(50), ctx))[-1].finish_reason == (
            FinishReason.CANCELLED)
        with pytest.raises(DynamoError):
            await collect(client, worker, req(4, [666]))
        assert metric(worker, "dynamo_component_requests_total") == 5
        for status, n in (("success", 3), ("cancelled", 1), ("error", 1)):
            got = metric(worker, "dynamo_component_requests_finished_total", status=status)
            assert got == n, status
        # Four 3-token prompts and the 1-token [666] one.
        assert metric(worker, "dynamo_component_input_tokens_total") == 4 * 3 + 1
        assert metric(worker, "dynamo_component_output_tokens_total") == 12
        assert metric(worker, "dynamo_component_time_to_first_token_seconds_count") == 3
        assert metric(worker, "dynamo_component_inter_token_latency_seconds_count") == 9
        assert metric(worker, "dynamo_component_inflight_requests") == 0
        assert metric(worker, "dynamo_component_model_load_time_seconds") > 0


# -- shutdown ---------------------------------------------------------------------------------


async def test_shutdown_runs_every_stage_once_in_order(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="dynamo_backend_common.worker")
    engine = LifecycleEngine()
    cfg = config(shutdown=ShutdownConfig(total_secs=10, router_grace_secs=0.01))
    async with serving(engine, cfg) as worker:
        pass
    stages = [m.group(1) for r in caplog.records
              if (m := re.match(r"shutdown stage (\w+) (\w+)", r.getMessage()))]
    assert stages == STAGES
    assert engine.events == ["start", "drain", "cleanup"]
    recorded = {dict(lab)["stage"]: dict(lab)["reason"] for (n, lab) in samples(worker)
                if n == "dynamo_component_shutdown_stage_seconds"}
    assert recorded == dict.fromkeys(STAGES, "completed")


async def test_shutdown_before_start_never_calls_start_or_cleanup() -> None:
    engine = LifecycleEngine()
    worker = Worker(engine, config())
    worker.request_shutdown("early")
    assert await asyncio.wait_for(worker.run(), TIMEOUT) == 0
    assert engine.events == []


async def test_failed_start_still_runs_cleanup_once_and_fails() -> None:
    engine = LifecycleEngine(fail_start=True)
    worker = Worker(engine, config())
    assert await asyncio.wait_for(worker.run(), TIMEOUT) == 1
    assert engine.events == ["start", "cleanup"]
    assert not worker.ready.is_set()


async def test_request_after_admission_closed_gets_worker_draining() -> None:
    engine = LifecycleEngine()
    engine.hold = asyncio.Event()
    async with serving(engine) as worker, WorkerClient() as client:
        held = asyncio.create_task(collect(client, worker, req(3)))
        await until(lambda: engine.requests)
        worker.request_shutdown("test")
        await until(lambda: not worker._tracker.accepting)
        with pytest.raises(DynamoError) as err:
            await collect(client, worker, req(3))
        # EngineShutdown: the frontend retries it on another worker.
        assert err.value.kind is BackendError.EngineShutdown
        assert "not accepting" in err.value.message
        engine.hold.set()
        chunks = await asyncio.wait_for(held, TIMEOUT)
        assert [t for c in chunks for t in c.token_ids] == [0, 1, 2]
        assert len(engine.requests) == 1  # the refused one never reached the engine


# -- command line -----------------------------------------------------------------------------


def test_the_parser_leaves_flags_it_does_not_know_to_the_command() -> None:
    """No abbreviation: ``--model`` and ``--event`` are not taken for ``--model-path`` and
    ``--events``. The command then refuses them before ``--`` (tests/test_cli.py); engine
    flags go after it."""
    from dynamo_backend_common.cli import build_parser

    args, unknown = build_parser().parse_known_args(
        ["worker", "--engine", "echo", "--model", "Qwen/Qwen3-0.6B", "--event", "x",
         "--namespace", "ns1"])
    assert unknown == ["--model", "Qwen/Qwen3-0.6B", "--event", "x"]
    assert args.model_path == "" and args.events == "" and args.namespace == "ns1"


async def test_shutdown_during_runtime_setup_never_starts_the_engine(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    engine = LifecycleEngine()
    worker = Worker(engine, config())
    setup = worker._start_runtime

    async def setup_then_signal() -> None:
        await setup()
        worker.request_shutdown("SIGTERM")  # arrives while the runtime was being set up

    monkeypatch.setattr(worker, "_start_runtime", setup_then_signal)
    assert await asyncio.wait_for(worker.run(), TIMEOUT) == 0
    assert engine.events == []


def test_docs_flag_table_matches_the_worker_parser() -> None:
    """docs/worker.md lists every worker flag with exactly the env vars its --help names."""
    import argparse
    from pathlib import Path

    from dynamo_backend_common.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    parser = sub.choices["worker"]
    expected = {a.option_strings[0]: sorted(re.findall(r"DYN_\w+", a.help or ""))
                for a in parser._actions if a.option_strings and a.dest != "help"}
    doc = (Path(__file__).resolve().parents[1] / "docs" / "worker.md").read_text()
    rows = re.findall(r"^\| `(--[\w-]+)` \| ([^|]*) \|", doc, re.MULTILINE)
    documented = {flag: sorted(re.findall(r"DYN_\w+", env)) for flag, env in rows}
    assert documented == expected


# -- registration -----------------------------------------------------------------------------


async def test_wildcard_bind_advertises_a_connectable_address() -> None:
    import msgspec

    from dynamo_backend_common.protocols.discovery import INSTANCES_PREFIX, InstanceInfo
    from dynamo_backend_common.runtime.discovery import open_discovery

    cfg = config(host="0.0.0.0", status_host="0.0.0.0")
    async with serving(LifecycleEngine(), cfg) as worker, WorkerClient() as client:
        assert cfg.discovery is not None
        entries = await open_discovery(cfg.discovery).get_prefix(INSTANCES_PREFIX)
        (info,) = [msgspec.json.decode(v, type=InstanceInfo) for v in entries.values()]
        host = info.address.rpartition(":")[0]
        assert host not in ("0.0.0.0", "", "::")
        assert info.status_url is not None and "0.0.0.0" not in info.status_url
        chunks = [from_msgpack(raw, LLMEngineOutput)
                  async for raw in client.stream(info, req(2))]
        assert [t for c in chunks for t in c.token_ids] == [0, 1]
        async with httpx.AsyncClient(trust_env=False) as http:
            assert (await http.get(info.status_url + "/live")).status_code == 200
    assert worker.address is not None


async def test_cleanup_overrunning_its_bound_is_abandoned_and_exits_1() -> None:
    engine = LifecycleEngine(cleanup="hang")
    cfg = config(shutdown=ShutdownConfig(total_secs=10, router_grace_secs=0,
                                         cleanup_timeout_secs=0.2))
    async with serving(engine, cfg, exit_code=1) as worker:
        pass
    assert engine.events == ["start", "drain", "cleanup"]
    recorded = {dict(lab)["stage"]: dict(lab)["reason"] for (n, lab) in samples(worker)
                if n == "dynamo_component_shutdown_stage_seconds"}
    assert recorded["cleanup"] == "timed_out"


async def test_canary_timeout_is_reported_and_leaves_nothing_in_flight() -> None:
    engine = LifecycleEngine()
    engine.hold = asyncio.Event()  # the canary never gets a token
    cfg = config(health_check_payload={"token_ids": [1]}, health_check_timeout_secs=0.05)
    async with serving(engine, cfg) as worker:
        await worker.run_canary()
        ok, details = await worker._health_check()
        assert not ok
        assert details["canary_error"] == "no terminal chunk within 0.05s"
        assert worker._tracker.inflight == 0
        engine.hold.set()


class SlowAbortEngine(LifecycleEngine):
    async def abort(self, ctx: Context) -> None:
        self.record("abort started")
        await asyncio.sleep(0.2)  # e.g. an RPC to the engine's scheduler
        self.record("abort done")


async def test_cleanup_waits_for_abort_calls_still_running() -> None:
    engine = SlowAbortEngine(delay_s=0.01)
    async with serving(engine) as worker, WorkerClient() as client:
        ctx = Context()
        ctx.stop_generating()
        await collect(client, worker, req(100), ctx)
        await until(lambda: "abort started" in engine.events)
    # Shutdown began while abort() was still running: cleanup came after it, not during it.
    assert engine.events == ["start", "abort started", "abort done", "drain", "cleanup"]


async def test_with_a_canary_health_waits_for_the_first_pass() -> None:
    engine = LifecycleEngine(canary=True)
    engine.hold = asyncio.Event()  # the first canary cannot finish yet
    async with serving(engine) as worker:
        ok, details = await worker._health_check()
        assert not ok and details["canary"] == "pending"
        engine.hold.set()
        await worker.run_canary()
        ok, details = await worker._health_check()
        assert ok and details["canary"] == "ok"


class BadPayloadEngine(LifecycleEngine):
    async def health_check_payload(self) -> dict[str, Any] | None:
        raise RuntimeError("no canary today")


async def test_failing_health_check_payload_disables_the_canary_not_the_worker() -> None:
    async with serving(BadPayloadEngine()) as worker, WorkerClient() as client:
        ok, details = await worker._health_check()
        assert ok and details["canary"] == "disabled"
        assert len(await collect(client, worker, req(2))) == 2


def test_invalid_payload_flag_is_a_usage_error_and_invalid_env_is_ignored(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from dynamo_backend_common.cli import build_parser

    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_known_args(
            ["worker", "--engine", "echo", "--health-check-payload", "[1, 2]"])
    assert exit_.value.code == 2
    assert "--health-check-payload: health check payload must be a JSON object" in (
        capsys.readouterr().err)
    args, _ = build_parser().parse_known_args(
        ["worker", "--engine", "echo", "--health-check-payload", '{"token_ids": [4]}'])
    assert WorkerConfig.from_args(args).health_check_payload == {"token_ids": [4]}
    # A bad environment value does not stop the worker from starting (it is warned about and
    # ignored when the worker resolves the canary).
    monkeypatch.setenv("DYN_HEALTH_CHECK_PAYLOAD", "{not json")
    args, _ = build_parser().parse_known_args(["worker", "--engine", "echo"])
    assert WorkerConfig.from_args(args).health_check_payload is None


async def test_losing_the_discovery_lease_shuts_the_worker_down() -> None:
    engine = LifecycleEngine()
    worker = Worker(engine, config())
    task = asyncio.create_task(worker.run())
    await asyncio.wait_for(worker.ready.wait(), TIMEOUT)
    assert worker._discovery is not None
    worker._discovery.lease_lost.set()  # what a backend does when keep-alive fails for a TTL
    assert await asyncio.wait_for(task, TIMEOUT) == 1  # not asked to stop: restart it
    assert worker._shutdown_reason == "lease_lost"
    assert engine.events == ["start", "drain", "cleanup"]


async def test_cancelling_the_worker_task_still_shuts_down_in_order() -> None:
    from dynamo_backend_common.protocols.discovery import INSTANCES_PREFIX
    from dynamo_backend_common.runtime.discovery import open_discovery

    engine = LifecycleEngine()
    cfg = config()
    worker = Worker(engine, cfg)
    task = asyncio.create_task(worker.run())
    await asyncio.wait_for(worker.ready.wait(), TIMEOUT)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, TIMEOUT)
    assert engine.events == ["start", "drain", "cleanup"]
    assert cfg.discovery is not None
    assert await open_discovery(cfg.discovery).get_prefix(INSTANCES_PREFIX) == {}


async def test_bad_discovery_url_fails_fast_without_starting_the_engine() -> None:
    engine = LifecycleEngine()
    assert await Worker(engine, config(discovery="bogus://x")).run() == 1
    assert engine.events == []


async def test_card_names_model_files_served_by_the_status_server(tmp_path: Path) -> None:
    """Like Dynamo with DYN_SYSTEM_PORT set: the card's CheckedFiles are URLs on the worker's
    status server (``/v1/metadata/...``), so a frontend on another host can fetch them, and
    their bytes match the blake3 checksums."""
    import msgspec

    from dynamo_backend_common.frontend.card_files import materialize
    from dynamo_backend_common.protocols.discovery import MODELS_PREFIX, ModelCard
    from dynamo_backend_common.runtime.discovery import open_discovery

    tiny = TINY_MODEL
    cfg = config(model_path=str(tiny), served_model_name="Tiny Model")
    async with serving(LifecycleEngine(), cfg):
        assert cfg.discovery is not None
        entries = await open_discovery(cfg.discovery).get_prefix(MODELS_PREFIX)
        (card,) = [msgspec.json.decode(v, type=ModelCard) for v in entries.values()]
        files = card.card_json.files()
        assert sorted(files) == ["config.json", "generation_config.json", "tokenizer.json",
                                 "tokenizer_config.json"]
        tok = files["tokenizer.json"]
        assert tok.path.startswith("http://127.0.0.1:")
        assert tok.path.endswith("/v1/metadata/dynamo/backend/generate/tiny_model/_base/"
                                 "tokenizer.json")
        async with httpx.AsyncClient(trust_env=False) as http:
            got = await http.get(tok.path)
            assert got.status_code == 200
            assert got.content == (tiny / "tokenizer.json").read_bytes()
        local = await asyncio.to_thread(materialize, card.card_json, tmp_path / "cache")
        assert (local / "tokenizer_config.json").read_bytes() == (
            tiny / "tokenizer_config.json").read_bytes()


# -- the mux fast path beside Dynamo's plane ----------------------------------------------------


async def test_tcp_worker_also_serves_the_mux_fast_path_our_clients_prefer() -> None:
    from dynamo_backend_common.runtime.transport.callhome import CallHomeServer

    async with serving(LifecycleEngine(), config(mux_fastpath=True)) as worker:
        info = info_of(worker)
        assert "tcp" in info.transport and info.mux is not None
        host_port, _, name = info.mux.partition("/")
        assert name == "generate" and host_port != info.address
        # What a Dynamo frontend reads is unchanged: the extension is one more field.
        assert msgspec.json.decode(msgspec.json.encode(info))["mux"] == info.mux
        tcp_server = worker._server
        assert isinstance(tcp_server, CallHomeServer)
        async with WorkerClient() as fast, WorkerClient(prefer_mux=False) as dynamo_way:
            got_fast = await collect(fast, worker, req(4))
            assert tcp_server.stats.streams == 0  # went over the mux plane
            got_tcp = await collect(dynamo_way, worker, req(4))
            assert tcp_server.stats.streams == 1
            assert [c.token_ids for c in got_fast] == [c.token_ids for c in got_tcp]
            assert got_fast[-1].finish_reason == got_tcp[-1].finish_reason == FinishReason.LENGTH
            # Engine control is served on the fast path too.
            with pytest.raises(DynamoError) as err:
                await fast.call(info, to_msgpack({"control": "reboot"}),
                                endpoint=CONTROL_ENDPOINT)
            assert err.value.kind is BackendError.InvalidArgument
            assert tcp_server.stats.streams == 1
    # Without the fast path the record has no mux field.
    async with serving(LifecycleEngine(), config(mux_fastpath=False)) as worker:
        assert info_of(worker).mux is None
