"""dynamo-backend-common: turn any LLM inference engine into a production serving worker.

An engine author needs one import line::

    from dynamo_backend_common import LLMEngine, EngineConfig, LLMEngineOutput, chunk, usage
"""

from . import chunk
from .engine import (
    GUIDED_DECODING_KEY,
    GUIDED_DECODING_KINDS,
    HEALTH_CHECK_KEY,
    ComponentSnapshot,
    EngineConfig,
    GenerateContext,
    KvEventSource,
    LLMEngine,
    Metrics,
    MetricsBindings,
    MetricsCtx,
    PushKvEventSource,
    ZmqKvEventSource,
)
from .errors import BackendError, DynamoError, ProtocolError, WorkerDraining
from .protocols import (
    BootstrapInfo,
    CompletionUsage,
    FinishReason,
    GuidedDecodingOptions,
    LLMEngineOutput,
    OutputOptions,
    PrefillResult,
    PreprocessedRequest,
    SamplingOptions,
    StopConditions,
    usage,
)
from .runtime import Context, EngineMetrics, KvEventPublisher, SnapshotPublisher

__version__ = "0.1.0"

__all__ = [
    "GUIDED_DECODING_KEY",
    "GUIDED_DECODING_KINDS",
    "HEALTH_CHECK_KEY",
    "BackendError",
    "BootstrapInfo",
    "CompletionUsage",
    "ComponentSnapshot",
    "Context",
    "DynamoError",
    "EngineConfig",
    "EngineMetrics",
    "FinishReason",
    "GenerateContext",
    "GuidedDecodingOptions",
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
    "ProtocolError",
    "PushKvEventSource",
    "SamplingOptions",
    "SnapshotPublisher",
    "StopConditions",
    "WorkerDraining",
    "ZmqKvEventSource",
    "chunk",
    "usage",
]
