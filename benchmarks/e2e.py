"""End to end: OpenAI HTTP frontend -> router -> request plane -> echo workers, and back.

    python benchmarks/e2e.py [--workers 2] [--concurrency 1,64] [--requests 256]
                             [--max-tokens 64] [--delay-ms 0] [--plot benchmarks/e2e.png]

Starts ``dynamo-backend run --engine echo --workers N --port 0`` (the echo engine at full
speed, so every figure is serving overhead: HTTP parsing, chat template and tokenizer,
routing, the request plane, detokenization, SSE), then for each concurrency level drives
``--requests`` streaming chat completions (``max_tokens`` tokens each, ``ignore_eos``) with
that many in flight, from an httpx client in this process. Prints requests/s, output tokens/s,
TTFT (request sent -> first content chunk) and ITL (gap between content chunks) p50 / p99, and
saves the TTFT and ITL distributions as a PNG (``--plot``). The client is a minimal
keep-alive HTTP/1.1 client (one connection per in-flight request), cheap enough not to starve
the server on a small machine.

The client shares the machine with the server: on a small machine the figures are a lower bound
of what the server alone could do (``--workers`` competes for the same cores too).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

_URL_RE = re.compile(r"Serving (\S+) at (http://\S+/v1)")
PROMPT = ("Summarise the following in one sentence: the quick brown fox jumps over the lazy "
          "dog while the cat watches from the windowsill.")


@dataclass
class Level:
    concurrency: int
    wall_s: float = 0.0
    requests: int = 0
    tokens: int = 0
    errors: int = 0
    ttft: list[float] = field(default_factory=list)
    itl: list[float] = field(default_factory=list)


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


def start_server(workers: int, extra: list[str]) -> tuple[subprocess.Popen[str], str, str]:
    argv = [sys.executable, "-m", "dynamo_backend_common.cli", "run", "--engine", "echo",
            "--workers", str(workers), "--port", "0", *extra]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"))
    assert proc.stdout is not None
    lines = []
    for line in proc.stdout:
        lines.append(line.rstrip())
        m = _URL_RE.search(line)
        if m:
            # Keep draining the server's output so it never blocks on a full pipe.
            threading.Thread(target=lambda: [None for _ in proc.stdout or ()],
                             daemon=True).start()
            return proc, m.group(1), m.group(2)
    raise SystemExit("server did not start:\n" + "\n".join(lines))


class Conn:
    """A minimal keep-alive HTTP/1.1 client connection: POST a JSON body, read a chunked (SSE)
    or sized response. httpx costs ~15 ms of client CPU per 64-token stream, which on a small
    machine starves the server under test; this costs a fraction of that."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def post(self, path: str, body: bytes) -> tuple[int, asyncio.StreamReader, bool]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        assert self.reader is not None
        self.writer.write(
            b"POST %s HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n" % (path.encode(), self.host.encode(), len(body))
            + body)
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        chunked = b"transfer-encoding: chunked" in head.lower()
        if not chunked:
            n = int(re.search(rb"(?i)content-length: (\d+)", head).group(1))  # type: ignore[union-attr]
            await self.reader.readexactly(n)
        return status, self.reader, chunked

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            await self.writer.wait_closed()


async def one(conn: Conn, path: str, model: str, max_tokens: int, lvl: Level) -> None:
    body = json.dumps({
        "model": model, "messages": [{"role": "user", "content": PROMPT}],
        "max_tokens": max_tokens, "stream": True, "ignore_eos": True,
        "stream_options": {"include_usage": True}}).encode()
    t0 = time.perf_counter()
    last = None
    status, reader, chunked = await conn.post(path, body)
    if status != 200 or not chunked:
        lvl.errors += 1
        return
    # One timestamp per received chunk (events written together arrive together); content
    # events found by substring, JSON parsed only for the usage event.
    while True:
        size = int((await reader.readuntil(b"\r\n"))[:-2], 16)
        data = await reader.readexactly(size + 2)
        if size == 0:
            break
        now = time.perf_counter()
        for _ in range(data.count(b'"delta":{"content":"')):
            if last is None:
                lvl.ttft.append(now - t0)
            else:
                lvl.itl.append(now - last)
            last = now
        i = data.find(b'"usage":{')
        if i >= 0:
            event = data[data.rfind(b"data: ", 0, i) + 6:]
            event = event[:event.index(b"\n")]
            lvl.tokens += json.loads(event)["usage"]["completion_tokens"]
    lvl.requests += 1


async def drive(url: str, model: str, concurrency: int, requests: int,
                max_tokens: int) -> Level:
    lvl = Level(concurrency)
    parsed = httpx.URL(url)
    path = parsed.path.rstrip("/") + "/chat/completions"
    conns = [Conn(parsed.host, parsed.port or 80) for _ in range(concurrency)]
    try:
        # Warm-up: connections, the tokenizer, the workers.
        await asyncio.gather(*(one(c, path, model, 4, Level(0)) for c in conns))
        left = [requests]

        async def loop(conn: Conn) -> None:
            while left[0] > 0:
                left[0] -= 1
                await one(conn, path, model, max_tokens, lvl)

        t0 = time.perf_counter()
        await asyncio.gather(*(loop(c) for c in conns))
        lvl.wall_s = time.perf_counter() - t0
    finally:
        await asyncio.gather(*(c.close() for c in conns), return_exceptions=True)
    return lvl


def run_loop(coro: Any) -> Level:
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)  # type: ignore[no-any-return]
    return uvloop.run(coro)  # type: ignore[no-any-return]


def plot(levels: list[Level], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for lvl in levels:
        for ax, values in ((a, lvl.ttft), (b, lvl.itl)):
            if values:
                # Tokens that arrive in one read have a gap of 0: clip for the log axis.
                xs = sorted(max(v * 1000, 1e-3) for v in values)
                ys = [(i + 1) / len(xs) for i in range(len(xs))]
                ax.plot(xs, ys, label=f"concurrency {lvl.concurrency}")
    a.set_title("TTFT (CDF)")
    a.set_xlabel("ms")
    b.set_title("ITL (CDF; gaps of 0, tokens in the same read, drawn at 1 µs)")
    b.set_xlabel("ms")
    for ax in (a, b):
        ax.set_xscale("log")
        ax.set_ylabel("fraction of observations")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--concurrency", default="1,64", help="comma list of levels")
    p.add_argument("--requests", type=int, default=256, help="requests per level")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--delay-ms", type=float, default=0.0,
                   help="echo engine delay per token (default 0: full speed, tokens arrive "
                        "in bursts and most ITL gaps are 0)")
    p.add_argument("--plot", default=str(Path(__file__).with_name("e2e.png")))
    p.add_argument("--url", default=None,
                   help="benchmark a running server (URL ending in /v1) instead of starting one")
    p.add_argument("--model", default="tiny-model", help="model name with --url")
    args = p.parse_args()
    levels = [int(x) for x in args.concurrency.split(",") if x.strip()]

    proc = None
    if args.url:
        url, model = args.url.rstrip("/"), args.model
    else:
        extra = ["--", "--delay-ms", str(args.delay_ms)] if args.delay_ms else []
        proc, model, url = start_server(args.workers, extra)
    try:
        results = []
        print(f"{'conc':>5} {'req/s':>8} {'tok/s':>9} {'TTFT p50':>9} {'TTFT p99':>9} "
              f"{'ITL p50':>8} {'ITL p99':>8} {'errors':>6}")
        for c in levels:
            lvl = run_loop(drive(url, model, c, max(args.requests, c), args.max_tokens))
            results.append(lvl)
            print(f"{c:>5} {lvl.requests / lvl.wall_s:>8.1f} {lvl.tokens / lvl.wall_s:>9.0f} "
                  f"{pct(lvl.ttft, 0.5) * 1e3:>7.2f}ms {pct(lvl.ttft, 0.99) * 1e3:>7.2f}ms "
                  f"{pct(lvl.itl, 0.5) * 1e3:>6.3f}ms {pct(lvl.itl, 0.99) * 1e3:>6.3f}ms "
                  f"{lvl.errors:>6}", flush=True)
        if args.plot:
            plot(results, args.plot,
                 f"e2e: echo engine ({args.delay_ms:g} ms/token), {args.workers} worker(s), "
                 f"{args.max_tokens} tokens/request")
            print(f"plot saved to {args.plot}")
        ttft_all = [v for lvl in results for v in lvl.ttft]
        if ttft_all:
            print(f"(TTFT mean over all levels {statistics.mean(ttft_all) * 1e3:.2f} ms)")
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
