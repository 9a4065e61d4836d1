"""Load snapshots engines hand to the worker (``dynamo_component_*`` gauges, router load).

Plain data, below the runtime that publishes them and the engine API that re-exports them.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["ComponentSnapshot", "Metrics"]


@dataclass(frozen=True)
class Metrics:
    """Worker-level load snapshot. ``None`` means no snapshot yet (publishing is skipped)."""

    kv_used_blocks: int | None = None


@dataclass(frozen=True)
class ComponentSnapshot:
    """Per-rank snapshot driving the ``dynamo_component_*`` gauges and the router load signal.

    ``kv_cache_hit_rate`` is tri-state: ``None`` = not measured (the gauge is not written),
    ``0.0`` = measured zero hits.
    """

    kv_used_blocks: int = 0
    kv_total_blocks: int = 0
    #: Fractional cache usage, 0.0..1.0.
    gpu_cache_usage: float = 0.0
    #: Fractional prefix cache hit rate, 0.0..1.0, or None when not measured.
    kv_cache_hit_rate: float | None = None
    dp_rank: int = 0
