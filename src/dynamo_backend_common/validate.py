"""Debug-time validation of the engine stream contract.

The worker wraps every ``generate`` stream in :func:`validate_stream` unless
:func:`validation_enabled` is false (``DYN_VALIDATE_STREAMS=0`` or ``python -O``). A violation
raises :class:`StreamContractError`, loudly, instead of letting a client hang or see a mangled
stream. The wrapper costs about 190 ns per chunk on one x86 core (CPython 3.11;
``python benchmarks/validator.py``), a tenth of the worker's whole per-token cost, so it stays
on in production too.

The rules (``LLMEngine.generate``'s contract):

``ChunkAfterTerminal``
    Nothing follows the terminal chunk (the one with ``finish_reason`` set): no chunk, and no
    exception either.
``NoTerminalChunk``
    A stream that runs to its end has exactly one terminal chunk. Not a violation: the consumer
    closing the stream early (``aclose()``, ``break``), or the engine raising: a raised
    :class:`~dynamo_backend_common.errors.DynamoError` *is* a terminal and propagates unchanged
    (so does any other exception; the worker turns it into ``Unknown``).
``CancellationIgnored``
    Once the context is stopped the stream ends with ``LLMEngineOutput.cancelled()``. Precisely:
    the terminal must be ``cancelled`` if the context was already stopped when the engine was
    resumed to produce an *earlier, non-terminal* chunk. The engine then had a whole step in
    which ``ctx.is_stopped()`` was true, yet kept going and ended some other way. A stop that
    races the very last step is not flagged: the engine may have finished its last token while
    the stop was in flight. A ``cancelled`` terminal without a stop is allowed (the engine may
    shed load), and so is raising ``DynamoError``.
``InvalidChunk``
    Every item is an :class:`~dynamo_backend_common.protocols.LLMEngineOutput` and a terminal's
    ``finish_reason`` is a :class:`~dynamo_backend_common.protocols.FinishReason` (not a str).
"""

from __future__ import annotations

import enum
import os
from collections.abc import AsyncIterator
from typing import Final

from .engine import GenerateContext
from .protocols.codec import to_builtins
from .protocols.common import FinishReason, LLMEngineOutput
from .runtime.context import Context

__all__ = [
    "CANCELLATION_IGNORED",
    "CHUNK_AFTER_TERMINAL",
    "INVALID_CHUNK",
    "NO_TERMINAL_CHUNK",
    "FailureKind",
    "StreamContractError",
    "validate_stream",
    "validation_enabled",
]

class FailureKind(enum.StrEnum):
    """Every kind of contract failure, one vocabulary for the stream validator (the first four,
    :class:`StreamContractError.violation`) and the conformance kit
    (``ConformanceFailure.kind``). Members are ``str``: they compare equal to their names."""

    ChunkAfterTerminal = "ChunkAfterTerminal"
    NoTerminalChunk = "NoTerminalChunk"
    CancellationIgnored = "CancellationIgnored"
    InvalidChunk = "InvalidChunk"
    # Found by the conformance kit (dynamo_backend_common.testing):
    AbortFailed = "AbortFailed"
    CancellationNotObserved = "CancellationNotObserved"
    CancellationUntestable = "CancellationUntestable"
    CleanupFailed = "CleanupFailed"
    CleanupWithoutStartFailed = "CleanupWithoutStartFailed"
    ConcurrentGenerateFailed = "ConcurrentGenerateFailed"
    DuplicateDpRank = "DuplicateDpRank"
    EmptyModelInConfig = "EmptyModelInConfig"
    FactoryFailed = "FactoryFailed"
    GenerateFailed = "GenerateFailed"
    GenerateNotAsyncIterator = "GenerateNotAsyncIterator"
    HangAfterTerminal = "HangAfterTerminal"
    InvalidEngineConfig = "InvalidEngineConfig"
    InvalidHealthCheckPayload = "InvalidHealthCheckPayload"
    NotIdempotent = "NotIdempotent"
    QueryFailed = "QueryFailed"
    SecondCleanupFailed = "SecondCleanupFailed"
    StartFailed = "StartFailed"
    StreamCloseHung = "StreamCloseHung"
    TypedErrorLost = "TypedErrorLost"
    Unexpected = "Unexpected"
    UntypedError = "UntypedError"
    WrongErrorKind = "WrongErrorKind"


CHUNK_AFTER_TERMINAL: Final = FailureKind.ChunkAfterTerminal
NO_TERMINAL_CHUNK: Final = FailureKind.NoTerminalChunk
CANCELLATION_IGNORED: Final = FailureKind.CancellationIgnored
INVALID_CHUNK: Final = FailureKind.InvalidChunk

_CHUNK_REPR_MAX: Final = 300


class StreamContractError(AssertionError):
    """An engine's stream broke the ``generate`` contract.

    ``violation`` is one of the rule names of this module (``ChunkAfterTerminal``, ...),
    ``request_id`` the request, ``chunk`` the offending item (``None`` when there is none, e.g.
    an empty stream). The message states all three.
    """

    def __init__(
        self, violation: FailureKind, detail: str, *, request_id: str,
        chunk: object | None = None
    ) -> None:
        self.violation = violation
        self.request_id = request_id
        self.chunk = chunk
        message = f"stream contract violated ({violation}) by request {request_id!r}: {detail}"
        if chunk is not None:
            message += f"; offending chunk: {_short_repr(chunk)}"
        super().__init__(message)


def validation_enabled() -> bool:
    """True unless ``DYN_VALIDATE_STREAMS`` is ``"0"`` or Python runs with ``-O``."""
    return __debug__ and os.environ.get("DYN_VALIDATE_STREAMS", "").strip() != "0"


async def validate_stream(
    stream: AsyncIterator[LLMEngineOutput],
    ctx: GenerateContext | Context,
    *,
    request_id: str | None = None,
) -> AsyncIterator[LLMEngineOutput]:
    """Yield ``stream``'s chunks unchanged, raising :class:`StreamContractError` on a violation.

    Always validates (the caller decides with :func:`validation_enabled`). Closing the wrapper
    (``aclose()``, or dropping it) closes ``stream`` at once so the engine's ``finally`` runs
    promptly; closing it early is never a violation. Exceptions from ``stream`` propagate
    unchanged. ``request_id`` defaults to ``ctx.id``.
    """
    rid = request_id if request_id is not None else ctx.id
    is_stopped = (ctx.inner if isinstance(ctx, GenerateContext) else ctx).is_stopped
    terminal: LLMEngineOutput | None = None
    last: LLMEngineOutput | None = None
    count = 0
    # Stop state at the moment the engine is resumed for the next item. Stopping is one-way, so
    # once seen it is not read again (that keeps the hot path to two attribute tests).
    stopped = is_stopped()
    ran_on_after_stop = False
    try:
        try:
            async for item in stream:
                if terminal is not None:
                    raise StreamContractError(
                        CHUNK_AFTER_TERMINAL,
                        f"a chunk followed the terminal chunk {_short_repr(terminal)}; the "
                        "terminal chunk must be the last item",
                        request_id=rid,
                        chunk=item,
                    )
                try:
                    finish = item.finish_reason
                except AttributeError:
                    raise StreamContractError(
                        INVALID_CHUNK,
                        f"generate yielded a {type(item).__name__}, expected LLMEngineOutput",
                        request_id=rid,
                        chunk=item,
                    ) from None
                if finish is not None:
                    if type(finish) is not FinishReason:
                        raise StreamContractError(
                            INVALID_CHUNK,
                            f"finish_reason must be a FinishReason, got {finish!r}; build "
                            "terminals with LLMEngineOutput.stop()/.length()/.cancelled()",
                            request_id=rid,
                            chunk=item,
                        )
                    if ran_on_after_stop and finish.kind != "cancelled":
                        raise StreamContractError(
                            CANCELLATION_IGNORED,
                            "the context was stopped, the engine produced more chunks, then "
                            f"ended with finish_reason {finish}; check ctx.is_stopped() "
                            "between chunks and end with LLMEngineOutput.cancelled()",
                            request_id=rid,
                            chunk=item,
                        )
                    terminal = item
                elif stopped:
                    ran_on_after_stop = True
                last = item
                count += 1
                yield item
                if not stopped:
                    stopped = is_stopped()
        except Exception as exc:
            if terminal is None or isinstance(exc, StreamContractError):
                raise
            raise StreamContractError(
                CHUNK_AFTER_TERMINAL,
                f"the stream raised {type(exc).__name__}: {exc} after its terminal chunk",
                request_id=rid,
                chunk=terminal,
            ) from exc
    finally:
        # Forward close to the engine's generator (no-op when it already finished).
        aclose = getattr(stream, "aclose", None)
        if aclose is not None:
            await aclose()
    if terminal is None:
        raise StreamContractError(
            NO_TERMINAL_CHUNK,
            f"the stream ended after {count} chunk(s) without a terminal chunk; end it with "
            "LLMEngineOutput.stop()/.length()/.cancelled() or raise DynamoError",
            request_id=rid,
            chunk=last,
        )


def _short_repr(obj: object) -> str:
    # Only non-default fields: the offending chunk should be readable in one log line.
    if isinstance(obj, LLMEngineOutput):
        try:
            fields = to_builtins(obj)
        except Exception:  # a malformed chunk (e.g. a bad field type) still gets reported
            fields = None
        text = (
            "LLMEngineOutput(" + ", ".join(f"{k}={v!r}" for k, v in fields.items()) + ")"
            if isinstance(fields, dict)
            else repr(obj)
        )
    else:
        text = repr(obj)
    if len(text) > _CHUNK_REPR_MAX:
        text = text[: _CHUNK_REPR_MAX - 3] + "..."
    return text
