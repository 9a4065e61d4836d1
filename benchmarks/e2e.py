"""End to end: OpenAI HTTP frontend -> router -> request plane -> echo workers, and back.

    python benchmarks/e2e.py [--workers 2] [--concurrency 1,64] [--requests 256]
                             [--max-tokens 64] [--delay-ms 0] [--plot benchmarks/e2e.png]

Starts ``dynamo-backend run --engine echo --workers N --port 0`` (the echo engine at full
speed, so every figure is serving overhead: HTTP parsing, chat template and tokenizer,
routing, the request plane, detokenization, SSE), then for each concurrency level drives
``--requests`` streaming chat completions (``max_tokens`` tokens each, ``ignore_eos``) with
that many in flight, from an httpx client in this process. Prints requests/s, output tokens/s,
TTFT (request sent -> first content chunk) and ITL (gap between content chunks) p50 / p99, and
saves the TTFT and ITL distributions as a PNG (``--plot``).

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


async def one(h: httpx.AsyncClient, url: str, model: str, max_tokens: int, lvl: Level) -> None:
    body = {"model": model, "messages": [{"role": "user", "content": PROMPT}],
            "max_tokens": max_tokens, "stream": True, "ignore_eos": True,
            "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    last = None
    async with h.stream("POST", url + "/chat/completions", json=body) as r:
        if r.status_code != 200:
            lvl.errors += 1
            await r.aread()
            return
        # Light parsing, so the client (same machine) steals little CPU from the server: one
        # timestamp per received read, content events found by substring, JSON only for usage.
        tail = b""
        async for raw in r.aiter_raw():
            now = time.perf_counter()
            events = (tail + raw).split(b"\n\n")
            tail = events.pop()
            for event in events:
                if b'"delta":{"content":"' in event:
                    if last is None:
                        lvl.ttft.append(now - t0)
                    else:
                        lvl.itl.append(now - last)
                    last = now
                elif b'"usage":{' in event:
                    lvl.tokens += json.loads(event[6:])["usage"]["completion_tokens"]
    lvl.requests += 1


async def drive(url: str, model: str, concurrency: int, requests: int,
                max_tokens: int) -> Level:
    lvl = Level(concurrency)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=60, limits=limits) as h:
        # Warm-up: connections, the tokenizer, the workers.
        await asyncio.gather(*(one(h, url, model, 4, Level(0)) for _ in range(concurrency)))
        queue: asyncio.Queue[int] = asyncio.Queue()
        for i in range(requests):
            queue.put_nowait(i)

        async def loop() -> None:
            while not queue.empty():
                queue.get_nowait()
                await one(h, url, model, max_tokens, lvl)

        t0 = time.perf_counter()
        await asyncio.gather(*(loop() for _ in range(concurrency)))
        lvl.wall_s = time.perf_counter() - t0
    return lvl


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
    b.set_title("ITL (CDF)")
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
            lvl = asyncio.run(drive(url, model, c, max(args.requests, c), args.max_tokens))
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
