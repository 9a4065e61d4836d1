"""WorkerMetrics: names, labels and values as a Prometheus scraper parses them."""

from __future__ import annotations

import random
import threading

import pytest
from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from dynamo_backend_common import ComponentSnapshot
from dynamo_backend_common.runtime.metrics import ITL_BUCKETS, FastHistogram
from dynamo_backend_common.worker.metrics import WorkerMetrics

BASE = {
    "dynamo_namespace": "ns",
    "dynamo_component": "backend",
    "dynamo_endpoint": "generate",
    "worker_id": "1f",
    "model": "org/model",
    "model_name": "served",
}


def make(
    *, model: str = "org/model", model_name: str = "served",
    extra_labels: dict[str, str] | None = None,
) -> WorkerMetrics:
    return WorkerMetrics(
        namespace="ns", component="backend", endpoint="generate", worker_id="1f",
        model=model, model_name=model_name, extra_labels=extra_labels,
    )


def samples(m: WorkerMetrics) -> list[Sample]:
    text = m.render().decode()
    return [s for fam in text_string_to_metric_families(text) for s in fam.samples]


def find(m: WorkerMetrics, name: str, **labels: str) -> list[Sample]:
    """Samples named ``name`` whose labels include ``labels``."""
    return [
        s for s in samples(m)
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    ]


def value(m: WorkerMetrics, name: str, **labels: str) -> float:
    found = find(m, name, **labels)
    assert len(found) == 1, (name, labels, found)
    return found[0].value


def test_every_series_carries_the_const_labels() -> None:
    m = make(extra_labels={"team": "infra"})
    m.declare_dp_ranks([0])
    m.record_shutdown_stage("cleanup", "completed", 0.5)
    all_samples = samples(m)
    assert all_samples
    for s in all_samples:
        assert {k: s.labels[k] for k in BASE} == BASE, s
        assert s.labels["team"] == "infra"


def test_empty_label_values_are_omitted() -> None:
    m = make(model="", model_name="", extra_labels={"zone": ""})
    s = find(m, "dynamo_component_model_load_time_seconds")[0]
    assert "model" not in s.labels and "model_name" not in s.labels and "zone" not in s.labels
    assert s.labels["dynamo_endpoint"] == "generate"


@pytest.mark.parametrize("name", ["model", "dp_rank", "status", "__x", "bad-name", "1a"])
def test_invalid_or_reserved_extra_labels_are_rejected(name: str) -> None:
    with pytest.raises(ValueError):
        make(extra_labels={name: "v"})


def test_lifecycle_gauges() -> None:
    m = make()
    assert value(m, "dynamo_component_model_load_time_seconds") == 0.0
    m.set_model_load_time(12.5)
    m.set_drain_time(1.25)
    m.set_cleanup_time(0.75)
    assert value(m, "dynamo_component_model_load_time_seconds") == 12.5
    assert value(m, "dynamo_component_drain_time_seconds") == 1.25
    assert value(m, "dynamo_component_cleanup_time_seconds") == 0.75


def test_shutdown_stage_gauge_labels() -> None:
    m = make()
    assert find(m, "dynamo_component_shutdown_stage_seconds") == []
    m.record_shutdown_stage("inflight", "started", 0.0)
    m.record_shutdown_stage("inflight", "completed", 1.5)
    m.record_shutdown_stage("kv_transfer", "skipped", 0.0)
    m.record_shutdown_stage("inflight", "completed", 2.0)  # overwrite, not a new series
    got = {
        (s.labels["stage"], s.labels["reason"]): s.value
        for s in find(m, "dynamo_component_shutdown_stage_seconds")
    }
    assert got == {
        ("inflight", "started"): 0.0,
        ("inflight", "completed"): 2.0,
        ("kv_transfer", "skipped"): 0.0,
    }


def test_declare_dp_ranks_seeds_zeros_but_not_hit_rate() -> None:
    m = make()
    assert find(m, "dynamo_component_total_blocks") == []
    m.declare_dp_ranks([0, 3])
    for name in (
        "dynamo_component_total_blocks",
        "dynamo_component_gpu_cache_usage_percent",
        "dynamo_component_kv_used_blocks",
    ):
        got = {s.labels["dp_rank"]: s.value for s in find(m, name)}
        assert got == {"0": 0.0, "3": 0.0}, name
    assert find(m, "dynamo_component_kv_cache_hit_rate") == []


def test_snapshot_updates_rank_gauges() -> None:
    m = make()
    m.declare_dp_ranks([0, 1])
    m.on_snapshot(ComponentSnapshot(kv_used_blocks=7, kv_total_blocks=100,
                                    gpu_cache_usage=0.07, dp_rank=1))
    assert value(m, "dynamo_component_kv_used_blocks", dp_rank="1") == 7
    assert value(m, "dynamo_component_total_blocks", dp_rank="1") == 100
    assert value(m, "dynamo_component_gpu_cache_usage_percent", dp_rank="1") == 0.07
    assert value(m, "dynamo_component_total_blocks", dp_rank="0") == 0


def test_kv_cache_hit_rate_is_tri_state() -> None:
    m = make()
    m.declare_dp_ranks([0])
    m.on_snapshot(ComponentSnapshot(kv_total_blocks=10, kv_cache_hit_rate=None, dp_rank=0))
    assert find(m, "dynamo_component_kv_cache_hit_rate") == []
    m.on_snapshot(ComponentSnapshot(kv_total_blocks=10, kv_cache_hit_rate=0.0, dp_rank=0))
    assert value(m, "dynamo_component_kv_cache_hit_rate", dp_rank="0") == 0.0
    m.on_snapshot(ComponentSnapshot(kv_total_blocks=10, kv_cache_hit_rate=0.4, dp_rank=0))
    assert value(m, "dynamo_component_kv_cache_hit_rate", dp_rank="0") == 0.4
    # A later unmeasured snapshot leaves the last measurement, as an unwritten gauge would.
    m.on_snapshot(ComponentSnapshot(kv_total_blocks=10, kv_cache_hit_rate=None, dp_rank=0))
    assert value(m, "dynamo_component_kv_cache_hit_rate", dp_rank="0") == 0.4


def test_request_accounting() -> None:
    m = make()
    m.request_started()
    m.request_started()
    m.request_started()
    assert value(m, "dynamo_component_requests_total") == 3
    assert value(m, "dynamo_component_inflight_requests") == 3
    assert m.inflight == 3

    m.request_finished(status="success", input_tokens=10, output_tokens=4, ttft_s=0.02,
                       itl_s=[0.004, 0.012, 0.012], duration_s=0.05)
    m.request_finished(status="cancelled", input_tokens=5, output_tokens=0, ttft_s=None,
                       itl_s=None, duration_s=3.0)
    assert value(m, "dynamo_component_inflight_requests") == 1
    assert value(m, "dynamo_component_input_tokens_total") == 15
    assert value(m, "dynamo_component_output_tokens_total") == 4
    finished = {
        s.labels["status"]: s.value
        for s in find(m, "dynamo_component_requests_finished_total")
    }
    assert finished == {"success": 1, "cancelled": 1, "error": 0}

    ttft = "dynamo_component_time_to_first_token_seconds"
    assert value(m, ttft + "_count") == 1  # the cancelled request had no first token
    assert value(m, ttft + "_sum") == pytest.approx(0.02)
    assert value(m, ttft + "_bucket", le="0.01") == 0
    assert value(m, ttft + "_bucket", le="0.025") == 1

    itl = "dynamo_component_inter_token_latency_seconds"
    assert value(m, itl + "_count") == 3  # one observation per gap
    assert value(m, itl + "_sum") == pytest.approx(0.028)
    assert value(m, itl + "_bucket", le="0.005") == 1
    assert value(m, itl + "_bucket", le="0.01") == 1
    assert value(m, itl + "_bucket", le="0.015") == 3
    assert value(m, itl + "_bucket", le="+Inf") == 3

    dur = "dynamo_component_request_duration_seconds"
    assert value(m, dur + "_count") == 2
    assert value(m, dur + "_bucket", le="0.05") == 1  # le is inclusive
    assert value(m, dur + "_bucket", le="2.5") == 1
    assert value(m, dur + "_bucket", le="5.0") == 2


def test_unknown_status_is_rejected_and_not_recorded() -> None:
    m = make()
    m.request_started()
    with pytest.raises(ValueError):
        m.request_finished(status="weird", input_tokens=1, output_tokens=1, ttft_s=None,
                           itl_s=None, duration_s=0.1)
    assert m.inflight == 1
    assert value(m, "dynamo_component_request_duration_seconds_count") == 0


def test_concurrent_accounting_is_exact() -> None:
    m = make()
    n, threads = 2000, 4

    def work() -> None:
        for _ in range(n):
            m.request_started()
            m.request_finished(status="success", input_tokens=1, output_tokens=2, ttft_s=0.01,
                               itl_s=[0.01], duration_s=0.02)

    ts = [threading.Thread(target=work) for _ in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert value(m, "dynamo_component_requests_total") == n * threads
    assert value(m, "dynamo_component_inflight_requests") == 0
    assert value(m, "dynamo_component_output_tokens_total") == 2 * n * threads
    assert value(m, "dynamo_component_inter_token_latency_seconds_count") == n * threads


def test_engine_expfmt_callbacks_are_appended_and_a_failing_one_is_skipped() -> None:
    m = make()
    engine_reg = CollectorRegistry()
    c = Counter("vllm:prompt_tokens", "engine counter", registry=engine_reg)
    c.inc(42)

    def boom() -> str:
        raise RuntimeError("engine registry exploded")

    m.engine_metrics.add_expfmt_callback(lambda: generate_latest(engine_reg))
    m.engine_metrics.add_expfmt_callback(boom)
    m.engine_metrics.add_expfmt_callback(lambda: "sglang_custom 7")  # no trailing newline
    m.request_started()

    fams = {f.name: f for f in text_string_to_metric_families(m.render().decode())}
    engine = fams["vllm:prompt_tokens"]
    assert engine.samples[0].value == 42
    assert "dynamo_namespace" not in engine.samples[0].labels  # bridged without auto-labels
    assert fams["sglang_custom"].samples[0].value == 7
    assert fams["dynamo_component_requests"].samples[0].value == 1


def test_registries_are_private() -> None:
    a, b = make(), make()
    a.request_started()
    assert value(a, "dynamo_component_requests_total") == 1
    assert value(b, "dynamo_component_requests_total") == 0


def test_fast_histogram_matches_le_semantics() -> None:
    h = FastHistogram([1.0, 2.0])
    h.observe_many([0.5, 1.0, 1.5, 2.0, 3.0])
    h.observe(-1.0)
    buckets, total = h.cumulative()
    assert buckets == [("1.0", 3), ("2.0", 5), ("+Inf", 6)]
    assert total == pytest.approx(7.0)
    with pytest.raises(ValueError):
        FastHistogram([2.0, 1.0])
    with pytest.raises(ValueError):
        FastHistogram([])
    assert len(FastHistogram(ITL_BUCKETS).counts) == len(ITL_BUCKETS) + 1


def test_fast_histogram_batch_matches_single_observations() -> None:
    rng = random.Random(7)
    for _ in range(200):
        values = [
            rng.choice([rng.expovariate(50.0), rng.choice(ITL_BUCKETS), 0.0, 10.0])
            for _ in range(rng.choice([rng.randint(0, 40), rng.randint(500, 1200)]))
        ]
        batch, single = FastHistogram(ITL_BUCKETS), FastHistogram(ITL_BUCKETS)
        batch.observe_many(iter(values))
        for v in values:
            single.observe(v)
        assert batch.counts == single.counts
        assert batch.total == pytest.approx(single.total)
