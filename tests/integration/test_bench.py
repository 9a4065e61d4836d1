"""``dynamo-backend bench`` against a real ``dynamo-backend run`` server."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator

import pytest

from tests.integration.test_frontend_server import RunServer


@pytest.fixture(scope="module")
def echo_server() -> Iterator[RunServer]:
    srv = RunServer("--engine", "echo", "--workers", "1", "--", "--delay-ms", "1").start()
    yield srv
    assert srv.stop() == 0, srv.output()


def bench(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "dynamo_backend_common.cli", "bench", *args],
        capture_output=True, text=True, timeout=60)


def test_bench_reports_each_level(echo_server: RunServer) -> None:
    done = bench("--url", echo_server.url, "--model", echo_server.model,
                 "--concurrency", "1,3", "--requests", "6", "--max-tokens", "8")
    assert done.returncode == 0, done.stdout + done.stderr
    header, *rows = done.stdout.strip().splitlines()
    assert header.split()[:3] == ["conc", "req/s", "tok/s"]
    assert [r.split()[0] for r in rows] == ["1", "3"]
    for row in rows:
        cols = row.split()
        assert float(cols[1]) > 0 and float(cols[2]) > 0  # requests/s, tokens/s
        assert cols[-1] == "0"  # errors


def test_bench_counts_failed_requests_and_exits_1(echo_server: RunServer) -> None:
    done = bench("--url", echo_server.url, "--model", "no-such-model",
                 "--concurrency", "2", "--requests", "4")
    assert done.returncode == 1
    row = done.stdout.strip().splitlines()[-1].split()
    assert int(row[-1]) >= 4


def test_bench_rejects_a_bad_url() -> None:
    done = bench("--url", "https://example.invalid/v1", "--concurrency", "1")
    assert done.returncode != 0 and "http://" in done.stderr
