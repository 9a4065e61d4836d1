"""Worker-level Prometheus metrics: lifecycle gauges, per-rank KV gauges, per-request accounting.

Every metric is named ``dynamo_component_*`` (Dynamo's ``build_component_metric_name``) and lives
in the worker's own :class:`~prometheus_client.CollectorRegistry`, never the process-global one, so
several workers (or tests) in one process never collide.

Labels on every worker series, in this order (a label whose value is empty is omitted, as
Prometheus treats an empty label value as an absent label anyway):

=====================  ============================================================
``dynamo_namespace``   the worker's namespace (Dynamo's hierarchy label name)
``dynamo_component``   the component
``dynamo_endpoint``    the serving endpoint
``worker_id``          the worker's instance id (hex), Dynamo's ``labels::WORKER_ID``
``model``              ``EngineConfig.model``
``model_name``         the served model name (the model when none is set)
extra labels           ``WorkerConfig.metrics_labels``, in the order given
=====================  ============================================================

Families (``{...}`` = labels beyond the ones above):

- ``dynamo_component_model_load_time_seconds``, ``..._drain_time_seconds``,
  ``..._cleanup_time_seconds``: gauges, always rendered (0 until set).
- ``dynamo_component_shutdown_stage_seconds{stage,reason}``: gauge per recorded pair.
- ``dynamo_component_kv_used_blocks{dp_rank}``, ``..._total_blocks{dp_rank}``,
  ``..._gpu_cache_usage_percent{dp_rank}`` (a 0.0-1.0 fraction, despite the name): seeded at 0 per
  declared rank. ``..._kv_cache_hit_rate{dp_rank}``: written only by a snapshot that carries a
  value, so an unmeasured rank has no sample at all (tri-state: absent != 0.0).
- ``dynamo_component_requests_total``: counter, +1 per request admitted to the engine.
- ``dynamo_component_requests_finished_total{status}``: status ``success|cancelled|error``, all
  three seeded at 0 so ``rate()`` works from the first scrape.
- ``dynamo_component_inflight_requests``: gauge.
- ``dynamo_component_input_tokens_total``, ``dynamo_component_output_tokens_total``: counters.
- ``dynamo_component_time_to_first_token_seconds``,
  ``dynamo_component_inter_token_latency_seconds`` (one observation per gap between token-bearing
  chunks), ``dynamo_component_request_duration_seconds``: histograms.

Cost: the per-request path does not use ``prometheus_client`` metric objects, whose every
``inc``/``observe`` takes its own lock and scans buckets linearly (measured ~0.25 us per counter
``inc``, ~0.6 us per histogram ``observe``). Instead all state is plain numbers behind one lock,
taken once per call, histograms bucket by ``bisect`` and an ITL list is folded in as one batch
(~0.07 us per observation); a custom collector turns the state into metric families at scrape
time. ``benchmarks/metrics_overhead.py`` prints both figures.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING

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
    EngineMetrics,
    FastHistogram,
)
from .shutdown import Outcome, Stage

if TYPE_CHECKING:
    from ..protocols.load import ComponentSnapshot

__all__ = [
    "REQUEST_STATUSES",
    "SHUTDOWN_REASONS",
    "SHUTDOWN_STAGES",
    "WorkerMetrics",
    "check_extra_labels",
]

PREFIX = "dynamo_component_"

#: Hierarchy label names (Dynamo's ``prometheus_names::labels``).
LABEL_NAMESPACE = "dynamo_namespace"
LABEL_COMPONENT = "dynamo_component"
LABEL_ENDPOINT = "dynamo_endpoint"
LABEL_WORKER_ID = "worker_id"
LABEL_MODEL = "model"
LABEL_MODEL_NAME = "model_name"
LABEL_DP_RANK = "dp_rank"

#: Values of ``status`` accepted by :meth:`WorkerMetrics.request_finished`.
REQUEST_STATUSES: tuple[str, ...] = ("success", "cancelled", "error")
#: Stable stage / reason strings (lifecycle reference 4.11.6 and 8). Others are accepted too.
SHUTDOWN_STAGES: tuple[str, ...] = tuple(Stage)
SHUTDOWN_REASONS: tuple[str, ...] = tuple(Outcome)

_LABEL_RE = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")
# Labels WorkerMetrics sets itself on some family; an extra label may not shadow them.
_RESERVED_LABELS = frozenset({
    LABEL_NAMESPACE, LABEL_COMPONENT, LABEL_ENDPOINT, LABEL_WORKER_ID, LABEL_MODEL,
    LABEL_MODEL_NAME, LABEL_DP_RANK, "stage", "reason", "status", "le", "quantile",
})


def check_extra_labels(labels: Mapping[str, str]) -> None:
    """Raise ``ValueError`` unless every name in ``labels`` may be used as an extra const label:
    a valid Prometheus label name, not ``__``-prefixed, not one the worker sets itself. Config
    validation can call this to fail before the engine starts."""
    for name in labels:
        if not _LABEL_RE.fullmatch(name) or name.startswith("__"):
            raise ValueError(f"invalid metrics label name {name!r}")
        if name in _RESERVED_LABELS:
            raise ValueError(f"metrics label {name!r} is reserved by the worker")


class _RankGauges:
    __slots__ = ("hit_rate", "total", "usage", "used")

    def __init__(self) -> None:
        self.used = 0
        self.total = 0
        self.usage = 0.0
        self.hit_rate: float | None = None  # None: never written, no sample rendered


class WorkerMetrics:
    """The worker's metrics: what ``/metrics`` serves, plus the engine's bridged text.

    All methods are thread-safe and cheap; the per-request ones (:meth:`request_started`,
    :meth:`request_finished`) take one uncontended lock and touch only plain numbers.

    Args:
        namespace, component, endpoint, worker_id: hierarchy labels (``dynamo_namespace``,
            ``dynamo_component``, ``dynamo_endpoint``, ``worker_id``).
        model, model_name: const labels ``model`` / ``model_name``; empty means omitted.
        extra_labels: further const labels (``WorkerConfig.metrics_labels``). A name must be a
            valid Prometheus label name, must not start with ``__`` and must not shadow a label
            listed in the module docstring or ``dp_rank``/``stage``/``reason``/``status``
            (``ValueError`` otherwise).
    """

    def __init__(
        self,
        *,
        namespace: str,
        component: str,
        endpoint: str,
        worker_id: str,
        model: str = "",
        model_name: str = "",
        extra_labels: Mapping[str, str] | None = None,
    ) -> None:
        pairs: list[tuple[str, str]] = [
            (LABEL_NAMESPACE, namespace),
            (LABEL_COMPONENT, component),
            (LABEL_ENDPOINT, endpoint),
            (LABEL_WORKER_ID, worker_id),
            (LABEL_MODEL, model),
            (LABEL_MODEL_NAME, model_name),
        ]
        check_extra_labels(extra_labels or {})
        pairs.extend((name, str(value)) for name, value in (extra_labels or {}).items())
        kept = [(n, v) for n, v in pairs if v != ""]
        self.const_labels: dict[str, str] = dict(kept)
        self._names = [n for n, _ in kept]
        self._values = [v for _, v in kept]

        self.engine_metrics = EngineMetrics()
        self.registry = CollectorRegistry(auto_describe=True)

        self._lock = threading.Lock()
        # Lifecycle gauges.
        self._model_load_time = 0.0
        self._drain_time = 0.0
        self._cleanup_time = 0.0
        self._stages: dict[tuple[str, str], float] = {}
        # Per-rank gauges, keyed by dp_rank.
        self._ranks: dict[int, _RankGauges] = {}
        # Per-request accounting.
        self._requests = 0
        self._inflight = 0
        self._finished = dict.fromkeys(REQUEST_STATUSES, 0)
        self._input_tokens = 0
        self._output_tokens = 0
        self._ttft = FastHistogram(TTFT_BUCKETS)
        self._itl = FastHistogram(ITL_BUCKETS)
        self._duration = FastHistogram(DURATION_BUCKETS)

        self.registry.register(_Collector(self))

    # -- lifecycle gauges -----------------------------------------------------------------
    def set_model_load_time(self, seconds: float) -> None:
        """``dynamo_component_model_load_time_seconds``: wall time of ``engine.start()``."""
        with self._lock:
            self._model_load_time = float(seconds)

    def set_drain_time(self, seconds: float) -> None:
        """``dynamo_component_drain_time_seconds``: time spent in the KV-transfer drain."""
        with self._lock:
            self._drain_time = float(seconds)

    def set_cleanup_time(self, seconds: float) -> None:
        """``dynamo_component_cleanup_time_seconds``: wall time of ``engine.cleanup()``."""
        with self._lock:
            self._cleanup_time = float(seconds)

    def record_shutdown_stage(self, stage: str, reason: str, seconds: float) -> None:
        """``dynamo_component_shutdown_stage_seconds{stage,reason} = seconds``.

        Each (stage, reason) pair is its own series and keeps its last value, as in Dynamo's
        GaugeVec (a ``started`` record and a later ``completed`` one both stay visible).
        """
        with self._lock:
            self._stages[(str(stage), str(reason))] = float(seconds)

    # -- per-rank gauges ------------------------------------------------------------------
    def declare_dp_ranks(self, ranks: Sequence[int]) -> None:
        """Seed ``kv_used_blocks``, ``total_blocks`` and ``gpu_cache_usage_percent`` at 0 for each
        rank so the families render before the first snapshot. ``kv_cache_hit_rate`` is not
        seeded. Idempotent; an already-written rank keeps its values."""
        with self._lock:
            for r in ranks:
                self._ranks.setdefault(int(r), _RankGauges())

    def on_snapshot(self, snapshot: ComponentSnapshot) -> None:
        """Write one rank's gauges from ``snapshot`` (the ``SnapshotPublisher`` sink).

        ``kv_cache_hit_rate`` is written only when not ``None``; a ``None`` leaves the previous
        value (or the absence of a sample) untouched.
        """
        with self._lock:
            g = self._ranks.get(snapshot.dp_rank)
            if g is None:
                g = self._ranks[snapshot.dp_rank] = _RankGauges()
            g.used = snapshot.kv_used_blocks
            g.total = snapshot.kv_total_blocks
            g.usage = snapshot.gpu_cache_usage
            if snapshot.kv_cache_hit_rate is not None:
                g.hit_rate = snapshot.kv_cache_hit_rate

    # -- per-request accounting (hot path) -------------------------------------------------
    def request_started(self) -> None:
        """A request was admitted: ``requests_total`` +1, ``inflight_requests`` +1.

        Contract: each call is matched by exactly one :meth:`request_finished`.
        """
        with self._lock:
            self._requests += 1
            self._inflight += 1

    def request_finished(
        self,
        *,
        status: str,
        input_tokens: int,
        output_tokens: int,
        ttft_s: float | None,
        itl_s: Sequence[float] | None,
        duration_s: float,
    ) -> None:
        """Account one finished request; ``inflight_requests`` -1.

        ``status`` is one of :data:`REQUEST_STATUSES` (``ValueError`` otherwise, and nothing is
        recorded). ``ttft_s`` is observed when not ``None`` (no token = no TTFT); every value in
        ``itl_s`` is one inter-token-latency observation. Times are in seconds.
        """
        if status not in self._finished:
            raise ValueError(f"status must be one of {REQUEST_STATUSES}, got {status!r}")
        with self._lock:
            self._inflight -= 1
            self._finished[status] += 1
            self._input_tokens += input_tokens
            self._output_tokens += output_tokens
            if ttft_s is not None:
                self._ttft.observe(ttft_s)
            if itl_s:
                self._itl.observe_many(itl_s)
            self._duration.observe(duration_s)

    @property
    def inflight(self) -> int:
        """Requests started and not yet finished."""
        return self._inflight

    # -- exposition -------------------------------------------------------------------------
    def render(self) -> bytes:
        """The full text exposition (format 0.0.4): this registry, then the engine's bridged
        text. A failing engine callback is logged and skipped, never breaks the scrape."""
        return generate_latest(self.registry) + self.engine_metrics.render().encode()

    def _collect(self) -> Iterator[Metric]:
        with self._lock:  # copy under the lock, build families outside it
            load, drain, cleanup = self._model_load_time, self._drain_time, self._cleanup_time
            stages = sorted(self._stages.items())
            ranks = sorted(
                (r, g.used, g.total, g.usage, g.hit_rate) for r, g in self._ranks.items()
            )
            requests, inflight = self._requests, self._inflight
            finished = list(self._finished.items())
            in_tok, out_tok = self._input_tokens, self._output_tokens
            hists = [
                (h, *h.cumulative())
                for h in (self._ttft, self._itl, self._duration)
            ]

        names, values = self._names, self._values

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            fam = GaugeMetricFamily(PREFIX + name, doc, labels=names)
            fam.add_metric(values, value)
            return fam

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            fam = CounterMetricFamily(PREFIX + name, doc, labels=names)
            fam.add_metric(values, value)
            return fam

        yield gauge(
            "model_load_time_seconds",
            "Time engine.start() took to return. Set once at Worker setup.", load,
        )
        yield gauge(
            "drain_time_seconds",
            "Time spent draining in-flight KV transfers at shutdown (0 without a drain).", drain,
        )
        yield gauge(
            "cleanup_time_seconds", "Time engine.cleanup() took at shutdown.", cleanup,
        )
        fam = GaugeMetricFamily(
            PREFIX + "shutdown_stage_seconds",
            "Seconds each shutdown stage took, by stage and outcome reason.",
            labels=[*names, "stage", "reason"],
        )
        for (stage, reason), secs in stages:
            fam.add_metric([*values, stage, reason], secs)
        yield fam

        rank_labels = [*names, LABEL_DP_RANK]
        used = GaugeMetricFamily(
            PREFIX + "kv_used_blocks", "KV cache blocks in use, per data-parallel rank.",
            labels=rank_labels,
        )
        total = GaugeMetricFamily(
            PREFIX + "total_blocks", "Total KV cache blocks, per data-parallel rank.",
            labels=rank_labels,
        )
        usage = GaugeMetricFamily(
            PREFIX + "gpu_cache_usage_percent",
            "KV cache usage as a fraction 0.0-1.0, per data-parallel rank.",
            labels=rank_labels,
        )
        hit = GaugeMetricFamily(
            PREFIX + "kv_cache_hit_rate",
            "Prefix cache hit rate 0.0-1.0, per data-parallel rank (absent until measured).",
            labels=rank_labels,
        )
        for rank, u, t, pct, hr in ranks:
            lv = [*values, str(rank)]
            used.add_metric(lv, u)
            total.add_metric(lv, t)
            usage.add_metric(lv, pct)
            if hr is not None:
                hit.add_metric(lv, hr)
        yield from (used, total, usage, hit)

        yield counter("requests_total", "Requests admitted to the engine.", requests)
        fam_c = CounterMetricFamily(
            PREFIX + "requests_finished_total",
            "Requests finished, by status (success, cancelled, error).",
            labels=[*names, "status"],
        )
        for status, n in finished:
            fam_c.add_metric([*values, status], n)
        yield fam_c
        yield gauge("inflight_requests", "Requests currently in the engine.", inflight)
        yield counter("input_tokens_total", "Prompt tokens of finished requests.", in_tok)
        yield counter("output_tokens_total", "Tokens generated by finished requests.", out_tok)

        docs = (
            ("time_to_first_token_seconds", "Time from admission to the first token."),
            ("inter_token_latency_seconds", "Time between consecutive token-bearing chunks."),
            ("request_duration_seconds", "Time from admission to the end of the stream."),
        )
        for (name, doc), (_, buckets, total_s) in zip(docs, hists, strict=True):
            fam_h = HistogramMetricFamily(PREFIX + name, doc, labels=names)
            fam_h.add_metric(values, buckets, total_s)
            yield fam_h


class _Collector:
    """Adapts :class:`WorkerMetrics` state to the ``prometheus_client`` collector protocol."""

    def __init__(self, owner: WorkerMetrics) -> None:
        self._owner = owner

    def collect(self) -> Iterator[Metric]:
        return self._owner._collect()
