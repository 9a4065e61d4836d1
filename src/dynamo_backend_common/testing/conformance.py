"""The conformance kit: the :class:`~dynamo_backend_common.LLMEngine` contract as runnable checks.

``report = await run_conformance(MyEngine)`` drives an engine the way a worker does and reports
every broken invariant with a named kind and a message that says what to fix. Every check runs,
also after an earlier one failed, and each reports all of its failures.

Checks, in run order (check name: failure kinds):

``start_config``
    ``start(worker_id)`` returns an :class:`EngineConfig` with a non-empty ``model`` that passes
    ``EngineConfig.validate()``: ``EmptyModelInConfig``, ``InvalidEngineConfig``,
    ``StartFailed``, ``FactoryFailed``.
``single_generate``
    one request streams to exactly one terminal chunk, nothing after it, and the generator then
    returns: ``NoTerminalChunk``, ``ChunkAfterTerminal``, ``HangAfterTerminal``,
    ``InvalidChunk``, ``GenerateFailed``, ``GenerateNotAsyncIterator``.
``concurrent_8``
    8 requests advanced in lock-step round robin (so they really interleave, even for an engine
    that never awaits) all succeed: ``ConcurrentGenerateFailed``.
``concurrency_100``
    100 requests as concurrent tasks all succeed: ``ConcurrentGenerateFailed``.
``cancellation``
    the context is stopped after the first chunk and ``engine.abort(ctx)`` is called, as the
    worker does; the stream must end within ``cancel_timeout`` (2 s) and its terminal must be
    ``cancelled``: ``CancellationNotObserved``, ``CancellationIgnored``,
    ``CancellationUntestable`` (the first chunk was already terminal), ``AbortFailed``.
``typed_errors``
    errors stay typed. For requests no engine can serve as usual (empty ``token_ids``, and
    ``max_tokens=0``) the engine either streams a valid response or raises
    ``DynamoError(InvalidArgument)``: ``UntypedError`` (a raw exception such as ``IndexError``
    escaped; the worker could only report it as ``Unknown``), ``TypedErrorLost`` (the stream
    ended with ``LLMEngineOutput.error(...)``, which drops the kind), ``WrongErrorKind``
    (a ``DynamoError`` of another kind). These requests are chosen because they are invalid or
    degenerate for *every* engine; the streams go through
    :func:`~dynamo_backend_common.validate.validate_stream`, the framework's path, which
    propagates a raised ``DynamoError`` unchanged.
``health_check_payload``
    a non-``None`` canary payload decodes as a ``PreprocessedRequest`` and streams to a
    non-error terminal: ``InvalidHealthCheckPayload``.
``idempotent_queries``
    ``kv_event_sources()`` and ``supported_controls()`` give the same answer twice, with at most
    one KV event source per dp_rank: ``NotIdempotent``, ``DuplicateDpRank``, ``QueryFailed``.
``cleanup_twice``
    ``cleanup()`` on the engine used above (also when its ``start`` failed) succeeds, and a
    second call succeeds too: ``CleanupFailed``, ``SecondCleanupFailed``.
``cleanup_without_start``
    ``cleanup()`` on a fresh, never-started engine succeeds: ``CleanupWithoutStartFailed``.

``start(worker_id)`` is bounded by ``start_timeout`` (default: ``timeout``, 10 s); every other
step (one stream or batch of streams, each ``cleanup``) by ``timeout``. ``progress=`` is told
when each check starts and how it ended, as it happens (the ``dynamo-backend conformance``
command prints it), so a hang shows which check it is in at once.

Any check that streams can also report the stream-level kinds (``NoTerminalChunk``,
``ChunkAfterTerminal``, ``HangAfterTerminal``, ``InvalidChunk``, ``StreamCloseHung`` when
``aclose()`` hangs, ``GenerateNotAsyncIterator``); a check that crashes in an unforeseen way
reports ``Unexpected``.

One engine from ``factory`` serves ``start_config`` through ``cleanup_twice`` (as a worker uses
one engine for its life; real engines may take minutes to start); ``cleanup_without_start`` uses a
second one. When ``start`` raises, the checks that need a started engine are reported as
``skipped``. Every stream is consumed through ``validate_stream`` and closed with a bounded
``aclose()``; the kit always cleans up the engines it started.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Final, Literal

import msgspec

from ..engine import EngineConfig, GenerateContext, LLMEngine, PushKvEventSource
from ..errors import BackendError, DynamoError, ProtocolError
from ..protocols.codec import convert, from_msgpack, to_msgpack
from ..protocols.common import (
    FinishReason,
    LLMEngineOutput,
    PreprocessedRequest,
    SamplingOptions,
    StopConditions,
)
from ..runtime.context import Context
from ..validate import FailureKind, StreamContractError, validate_stream

__all__ = [
    "CHECKS",
    "CancellingContext",
    "CheckProgress",
    "ConformanceFailure",
    "ConformanceReport",
    "ProgressCallback",
    "cancelling_context",
    "check_engine",
    "default_request",
    "mock_context",
    "run_conformance",
]

log = logging.getLogger("dynamo_backend_common.testing")

EngineFactory = Callable[[], LLMEngine | Awaitable[LLMEngine]]

#: Check names in run order.
CHECKS: Final = (
    "start_config",
    "single_generate",
    "concurrent_8",
    "concurrency_100",
    "cancellation",
    "typed_errors",
    "health_check_payload",
    "idempotent_queries",
    "cleanup_twice",
    "cleanup_without_start",
)
# Checks that need the engine's start() to have returned.
_NEED_START: Final = frozenset(CHECKS[1:8])

_WORKER_ID: Final = 0x5EED_C0DE
# Bound on closing a stream: an engine's finally that blocks longer stalls worker shutdown.
_CLOSE_TIMEOUT_S: Final = 2.0
# Minimum max_tokens of the cancellation request, so the stream is still running at the stop.
_CANCEL_MIN_TOKENS: Final = 256
_EXAMPLES_IN_SUMMARY: Final = 3


# -- report ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class ConformanceFailure:
    """One broken invariant: the ``check`` that found it, its ``kind``, and what to fix."""

    check: str
    kind: FailureKind
    message: str

    def __str__(self) -> str:
        return f"{self.check}: {self.kind}: {self.message}"


@dataclass
class ConformanceReport:
    """Result of :func:`run_conformance`. ``ok`` is true when no check failed."""

    failures: list[ConformanceFailure] = field(default_factory=list)
    passed: list[str] = field(default_factory=list)
    #: Checks not run because a prerequisite failed, with the reason.
    skipped: dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.failures

    @property
    def kinds(self) -> set[str]:
        """The distinct failure kinds (handy in tests)."""
        return {f.kind for f in self.failures}

    def failures_of(self, check: str) -> list[ConformanceFailure]:
        return [f for f in self.failures if f.check == check]

    def raise_for_failures(self) -> None:
        """Raise ``AssertionError`` listing every failure (not only the first)."""
        if self.failures:
            raise AssertionError(str(self))

    def __str__(self) -> str:
        failed = {f.check for f in self.failures}
        lines = [
            f"conformance: {len(self.passed)} passed, {len(failed)} failed, "
            f"{len(self.skipped)} skipped"
        ]
        for check in CHECKS:
            if check in failed:
                for f in self.failures_of(check):
                    lines.append(f"  FAIL  {check}: {f.kind}: {f.message}")
            elif check in self.skipped:
                lines.append(f"  skip  {check}: {self.skipped[check]}")
            elif check in self.passed:
                lines.append(f"  ok    {check}")
        return "\n".join(lines)


@dataclass(frozen=True)
class CheckProgress:
    """One progress event of :func:`run_conformance`, given to its ``progress`` callback.

    Each check in :data:`CHECKS` gets, in run order, one ``"running"`` event when it starts
    (``seconds`` 0.0; checks that are skipped without running get none) and then exactly one
    final event: ``"ok"``, ``"FAIL"`` (with its ``failures``) or ``"skip"`` (``reason`` says
    why). ``seconds`` is the check's wall time.
    """

    check: str
    status: Literal["running", "ok", "FAIL", "skip"]
    seconds: float = 0.0
    failures: tuple[ConformanceFailure, ...] = ()
    reason: str = ""


#: ``progress=`` of :func:`run_conformance`: called synchronously on the kit's event loop, so it
#: must be quick (print a line); an exception it raises ends the run (engines are still cleaned
#: up).
ProgressCallback = Callable[[CheckProgress], None]


# -- contexts -------------------------------------------------------------------------------
def mock_context(
    request_id: str | None = None,
    *,
    metadata: Mapping[str, str] | None = None,
    decode: bool = False,
) -> GenerateContext:
    """A fresh, live :class:`GenerateContext` for calling ``engine.generate`` in tests.

    ``decode=True`` gives it a first-token signal (``ctx.is_decode`` is then true).
    """
    return GenerateContext(Context(request_id), asyncio.Event() if decode else None, metadata)


class CancellingContext(GenerateContext):
    """A :class:`GenerateContext` that stops itself; see :func:`cancelling_context`."""

    __slots__ = ("_after_chunks", "_seen", "_timer", "stopped_at")

    def __init__(
        self,
        after: int | float,
        request_id: str | None = None,
        *,
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        if isinstance(after, bool) or not isinstance(after, int | float) or after < 0:
            raise ValueError(f"after must be a non-negative int (chunks) or float (s): {after!r}")
        super().__init__(Context(request_id), None, metadata)
        self._seen = 0
        self._timer: asyncio.TimerHandle | None = None
        #: ``loop.time()`` at the stop, or None while live.
        self.stopped_at: float | None = None
        self._after_chunks: int | None = None
        if isinstance(after, int):
            self._after_chunks = after
            if after == 0:
                self._stop()
        else:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                raise RuntimeError(
                    "cancelling_context(seconds) needs a running event loop"
                ) from None
            self._timer = loop.call_later(after, self._stop)

    def observe(self, chunk: LLMEngineOutput) -> None:
        """Count one chunk the consumer received; stops the context at the ``after``-th."""
        self._seen += 1
        if self._after_chunks is not None and self._seen >= self._after_chunks:
            self._stop()

    async def watch(
        self, stream: AsyncIterator[LLMEngineOutput]
    ) -> AsyncIterator[LLMEngineOutput]:
        """Yield ``stream``'s chunks, calling :meth:`observe` on each; closing it closes
        ``stream``."""
        try:
            async for item in stream:
                self.observe(item)
                yield item
        finally:
            aclose = getattr(stream, "aclose", None)
            if aclose is not None:
                await aclose()

    def cancel_timer(self) -> None:
        """Disarm the seconds timer (no-op for the chunk-count form)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _stop(self) -> None:
        if self.stopped_at is None:
            try:
                self.stopped_at = asyncio.get_running_loop().time()
            except RuntimeError:
                self.stopped_at = 0.0
        self._timer = None
        self.stop_generating()


def cancelling_context(
    after: int | float,
    request_id: str | None = None,
    *,
    metadata: Mapping[str, str] | None = None,
) -> CancellingContext:
    """A context that stops itself, to test an engine's cancellation path.

    - ``after`` an ``int``: stop once the consumer has received ``after`` chunks, counted by
      ``ctx.observe(chunk)`` or by iterating ``ctx.watch(stream)``. The stop happens before the
      engine is resumed for the next chunk, so the test is deterministic. ``0`` stops at once.
    - ``after`` a ``float``: stop ``after`` seconds from now, by a loop timer (needs a running
      event loop; nothing polls).

    Example::

        ctx = cancelling_context(1)
        outs = [o async for o in ctx.watch(engine.generate(request, ctx))]
        assert outs[-1].finish_reason == FinishReason.CANCELLED
    """
    return CancellingContext(after, request_id, metadata=metadata)


def default_request() -> PreprocessedRequest:
    """The kit's request: 16 prompt tokens, ``max_tokens=16``, ``ignore_eos``, greedy.

    :func:`run_conformance` sets its ``model`` to the name ``start()`` returned.
    """
    return PreprocessedRequest(
        model="conformance",
        token_ids=list(range(1, 17)),
        stop_conditions=StopConditions(max_tokens=16, ignore_eos=True),
        sampling_options=SamplingOptions(temperature=0.0),
    )


# -- stream driving -------------------------------------------------------------------------
class _NotAsyncIterator(Exception):
    pass


@dataclass
class _Run:
    """What one consumed stream did."""

    chunks: int = 0
    terminal: LLMEngineOutput | None = None
    error: BaseException | None = None
    timed_out: bool = False
    close_hung: bool = False
    abort_problem: str | None = None  # how engine.abort(ctx) failed, if it did

    @property
    def ended_ok(self) -> bool:
        """Ended on its own with a success terminal (not error, not cancelled)."""
        t = self.terminal
        return (
            self.error is None
            and not self.timed_out
            and t is not None
            and t.finish_reason is not None
            and not t.finish_reason.is_error
            and t.finish_reason != FinishReason.CANCELLED
        )


def _open(
    engine: LLMEngine, request: PreprocessedRequest, ctx: GenerateContext
) -> AsyncIterator[LLMEngineOutput]:
    """``validate_stream(engine.generate(...))``; raises ``_NotAsyncIterator`` or what
    ``generate`` raised synchronously."""
    stream: object = engine.generate(_copy(request), ctx)
    if not hasattr(stream, "__anext__"):
        if inspect.iscoroutine(stream):
            stream.close()  # avoid "never awaited" noise
        raise _NotAsyncIterator(type(stream).__name__)
    return validate_stream(stream, ctx)  # type: ignore[arg-type]


async def _aclose(stream: AsyncIterator[LLMEngineOutput]) -> bool:
    """Close ``stream`` within the bound; False when the engine's cleanup code hung."""
    aclose = getattr(stream, "aclose", None)
    if aclose is None:
        return True
    task = asyncio.ensure_future(aclose())
    done, _ = await asyncio.wait({task}, timeout=_CLOSE_TIMEOUT_S)
    if not done:
        task.cancel()
        await asyncio.wait({task})
        return False
    if not task.cancelled() and task.exception() is not None:
        log.debug("closing a stream raised", exc_info=task.exception())
    return True


async def _consume(
    engine: LLMEngine,
    request: PreprocessedRequest,
    ctx: GenerateContext,
    timeout: float,
    *,
    cancel_timeout: float | None = None,
) -> _Run:
    """Drive one stream to its end, within ``timeout`` s (``cancel_timeout`` s after a stop
    when ``ctx`` is a :class:`CancellingContext`). Never raises for engine misbehaviour."""
    run = _Run()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    cancelling = ctx if isinstance(ctx, CancellingContext) else None
    abort_task: asyncio.Task[str | None] | None = None
    try:
        stream = _open(engine, request, ctx)
    except Exception as exc:
        run.error = exc
        return run
    try:
        async with asyncio.timeout_at(deadline) as cm:
            try:
                async for item in stream:
                    run.chunks += 1
                    if item.finish_reason is not None:
                        run.terminal = item
                    # Stop after the first *non-terminal* chunk (after a terminal it is moot).
                    if (
                        cancelling is not None
                        and item.finish_reason is None
                        and not cancelling.is_stopped()
                    ):
                        cancelling.observe(item)
                        if cancelling.is_stopped():
                            # As the worker does on an explicit stop: tell the engine.
                            abort_task = loop.create_task(_abort(engine, cancelling.inner))
                            if cancel_timeout is not None:
                                deadline = loop.time() + cancel_timeout
                                cm.reschedule(deadline)
                    # An engine that never awaits cannot be interrupted by the timeout.
                    if loop.time() > deadline:
                        run.timed_out = True
                        break
            except Exception as exc:
                run.error = exc
    except TimeoutError:
        run.timed_out = True
    finally:
        run.close_hung = not await _aclose(stream)
        if abort_task is not None:
            done, _ = await asyncio.wait({abort_task}, timeout=_CLOSE_TIMEOUT_S)
            if done:
                run.abort_problem = abort_task.result()
            else:
                abort_task.cancel()
                await asyncio.wait({abort_task})
                run.abort_problem = f"abort(ctx) did not return within {_CLOSE_TIMEOUT_S}s"
    return run


async def _abort(engine: LLMEngine, ctx: Context) -> str | None:
    try:
        await engine.abort(ctx)
    except Exception as exc:
        return f"abort(ctx) raised {type(exc).__name__}: {exc}"
    return None


_replace = msgspec.structs.replace


def _copy(request: PreprocessedRequest) -> PreprocessedRequest:
    # Each generate gets its own deep copy: an engine may mutate its request.
    return from_msgpack(to_msgpack(request), PreprocessedRequest)


def _describe(run: _Run, *, brief: bool = False) -> str:
    """One phrase saying how a stream that did not succeed ended."""
    if isinstance(run.error, _NotAsyncIterator):
        return f"generate returned a {run.error}, not an async iterator"
    if isinstance(run.error, StreamContractError):
        return run.error.violation if brief else str(run.error)
    if isinstance(run.error, DynamoError):
        return f"raised DynamoError({run.error.kind.value}: {run.error.message})"
    if run.error is not None:
        return f"raised {type(run.error).__name__}: {run.error}"
    if run.timed_out:
        if run.terminal is None:
            return f"no terminal chunk before the timeout ({run.chunks} chunks)"
        return "did not return after its terminal chunk before the timeout"
    if run.terminal is None or run.terminal.finish_reason is None:
        return "ended without a terminal chunk"
    return f"ended with finish_reason {run.terminal.finish_reason}"


# -- the kit --------------------------------------------------------------------------------
class _Check:
    def __init__(self, report: ConformanceReport, name: str) -> None:
        self.report = report
        self.name = name
        self.failed = False

    def fail(self, kind: FailureKind, message: str) -> None:
        self.failed = True
        self.report.failures.append(ConformanceFailure(self.name, kind, message))


_FIX: Final[Mapping[FailureKind, str]] = {
    FailureKind.NoTerminalChunk: "end every stream with exactly one terminal chunk "
    "(LLMEngineOutput.stop()/.length()/.cancelled()) or raise DynamoError",
    FailureKind.HangAfterTerminal: "return from generate right after yielding the terminal "
    "chunk; a generator that keeps running holds the request in flight and stalls shutdown",
    FailureKind.CancellationIgnored: "once ctx.is_stopped() is true, yield "
    "LLMEngineOutput.cancelled() (with usage) as the terminal and return",
    FailureKind.GenerateNotAsyncIterator: "write generate as `async def generate(self, request, "
    "ctx):` with `yield` (an async generator), not a coroutine returning a stream",
}


def _stream_failure(check: _Check, run: _Run, what: str) -> bool:
    """Report the contract problems of ``run`` common to every check; True if it had any."""
    before = len(check.report.failures)
    err = run.error
    if isinstance(err, _NotAsyncIterator):
        kind = FailureKind.GenerateNotAsyncIterator
        check.fail(kind, f"{what}: generate returned a {err}; {_FIX[kind]}")
    elif isinstance(err, StreamContractError):
        check.fail(err.violation, f"{what}: {err}")  # its message already says what to fix
    elif run.timed_out and run.terminal is not None:
        kind = FailureKind.HangAfterTerminal
        check.fail(kind, f"{what}: the stream did not end after its terminal chunk; {_FIX[kind]}")
    elif run.timed_out:
        kind = FailureKind.NoTerminalChunk
        check.fail(
            kind,
            f"{what}: no terminal chunk before the timeout ({run.chunks} chunks); {_FIX[kind]}",
        )
    if run.close_hung:
        check.fail(
            (FailureKind.HangAfterTerminal if run.terminal is not None
             else FailureKind.StreamCloseHung),
            f"{what}: closing the stream (aclose) did not finish within {_CLOSE_TIMEOUT_S}s; "
            "keep the generator's finally blocks short and cancellable",
        )
    return len(check.report.failures) > before


class _Kit:
    def __init__(
        self,
        factory: EngineFactory,
        request: PreprocessedRequest | None,
        timeout: float,
        cancel_timeout: float,
        start_timeout: float | None = None,
        progress: ProgressCallback | None = None,
    ) -> None:
        self.factory = factory
        self.request = request or default_request()
        self.request_given = request is not None
        self.timeout = timeout
        self.start_timeout = timeout if start_timeout is None else start_timeout
        self.cancel_timeout = cancel_timeout
        self.progress = progress
        self.report = ConformanceReport()
        self.engine: LLMEngine | None = None
        self.started = False
        self.cleaned = False

    async def run(self) -> ConformanceReport:
        try:
            await self._run_check("start_config", self.check_start)
            steps: list[tuple[str, Callable[[_Check, LLMEngine], Awaitable[None]]]] = [
                ("single_generate", self.check_single),
                ("concurrent_8", self.check_concurrent_8),
                ("concurrency_100", self.check_concurrency_100),
                ("cancellation", self.check_cancellation),
                ("typed_errors", self.check_typed_errors),
                ("health_check_payload", self.check_health_payload),
                ("idempotent_queries", self.check_idempotent),
            ]
            for name, fn in steps:
                await self._run_engine_check(name, fn)
            await self._run_check("cleanup_twice", self.check_cleanup_twice)
            await self._run_check("cleanup_without_start", self.check_cleanup_without_start)
        finally:
            if self.engine is not None and not self.cleaned:
                # The kit was interrupted: still release what it started.
                try:
                    await asyncio.wait_for(self.engine.cleanup(), self.timeout)
                except Exception:
                    log.warning("conformance: cleanup after an interrupted run failed")
        return self.report

    def _tell(self, event: CheckProgress) -> None:
        if self.progress is not None:
            self.progress(event)

    async def _run_check(self, name: str, fn: Callable[[_Check], Awaitable[None]]) -> None:
        check = _Check(self.report, name)
        self._tell(CheckProgress(name, "running"))
        t0 = time.perf_counter()
        try:
            await fn(check)
        except Exception as exc:  # a kit bug or an engine failure the check did not foresee
            check.fail(FailureKind.Unexpected, f"{type(exc).__name__}: {exc}")
        seconds = time.perf_counter() - t0
        if check.failed:
            self._tell(CheckProgress(name, "FAIL", seconds, tuple(self.report.failures_of(name))))
        elif name in self.report.skipped:
            self._tell(CheckProgress(name, "skip", seconds, reason=self.report.skipped[name]))
        else:
            self.report.passed.append(name)
            self._tell(CheckProgress(name, "ok", seconds))

    async def _run_engine_check(
        self, name: str, fn: Callable[[_Check, LLMEngine], Awaitable[None]]
    ) -> None:
        engine = self.engine
        if engine is None or not self.started:
            reason = "needs a started engine (see start_config)"
            self.report.skipped[name] = reason
            self._tell(CheckProgress(name, "skip", reason=reason))
            return

        async def call(check: _Check) -> None:
            await fn(check, engine)

        await self._run_check(name, call)

    async def _make(self, check: _Check) -> LLMEngine | None:
        try:
            result = self.factory()
            if inspect.isawaitable(result):
                result = await result
        except Exception as exc:
            check.fail(FailureKind.FactoryFailed,
                       f"the engine factory raised {type(exc).__name__}: {exc}")
            return None
        if not isinstance(result, LLMEngine):
            check.fail(
                FailureKind.FactoryFailed,
                f"the factory returned {type(result).__name__}, expected an LLMEngine subclass",
            )
            return None
        return result

    # -- checks ---------------------------------------------------------------------------
    async def check_start(self, check: _Check) -> None:
        self.engine = await self._make(check)
        if self.engine is None:
            return
        try:
            config: object = await asyncio.wait_for(
                self.engine.start(_WORKER_ID), self.start_timeout
            )
        except TimeoutError:
            check.fail(
                FailureKind.StartFailed,
                f"start() did not return within {self.start_timeout}s; an engine that loads "
                "for longer needs a larger start_timeout= (--start-timeout SECONDS)",
            )
            return
        except Exception as exc:
            hint = "" if isinstance(exc, DynamoError) else " (raise DynamoError for typed errors)"
            check.fail(FailureKind.StartFailed, f"start() raised {type(exc).__name__}: {exc}{hint}")
            return
        self.started = True
        if not isinstance(config, EngineConfig):
            check.fail(
                FailureKind.InvalidEngineConfig,
                f"start() returned {type(config).__name__}; return an EngineConfig",
            )
            return
        if not isinstance(config.model, str) or not config.model.strip():
            check.fail(
                FailureKind.EmptyModelInConfig,
                f"start() returned EngineConfig(model={config.model!r}); set model to the "
                "canonical model id (e.g. the HF repo name), a non-empty string",
            )
            config = replace(config, model="placeholder")  # still validate the other fields
        elif not self.request_given:
            # Address the kit's requests to the model the engine serves, as a frontend would.
            self.request = _replace(self.request, model=config.display_name)
        try:
            config.validate()
        except DynamoError as exc:
            check.fail(FailureKind.InvalidEngineConfig,
                       f"EngineConfig.validate() failed: {exc.message}")

    async def check_single(self, check: _Check, engine: LLMEngine) -> None:
        run = await _consume(engine, self.request, mock_context("conformance-single"), self.timeout)
        if _stream_failure(check, run, "a single generate"):
            return
        if not run.ended_ok:
            check.fail(
                FailureKind.GenerateFailed,
                f"a single valid generate {_describe(run)}; a valid request must succeed "
                "(raise DynamoError only for requests the engine cannot serve)",
            )

    async def check_concurrent_8(self, check: _Check, engine: LLMEngine) -> None:
        n = 8
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        runs = [_Run() for _ in range(n)]
        streams: list[AsyncIterator[LLMEngineOutput] | None] = []
        for i in range(n):
            try:
                streams.append(_open(engine, self.request, mock_context(f"conformance-rr-{i}")))
            except Exception as exc:
                runs[i].error = exc
                streams.append(None)
        active = [i for i in range(n) if streams[i] is not None]
        try:
            # Lock-step round robin: every stream is advanced one chunk per round, so all 8
            # are in flight together even when the engine never awaits.
            while active:
                for i in list(active):
                    stream = streams[i]
                    assert stream is not None
                    try:
                        async with asyncio.timeout_at(deadline):
                            item = await anext(stream)
                    except StopAsyncIteration:
                        active.remove(i)
                        continue
                    except TimeoutError:
                        runs[i].timed_out = True
                        active.remove(i)
                        continue
                    except Exception as exc:
                        runs[i].error = exc
                        active.remove(i)
                        continue
                    runs[i].chunks += 1
                    if item.finish_reason is not None:
                        runs[i].terminal = item
                    if loop.time() > deadline:
                        runs[i].timed_out = True
                        active.remove(i)
        finally:
            for i, s in enumerate(streams):
                if s is not None:
                    runs[i].close_hung = not await _aclose(s)
        self._report_batch(check, runs, "interleaved")

    async def check_concurrency_100(self, check: _Check, engine: LLMEngine) -> None:
        n = 100
        runs = await asyncio.gather(
            *(
                _consume(engine, self.request, mock_context(f"conformance-c100-{i}"), self.timeout)
                for i in range(n)
            )
        )
        self._report_batch(check, list(runs), "concurrent")

    def _report_batch(self, check: _Check, runs: list[_Run], how: str) -> None:
        bad = [(i, r) for i, r in enumerate(runs) if not r.ended_ok or r.close_hung]
        if not bad:
            return
        examples = "; ".join(
            f"#{i} {_describe(r, brief=True)}" + (" (aclose hung)" if r.close_hung else "")
            for i, r in bad[:_EXAMPLES_IN_SUMMARY]
        )
        extra = len(bad) - _EXAMPLES_IN_SUMMARY
        more = f" (and {extra} more)" if extra > 0 else ""
        if self.report.failures_of("single_generate"):
            advice = "fix single_generate first"
        else:
            advice = (
                "a single generate works, so this is about concurrency: generate is called "
                "concurrently; keep per-request state inside the generator, not on self, and "
                "queue work rather than rejecting it"
            )
        check.fail(
            FailureKind.ConcurrentGenerateFailed,
            f"{len(bad)} of {len(runs)} {how} generates failed: {examples}{more}; {advice}",
        )

    async def check_cancellation(self, check: _Check, engine: LLMEngine) -> None:
        sc = self.request.stop_conditions
        max_tokens = max(sc.max_tokens or 0, _CANCEL_MIN_TOKENS)
        request = _replace(self.request, stop_conditions=_replace(sc, max_tokens=max_tokens))
        ctx = cancelling_context(1, "conformance-cancel")
        run = await _consume(engine, request, ctx, self.timeout, cancel_timeout=self.cancel_timeout)
        if ctx.stopped_at is None:
            if run.terminal is not None and run.chunks == 1:
                check.fail(
                    FailureKind.CancellationUntestable,
                    "the first chunk was already terminal, so the kit could not stop the stream "
                    "mid-way; make the engine stream one chunk per token (or pass a request= "
                    "that yields more than one chunk)",
                )
            else:
                if not _stream_failure(check, run, "the stream to cancel"):
                    check.fail(FailureKind.GenerateFailed, f"the stream to cancel {_describe(run)}")
            return
        if run.abort_problem is not None:
            check.fail(
                FailureKind.AbortFailed,
                f"{run.abort_problem}; the worker calls abort(ctx) on every explicit stop: keep "
                "it short, and never let it raise",
            )
        fix = _FIX[FailureKind.CancellationIgnored]
        err = run.error
        if (isinstance(err, StreamContractError)
                and err.violation == FailureKind.CancellationIgnored):
            check.fail(FailureKind.CancellationIgnored, str(err))  # says what to fix
        elif run.timed_out and run.terminal is None:
            check.fail(
                FailureKind.CancellationNotObserved,
                f"the stream was still running {self.cancel_timeout}s after ctx.stop_generating()"
                f" ({run.chunks - 1} chunks after the stop); check ctx.is_stopped() between "
                "chunks, or race long waits against `await ctx.stopped()`",
            )
        elif isinstance(err, DynamoError):
            check.fail(
                FailureKind.CancellationIgnored,
                f"after the stop the engine raised DynamoError({err.kind.value}: {err.message})"
                f" instead of ending cleanly; {fix}",
            )
        elif _stream_failure(check, run, "the cancelled stream"):
            pass
        elif err is not None:
            check.fail(
                FailureKind.CancellationIgnored,
                f"after the stop the engine raised {type(err).__name__}: {err}; {fix}",
            )
        elif run.terminal is None or run.terminal.finish_reason != FinishReason.CANCELLED:
            reason = run.terminal.finish_reason if run.terminal is not None else None
            check.fail(
                FailureKind.CancellationIgnored,
                f"the stream was stopped after its first chunk but ended with finish_reason "
                f"{reason}; {fix}",
            )

    async def check_typed_errors(self, check: _Check, engine: LLMEngine) -> None:
        sc = self.request.stop_conditions
        cases = [
            ("empty token_ids", _replace(self.request, token_ids=[])),
            ("max_tokens=0", _replace(self.request, stop_conditions=_replace(sc, max_tokens=0))),
        ]
        for label, request in cases:
            run = await _consume(engine, request, mock_context("conformance-typed"), self.timeout)
            what = f"a request with {label}"
            err = run.error
            if isinstance(err, DynamoError):
                if err.kind is not BackendError.InvalidArgument:
                    check.fail(
                        FailureKind.WrongErrorKind,
                        f"{what} raised DynamoError({err.kind.value}); a request the engine "
                        "cannot serve is DynamoError.invalid_argument(...) (a 4xx for clients)",
                    )
            elif err is not None and not isinstance(
                err, StreamContractError | _NotAsyncIterator
            ):
                check.fail(
                    FailureKind.UntypedError,
                    f"{what} raised {type(err).__name__}: {err}; validate the request and raise "
                    "DynamoError.invalid_argument(...) so clients get a typed error",
                )
            elif _stream_failure(check, run, what):
                pass
            elif run.terminal is not None and run.terminal.finish_reason is not None and (
                run.terminal.finish_reason.is_error
            ):
                check.fail(
                    FailureKind.TypedErrorLost,
                    f"{what} ended with LLMEngineOutput.error(...) ({run.terminal.finish_reason}),"
                    " which loses the error kind; raise DynamoError.invalid_argument(...) instead",
                )

    async def check_health_payload(self, check: _Check, engine: LLMEngine) -> None:
        kind = FailureKind.InvalidHealthCheckPayload
        try:
            payload: Any = await asyncio.wait_for(engine.health_check_payload(), self.timeout)
        except Exception as exc:
            check.fail(kind, f"health_check_payload() raised {type(exc).__name__}: {exc}")
            return
        if payload is None:
            return  # active probing disabled: allowed
        if not isinstance(payload, dict):
            check.fail(kind, f"health_check_payload() returned {type(payload).__name__}; "
                       "return a PreprocessedRequest-shaped dict or None")
            return
        try:
            request = convert(payload, PreprocessedRequest)
        except ProtocolError as exc:
            check.fail(kind, f"the payload is not a valid PreprocessedRequest: {exc}")
            return
        run = await _consume(engine, request, mock_context("conformance-health"), self.timeout)
        if _stream_failure(check, run, "the health-check request"):
            return
        if not run.ended_ok:
            check.fail(kind, f"the health-check request {_describe(run)}; the canary must "
                       "succeed on a healthy engine")

    async def check_idempotent(self, check: _Check, engine: LLMEngine) -> None:
        try:
            first = await asyncio.wait_for(engine.kv_event_sources(), self.timeout)
            second = await asyncio.wait_for(engine.kv_event_sources(), self.timeout)
        except Exception as exc:
            check.fail(FailureKind.QueryFailed,
                       f"kv_event_sources() raised {type(exc).__name__}: {exc}")
        else:
            a, b = _source_keys(first), _source_keys(second)
            if a != b:
                check.fail(
                    FailureKind.NotIdempotent,
                    f"kv_event_sources() returned {a} then {b}; return the same sources on "
                    "every call (build them in start())",
                )
            ranks = [k[1] for k in a]
            if len(ranks) != len(set(ranks)):
                check.fail(
                    FailureKind.DuplicateDpRank,
                    f"kv_event_sources() has more than one source for a dp_rank: {ranks}",
                )
        try:
            c1 = await asyncio.wait_for(engine.supported_controls(), self.timeout)
            c2 = await asyncio.wait_for(engine.supported_controls(), self.timeout)
        except Exception as exc:
            check.fail(FailureKind.QueryFailed,
                       f"supported_controls() raised {type(exc).__name__}: {exc}")
        else:
            if list(c1) != list(c2):
                check.fail(
                    FailureKind.NotIdempotent,
                    f"supported_controls() returned {c1!r} then {c2!r}; return a fixed list",
                )

    async def check_cleanup_twice(self, check: _Check) -> None:
        engine = self.engine
        if engine is None:
            self.report.skipped[check.name] = "no engine (the factory failed)"
            return
        self.cleaned = True  # whatever happens below, the kit does not clean it up again
        when = "after start()" if self.started else "after a failed start() (partial state)"
        for kind, which in ((FailureKind.CleanupFailed, "the first"),
                            (FailureKind.SecondCleanupFailed, "a second")):
            try:
                await asyncio.wait_for(engine.cleanup(), self.timeout)
            except TimeoutError:
                check.fail(kind, f"{which} cleanup() {when} did not return within {self.timeout}s")
            except Exception as exc:
                hint = (
                    "cleanup must be null-safe and release what exists"
                    if kind == FailureKind.CleanupFailed
                    else "cleanup must be idempotent: remember it ran and return at once"
                )
                check.fail(
                    kind, f"{which} cleanup() {when} raised {type(exc).__name__}: {exc}; {hint}"
                )

    async def check_cleanup_without_start(self, check: _Check) -> None:
        engine = await self._make(check)
        if engine is None:
            return
        kind = FailureKind.CleanupWithoutStartFailed
        try:
            await asyncio.wait_for(engine.cleanup(), self.timeout)
        except TimeoutError:
            check.fail(kind, f"cleanup() on a never-started engine hung for {self.timeout}s")
        except Exception as exc:
            check.fail(
                kind,
                f"cleanup() on a never-started engine raised {type(exc).__name__}: {exc}; "
                "guard each resource with an `is None` check so cleanup is null-safe",
            )


def _source_keys(sources: object) -> list[tuple[str, int, str]]:
    keys: list[tuple[str, int, str]] = []
    for s in sources if isinstance(sources, list | tuple) else [sources]:
        detail = "" if isinstance(s, PushKvEventSource) else f"{getattr(s, 'endpoint', s)!r}"
        keys.append((type(s).__name__, int(getattr(s, "dp_rank", -1)), detail))
    return keys


async def run_conformance(
    factory: EngineFactory,
    *,
    request: PreprocessedRequest | None = None,
    timeout: float = 10.0,
    start_timeout: float | None = None,
    cancel_timeout: float = 2.0,
    progress: ProgressCallback | None = None,
) -> ConformanceReport:
    """Check an engine against the ``LLMEngine`` contract; see the module doc for the checks.

    ``factory`` builds a fresh engine: a class, a function, or an async function. ``request``
    replaces :func:`default_request` (use one your engine serves normally, with at least two
    chunks of output). ``start_timeout`` bounds ``start()`` (``None``: the same as ``timeout``);
    ``timeout`` bounds every other step (one stream or batch of streams, each ``cleanup``);
    ``cancel_timeout`` is how long a stopped stream may take to end. ``progress`` is called with
    a :class:`CheckProgress` as each check starts and ends. Never raises for engine
    misbehaviour: inspect the report, or call :meth:`ConformanceReport.raise_for_failures`.
    """
    for name, value in (("timeout", timeout), ("start_timeout", start_timeout),
                        ("cancel_timeout", cancel_timeout)):
        if value is not None and not value > 0:
            raise ValueError(f"{name} must be a positive number of seconds, not {value!r}")
    kit = _Kit(factory, request, timeout, cancel_timeout, start_timeout, progress)
    return await kit.run()


def check_engine(
    factory: EngineFactory,
    *,
    request: PreprocessedRequest | None = None,
    timeout: float = 10.0,
    start_timeout: float | None = None,
    cancel_timeout: float = 2.0,
) -> ConformanceReport:
    """Run :func:`run_conformance` to completion on a fresh event loop and assert it passed.

    A plain synchronous function, so a test needs no pytest-asyncio configuration::

        def test_my_engine_conforms():
            check_engine(MyEngine)

    Raises ``AssertionError`` listing every failure when the engine does not conform, else
    returns the report. The keyword arguments are :func:`run_conformance`'s. It must be called
    with no event loop running in the thread (``asyncio.run`` semantics): an ``async def`` test
    uses ``report = await run_conformance(MyEngine)`` and ``report.raise_for_failures()``
    instead, and calling this from one raises ``RuntimeError`` saying so.
    """
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        pass
    else:
        raise RuntimeError(
            "check_engine() runs its own event loop and cannot be called from a running one "
            "(an async test); there, use `report = await run_conformance(MyEngine)` and "
            "`report.raise_for_failures()`"
        )
    report = asyncio.run(
        run_conformance(
            factory,
            request=request,
            timeout=timeout,
            start_timeout=start_timeout,
            cancel_timeout=cancel_timeout,
        )
    )
    report.raise_for_failures()
    return report
