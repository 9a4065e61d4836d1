"""The worker: serve an :class:`~dynamo_backend_common.LLMEngine` (``Worker``, ``run``)."""

from .adapter import EngineAdapter
from .lifecycle import CONTROL_ENDPOINT, Worker, run
from .tracker import RequestTracker

__all__ = ["CONTROL_ENDPOINT", "EngineAdapter", "RequestTracker", "Worker", "run"]
