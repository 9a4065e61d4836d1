"""``dynamo-backend bench`` against a real ``dynamo-backend run`` server."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

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
    # The reason, not "nan ms": the status and body of the first failures, on stderr.
    assert "nan" not in done.stdout and row[3:7] == ["-", "-", "-", "-"]
    assert "conc 2: 4 of 4 requests failed; first errors:" in done.stderr
    (reason,) = [line.strip() for line in done.stderr.splitlines()
                 if line.startswith("  HTTP ")]
    assert reason.startswith("HTTP 404: ") and "no-such-model" in reason


def test_bench_shows_progress_on_stderr(echo_server: RunServer) -> None:
    done = bench("--url", echo_server.url, "--model", echo_server.model,
                 "--concurrency", "2", "--requests", "6", "--max-tokens", "4")
    assert done.returncode == 0, done.stderr
    progress = [line for line in done.stderr.splitlines() if line.startswith("conc 2: ")]
    assert progress, done.stderr  # one a second while it runs, and one at the end
    last = progress[-1].split()
    assert last[2:4] == ["6/6", "done,"] and float(last[4]) > 0 and last[6:8] == ["0", "errors,"]
    assert "conc" not in done.stdout.splitlines()[-1]  # stdout stays the table


def test_bench_plot_saves_ttft_and_itl_cdfs(echo_server: RunServer, tmp_path: Path) -> None:
    out = tmp_path / "bench.png"
    done = bench("--url", echo_server.url, "--model", echo_server.model,
                 "--concurrency", "1,2", "--requests", "4", "--max-tokens", "4",
                 "--plot", str(out))
    assert done.returncode == 0, done.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"plot saved to {out}" in done.stderr


def test_bench_reports_a_server_error_event_inside_a_200_stream() -> None:
    """A stream that starts (200) and then carries ``data: {"error": ...}`` is a failure
    with that event as its reason, not a success with no tokens."""
    import asyncio

    from dynamo_backend_common.cli.bench import drive

    event = b'data: {"error":{"message":"engine exploded","type":"internal_error"}}\n\n'

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except asyncio.IncompleteReadError:
                break
            size = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
            await reader.readexactly(size)
            writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"
                         + b"%x\r\n%s\r\n0\r\n\r\n" % (len(event), event))
            await writer.drain()
        writer.close()

    async def main() -> None:
        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        async with server:
            lvl = await drive(f"http://127.0.0.1:{port}/v1", "m", 1, 2, 4)
        assert (lvl.requests, lvl.errors) == (0, 2)
        assert lvl.error_reasons == [
            'error event in a 200 stream: {"error":{"message":"engine exploded",'
            '"type":"internal_error"}}']

    asyncio.run(main())


def test_bench_rejects_a_bad_url() -> None:
    done = bench("--url", "https://example.invalid/v1", "--concurrency", "1")
    assert done.returncode != 0 and "http://" in done.stderr
