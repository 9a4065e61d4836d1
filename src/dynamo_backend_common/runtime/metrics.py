"""Metrics plumbing shared by workers and frontends: the engine-facing bridge for a vendor
Prometheus registry (:class:`EngineMetrics`), and :class:`FastHistogram` with the bucket bounds
both sides use."""

from __future__ import annotations

import logging
import math
from bisect import bisect_left, bisect_right
from collections.abc import Callable, Iterable, Sequence
from itertools import pairwise

from prometheus_client.utils import floatToGoString

log = logging.getLogger(__name__)


class EngineMetrics:
    """Collects text-exposition callbacks whose output is appended to the worker's ``/metrics``.

    Each callback returns Prometheus text format (e.g. ``prometheus_client.generate_latest(reg)``
    decoded). A callback that raises is logged and skipped for that scrape; it never breaks
    ``/metrics``.
    """

    def __init__(self) -> None:
        self._callbacks: list[Callable[[], str | bytes]] = []

    def add_expfmt_callback(self, callback: Callable[[], str | bytes]) -> None:
        self._callbacks.append(callback)

    def render(self) -> str:
        parts: list[str] = []
        for cb in self._callbacks:
            try:
                text = cb()
            except Exception:
                log.exception("engine metrics callback failed; skipped for this scrape")
                continue
            if isinstance(text, bytes):
                text = text.decode()
            if text and not text.endswith("\n"):
                text += "\n"
            parts.append(text)
        return "".join(parts)


# -- histograms shared by the worker's and the frontend's metrics -----------------------------

# Bucket upper bounds in seconds (+Inf is implicit). Chosen to resolve the ranges that matter:
# TTFT from a prefix-cache hit (~ms) to a long prefill under load (minutes).
TTFT_BUCKETS: tuple[float, ...] = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75,
    1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
)
# ITL: decode steps are typically 5-100 ms; finer resolution there.
ITL_BUCKETS: tuple[float, ...] = (
    0.0005, 0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05,
    0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5,
)
DURATION_BUCKETS: tuple[float, ...] = (
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0,
    300.0, 600.0,
)

# prometheus_client's own ``le`` formatting (untyped upstream, hence the annotated alias).
_go_float: Callable[[float], str] = floatToGoString


# Values sorted at a time by FastHistogram.observe_many: enough to amortise its per-bucket
# bisections, few enough that the sort stays in cache (sorting 200k values at once is slower
# than bisecting each one).
_SORT_SLICE = 512


class FastHistogram:
    """A histogram's state as plain numbers: non-cumulative bucket counts and a sum.

    Not thread-safe by itself: the owner serialises access (``WorkerMetrics`` holds one lock for
    all of its state). Bucket ``i`` counts values ``v`` with ``bounds[i-1] < v <= bounds[i]``
    (Prometheus ``le`` semantics); the last slot is ``+Inf``. Values must be finite numbers.
    """

    __slots__ = ("bounds", "counts", "les", "total")

    def __init__(self, bounds: Sequence[float]) -> None:
        b = tuple(float(x) for x in bounds)
        if not b or any(not math.isfinite(x) for x in b) or any(
            lo >= hi for lo, hi in pairwise(b)
        ):
            raise ValueError("histogram bounds must be finite and strictly increasing")
        self.bounds = b
        self.les = [_go_float(x) for x in b]  # ``le`` label values, formatted once
        self.counts = [0] * (len(b) + 1)
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.total += value

    def observe_many(self, values: Iterable[float]) -> None:
        """Fold a batch in (one request's inter-token latencies: one value per token).

        Sorts the batch in slices and counts each bucket of a slice with one bisection, so the
        per-value work is all in C: about half the cost of bisecting every value into the
        bounds in a Python loop.
        """
        batch = values if isinstance(values, list) else list(values)
        for start in range(0, len(batch), _SORT_SLICE):
            self._observe_sorted(sorted(batch[start : start + _SORT_SLICE]))

    def _observe_sorted(self, ordered: list[float]) -> None:
        n = len(ordered)
        counts = self.counts
        below = 0  # values <= the previous bound
        for i, bound in enumerate(self.bounds):
            if below == n:
                break
            upto = bisect_right(ordered, bound, below)
            counts[i] += upto - below
            below = upto
        counts[-1] += n - below
        self.total += sum(ordered)

    def cumulative(self) -> tuple[list[tuple[str, float]], float]:
        """``([(le, cumulative_count), ..., ("+Inf", count)], sum)`` for a metric family."""
        out: list[tuple[str, float]] = []
        acc = 0
        for le, n in zip(self.les, self.counts, strict=False):
            acc += n
            out.append((le, acc))
        out.append(("+Inf", acc + self.counts[-1]))
        return out, self.total
