"""The mocker: a simulated vLLM-like engine (paged KV cache with prefix caching, continuous
batching, KV events, load snapshots, cost-model timing), usable as a reference engine and as a
stand-in for a GPU in tests and router benchmarks.

``dynamo-backend worker --engine mocker -- --help`` lists its flags; in code::

    from dynamo_backend_common.mocker import MockerEngine
    engine = MockerEngine(num_gpu_blocks=1024, speedup_ratio=10.0)

``disaggregation_mode="prefill"`` / ``"decode"`` give the two disaggregated roles, with a
simulated KV transfer between them (:mod:`.disagg`).
"""

from .args import MockerArgs
from .disagg import KvTransferStats
from .engine import MockerEngine
from .kv_manager import KvManager, KvPin, KvStats
from .scheduler import (
    CostModel,
    Scheduler,
    SchedulerConfig,
    SeqState,
    Sequence,
    StepPlan,
    StepStats,
    StopRules,
)
from .structured import ScriptedSequence, guided_text, instance_for_schema

__all__ = [
    "CostModel",
    "KvManager",
    "KvPin",
    "KvStats",
    "KvTransferStats",
    "MockerArgs",
    "MockerEngine",
    "Scheduler",
    "SchedulerConfig",
    "ScriptedSequence",
    "SeqState",
    "Sequence",
    "StepPlan",
    "StepStats",
    "StopRules",
    "guided_text",
    "instance_for_schema",
]
