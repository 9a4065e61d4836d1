"""``dynamo-backend bench``: a load generator for any OpenAI-compatible server.

For each concurrency level it keeps that many streaming chat completions in flight (one
keep-alive connection each) until ``requests`` have completed, and reports requests/s, output
tokens/s, TTFT (request sent -> first content chunk) and ITL (gap between content chunks)
p50 / p99. Each request asks for ``max_tokens`` tokens with ``ignore_eos`` and
``stream_options.include_usage`` (the token count comes from the usage event).

While a level runs, a progress line goes to stderr every second and once at its end
(``conc C: done/total done, R req/s, E errors, Ts``). A request fails on a non-200 status, an
error event inside the stream (``data: {"error": ...}``) or a broken connection; the first few
distinct reasons (status and body, or the exception) are printed to stderr under the level's
row, and percentiles with no sample print as ``-``. ``--plot PATH`` saves the TTFT and ITL CDFs
of every level as a PNG (:func:`plot_cdfs`, needs matplotlib).

The client is a minimal HTTP/1.1 client over asyncio streams (plain ``http://`` only): a general
client such as httpx costs ~15 ms of CPU per 64-token stream, enough to starve the server under
test when both share a small machine. ``benchmarks/e2e.py`` drives the same code against a
server it starts itself and plots the distributions with :func:`plot_cdfs`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import re
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from ..runtime.loop import run_coroutine

__all__ = ["DEFAULT_PROMPT", "Level", "drive", "main", "percentile", "plot_cdfs",
           "run_levels"]

DEFAULT_PROMPT = ("Summarise the following in one sentence: the quick brown fox jumps over the "
                  "lazy dog while the cat watches from the windowsill.")
_CONTENT = b'"delta":{"content":"'
_ERROR_EVENT = b'data: {"error"'
_LENGTH = re.compile(rb"(?i)content-length: *(\d+)")
#: Distinct failure reasons a level keeps (the first ones seen), and the length kept of each.
MAX_ERROR_REASONS = 3
_REASON_CHARS = 300


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
    #: The first :data:`MAX_ERROR_REASONS` distinct failure reasons, e.g. ``HTTP 404: {...}``.
    error_reasons: list[str] = field(default_factory=list)

    def fail(self, reason: str) -> None:
        """Count one failed request; keep ``reason`` if it is new and there is room."""
        self.errors += 1
        reason = reason.strip()[:_REASON_CHARS]
        if len(self.error_reasons) < MAX_ERROR_REASONS and reason not in self.error_reasons:
            self.error_reasons.append(reason)

    def row(self) -> str:
        """One line of the report table (see :data:`HEADER`); ``-`` where there is no sample."""
        wall = self.wall_s or float("nan")

        def ms(values: list[float], q: float, width: int, digits: int) -> str:
            if not values:
                return f"{'-':>{width + 2}}"
            return f"{percentile(values, q) * 1e3:>{width}.{digits}f}ms"

        return (f"{self.concurrency:>5} {self.requests / wall:>8.1f} {self.tokens / wall:>9.0f} "
                f"{ms(self.ttft, 0.5, 7, 2)} {ms(self.ttft, 0.99, 7, 2)} "
                f"{ms(self.itl, 0.5, 6, 3)} {ms(self.itl, 0.99, 6, 3)} {self.errors:>6}")


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
        self.server_closes = False

    async def post(self, path: str, body: bytes
                   ) -> tuple[int, asyncio.StreamReader, bool, bytes]:
        """Send the request; ``(status, reader, chunked, body)``, ``body`` read already unless
        the response is chunked (then the caller reads it from ``reader``)."""
        await self.connect()
        assert self.reader is not None and self.writer is not None
        self.writer.write(
            b"POST %s HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\n%s"
            b"Content-Length: %d\r\n\r\n" % (path.encode(), self.host.encode(), self.headers,
                                             len(body))
            + body)
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        lower = head.lower()
        chunked = b"transfer-encoding: chunked" in lower
        self.server_closes = b"connection: close" in lower  # reconnect for the next request
        data = b""
        if not chunked:
            m = _LENGTH.search(head)
            data = await self.reader.readexactly(int(m.group(1)) if m else 0)
        return status, self.reader, chunked, data

    async def connect(self) -> None:
        """Open the connection unless it is open."""
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)

    async def close(self) -> None:
        """Close the connection (the next :meth:`post` opens a new one)."""
        writer, self.reader, self.writer = self.writer, None, None
        if writer is not None:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()


async def _read_chunk(reader: asyncio.StreamReader) -> bytes | None:
    """One chunk of a chunked body (with its CRLF stripped), ``None`` at the last one."""
    size = int((await reader.readuntil(b"\r\n"))[:-2], 16)
    data = await reader.readexactly(size + 2)
    return data[:-2] if size else None


async def _one(conn: _Conn, path: str, body: bytes, lvl: Level) -> None:
    """One streaming request, recorded in ``lvl`` (a failure with its reason). A broken
    connection fails the request and is replaced by a new one for the next; failing to connect
    raises (``OSError``: the server is not there)."""
    await conn.connect()
    try:
        await _stream(conn, path, body, lvl)
    except (OSError, EOFError, ValueError, asyncio.LimitOverrunError) as exc:
        await conn.close()
        lvl.fail(f"connection: {type(exc).__name__}: {exc}")
    else:
        if conn.server_closes:
            await conn.close()


async def _stream(conn: _Conn, path: str, body: bytes, lvl: Level) -> None:
    t0 = time.perf_counter()
    last = None
    status, reader, chunked, data = await conn.post(path, body)
    if status != 200 or not chunked:
        if chunked:  # read the error body, which also keeps the connection usable
            parts = []
            while (part := await _read_chunk(reader)) is not None:
                parts.append(part)
            data = b"".join(parts)
        lvl.fail(f"HTTP {status}: {data.decode(errors='replace')}")
        return
    # One timestamp per received chunk (events written together arrive together); content
    # events are found by substring, JSON is parsed only for the usage event.
    failed = b""
    while True:
        chunk = await _read_chunk(reader)
        if chunk is None:
            break
        data = chunk
        if not failed and _ERROR_EVENT in data:
            event = data[data.index(_ERROR_EVENT) + 6:]
            failed = event.split(b"\n", 1)[0] or b"(empty error event)"
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
    if failed:
        lvl.fail(f"error event in a 200 stream: {failed.decode(errors='replace')}")
    else:
        lvl.requests += 1


def _body(model: str, prompt: str, max_tokens: int,
          extra: dict[str, Any] | None = None) -> bytes:
    return json.dumps({
        "model": model, "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens, "stream": True, "ignore_eos": True,
        "stream_options": {"include_usage": True}, **(extra or {})}).encode()


#: ``progress(level, total, elapsed_s)``: called about once a second while a level runs and
#: once when it ends.
Progress = Callable[[Level, int, float], None]


def print_progress(lvl: Level, total: int, elapsed: float) -> None:
    """The default :data:`Progress`: one line on stderr."""
    done = lvl.requests + lvl.errors
    rate = lvl.requests / elapsed if elapsed > 0 else 0.0
    print(f"conc {lvl.concurrency}: {done}/{total} done, {rate:.1f} req/s, {lvl.errors} errors, "
          f"{elapsed:.1f}s", file=sys.stderr, flush=True)


async def drive(url: str, model: str, concurrency: int, requests: int, max_tokens: int, *,
                prompt: str = DEFAULT_PROMPT, api_key: str | None = None,
                extra_body: dict[str, Any] | None = None, progress: Progress | None = None,
                progress_interval_s: float = 1.0,
                prompts: Sequence[str] | None = None) -> Level:
    """Run one level against ``url`` (the base URL ending in ``/v1``) and return it.
    ``extra_body`` adds fields to every request (e.g. ``tools``); ``progress`` is called every
    ``progress_interval_s`` while the level runs, and once at its end. ``prompts`` (instead of
    ``prompt``): the requests take these user messages in turn."""
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
        bodies = [_body(model, p, max_tokens, extra_body) for p in (prompts or [prompt])]
        left = requests

        async def loop(conn: _Conn) -> None:
            nonlocal left
            while left > 0:
                left -= 1
                await _one(conn, path, bodies[left % len(bodies)], lvl)

        t0 = time.perf_counter()
        work = asyncio.gather(*(loop(c) for c in conns))
        try:
            while True:
                done, _ = await asyncio.wait({work}, timeout=progress_interval_s)
                if done:
                    break
                if progress is not None:
                    progress(lvl, requests, time.perf_counter() - t0)
        finally:
            if not work.done():
                work.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await work
        work.result()
        lvl.wall_s = time.perf_counter() - t0
        if progress is not None:
            progress(lvl, requests, lvl.wall_s)
    finally:
        await asyncio.gather(*(c.close() for c in conns), return_exceptions=True)
    return lvl


def run_levels(url: str, model: str, levels: Sequence[int], requests: int, max_tokens: int, *,
               prompt: str = DEFAULT_PROMPT, api_key: str | None = None,
               echo: bool = True, extra_body: dict[str, Any] | None = None,
               prompts: Sequence[str] | None = None) -> list[Level]:
    """Run each concurrency level in turn (each with at least as many requests as in flight).
    With ``echo``: the table on stdout as it goes, progress and the failure reasons on stderr.
    ``prompts``: see :func:`drive`."""
    if echo:
        print(HEADER, flush=True)
    results = []
    for c in levels:
        total = max(requests, c)
        lvl = run_coroutine(drive(url, model, c, total, max_tokens, prompt=prompt,
                                  api_key=api_key, extra_body=extra_body,
                                  progress=print_progress if echo else None,
                                  prompts=prompts))
        results.append(lvl)
        if echo:
            print(lvl.row(), flush=True)
            if lvl.errors:
                print(f"conc {c}: {lvl.errors} of {total} requests failed; first errors:\n"
                      + "\n".join(f"  {r}" for r in lvl.error_reasons),
                      file=sys.stderr, flush=True)
    return results


def plot_cdfs(levels: Sequence[Level], path: str, title: str = "") -> None:
    """Save the TTFT and ITL CDFs of ``levels`` (one curve per level, log ms axis) as an image
    at ``path`` (format from its suffix). Needs matplotlib; raises ``ImportError`` without it."""
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
        if ax.get_lines():
            ax.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


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
    p.add_argument("--plot", default=None, metavar="PATH",
                   help="save the TTFT and ITL CDFs of every level as an image (PNG by the "
                        "suffix; needs matplotlib)")


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
    if args.plot:
        try:
            import matplotlib  # noqa: F401  (fail before the run, not after it)
        except ImportError:
            raise SystemExit("bench: --plot needs matplotlib (pip install matplotlib)") from None
    try:
        results = run_levels(args.url.rstrip("/"), args.model, levels, args.requests,
                             args.max_tokens, prompt=args.prompt, api_key=args.api_key)
    except (OSError, ValueError) as exc:
        raise SystemExit(f"bench: {exc}") from None
    if args.plot:
        plot_cdfs(results, args.plot, f"bench: {args.model} at {args.url}, "
                                      f"{args.max_tokens} tokens/request")
        print(f"plot saved to {args.plot}", file=sys.stderr, flush=True)
    return 1 if any(lvl.errors for lvl in results) else 0
