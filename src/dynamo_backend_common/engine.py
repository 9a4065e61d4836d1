"""The engine contract: what an engine author implements, and the helpers around it.

An engine is one subclass of :class:`LLMEngine`. The worker drives it:

1. construct it (your own ``__init__`` / factory);
2. ``await start(worker_id)`` -> :class:`EngineConfig` (the engine is then ready for ``generate``);
3. ``generate(request, ctx)`` for each request, concurrently;
4. ``abort(ctx)`` when a client explicitly cancels (not on a plain drop);
5. on shutdown ``drain()`` then ``cleanup()`` (exactly once, also after a failed ``start``).
"""

from __future__ import annotations

import abc
import asyncio
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Final

from .errors import DynamoError
from .protocols.common import (
    BootstrapInfo,
    CompletionUsage,
    FinishReason,
    LLMEngineOutput,
    OutputOptions,
    PrefillResult,
    PreprocessedRequest,
    SamplingOptions,
    StopConditions,
    usage,
)
from .protocols.load import ComponentSnapshot, Metrics
from .runtime.context import Context
from .runtime.loop import call_on_loop
from .runtime.metrics import EngineMetrics
from .runtime.publishers import KvEventPublisher, SnapshotPublisher

#: Marker key stamped on canary payloads (``PreprocessedRequest.health_check`` on decode).
HEALTH_CHECK_KEY: Final = "_HEALTH_CHECK"

#: ``EngineConfig.runtime_data`` key: the guided-decoding (structured output) kinds the engine
#: honours, a list drawn from :data:`GUIDED_DECODING_KINDS`. ``sampling_options.guided_decoding``
#: carries them to ``generate`` (``json``: a JSON schema, ``regex``, ``choice``, ``grammar``).
#: The frontend refuses (HTTP 400) a request asking for a kind its model's engines did not list.
GUIDED_DECODING_KEY: Final = "guided_decoding"
GUIDED_DECODING_KINDS: Final = ("json", "regex", "choice", "grammar")

__all__ = [
    "GUIDED_DECODING_KEY",
    "GUIDED_DECODING_KINDS",
    "HEALTH_CHECK_KEY",
    "BootstrapInfo",
    "CompletionUsage",
    "ComponentSnapshot",
    "EngineConfig",
    "FinishReason",
    "GenerateContext",
    "KvEventPublisher",
    "KvEventSource",
    "LLMEngine",
    "LLMEngineOutput",
    "Metrics",
    "MetricsBindings",
    "MetricsCtx",
    "OutputOptions",
    "PrefillResult",
    "PreprocessedRequest",
    "PushKvEventSource",
    "SamplingOptions",
    "SnapshotPublisher",
    "StopConditions",
    "ZmqKvEventSource",
    "usage",
]


class GenerateContext:
    """Per-request handle given to ``generate``: the runtime :class:`Context` plus extras.

    Delegates ``id``, ``is_stopped()``, ``is_killed()``, ``stopped()``, ``killed()``,
    ``stop_generating()`` and ``kill()`` to the runtime context. ``inner`` is that context, for
    tasks that outlive ``generate``. ``metadata`` is a read-only mapping of request metadata.
    """

    __slots__ = ("_first_token", "_inner", "_metadata")

    def __init__(
        self,
        inner: Context,
        first_token: asyncio.Event | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        self._inner = inner
        self._first_token = first_token
        self._metadata: Mapping[str, str] = MappingProxyType(dict(metadata or {}))

    @property
    def inner(self) -> Context:
        return self._inner

    @property
    def id(self) -> str:
        return self._inner.id

    @property
    def metadata(self) -> Mapping[str, str]:
        return self._metadata

    def is_stopped(self) -> bool:
        return self._inner.is_stopped()

    def is_killed(self) -> bool:
        return self._inner.is_killed()

    async def stopped(self) -> None:
        await self._inner.stopped()

    async def stopped_within(self, seconds: float) -> bool:
        """Wait up to ``seconds`` for a stop: ``True`` once stopped, ``False`` on time out
        (see :meth:`Context.stopped_within`)."""
        return await self._inner.stopped_within(seconds)

    async def killed(self) -> None:
        await self._inner.killed()

    def stop_generating(self) -> None:
        self._inner.stop_generating()

    def kill(self) -> None:
        self._inner.kill()

    @property
    def is_decode(self) -> bool:
        """True on decode-mode requests (those carrying a first-token signal)."""
        return self._first_token is not None

    def notify_first_token(self) -> None:
        """Fire the decode-mode first-token signal. Idempotent; a no-op off decode mode.

        The framework fires it on the first non-empty chunk; call it only when the first token
        is observable through a side channel before the stream yields. Safe from any thread.
        """
        event = self._first_token
        if event is None or event.is_set():
            return
        inner = self._inner
        call_on_loop(inner._loop, event.set, loop_thread=inner._thread)

    def __repr__(self) -> str:
        return f"GenerateContext({self._inner!r})"


@dataclass(kw_only=True)
class EngineConfig:
    """Registration metadata returned by :meth:`LLMEngine.start`.

    ``None`` on an optional field means "not advertised": routers fall back to round-robin (for
    scheduling hints) or their defaults. Engines without a block-structured KV cache leave
    ``kv_cache_block_size`` and ``total_kv_blocks`` unset.
    """

    #: Canonical model identifier (e.g. the HF repo name). Must be non-empty.
    model: str
    #: Public-facing name advertised to clients; defaults to ``model``.
    served_model_name: str | None = None
    #: Maximum context length the engine supports, in tokens.
    context_length: int | None = None
    #: KV cache block size in tokens (used by KV-aware routing).
    kv_cache_block_size: int | None = None
    #: Total number of KV cache blocks available to the engine.
    total_kv_blocks: int | None = None
    #: Maximum number of concurrent in-flight sequences.
    max_num_seqs: int | None = None
    #: Maximum tokens processed in one batched step.
    max_num_batched_tokens: int | None = None
    #: Number of data-parallel ranks this worker hosts (default 1).
    data_parallel_size: int | None = None
    #: Global index of the first DP rank this worker hosts (default 0).
    data_parallel_start_rank: int | None = None
    #: Bootstrap host a prefill worker advertises to decode peers (both host and port, or neither).
    bootstrap_host: str | None = None
    #: Bootstrap port for disaggregated KV transfer.
    bootstrap_port: int | None = None
    #: Engine-specific metadata copied into the model card's ``runtime_data``.
    runtime_data: dict[str, Any] = field(default_factory=dict)

    @property
    def display_name(self) -> str:
        return self.served_model_name or self.model

    def validate(self) -> None:
        """Raise ``DynamoError(InvalidArgument)`` listing every problem found."""
        problems: list[str] = []
        if not isinstance(self.model, str) or not self.model.strip():
            problems.append("model must be a non-empty string")
        for name in (
            "context_length",
            "kv_cache_block_size",
            "total_kv_blocks",
            "max_num_seqs",
            "max_num_batched_tokens",
            "data_parallel_size",
        ):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value <= 0):
                problems.append(f"{name} must be a positive int or None, got {value!r}")
        rank = self.data_parallel_start_rank
        if rank is not None and (not isinstance(rank, int) or rank < 0):
            problems.append(f"data_parallel_start_rank must be >= 0, got {rank!r}")
        if (self.bootstrap_host is None) != (self.bootstrap_port is None):
            problems.append("bootstrap_host and bootstrap_port must be set together")
        if self.bootstrap_port is not None and not 0 < self.bootstrap_port < 65536:
            problems.append(f"bootstrap_port out of range: {self.bootstrap_port}")
        if problems:
            raise DynamoError.invalid_argument("invalid EngineConfig: " + "; ".join(problems))


class ZmqKvEventSource:
    """Subscribe to an engine-provided ZMQ PUB socket emitting vLLM-format KV events."""

    __slots__ = ("dp_rank", "endpoint", "topic")

    def __init__(self, endpoint: str, topic: str = "", dp_rank: int = 0) -> None:
        self.endpoint = endpoint
        self.topic = topic
        self.dp_rank = dp_rank

    def __repr__(self) -> str:
        return f"ZmqKvEventSource({self.endpoint!r}, topic={self.topic!r}, dp_rank={self.dp_rank})"


class PushKvEventSource:
    """Hand a :class:`KvEventPublisher` to the engine; it calls ``publish*`` from any thread.

    ``on_ready`` is invoked exactly once with the publisher; if it raises, startup fails.
    """

    __slots__ = ("dp_rank", "on_ready")

    def __init__(self, on_ready: Callable[[KvEventPublisher], None], dp_rank: int = 0) -> None:
        self.on_ready = on_ready
        self.dp_rank = dp_rank

    def __repr__(self) -> str:
        return f"PushKvEventSource(dp_rank={self.dp_rank})"


KvEventSource = ZmqKvEventSource | PushKvEventSource


@dataclass(frozen=True)
class MetricsCtx:
    """Handed to :meth:`LLMEngine.setup_metrics`. Do not keep ``metrics`` past the call."""

    model: str
    component: str
    model_load_time_seconds: float
    metrics: EngineMetrics


@dataclass
class MetricsBindings:
    """What :meth:`LLMEngine.setup_metrics` returns.

    ``dp_ranks``: ranks the engine publishes snapshots for (empty = opt out).
    ``on_publisher_ready``: called exactly once with the :class:`SnapshotPublisher`.
    """

    dp_ranks: list[int] = field(default_factory=list)
    on_publisher_ready: Callable[[SnapshotPublisher], None] | None = None


class LLMEngine(abc.ABC):
    """Base class of every engine. Implement :meth:`start`, :meth:`generate`, :meth:`cleanup`.

    All methods may be called concurrently with ``generate``; keep state on ``self`` and make it
    safe for that. Every other method has a working default.
    """

    @abc.abstractmethod
    async def start(self, worker_id: int) -> EngineConfig:
        """Start the engine and return its registration metadata.

        After it returns the engine MUST accept concurrent ``generate`` calls. ``worker_id`` is an
        opaque id, unique across replicas and stable for the worker's lifetime: derive per-worker
        keys from it. It may take minutes: log progress at INFO so operators see it.
        """

    @abc.abstractmethod
    def generate(
        self, request: PreprocessedRequest, ctx: GenerateContext
    ) -> AsyncIterator[LLMEngineOutput]:
        """Yield the chunks of one request (write it as an ``async def`` with ``yield``).

        Contract:
        - Exactly one terminal chunk (``finish_reason`` set) ends a successful stream, and
          nothing follows it.
        - Check ``ctx.is_stopped()`` between yields (or race ``await ctx.stopped()``); once
          stopped, yield :meth:`LLMEngineOutput.cancelled` as the terminal.
        - A typed failure is raised as :class:`DynamoError`; it is terminal and its kind
          reaches the client. Yielding ``LLMEngineOutput.error(msg)`` loses the kind.
        - Put cleanup that must run on every exit path in ``try/finally`` inside the generator.
        """

    async def abort(self, ctx: Context) -> None:
        """Out-of-band notice that a request was explicitly cancelled (default: no-op).

        Called once per cancelled request when its context is stopped or killed; NOT called
        when the stream is merely dropped. Resource release belongs in ``generate``'s
        ``finally``.
        """
        return None

    async def drain(self) -> None:
        """Finish backend-side work before shutdown (default: no-op).

        Called once during graceful shutdown after unregistering and the grace period, before
        :meth:`cleanup`, while discovery and the event plane are still up. Errors are logged and
        swallowed.
        """
        return None

    @abc.abstractmethod
    async def cleanup(self) -> None:
        """Release all resources. Called exactly once by the worker.

        Runs after ``start`` succeeded and also after ``start`` raised (so it must be null-safe
        against partial state), and is not called if ``start`` was never invoked. It must be
        idempotent: a second call returns without re-entering teardown.
        """

    async def kv_event_sources(self) -> list[KvEventSource]:
        """KV event sources, one per dp_rank (default: none, i.e. no KV-aware routing)."""
        return []

    async def setup_metrics(self, ctx: MetricsCtx) -> MetricsBindings:
        """Wire up metrics once after ``start`` (default: nothing).

        Bridge a vendor registry with ``ctx.metrics.add_expfmt_callback``, and/or return
        :class:`MetricsBindings` declaring ``dp_ranks`` to receive a :class:`SnapshotPublisher`.
        An error aborts startup (``cleanup`` still runs).
        """
        return MetricsBindings()

    async def health_check_payload(self) -> dict[str, Any] | None:
        """Canary request (``PreprocessedRequest`` JSON) the worker sends to probe health.

        ``None`` (default) disables active probing. ``DYN_HEALTH_CHECK_PAYLOAD`` overrides it.
        """
        return None

    async def supported_controls(self) -> list[str]:
        """Names of the engine controls this engine implements (default: none)."""
        return []

    async def engine_control(self, control: str, body: Any) -> Any:
        """Handle one engine-control request (default: an error body naming the control)."""
        return {"status": "error", "message": f"unsupported engine control: {control}"}


__all__ += ["DynamoError"]
