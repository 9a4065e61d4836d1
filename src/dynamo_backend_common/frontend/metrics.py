"""The frontend's Prometheus metrics (``GET /metrics``), named ``dynamo_frontend_*``.

Families (labels in braces):

- ``dynamo_frontend_requests_total{model,endpoint,request_type,status}``: finished HTTP
  requests; ``endpoint`` is ``chat_completions`` | ``completions``, ``request_type``
  ``stream`` | ``unary``, ``status`` ``success`` | ``error`` | ``cancelled`` (the client left).
  Requests refused before a model was resolved (bad JSON, unknown model) count under
  ``model=""`` so client-chosen names never become label values.
- ``dynamo_frontend_inflight_requests{model}``: gauge.
- ``dynamo_frontend_input_tokens_total{model}``, ``dynamo_frontend_output_tokens_total{model}``.
- ``dynamo_frontend_time_to_first_token_seconds{model}``: from request arrival to the first
  token-bearing chunk; ``dynamo_frontend_inter_token_latency_seconds{model}``: per token, the gap
  between token-bearing chunks divided by the chunk's tokens (one observation per chunk);
  ``dynamo_frontend_request_duration_seconds{model}``: histograms.
- ``dynamo_frontend_model_workers{model}``: workers serving each model (from discovery).
- ``dynamo_frontend_migrations_total``: streams moved to another worker mid-stream.
- the router's ``dynamo_frontend_router_*`` families (they share this registry).

Like :mod:`..worker.metrics`, state is plain numbers folded into metric families at
scrape time (no per-call ``prometheus_client`` locks); everything runs on the event loop thread.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from ..runtime.metrics import (
    DURATION_BUCKETS,
    ITL_BUCKETS,
    TTFT_BUCKETS,
    FastHistogram,
)

__all__ = ["FrontendMetrics", "ModelStats", "RequestTimer"]

PREFIX = "dynamo_frontend_"


@dataclass(slots=True)
class ModelStats:
    """Per-model state."""

    inflight: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    ttft: FastHistogram = field(default_factory=lambda: FastHistogram(TTFT_BUCKETS))
    itl: FastHistogram = field(default_factory=lambda: FastHistogram(ITL_BUCKETS))
    duration: FastHistogram = field(default_factory=lambda: FastHistogram(DURATION_BUCKETS))


class RequestTimer:
    """Per-request timing: call :meth:`tokens` for every token-bearing chunk, :meth:`done` once.

    Cheap enough to call per chunk: two float subtractions and one histogram bucket lookup.
    """

    __slots__ = ("_last", "_metrics", "_start", "_stats", "_tokens", "done_called", "first")

    def __init__(self, metrics: FrontendMetrics, stats: ModelStats, start: float) -> None:
        self._metrics = metrics
        self._stats = stats
        self._start = start
        self._last = 0.0
        self._tokens = 0
        #: Seconds to the first token, once seen.
        self.first: float | None = None
        self.done_called = False

    def tokens(self, n: int, now: float) -> None:
        if n <= 0:
            return
        if self.first is None:
            self.first = now - self._start
            self._stats.ttft.observe(self.first)
        else:
            self._stats.itl.observe((now - self._last) / n)
        self._last = now
        self._tokens += n


class FrontendMetrics:
    """Owns the frontend registry (pass :attr:`registry` to the Router too)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry(
            auto_describe=True)
        self._models: dict[str, ModelStats] = {}
        self._requests: dict[tuple[str, str, str, str], int] = {}
        self._worker_counts: Callable[[], dict[str, int]] = dict
        self._migrations: Callable[[], int] = lambda: 0
        self.registry.register(_Collector(self))

    def bind(self, worker_counts: Callable[[], dict[str, int]],
             migrations: Callable[[], int]) -> None:
        """Where the scrape reads the per-model worker counts and the migration count."""
        self._worker_counts = worker_counts
        self._migrations = migrations

    def stats(self, model: str) -> ModelStats:
        s = self._models.get(model)
        if s is None:
            s = self._models[model] = ModelStats()
        return s

    def request_started(self, model: str, input_tokens: int, start: float) -> RequestTimer:
        s = self.stats(model)
        s.inflight += 1
        s.input_tokens += input_tokens
        return RequestTimer(self, s, start)

    def request_finished(self, timer: RequestTimer, model: str, endpoint: str, stream: bool,
                         status: str, output_tokens: int, now: float) -> None:
        if timer.done_called:
            return
        timer.done_called = True
        s = timer._stats
        s.inflight -= 1
        s.output_tokens += output_tokens
        s.duration.observe(now - timer._start)
        self.count(model, endpoint, stream, status)

    def count(self, model: str, endpoint: str, stream: bool, status: str) -> None:
        """Count a finished request (also those refused before generation)."""
        key = (model, endpoint, "stream" if stream else "unary", status)
        self._requests[key] = self._requests.get(key, 0) + 1

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def _collect(self) -> Iterator[Metric]:
        req = CounterMetricFamily(PREFIX + "requests", "Finished HTTP requests.",
                                  labels=["model", "endpoint", "request_type", "status"])
        for key, n in sorted(self._requests.items()):
            req.add_metric(list(key), n)
        yield req
        models = sorted(self._models.items())
        inflight = GaugeMetricFamily(PREFIX + "inflight_requests", "Requests in progress.",
                                     labels=["model"])
        in_tok = CounterMetricFamily(PREFIX + "input_tokens", "Prompt tokens of requests sent "
                                     "to workers.", labels=["model"])
        out_tok = CounterMetricFamily(PREFIX + "output_tokens", "Tokens generated for finished "
                                      "requests.", labels=["model"])
        for name, s in models:
            inflight.add_metric([name], s.inflight)
            in_tok.add_metric([name], s.input_tokens)
            out_tok.add_metric([name], s.output_tokens)
        yield inflight
        yield in_tok
        yield out_tok
        for attr, doc in (
            ("ttft", ("time_to_first_token_seconds",
                      "Time from request arrival to the first token.")),
            ("itl", ("inter_token_latency_seconds",
                     "Gap between token-bearing chunks, per token.")),
            ("duration", ("request_duration_seconds", "Time from arrival to the end.")),
        ):
            fam = HistogramMetricFamily(PREFIX + doc[0], doc[1], labels=["model"])
            for name, s in models:
                buckets, total = getattr(s, attr).cumulative()
                fam.add_metric([name], buckets, total)
            yield fam
        workers = GaugeMetricFamily(PREFIX + "model_workers", "Workers serving each model.",
                                    labels=["model"])
        for name, n in sorted(self._worker_counts().items()):
            workers.add_metric([name], n)
        yield workers
        yield CounterMetricFamily(PREFIX + "migrations", "Streams moved to another worker "
                                  "after a mid-stream failure.", value=self._migrations())


class _Collector:
    def __init__(self, owner: FrontendMetrics) -> None:
        self._owner = owner

    def collect(self) -> Iterator[Metric]:
        return self._owner._collect()
