"""Per-request metrics cost: prometheus_client metric objects vs WorkerMetrics' batched path.

Run: ``.venv/bin/python benchmarks/metrics_overhead.py [--tokens 256] [--requests 2000]``

Prints, best of ``--repeat`` runs:

- the cost of one inter-token-latency observation with ``prometheus_client.Histogram.observe``
  (what a naive adapter would call once per token) and with ``FastHistogram.observe_many``
  (what ``WorkerMetrics.request_finished`` does with the request's ITL list);
- the whole per-request accounting (``request_started`` + ``request_finished`` with ``--tokens``
  ITL values) both ways, the prometheus_client version being the same metrics built from
  Counter/Gauge/Histogram objects;
- the cost of one ``/metrics`` render.
"""

from __future__ import annotations

import argparse
import random
import timeit
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from dynamo_backend_common.engine import ComponentSnapshot
from dynamo_backend_common.runtime.metrics import (
    DURATION_BUCKETS,
    ITL_BUCKETS,
    TTFT_BUCKETS,
    FastHistogram,
)
from dynamo_backend_common.worker.metrics import WorkerMetrics

LABELS = {
    "dynamo_namespace": "ns", "dynamo_component": "backend", "dynamo_endpoint": "generate",
    "worker_id": "1f", "model": "org/model", "model_name": "served",
}


def best(fn: Callable[[], object], number: int, repeat: int) -> float:
    """Seconds per call, best of ``repeat`` runs of ``number`` calls."""
    return min(timeit.repeat(fn, number=number, repeat=repeat)) / number


class PromClientRequestMetrics:
    """The same per-request metrics, written the straightforward prometheus_client way."""

    def __init__(self) -> None:
        reg = CollectorRegistry()
        names = list(LABELS)
        vals = list(LABELS.values())
        self.requests = Counter("requests", "", names, registry=reg).labels(*vals)
        self.inflight = Gauge("inflight", "", names, registry=reg).labels(*vals)
        fin = Counter("finished", "", [*names, "status"], registry=reg)
        self.finished = {s: fin.labels(*vals, s) for s in ("success", "cancelled", "error")}
        self.in_tok = Counter("in_tok", "", names, registry=reg).labels(*vals)
        self.out_tok = Counter("out_tok", "", names, registry=reg).labels(*vals)
        self.ttft = Histogram("ttft", "", names, buckets=TTFT_BUCKETS, registry=reg).labels(*vals)
        self.itl = Histogram("itl", "", names, buckets=ITL_BUCKETS, registry=reg).labels(*vals)
        self.dur = Histogram("dur", "", names, buckets=DURATION_BUCKETS,
                             registry=reg).labels(*vals)

    def request_started(self) -> None:
        self.requests.inc()
        self.inflight.inc()

    def request_finished(self, *, status: str, input_tokens: int, output_tokens: int,
                         ttft_s: float | None, itl_s: list[float], duration_s: float) -> None:
        self.inflight.dec()
        self.finished[status].inc()
        self.in_tok.inc(input_tokens)
        self.out_tok.inc(output_tokens)
        if ttft_s is not None:
            self.ttft.observe(ttft_s)
        for v in itl_s:
            self.itl.observe(v)
        self.dur.observe(duration_s)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=256, help="ITL values per request")
    ap.add_argument("--requests", type=int, default=2000, help="requests per timing run")
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()

    rng = random.Random(0)
    itl = [rng.uniform(0.005, 0.06) for _ in range(args.tokens)]
    n_obs = args.requests * args.tokens // 10 or 1

    # 1. One ITL observation.
    reg = CollectorRegistry()
    hist = Histogram("itl", "", list(LABELS), buckets=ITL_BUCKETS,
                     registry=reg).labels(*LABELS.values())
    v = itl[len(itl) // 2]
    prom_obs = best(lambda: hist.observe(v), n_obs, args.repeat)
    fast = FastHistogram(ITL_BUCKETS)
    fast_obs = best(lambda: fast.observe_many(itl), max(1, n_obs // args.tokens),
                    args.repeat) / args.tokens

    # 2. Whole request accounting.
    def one_request(m: WorkerMetrics | PromClientRequestMetrics) -> Callable[[], None]:
        def run() -> None:
            m.request_started()
            m.request_finished(status="success", input_tokens=512, output_tokens=args.tokens,
                               ttft_s=0.08, itl_s=itl, duration_s=1.5)
        return run

    wm = WorkerMetrics(namespace="ns", component="backend", endpoint="generate",
                       worker_id="1f", model="org/model", model_name="served")
    prom_req = best(one_request(PromClientRequestMetrics()), args.requests, args.repeat)
    fast_req = best(one_request(wm), args.requests, args.repeat)

    def started_finished_empty(m: WorkerMetrics | PromClientRequestMetrics) -> Callable[[], None]:
        def run() -> None:
            m.request_started()
            m.request_finished(status="success", input_tokens=1, output_tokens=0,
                               ttft_s=None, itl_s=[], duration_s=0.01)
        return run

    prom_fixed = best(started_finished_empty(PromClientRequestMetrics()), args.requests,
                      args.repeat)
    fast_fixed = best(started_finished_empty(wm), args.requests, args.repeat)

    # 3. A scrape, with 8 ranks and a few shutdown stages recorded.
    wm.declare_dp_ranks(range(8))
    for r in range(8):
        wm.on_snapshot(ComponentSnapshot(10, 100, 0.1, 0.5, r))
    for stage in ("unregister", "router_grace", "stop_admission", "inflight"):
        wm.record_shutdown_stage(stage, "completed", 0.1)
    render = best(wm.render, 200, args.repeat)
    snapshot = best(lambda: wm.on_snapshot(ComponentSnapshot(10, 100, 0.1, 0.5, 3)),
                    args.requests, args.repeat)

    us = 1e6
    print(f"ITL observation, prometheus_client Histogram.observe : {prom_obs * us:7.3f} us/obs")
    print(f"ITL observation, FastHistogram.observe_many (batched): {fast_obs * us:7.3f} us/obs"
          f"   ({prom_obs / fast_obs:.1f}x cheaper)")
    print(f"request accounting, {args.tokens} ITL values, prometheus_client objects: "
          f"{prom_req * us:8.2f} us/request")
    print(f"request accounting, {args.tokens} ITL values, WorkerMetrics            : "
          f"{fast_req * us:8.2f} us/request   ({prom_req / fast_req:.1f}x cheaper)")
    print(f"request accounting, no tokens, prometheus_client objects: "
          f"{prom_fixed * us:6.2f} us/request")
    print(f"request accounting, no tokens, WorkerMetrics            : "
          f"{fast_fixed * us:6.2f} us/request   ({prom_fixed / fast_fixed:.1f}x cheaper)")
    print(f"on_snapshot: {snapshot * us:.2f} us/call")
    print(f"render() (8 ranks, 4 stages, {len(wm.render())} bytes): {render * 1e3:.3f} ms/scrape")


if __name__ == "__main__":
    main()
