"""Runtime plumbing shared by workers, engines and frontends: request contexts
(:mod:`.context`), discovery (:mod:`.discovery`), the request plane (:mod:`.transport`), the
event plane (:mod:`.events`), KV-event and load publishers (:mod:`.publishers`), metrics
plumbing (:mod:`.metrics`), plane selection (:mod:`.planes`), the status server and the event
loop helpers. Nothing here knows about engines, workers or the frontend."""

from .context import Context
from .metrics import EngineMetrics
from .publishers import KvEventPublisher, SnapshotPublisher

__all__ = ["Context", "EngineMetrics", "KvEventPublisher", "SnapshotPublisher"]
