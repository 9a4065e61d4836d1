"""What a worker registers in discovery, and where.

Keys (same layout as Dynamo's KV-store discovery):

- ``v1/instances/{ns}/{comp}/{ep}/{instance_id:x}`` -> :class:`InstanceInfo` (JSON)
- ``v1/mdc/{ns}/{comp}/{ep}/{instance_id:x}`` -> :class:`ModelCard` (JSON)

Both are written under the worker's lease, so they vanish when the worker dies.
"""

from __future__ import annotations

from typing import Any

import msgspec

INSTANCES_PREFIX = "v1/instances/"
MODELS_PREFIX = "v1/mdc/"


def instance_key(namespace: str, component: str, endpoint: str, instance_id: int) -> str:
    return f"{INSTANCES_PREFIX}{namespace}/{component}/{endpoint}/{instance_id:x}"


def model_key(namespace: str, component: str, endpoint: str, instance_id: int) -> str:
    return f"{MODELS_PREFIX}{namespace}/{component}/{endpoint}/{instance_id:x}"


class InstanceInfo(msgspec.Struct, omit_defaults=True, kw_only=True):
    """One serving endpoint instance. ``transport`` is ``{"tcp": "host:port/endpoint"}``."""

    type: str = "Endpoint"
    namespace: str
    component: str
    endpoint: str
    instance_id: int
    transport: dict[str, str]
    #: Base URL of the worker's status server (``/metrics``, ``/health``), if any.
    status_url: str | None = None

    @property
    def address(self) -> str:
        """``host:port`` of the request plane."""
        return self.transport["tcp"].partition("/")[0]


class RuntimeConfig(msgspec.Struct, omit_defaults=True, kw_only=True):
    """Scheduling hints (Dynamo's ``ModelRuntimeConfig``)."""

    context_length: int | None = None
    total_kv_blocks: int | None = None
    max_num_seqs: int | None = None
    max_num_batched_tokens: int | None = None
    data_parallel_size: int = 1
    data_parallel_start_rank: int = 0
    enable_local_indexer: bool = False
    runtime_data: dict[str, Any] = msgspec.field(default_factory=dict)
    disaggregated_endpoint: dict[str, Any] | None = None
    supported_controls: list[str] = msgspec.field(default_factory=list)


class ModelCard(msgspec.Struct, omit_defaults=True, kw_only=True):
    """The model deployment card a frontend needs to serve a model through this worker."""

    type: str = "Model"
    namespace: str
    component: str
    endpoint: str
    instance_id: int
    display_name: str
    #: Canonical model id (``EngineConfig.model``).
    model: str
    #: Model directory (HF layout) for tokenizer and chat template; empty = name only.
    source_path: str = ""
    #: Checksum of the tokenizer files, so a frontend can tell incompatible workers apart.
    checksum: str | None = None
    #: ``"Chat | Completions"`` style bit names, or ``"Prefill"``.
    model_type: str = "Chat | Completions"
    model_input: str = "Tokens"
    worker_type: str = "aggregated"
    kv_cache_block_size: int | None = None
    migration_limit: int = 0
    runtime_config: RuntimeConfig = msgspec.field(default_factory=RuntimeConfig)
