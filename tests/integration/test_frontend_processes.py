"""Several frontend processes on one port, for real: ``dynamo-backend run --frontend-processes 2``
and ``dynamo-backend frontend --processes 2`` as subprocesses with mocker workers, driven over
HTTP on 127.0.0.1. Every wait is on an output line or an HTTP answer, with a timeout."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from dynamo_backend_common.fixtures import tiny_model_dir
from dynamo_backend_common.frontend.replicas import (
    ReplicaOptions,
    ReplicaStartError,
    ReplicaSupervisor,
)
from dynamo_backend_common.frontend.server import FrontendConfig
from tests.integration.test_frontend_server import RunServer, metric

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="SO_REUSEPORT spreading"),
]

TIMEOUT = 30.0
_CHILD_RE = re.compile(r"frontend process (\d+)/\d+ started \(pid (\d+)\)")
_FRONTEND_URL_RE = re.compile(r"Frontend serving OpenAI API at (http://\S+)/v1")
# The mocker publishes one load snapshot at start and no other (an hour apart, no heartbeat):
# what the routers know of the workers' load is then only what they routed there, theirs and,
# through replica sync, each other's. Without sync two routers would herd.
NO_SNAPSHOTS = ["--snapshot-interval-ms", "3600000", "--snapshot-heartbeat-ms", "0"]
VOCAB = "1520"  # the tiny model's


def per_label(text: str, name: str, label: str, **where: str) -> dict[str, float]:
    """``{label value: sample value}`` of the samples of ``name`` matching ``where``."""
    out: dict[str, float] = {}
    pat = re.compile(rf'{label}="([^"]*)"')
    for line in text.splitlines():
        if not line.startswith(name + "{"):
            continue
        head, _, value = line.rpartition(" ")
        m = pat.search(head)
        if m and all(f'{k}="{v}"' in head for k, v in where.items()):
            out[m.group(1)] = out.get(m.group(1), 0.0) + float(value)
    return out


def scrape(base: str) -> str:
    """One ``GET /metrics`` on a fresh connection (whichever process the kernel picks)."""
    r = httpx.get(base + "/metrics", timeout=10)
    assert r.status_code == 200, r.text
    return r.text


def wait_metrics(base: str, pred: Callable[[str], bool], what: str,
                 timeout: float = TIMEOUT) -> str:
    """Scrape until ``pred(text)`` (each scrape merges every process, so any one will do)."""
    deadline = time.monotonic() + timeout
    text = ""
    while time.monotonic() < deadline:
        text = scrape(base)
        if pred(text):
            return text
    raise AssertionError(f"{what}: not within {timeout}s; last scrape:\n{text}")


def synced(text: str, processes: int, workers: int) -> bool:
    peers = per_label(text, "dynamo_frontend_router_replica_peers", "pid")
    seen = per_label(text, "dynamo_frontend_router_replica_workers", "pid")
    return (len(peers) == processes and all(v == processes - 1 for v in peers.values())
            and len(seen) == processes and all(v == workers for v in seen.values()))


def views(text: str) -> dict[str, float]:
    """Per process: requests in flight in its router's load view (its own + the others')."""
    return per_label(text, "dynamo_frontend_router_replica_requests", "pid")


def tokens(seed: int, n: int = 64) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(10, 1500) for _ in range(n)]


def child_pids(server: RunServer) -> dict[int, int]:
    return {int(m.group(1)): int(m.group(2))
            for m in (_CHILD_RE.search(s) for s in server.lines) if m}


def test_two_processes_share_the_port_the_load_and_the_metrics() -> None:
    srv = RunServer("--engine", "mocker", "--workers", "2", "--frontend-processes", "2",
                    "--router-mode", "kv", "--", "--speedup-ratio", "1", "--vocab-size",
                    VOCAB, *NO_SNAPSHOTS).start()
    base = srv.url.removesuffix("/v1")
    try:
        assert list(child_pids(srv)) == [2], srv.output()
        wait_metrics(base, lambda t: synced(t, 2, 2), "replicas hear each other")

        # (a) No herding. Long requests (distinct prompts: no cache overlap) are opened one at a
        # time; each is routed by whichever process the kernel gave its connection to, and
        # before the next one opens every process's load view holds all of them. Each choice
        # then goes to the worker with fewer requests (4 blocks each), so 8 requests end
        # exactly 4 + 4 whichever processes routed them. Without replica sync a process would
        # not see the other's requests and the split would depend on the kernel's hashing.
        readers: list[Iterator[str]] = []  # kept: a dropped line iterator closes its stream
        with contextlib.ExitStack() as streams:
            for i in range(8):
                client = streams.enter_context(httpx.Client(base_url=base, timeout=60))
                resp = streams.enter_context(client.stream("POST", "/v1/completions", json={
                    "model": srv.model, "prompt": tokens(i), "max_tokens": 1500,
                    "ignore_eos": True, "stream": True}))
                assert resp.status_code == 200
                readers.append(resp.iter_lines())
                assert next(line for line in readers[-1] if line.startswith("data:"))
                wait_metrics(base, lambda t, n=i + 1: len(views(t)) == 2 and all(
                    v == n for v in views(t).values()), f"both views hold {i + 1} requests")
            text = scrape(base)
            decisions = per_label(text, "dynamo_frontend_router_decisions_total", "worker_id")
            assert sorted(decisions.values()) == [4.0, 4.0], decisions
            local = per_label(text, "dynamo_frontend_router_replica_requests", "pid",
                              source="local")
            assert sum(local.values()) == 8, local
        # The clients left: every request ends, in every view.
        wait_metrics(base, lambda t: all(v == 0 for v in views(t).values()),
                     "the views are empty")

        # (c) Requests spread over both processes (new connections hash to either), and any
        # process's /metrics shows the sum of both.
        n = 40
        for i in range(n):
            r = httpx.post(base + "/v1/completions", timeout=30, json={
                "model": srv.model, "prompt": tokens(100 + i, 8), "max_tokens": 2})
            assert r.status_code == 200, r.text
        totals = set()
        for _ in range(10):
            text = scrape(base)
            totals.add(metric(text, "dynamo_frontend_requests_total", endpoint="completions",
                              status="success"))
            per_process = per_label(text, "dynamo_frontend_process_requests_total", "pid")
            assert len(per_process) == 2 and all(v > 0 for v in per_process.values()), text
            assert metric(text, "dynamo_frontend_processes", status="up") == 2
            assert metric(text, "dynamo_frontend_processes", status="down") == 0
        assert totals == {float(n)}
        assert metric(scrape(base), "dynamo_frontend_request_duration_seconds_count",
                      model=srv.model) >= n
    finally:
        code = srv.stop()
    out = srv.output()
    assert code == 0, out
    for pid in child_pids(srv).values():
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    assert out.rstrip().endswith("stopped"), out


@pytest.fixture
def mocker_worker(tmp_path: Path) -> Iterator[str]:
    """One mocker worker subprocess on a private file:// discovery; yields the URL."""
    discovery = f"file://{tmp_path / 'discovery'}"
    log = open(tmp_path / "worker.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "dynamo_backend_common.cli", "worker", "--engine", "mocker",
         "--discovery", discovery, "--model-path", str(tiny_model_dir()),
         "--served-model-name", "tiny-model", "--graceful-shutdown-grace-secs", "0",
         "--", "--speedup-ratio", "0", "--vocab-size", VOCAB],
        stdout=log, stderr=subprocess.STDOUT)
    try:
        yield discovery
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def start_frontend(*args: str) -> tuple[RunServer, str]:
    srv = RunServer(*args, command="frontend")
    # RunServer.start waits for run's "Serving MODEL at URL"; the frontend says it otherwise.
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    srv.proc = subprocess.Popen(srv.argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, env=env)
    threading.Thread(target=srv._pump, daemon=True).start()
    line = srv.wait_for_line(lambda s: _FRONTEND_URL_RE.search(s) is not None, TIMEOUT)
    m = _FRONTEND_URL_RE.search(line)
    assert m is not None
    return srv, m.group(1)


def test_a_killed_frontend_process_leaves_the_other_serving(mocker_worker: str) -> None:
    srv, base = start_frontend("--discovery", mocker_worker, "--processes", "2",
                               "--router-mode", "kv")
    try:
        (child,) = child_pids(srv).values()
        wait_metrics(base, lambda t: synced(t, 2, 1), "both processes see the worker")
        body = {"model": "tiny-model", "prompt": "hello there", "max_tokens": 2}
        for _ in range(10):
            assert httpx.post(base + "/v1/completions", json=body, timeout=30).status_code == 200

        os.kill(child, signal.SIGKILL)
        srv.wait_for_line(lambda s: f"(pid {child}) exited with code -9" in s, TIMEOUT)
        # The kernel no longer routes to the dead listener: every new connection is served.
        statuses = Counter(httpx.post(base + "/v1/completions", json=body, timeout=30)
                           .status_code for _ in range(30))
        assert statuses == {200: 30}
        text = scrape(base)
        assert metric(text, "dynamo_frontend_processes", status="up") == 1
        assert metric(text, "dynamo_frontend_processes", status="down") == 1
        assert len(per_label(text, "dynamo_frontend_process_requests_total", "pid")) == 1
    finally:
        code = srv.stop()
    assert code == 0, srv.output()
    assert "shutting down" in srv.output()


async def test_a_child_that_cannot_start_fails_the_start(tmp_path: Path) -> None:
    """A child that cannot listen (the port is held by a socket outside the group) exits
    before it is ready: start_children raises and leaves nothing running."""
    holder = socket.create_server(("127.0.0.1", 0))  # no SO_REUSEPORT: nobody may join
    port = holder.getsockname()[1]
    said: list[str] = []
    config = FrontendConfig(host="127.0.0.1", port=port,
                            discovery=f"file://{tmp_path / 'discovery'}")
    sup = ReplicaSupervisor(config, ReplicaOptions(2, start_timeout_s=TIMEOUT), say=said.append)
    try:
        with pytest.raises(ReplicaStartError, match="exited with code 1 before it was ready"):
            await sup.start_children(port)
        assert any("cannot listen" in s for s in said), said
        assert all(c.proc is not None and c.proc.returncode is not None for c in sup.children)
    finally:
        await sup.stop()
        sup.cleanup()
        holder.close()
    assert sup.state_dir is not None
    assert not await asyncio.to_thread(os.path.exists, sup.state_dir)
