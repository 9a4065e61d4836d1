"""The multi-machine shape on one machine: mocker workers and ``dynamo-backend frontend`` as
separate processes that share only a real etcd (discovery, leases) and a real NATS server
(KV events, load snapshots), with the KV-aware router."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from dynamo_backend_common.fixtures import tiny_model_dir
from dynamo_backend_common.model_dir import ModelDir
from tests.integration.test_frontend_server import RunServer, wait_until

_URL = re.compile(r"Frontend serving OpenAI API at (http://\S+/v1)")
# A long plain-text prompt: many full KV blocks (block size 4) for the router to match.
PROMPT = " ".join(["The quick brown fox jumps over the lazy dog."] * 12)


def samples(text: str, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name:
                out[tuple(sorted(s.labels.items()))] = s.value
    return out


@pytest.fixture
def cluster(etcd_url: str, nats_url: str) -> Iterator[tuple[str, list[subprocess.Popen[bytes]]]]:
    """Two mocker workers and a kv-routing frontend; yields (frontend /v1 URL, workers)."""
    namespace = f"dist{uuid.uuid4().hex[:8]}"
    model = tiny_model_dir()
    vocab = ModelDir.load(model).tokenizer.get_vocab_size(with_added_tokens=True)
    common = ["--discovery", etcd_url, "--events", nats_url, "--namespace", namespace]
    workers = [
        subprocess.Popen(
            [sys.executable, "-m", "dynamo_backend_common.cli", "worker", "--engine", "mocker",
             *common, "--model-path", str(model), "--served-model-name", "tiny-kv",
             "--system-port", "-1", "--graceful-shutdown-grace-secs", "0",
             "--", "--speedup-ratio", "0", "--block-size", "4", "--vocab-size", str(vocab)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for _ in range(2)
    ]
    # Overlap weight 2: a load snapshot taken while the previous request ran can arrive after
    # it finished (snapshots and completions travel separately), making the cached worker look
    # busy by about one prompt for a moment; at weight 1 that ties it with the cold worker.
    front = RunServer(*common, "--router-mode", "kv", "--kv-overlap-weight", "2",
                      command="frontend")
    front.proc = subprocess.Popen(front.argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  text=True)
    threading.Thread(target=front._pump, daemon=True).start()
    try:
        m = _URL.search(front.wait_for_line(lambda s: _URL.search(s) is not None, 30))
        assert m is not None
        yield m.group(1), workers
    finally:
        for w in workers:
            if w.poll() is None:
                w.kill()
                w.wait()
        code = front.stop()
        assert code == 0, front.output()


def test_kv_routing_over_etcd_and_nats(
    cluster: tuple[str, list[subprocess.Popen[bytes]]],
) -> None:
    url, workers = cluster
    metrics_url = url.removesuffix("/v1") + "/metrics"
    client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=30)
    wait_until(lambda: client.models.list().data != [] and len(
        httpx.get(url.removesuffix("/v1") + "/health").json().get("instances", [])) == 2,
        30, "both workers to be discovered through etcd")

    first = client.completions.create(model="tiny-kv", prompt=PROMPT, max_tokens=4)
    assert first.usage is not None and first.usage.completion_tokens == 4

    def indexed_blocks() -> float:
        text = httpx.get(metrics_url).text
        return samples(text, "dynamo_frontend_router_indexed_blocks").get((), 0.0)

    # The first request's blocks reach the frontend's index over NATS (all of them: a partly
    # indexed prefix would rightly lose to the idle worker).
    full_blocks = first.usage.prompt_tokens // 4
    wait_until(lambda: indexed_blocks() >= full_blocks, 30,
               f"{full_blocks} KV blocks from the worker over NATS")
    for _ in range(4):
        r = client.completions.create(model="tiny-kv", prompt=PROMPT, max_tokens=4)
        assert r.usage is not None and r.usage.completion_tokens == 4
        details = r.usage.prompt_tokens_details
        assert details is not None and (details.cached_tokens or 0) > 0

    decisions = samples(httpx.get(metrics_url).text, "dynamo_frontend_router_decisions_total")
    # Every request followed the cached prefix to the same worker.
    assert sorted(decisions.values()) == [5.0]

    # A worker that stops leaves etcd, and the frontend stops routing to it.
    for w in workers:
        w.send_signal(signal.SIGTERM)
    for w in workers:
        assert w.wait(timeout=30) == 0
    wait_until(lambda: client.models.list().data == [], 30, "the model to leave with its workers")

