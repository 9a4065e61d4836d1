"""The conformance kit passes a conforming engine and names each broken invariant."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from dynamo_backend_common import (
    HEALTH_CHECK_KEY,
    DynamoError,
    EngineConfig,
    FinishReason,
    GenerateContext,
    LLMEngine,
    LLMEngineOutput,
    PreprocessedRequest,
    StopConditions,
    usage,
)
from dynamo_backend_common.engines.echo import EchoEngine
from dynamo_backend_common.errors import BackendError
from dynamo_backend_common.protocols import convert
from dynamo_backend_common.testing import (
    CHECKS,
    CancellingContext,
    CheckProgress,
    ConformanceReport,
    cancelling_context,
    check_engine,
    default_request,
    mock_context,
    run_conformance,
)
from tests import broken_engines as b

# Small bounds keep the deliberately hanging engines fast; conforming engines finish in ms.
FAST = {"timeout": 0.5, "cancel_timeout": 0.3}


async def kit(factory: Callable[[], LLMEngine], timeout: float = 5.0) -> ConformanceReport:
    # Generous by default so checks that must pass don't fail on a loaded machine; tests of
    # hangs pass a short timeout.
    return await run_conformance(factory, timeout=timeout, cancel_timeout=0.3)


def failed_checks(report: ConformanceReport) -> set[str]:
    return {f.check for f in report.failures}


async def test_echo_engine_passes_every_check() -> None:
    report = await run_conformance(EchoEngine)
    assert report.ok, str(report)
    assert report.passed == list(CHECKS)
    assert not report.skipped


async def test_echo_engine_with_delay_passes() -> None:
    report = await run_conformance(lambda: EchoEngine(delay_s=0.001))
    assert report.ok, str(report)


async def test_echo_engine_races_its_delay_against_the_stop() -> None:
    engine = EchoEngine(delay_s=30.0)
    await engine.start(1)
    ctx = cancelling_context(0.01)
    # Without the race the first token alone would take 30 s.
    outs = await asyncio.wait_for(_collect(engine.generate(default_request(), ctx)), 5.0)
    assert [o.finish_reason for o in outs] == [FinishReason.CANCELLED]
    await engine.cleanup()


async def _collect(stream: AsyncIterator[LLMEngineOutput]) -> list[LLMEngineOutput]:
    return [o async for o in stream]


async def test_good_engine_passes() -> None:
    report = await kit(b.GoodEngine)
    assert report.ok, str(report)


async def test_async_factory_is_accepted() -> None:
    async def make() -> LLMEngine:
        return EchoEngine()

    report = await run_conformance(make)
    assert report.ok, str(report)


@pytest.mark.parametrize(
    ("engine", "check", "kind"),
    [
        (b.EmptyModelEngine, "start_config", "EmptyModelInConfig"),
        (b.NoTerminalEngine, "single_generate", "NoTerminalChunk"),
        (b.ChunkAfterTerminalEngine, "single_generate", "ChunkAfterTerminal"),
        (b.HangAfterTerminalEngine, "single_generate", "HangAfterTerminal"),
        (b.SingleSlotEngine, "concurrent_8", "ConcurrentGenerateFailed"),
        (b.DeafEngine, "cancellation", "CancellationNotObserved"),
        (b.StopIsLengthEngine, "cancellation", "CancellationIgnored"),
        (b.NotIdempotentCleanupEngine, "cleanup_twice", "SecondCleanupFailed"),
        (b.NotNullSafeCleanupEngine, "cleanup_without_start", "CleanupWithoutStartFailed"),
        (b.UntypedErrorEngine, "typed_errors", "UntypedError"),
        (b.ErrorChunkEngine, "typed_errors", "TypedErrorLost"),
        (b.WrongKindEngine, "typed_errors", "WrongErrorKind"),
        (b.SmallPoolEngine, "concurrency_100", "ConcurrentGenerateFailed"),
        (b.ShiftingSourcesEngine, "idempotent_queries", "NotIdempotent"),
        (b.BadHealthPayloadEngine, "health_check_payload", "InvalidHealthCheckPayload"),
        (b.CoroutineGenerateEngine, "single_generate", "GenerateNotAsyncIterator"),
    ],
)
async def test_each_broken_engine_fails_its_check(
    engine: Callable[[], LLMEngine], check: str, kind: str
) -> None:
    # A hang is only detected by a timeout, hit by most checks: keep it short.
    report = await kit(engine, timeout=0.2 if engine is b.HangAfterTerminalEngine else 0.5)
    assert not report.ok
    assert kind in {f.kind for f in report.failures_of(check)}, str(report)
    # One vocabulary with the stream validator: every kind is a FailureKind member.
    from dynamo_backend_common.validate import FailureKind

    assert all(isinstance(f.kind, FailureKind) for f in report.failures), report.failures
    message = next(f.message for f in report.failures_of(check) if f.kind == kind)
    assert len(message) > 30  # says what to fix, not just the kind


@pytest.mark.parametrize(
    ("engine", "only"),
    [
        (b.EmptyModelEngine, {"start_config"}),
        (b.SingleSlotEngine, {"concurrent_8", "concurrency_100"}),
        (b.SmallPoolEngine, {"concurrency_100"}),
        (b.StopIsLengthEngine, {"cancellation"}),
        (b.DeafEngine, {"cancellation"}),
        (b.NotIdempotentCleanupEngine, {"cleanup_twice"}),
        (b.NotNullSafeCleanupEngine, {"cleanup_without_start"}),
        (b.ErrorChunkEngine, {"typed_errors"}),
    ],
)
async def test_a_single_fault_fails_only_its_checks(
    engine: Callable[[], LLMEngine], only: set[str]
) -> None:
    report = await kit(engine)
    assert failed_checks(report) == only, str(report)
    assert set(report.passed) == set(CHECKS) - only


async def test_report_lists_all_failures_not_only_the_first() -> None:
    report = await kit(b.ManyFaultsEngine)
    assert {"EmptyModelInConfig", "ChunkAfterTerminal", "SecondCleanupFailed"} <= report.kinds
    with pytest.raises(AssertionError) as info:
        report.raise_for_failures()
    text = str(info.value)
    for kind in ("EmptyModelInConfig", "ChunkAfterTerminal", "SecondCleanupFailed"):
        assert kind in text
    assert "FAIL  start_config" in text and "ok    cleanup_without_start" in text


async def test_a_check_reports_all_of_its_failures() -> None:
    class TwoWrongs(b.GoodEngine):
        async def abort(self, ctx: object) -> None:
            raise RuntimeError("scheduler gone")

        async def generate(
            self, request: PreprocessedRequest, ctx: GenerateContext
        ) -> AsyncIterator[LLMEngineOutput]:
            if request.stop_conditions.max_tokens == 0:
                yield LLMEngineOutput.error("nothing to do")  # loses the kind
                return
            first = request.token_ids[0]  # IndexError on an empty prompt
            async for out in super().generate(request, ctx):
                yield LLMEngineOutput.length() if out.finish_reason else out.with_tokens([first])

    report = await kit(TwoWrongs)
    assert {f.kind for f in report.failures_of("typed_errors")} == {
        "UntypedError",
        "TypedErrorLost",
    }
    assert {f.kind for f in report.failures_of("cancellation")} == {
        "AbortFailed",
        "CancellationIgnored",
    }


async def test_failed_start_skips_stream_checks_but_still_cleans_up() -> None:
    engines: list[b.FailingStartEngine] = []

    def make() -> LLMEngine:
        engines.append(b.FailingStartEngine())
        return engines[-1]

    report = await kit(make)
    assert report.kinds == {"StartFailed"}
    assert "GPU not found" in report.failures[0].message
    assert set(report.skipped) == set(CHECKS[1:8])
    assert "skip  single_generate" in str(report)
    # cleanup ran on the partially started engine (twice), and on the never-started one.
    assert [e.cleanups for e in engines] == [2, 1]
    assert engines[0].handle is None


async def test_factory_failure_is_reported() -> None:
    def make() -> LLMEngine:
        raise RuntimeError("no weights")

    report = await kit(make)
    assert {(f.check, f.kind) for f in report.failures} == {
        ("start_config", "FactoryFailed"),
        ("cleanup_without_start", "FactoryFailed"),
    }
    assert "cleanup_twice" in report.skipped


async def test_cancellation_untestable_when_first_chunk_is_terminal() -> None:
    class OneShot(b.GoodEngine):
        def max_tokens(self, request: PreprocessedRequest) -> int:
            return 1

    report = await kit(OneShot)
    assert [(f.check, f.kind) for f in report.failures] == [
        ("cancellation", "CancellationUntestable")
    ]


async def test_abort_is_called_on_the_stop_and_its_failure_reported() -> None:
    aborted: list[str] = []

    class AbortingEngine(b.GoodEngine):
        async def abort(self, ctx: object) -> None:
            aborted.append(getattr(ctx, "id", "?"))
            raise RuntimeError("scheduler gone")

    report = await kit(AbortingEngine)
    assert aborted == ["conformance-cancel"]
    assert [f.kind for f in report.failures] == ["AbortFailed"]


async def test_custom_request_is_used() -> None:
    seen: list[list[int]] = []

    class Recording(b.GoodEngine):
        def generate(
            self, request: PreprocessedRequest, ctx: GenerateContext
        ) -> AsyncIterator[LLMEngineOutput]:
            seen.append(list(request.token_ids))
            return super().generate(request, ctx)

    report = await run_conformance(Recording, request=PreprocessedRequest(token_ids=[7, 8, 9]))
    assert report.ok, str(report)
    assert [7, 8, 9] in seen and list(range(1, 17)) not in seen


async def test_default_request_is_addressed_to_the_served_model() -> None:
    models: set[str] = set()

    class Named(b.GoodEngine):
        async def start(self, worker_id: int) -> EngineConfig:
            return EngineConfig(model="org/base", served_model_name="public-name")

        def generate(
            self, request: PreprocessedRequest, ctx: GenerateContext
        ) -> AsyncIterator[LLMEngineOutput]:
            models.add(request.model)
            return super().generate(request, ctx)

    assert (await kit(Named)).ok
    assert models == {"public-name"}


# -- contexts ---------------------------------------------------------------------------------
async def test_mock_context() -> None:
    ctx = mock_context("req-1", metadata={"k": "v"}, decode=True)
    assert ctx.id == "req-1" and ctx.metadata == {"k": "v"} and ctx.is_decode
    assert not ctx.is_stopped()
    assert not mock_context().is_decode


async def test_cancelling_context_counts_chunks_and_stops_the_engine() -> None:
    engine = EchoEngine()
    await engine.start(1)
    ctx = cancelling_context(3)
    request = PreprocessedRequest(
        token_ids=[1, 2, 3, 4, 5], stop_conditions=StopConditions(max_tokens=50)
    )
    outs = [o async for o in ctx.watch(engine.generate(request, ctx))]
    assert ctx.is_stopped() and ctx.stopped_at is not None
    assert [o.token_ids for o in outs[:3]] == [[1], [2], [3]]
    assert len(outs) == 4 and outs[-1].finish_reason == FinishReason.CANCELLED
    await engine.cleanup()


async def test_cancelling_context_zero_stops_at_once() -> None:
    assert cancelling_context(0).is_stopped()


async def test_cancelling_context_seconds_uses_a_timer() -> None:
    disarmed = cancelling_context(0.01)
    disarmed.cancel_timer()
    ctx = cancelling_context(0.02)
    assert not ctx.is_stopped()
    await asyncio.wait_for(ctx.stopped(), 2.0)
    assert ctx.is_stopped()
    # The disarmed timer was due first; it did not fire.
    assert not disarmed.is_stopped()


def test_cancelling_context_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError):
        cancelling_context(-1)
    with pytest.raises(ValueError):
        cancelling_context(True)
    with pytest.raises(RuntimeError, match="running event loop"):
        cancelling_context(0.5)  # seconds need a loop; this test is synchronous
    assert isinstance(cancelling_context(2), CancellingContext)


# -- pytest plugin ----------------------------------------------------------------------------
async def test_plugin_fixture_passes_a_conforming_engine(
    conformance: Callable[..., Awaitable[ConformanceReport]],
) -> None:
    report = await conformance(EchoEngine)
    assert report.passed == list(CHECKS)


async def test_plugin_fixture_fails_with_every_failure_listed(
    conformance: Callable[..., Awaitable[ConformanceReport]],
) -> None:
    with pytest.raises(AssertionError) as info:
        await conformance(b.ManyFaultsEngine, **FAST)
    assert "EmptyModelInConfig" in str(info.value) and "SecondCleanupFailed" in str(info.value)


def test_plugin_context_fixtures(
    mock_context: Callable[..., GenerateContext],
    cancelling_context: Callable[..., CancellingContext],
) -> None:
    assert mock_context("x").id == "x"
    assert cancelling_context(0).is_stopped()


# -- start timeout, progress, the sync helper ----------------------------------------------------
async def test_start_timeout_bounds_start_apart_from_the_step_timeout() -> None:
    # start() takes 0.6 s; every other step of this engine takes milliseconds.
    report = await run_conformance(lambda: b.SlowStartEngine(0.6), timeout=0.3)
    assert report.kinds == {"StartFailed"}  # start_timeout defaults to timeout
    (failure,) = report.failures
    assert "within 0.3s" in failure.message and "start_timeout" in failure.message
    report = await run_conformance(lambda: b.SlowStartEngine(0.6), timeout=0.3, start_timeout=30)
    assert report.ok, str(report)


async def test_run_conformance_rejects_non_positive_bounds() -> None:
    for kwargs in ({"timeout": 0}, {"start_timeout": -1.0}, {"cancel_timeout": float("nan")}):
        with pytest.raises(ValueError, match="positive number of seconds"):
            await run_conformance(EchoEngine, **kwargs)  # type: ignore[arg-type]


async def test_progress_tells_each_check_as_it_starts_and_ends() -> None:
    events: list[CheckProgress] = []
    report = await run_conformance(EchoEngine, progress=events.append)
    assert report.ok
    assert [(e.check, e.status) for e in events] == [
        (c, s) for c in CHECKS for s in ("running", "ok")
    ]
    assert all(e.seconds >= 0 for e in events)


async def test_progress_names_the_running_check_before_it_ends() -> None:
    events: list[CheckProgress] = []
    seen_while_running: list[str] = []

    def progress(event: CheckProgress) -> None:
        events.append(event)
        if event.status == "running":
            seen_while_running.append(event.check)

    report = await run_conformance(b.HangingEngine, progress=progress, **FAST)
    assert not report.ok
    single = [e for e in events if e.check == "single_generate"]
    assert [e.status for e in single] == ["running", "FAIL"]
    assert single[1].seconds >= FAST["timeout"] * 0.9
    assert {f.kind for f in single[1].failures} == {"NoTerminalChunk"}
    assert seen_while_running == list(CHECKS)


async def test_progress_reports_skips_without_a_running_event() -> None:
    events: list[CheckProgress] = []
    await run_conformance(b.FailingStartEngine, progress=events.append, **FAST)
    skipped = [e for e in events if e.status == "skip"]
    assert [e.check for e in skipped] == list(CHECKS[1:8])
    assert all("started engine" in e.reason for e in skipped)
    assert not [e for e in events if e.status == "running" and e.check in CHECKS[1:8]]


def test_check_engine_is_a_plain_function_that_asserts() -> None:
    report = check_engine(EchoEngine)
    assert report.passed == list(CHECKS)
    with pytest.raises(AssertionError) as info:
        check_engine(b.ManyFaultsEngine, **FAST)
    assert "EmptyModelInConfig" in str(info.value) and "SecondCleanupFailed" in str(info.value)
    with pytest.raises(AssertionError, match="StartFailed"):
        check_engine(lambda: b.SlowStartEngine(0.6), timeout=0.3)
    assert check_engine(lambda: b.SlowStartEngine(0.6), timeout=0.3, start_timeout=30).ok


async def test_check_engine_in_an_async_test_says_what_to_use_instead() -> None:
    with pytest.raises(RuntimeError, match="await run_conformance"):
        check_engine(EchoEngine)


# -- the example engine's own behaviour ---------------------------------------------------------
async def echo(
    request: PreprocessedRequest, engine: EchoEngine | None = None
) -> list[LLMEngineOutput]:
    engine = engine or EchoEngine()
    await engine.start(1)
    try:
        return await _collect(engine.generate(request, mock_context()))
    finally:
        await engine.cleanup()


def tokens(outs: list[LLMEngineOutput]) -> list[int]:
    return [t for o in outs for t in o.token_ids]


async def test_echo_cycles_the_prompt_up_to_max_tokens() -> None:
    outs = await echo(
        PreprocessedRequest(token_ids=[1, 2, 3], stop_conditions=StopConditions(max_tokens=7))
    )
    assert tokens(outs) == [1, 2, 3, 1, 2, 3, 1]
    assert all(o.finish_reason is None for o in outs[:-1])
    assert outs[-1].finish_reason == FinishReason.LENGTH
    assert outs[-1].completion_usage == usage(3, 7)


async def test_echo_uses_its_default_max_tokens() -> None:
    outs = await echo(PreprocessedRequest(token_ids=[4]), EchoEngine(max_tokens=3))
    assert tokens(outs) == [4, 4, 4]


async def test_echo_max_tokens_zero_is_an_empty_length_terminal() -> None:
    outs = await echo(
        PreprocessedRequest(token_ids=[4], stop_conditions=StopConditions(max_tokens=0))
    )
    assert outs == [LLMEngineOutput.length().with_usage(usage(1, 0))]


@pytest.mark.parametrize(
    ("conditions", "eos", "expected_tokens", "reason", "stop_reason"),
    [
        (StopConditions(), [3], [1, 2], FinishReason.EOS, None),
        (StopConditions(ignore_eos=True, max_tokens=4), [3], [1, 2, 3, 4], FinishReason.LENGTH,
         None),
        (StopConditions(stop_token_ids_hidden=[3]), [], [1, 2], FinishReason.STOP, 3),
        (StopConditions(stop_token_ids=[3]), [], [1, 2, 3], FinishReason.STOP, 3),
        (StopConditions(stop_token_ids_hidden=[1], min_tokens=2, max_tokens=9), [], [1, 2, 3, 4],
         FinishReason.STOP, 1),
    ],
)
async def test_echo_stop_conditions(
    conditions: StopConditions,
    eos: list[int],
    expected_tokens: list[int],
    reason: FinishReason,
    stop_reason: int | None,
) -> None:
    request = PreprocessedRequest(
        token_ids=[1, 2, 3, 4], stop_conditions=conditions, eos_token_ids=eos
    )
    outs = await echo(request)
    assert tokens(outs) == expected_tokens
    assert outs[-1].finish_reason == reason and outs[-1].stop_reason == stop_reason
    assert outs[-1].completion_usage == usage(4, len(expected_tokens))


async def test_echo_rejects_an_empty_prompt_with_a_typed_error() -> None:
    with pytest.raises(DynamoError) as info:
        await echo(PreprocessedRequest(token_ids=[]))
    assert info.value.kind is BackendError.InvalidArgument


async def test_echo_refuses_work_before_start_and_after_cleanup() -> None:
    engine = EchoEngine()
    with pytest.raises(DynamoError) as info:
        await _collect(engine.generate(default_request(), mock_context()))
    assert info.value.kind is BackendError.EngineShutdown
    await engine.start(1)
    await engine.cleanup()
    await engine.cleanup()  # idempotent
    with pytest.raises(DynamoError):
        await _collect(engine.generate(default_request(), mock_context()))


async def test_echo_start_config_and_canary() -> None:
    engine = EchoEngine(model_name="echo-7b", context_length=2048)
    cfg = await engine.start(1)
    assert (cfg.model, cfg.context_length, cfg.kv_cache_block_size) == ("echo-7b", 2048, None)
    payload = await engine.health_check_payload()
    assert payload[HEALTH_CHECK_KEY] is True
    assert convert(payload, PreprocessedRequest).health_check
    await engine.cleanup()


def test_echo_from_args(capsys: pytest.CaptureFixture[str]) -> None:
    engine = EchoEngine.from_args(["--delay-ms", "2.5", "--model-name", "e", "--max-tokens", "4"])
    assert (engine.delay_s, engine.model_name, engine.max_tokens) == (0.0025, "e", 4)
    default = EchoEngine.from_args([])
    assert (default.delay_s, default.model_name, default.max_tokens) == (0.0, "echo", 16)
    with pytest.raises(SystemExit) as info:
        EchoEngine.from_args(["--help"])
    assert info.value.code == 0
    assert "--delay-ms" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        EchoEngine.from_args(["--max-tokens", "many"])
