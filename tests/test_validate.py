"""The stream-contract validator: each violation raises, valid streams pass untouched."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterable

import pytest

from dynamo_backend_common import (
    Context,
    DynamoError,
    FinishReason,
    GenerateContext,
    LLMEngineOutput,
    chunk,
)
from dynamo_backend_common.testing import mock_context
from dynamo_backend_common.validate import (
    StreamContractError,
    validate_stream,
    validation_enabled,
)

LENGTH = LLMEngineOutput.length()
CANCELLED = LLMEngineOutput.cancelled()


async def stream_of(items: Iterable[object]) -> AsyncIterator[LLMEngineOutput]:
    for item in items:
        yield item  # type: ignore[misc]


async def drain(stream: AsyncIterator[LLMEngineOutput]) -> list[LLMEngineOutput]:
    return [o async for o in stream]


def violation(exc: pytest.ExceptionInfo[StreamContractError]) -> str:
    return exc.value.violation


# -- valid streams ----------------------------------------------------------------------------
async def test_valid_stream_passes_through_unchanged() -> None:
    items = [chunk.token(1), chunk.token(2), LENGTH.with_tokens([3])]
    out = await drain(validate_stream(stream_of(items), mock_context()))
    assert all(a is b for a, b in zip(out, items, strict=True))


async def test_terminal_only_stream_and_every_finish_reason_pass() -> None:
    for terminal in (LENGTH, LLMEngineOutput.stop(), CANCELLED, LLMEngineOutput.error("x")):
        assert await drain(validate_stream(stream_of([terminal]), mock_context())) == [terminal]


async def test_cancelled_without_a_stop_is_allowed() -> None:
    out = await drain(validate_stream(stream_of([chunk.token(1), CANCELLED]), mock_context()))
    assert out[-1].finish_reason == FinishReason.CANCELLED


async def test_plain_runtime_context_is_accepted() -> None:
    ctx = Context("plain")
    assert len(await drain(validate_stream(stream_of([LENGTH]), ctx))) == 1


# -- violations -------------------------------------------------------------------------------
async def test_chunk_after_terminal_raises_with_id_and_chunk() -> None:
    stream = stream_of([chunk.token(1), LENGTH, chunk.token(42)])
    with pytest.raises(StreamContractError) as info:
        await drain(validate_stream(stream, mock_context("req-7")))
    assert violation(info) == "ChunkAfterTerminal"
    assert info.value.request_id == "req-7" and info.value.chunk == chunk.token(42)
    text = str(info.value)
    assert "ChunkAfterTerminal" in text and "req-7" in text and "token_ids=[42]" in text


async def test_second_terminal_is_a_chunk_after_terminal() -> None:
    with pytest.raises(StreamContractError) as info:
        await drain(validate_stream(stream_of([LENGTH, CANCELLED]), mock_context()))
    assert violation(info) == "ChunkAfterTerminal"


async def test_exception_after_terminal_is_a_violation() -> None:
    async def engine() -> AsyncIterator[LLMEngineOutput]:
        yield LENGTH
        raise DynamoError.unknown("late failure")

    with pytest.raises(StreamContractError) as info:
        await drain(validate_stream(engine(), mock_context()))
    assert violation(info) == "ChunkAfterTerminal"
    assert isinstance(info.value.__cause__, DynamoError)


async def test_no_terminal_raises() -> None:
    with pytest.raises(StreamContractError) as info:
        await drain(validate_stream(stream_of([chunk.token(1), chunk.token(2)]), mock_context()))
    assert violation(info) == "NoTerminalChunk"
    assert "after 2 chunk(s)" in str(info.value) and info.value.chunk == chunk.token(2)


async def test_empty_stream_raises_no_terminal() -> None:
    with pytest.raises(StreamContractError) as info:
        await drain(validate_stream(stream_of([]), mock_context()))
    assert violation(info) == "NoTerminalChunk"


async def test_non_chunk_item_raises_invalid_chunk() -> None:
    with pytest.raises(StreamContractError) as info:
        await drain(validate_stream(stream_of([{"token_ids": [1]}]), mock_context()))
    assert violation(info) == "InvalidChunk" and "dict" in str(info.value)


async def test_str_finish_reason_raises_invalid_chunk() -> None:
    bad = LLMEngineOutput(token_ids=[], finish_reason="stop")  # type: ignore[arg-type]
    with pytest.raises(StreamContractError) as info:
        await drain(validate_stream(stream_of([bad]), mock_context()))
    assert violation(info) == "InvalidChunk"


async def test_stopped_engine_that_keeps_going_and_ends_otherwise_raises() -> None:
    ctx = mock_context()

    async def engine() -> AsyncIterator[LLMEngineOutput]:
        yield chunk.token(1)
        ctx.stop_generating()  # the stop arrives while chunk 2 is being produced
        yield chunk.token(2)
        yield chunk.token(3)  # resumed with the stop visible: still not cancelled
        yield LENGTH

    with pytest.raises(StreamContractError) as info:
        await drain(validate_stream(engine(), ctx))
    assert violation(info) == "CancellationIgnored"
    assert "finish_reason length" in str(info.value)


async def test_context_stopped_before_start_must_end_cancelled() -> None:
    ctx = mock_context()
    ctx.stop_generating()
    with pytest.raises(StreamContractError) as info:
        await drain(validate_stream(stream_of([chunk.token(1), LENGTH]), ctx))
    assert violation(info) == "CancellationIgnored"


async def test_stop_racing_the_last_step_is_not_flagged() -> None:
    ctx = mock_context()

    async def engine() -> AsyncIterator[LLMEngineOutput]:
        yield chunk.token(1)
        ctx.stop_generating()  # stop lands while the engine finishes its final token
        yield chunk.token(2)
        yield LENGTH  # first resume with the stop visible already produced the terminal

    assert len(await drain(validate_stream(engine(), ctx))) == 3


async def test_stop_then_extra_chunks_then_cancelled_passes() -> None:
    ctx = mock_context()
    ctx.stop_generating()
    out = await drain(validate_stream(stream_of([chunk.token(1), chunk.token(2), CANCELLED]), ctx))
    assert out[-1] is CANCELLED


async def test_dynamo_error_propagates_unchanged() -> None:
    err = DynamoError.invalid_argument("bad prompt")

    async def engine() -> AsyncIterator[LLMEngineOutput]:
        yield chunk.token(1)
        raise err

    with pytest.raises(DynamoError) as info:
        await drain(validate_stream(engine(), mock_context()))
    assert info.value is err


async def test_other_exceptions_propagate_unchanged() -> None:
    async def engine() -> AsyncIterator[LLMEngineOutput]:
        raise KeyError("boom")
        yield LENGTH  # pragma: no cover

    with pytest.raises(KeyError):
        await drain(validate_stream(engine(), mock_context()))


# -- closing ----------------------------------------------------------------------------------
async def test_early_close_does_not_raise_and_is_forwarded_to_the_engine() -> None:
    finalized = asyncio.Event()

    async def engine() -> AsyncIterator[LLMEngineOutput]:
        try:
            for i in range(1000):
                yield chunk.token(i)
            yield LENGTH
        finally:
            finalized.set()

    wrapped = validate_stream(engine(), mock_context())
    assert (await anext(wrapped)).token_ids == [0]
    await wrapped.aclose()  # type: ignore[attr-defined]
    # The engine's finally ran during aclose(), not later at garbage collection.
    assert finalized.is_set()


async def test_break_out_of_async_for_closes_the_engine() -> None:
    finalized = asyncio.Event()

    async def engine() -> AsyncIterator[LLMEngineOutput]:
        try:
            while True:
                yield chunk.token(0)
        finally:
            finalized.set()

    wrapped = validate_stream(engine(), mock_context())
    try:
        async for _ in wrapped:
            break
    finally:
        await wrapped.aclose()  # type: ignore[attr-defined]
    assert finalized.is_set()


async def test_request_id_override_is_used_in_messages() -> None:
    with pytest.raises(StreamContractError, match="'override'"):
        await drain(validate_stream(stream_of([]), mock_context("ctx-id"), request_id="override"))


# -- switch -----------------------------------------------------------------------------------
def test_validation_enabled_by_default_and_disabled_by_env(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("DYN_VALIDATE_STREAMS", raising=False)
    assert validation_enabled()
    monkeypatch.setenv("DYN_VALIDATE_STREAMS", "0")
    assert not validation_enabled()
    monkeypatch.setenv("DYN_VALIDATE_STREAMS", "1")
    assert validation_enabled()


def test_validation_disabled_under_python_dash_o() -> None:
    code = "from dynamo_backend_common.validate import validation_enabled as v; print(v())"
    env_free = {"PATH": "/usr/bin:/bin"}
    out = subprocess.run(
        [sys.executable, "-O", "-c", code], capture_output=True, text=True, env=env_free
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


# -- cost -------------------------------------------------------------------------------------
async def test_overhead_per_chunk_is_small() -> None:
    """Loose bound (measured ~70 ns/chunk): catches an accidental O(n) or per-chunk await."""
    n = 50_000
    items = [chunk.token(1)] * (n - 1) + [LENGTH]

    async def timed(wrap: bool) -> float:
        ctx: GenerateContext = mock_context()
        stream = stream_of(items)
        start = time.perf_counter()
        async for _ in validate_stream(stream, ctx) if wrap else stream:
            pass
        return time.perf_counter() - start

    overhead = min([await timed(True) for _ in range(3)]) - min(
        [await timed(False) for _ in range(3)]
    )
    assert overhead / n < 1e-6, f"{overhead / n * 1e9:.0f} ns/chunk"
