"""``dynamo-backend bench``: a load generator for any OpenAI-compatible server.

For each concurrency level it keeps that many streaming chat completions in flight (one
keep-alive connection each) until ``requests`` have completed, and reports requests/s, output
tokens/s, TTFT (request sent -> first content chunk) and ITL (gap between content chunks)
p50 / p99. Each request asks for ``max_tokens`` tokens with ``ignore_eos`` and
``stream_options.include_usage`` (the token count comes from the usage event).

The client is a minimal HTTP/1.1 client over asyncio streams (plain ``http://`` only): a general
client such as httpx costs ~15 ms of CPU per 64-token stream, enough to starve the server under
test when both share a small machine. ``benchmarks/e2e.py`` drives the same code against a
server it starts itself and plots the distributions.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from .runtime.loop import run_coroutine

__all__ = ["DEFAULT_PROMPT", "Level", "drive", "main", "percentile", "run_levels"]

DEFAULT_PROMPT = ("Summarise the following in one sentence: the quick brown fox jumps over the "
                  "lazy dog while the cat watches from the windowsill.")
_CONTENT = b'"delta":{"content":"'
_LENGTH = re.compile(rb"(?i)content-length: *(\d+)")


@dataclass
class Level:
    """What one concurrency level measured (latencies in seconds)."""

    concurrency: int
    wall_s: float = 0.0
    requests: int = 0
    tokens: int = 0
    errors: int = 0
    ttft: list[float] = field(default_factory=list)
    itl: list[float] = field(default_factory=list)

    def row(self) -> str:
        """One line of the report table (see :data:`HEADER`)."""
        wall = self.wall_s or float("nan")
        return (f"{self.concurrency:>5} {self.requests / wall:>8.1f} {self.tokens / wall:>9.0f} "
                f"{percentile(self.ttft, 0.5) * 1e3:>7.2f}ms "
                f"{percentile(self.ttft, 0.99) * 1e3:>7.2f}ms "
                f"{percentile(self.itl, 0.5) * 1e3:>6.3f}ms "
                f"{percentile(self.itl, 0.99) * 1e3:>6.3f}ms {self.errors:>6}")


HEADER = (f"{'conc':>5} {'req/s':>8} {'tok/s':>9} {'TTFT p50':>9} {'TTFT p99':>9} "
          f"{'ITL p50':>8} {'ITL p99':>8} {'errors':>6}")


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q`` quantile (nearest rank) of ``values``; NaN when empty."""
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


class _Conn:
    """One keep-alive HTTP/1.1 connection: POST a JSON body, read the response head."""

    def __init__(self, host: str, port: int, headers: bytes) -> None:
        self.host, self.port = host, port
        self.headers = headers
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def post(self, path: str, body: bytes) -> tuple[int, asyncio.StreamReader, bool]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        assert self.reader is not None
        self.writer.write(
            b"POST %s HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\n%s"
            b"Content-Length: %d\r\n\r\n" % (path.encode(), self.host.encode(), self.headers,
                                             len(body))
            + body)
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        chunked = b"transfer-encoding: chunked" in head.lower()
        if not chunked:
            m = _LENGTH.search(head)
            await self.reader.readexactly(int(m.group(1)) if m else 0)
        return status, self.reader, chunked

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            await self.writer.wait_closed()


async def _one(conn: _Conn, path: str, body: bytes, lvl: Level) -> None:
    t0 = time.perf_counter()
    last = None
    status, reader, chunked = await conn.post(path, body)
    if status != 200 or not chunked:
        lvl.errors += 1
        if chunked:  # drain the error body so the connection stays usable
            while int((await reader.readuntil(b"\r\n"))[:-2], 16) != 0:
                pass
        return
    # One timestamp per received chunk (events written together arrive together); content
    # events are found by substring, JSON is parsed only for the usage event.
    while True:
        size = int((await reader.readuntil(b"\r\n"))[:-2], 16)
        data = await reader.readexactly(size + 2)
        if size == 0:
            break
        now = time.perf_counter()
        for _ in range(data.count(_CONTENT)):
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


def _body(model: str, prompt: str, max_tokens: int,
          extra: dict[str, Any] | None = None) -> bytes:
    return json.dumps({
        "model": model, "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens, "stream": True, "ignore_eos": True,
        "stream_options": {"include_usage": True}, **(extra or {})}).encode()


async def drive(url: str, model: str, concurrency: int, requests: int, max_tokens: int, *,
                prompt: str = DEFAULT_PROMPT, api_key: str | None = None,
                extra_body: dict[str, Any] | None = None) -> Level:
    """Run one level against ``url`` (the base URL ending in ``/v1``) and return it.
    ``extra_body`` adds fields to every request (e.g. ``tools``)."""
    parts = urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        raise ValueError(f"bench needs a plain http:// URL ending in /v1, got {url!r}")
    path = parts.path.rstrip("/") + "/chat/completions"
    headers = b"Authorization: Bearer %s\r\n" % api_key.encode() if api_key else b""
    conns = [_Conn(parts.hostname, parts.port or 80, headers) for _ in range(concurrency)]
    lvl = Level(concurrency)
    try:
        # Warm-up: connections, the tokenizer, the workers.
        warm = _body(model, prompt, 4, extra_body)
        await asyncio.gather(*(_one(c, path, warm, Level(0)) for c in conns))
        body = _body(model, prompt, max_tokens, extra_body)
        left = requests

        async def loop(conn: _Conn) -> None:
            nonlocal left
            while left > 0:
                left -= 1
                await _one(conn, path, body, lvl)

        t0 = time.perf_counter()
        await asyncio.gather(*(loop(c) for c in conns))
        lvl.wall_s = time.perf_counter() - t0
    finally:
        await asyncio.gather(*(c.close() for c in conns), return_exceptions=True)
    return lvl


def run_levels(url: str, model: str, levels: Sequence[int], requests: int, max_tokens: int, *,
               prompt: str = DEFAULT_PROMPT, api_key: str | None = None,
               echo: bool = True, extra_body: dict[str, Any] | None = None) -> list[Level]:
    """Run each concurrency level in turn (each with at least as many requests as in flight),
    printing the table as it goes when ``echo``."""
    if echo:
        print(HEADER, flush=True)
    results = []
    for c in levels:
        lvl = run_coroutine(drive(url, model, c, max(requests, c), max_tokens, prompt=prompt,
                                  api_key=api_key, extra_body=extra_body))
        results.append(lvl)
        if echo:
            print(lvl.row(), flush=True)
    return results


def add_bench_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", default="http://127.0.0.1:8000/v1",
                   help="base URL of the server, ending in /v1 (default: %(default)s)")
    p.add_argument("--model", default="tiny-model", help="model name (default: %(default)s)")
    p.add_argument("--concurrency", default="1,64",
                   help="comma list of concurrency levels (default: %(default)s)")
    p.add_argument("--requests", type=int, default=256,
                   help="completed requests per level (default: %(default)s)")
    p.add_argument("--max-tokens", type=int, default=64,
                   help="tokens per request, ignore_eos (default: %(default)s)")
    p.add_argument("--prompt", default=DEFAULT_PROMPT, help="the user message")
    p.add_argument("--api-key", default=None, help="Bearer key, if the server needs one")


def parse_levels(text: str) -> list[int]:
    try:
        levels = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise SystemExit(f"--concurrency must be a comma list of integers, got {text!r}") from None
    if not levels or min(levels) < 1:
        raise SystemExit(f"--concurrency levels must be >= 1, got {text!r}")
    return levels


def main(args: argparse.Namespace) -> int:
    """Entry point of ``dynamo-backend bench``; exit 1 when any request failed."""
    levels = parse_levels(args.concurrency)
    try:
        results = run_levels(args.url.rstrip("/"), args.model, levels, args.requests,
                             args.max_tokens, prompt=args.prompt, api_key=args.api_key)
    except (OSError, ValueError) as exc:
        raise SystemExit(f"bench: {exc}") from None
    return 1 if any(lvl.errors for lvl in results) else 0
