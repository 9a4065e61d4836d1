"""Runtime plumbing: request contexts, publishers, metrics (and, later, discovery/transport)."""

from .context import Context
from .metrics import EngineMetrics
from .publishers import KvEventPublisher, SnapshotPublisher

__all__ = ["Context", "EngineMetrics", "KvEventPublisher", "SnapshotPublisher"]
