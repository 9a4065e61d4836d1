"""End to end: OpenAI HTTP frontend -> router -> request plane -> echo workers, and back.

    python benchmarks/e2e.py [--workers 2] [--concurrency 1,64] [--requests 256]
                             [--max-tokens 64] [--delay-ms 0] [--plot benchmarks/e2e.png]
                             [--request-plane tcp,tcp-only,mux]

Starts ``dynamo-backend run --engine echo --workers N --port 0`` (the echo engine at full
speed, so every figure is serving overhead: HTTP parsing, chat template and tokenizer,
routing, the request plane, detokenization, SSE), then for each concurrency level drives
``--requests`` streaming chat completions (``max_tokens`` tokens each, ``ignore_eos``) with
that many in flight, with the load generator of ``dynamo-backend bench``
(:mod:`dynamo_backend_common.cli.bench`) in this process. Prints requests/s, output tokens/s,
TTFT (request sent -> first content chunk) and ITL (gap between content chunks) p50 / p99, the
server's CPU per request (frontend process, worker processes; from ``/proc``), and saves the
TTFT and ITL distributions as a PNG (``--plot``).

``--tools`` sends one function tool with every request and starts the frontend with
``--tool-call-parser hermes``, so each reply streams through the tool-call parser (the echo
engine's text holds no calls: this is the parser's cost on content, the common case). The chat
template renders the tool into the prompt, which costs by itself; ``--tool-choice none`` sends
the same prompt without parsing, so ``--tools`` against ``--tools --tool-choice none`` is the
parser's cost alone. A run against an older checkout gives what the unused parsers cost.

``--request-plane`` picks the workers' request plane: ``tcp`` (the default: Dynamo 1.6.1's plane
plus our multiplexed fast path on a second port, which our frontend takes), ``tcp-only``
(``DYN_MUX_FASTPATH=0``: the path a Dynamo frontend takes, one connection per request) or
``mux`` (ours alone). A comma list runs each, one server after the other, and prints every
plane's CPU per request over the first one's.

The client shares the machine with the server: on a small machine the figures are a lower bound
of what the server alone could do (``--workers`` competes for the same cores too).
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import statistics
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

from dynamo_backend_common.cli.bench import Level, parse_levels, plot_cdfs, run_levels

_URL_RE = re.compile(r"Serving (\S+) at (http://\S+/v1)")


_PLANE_ENV = {"tcp": {"DYN_REQUEST_PLANE": "tcp", "DYN_MUX_FASTPATH": "1"},
              "tcp-only": {"DYN_REQUEST_PLANE": "tcp", "DYN_MUX_FASTPATH": "0"},
              "mux": {"DYN_REQUEST_PLANE": "mux"}}


TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}]


def start_server(workers: int, extra: list[str], plane: str = "tcp",
                 frontend: list[str] | None = None, engine: str = "echo",
                 ) -> tuple[subprocess.Popen[str], str, str]:
    """``dynamo-backend run --engine ENGINE --workers N --port 0 FRONTEND... EXTRA...``;
    (the process, the served model, the ``/v1`` URL) once it serves."""
    argv = [sys.executable, "-m", "dynamo_backend_common.cli", "run", "--engine", engine,
            "--workers", str(workers), "--port", "0", *(frontend or []), *extra]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=dict(os.environ, PYTHONUNBUFFERED="1", **_PLANE_ENV[plane]))
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


_TICK = os.sysconf("SC_CLK_TCK")


def _proc_table() -> dict[int, tuple[int, float]]:
    """``{pid: (ppid, cpu seconds)}`` of every process (Linux ``/proc``)."""
    out: dict[int, tuple[int, float]] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        # After the command: state ppid ... utime (11) stime (12), 0-based from state.
        out[int(d)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / _TICK)
    return out


def server_cpu(pid: int) -> tuple[float, float]:
    """(CPU seconds of ``pid``, of all its descendants): the frontend and its workers."""
    table = _proc_table()
    kids: dict[int, list[int]] = {}
    for p, (pp, _) in table.items():
        kids.setdefault(pp, []).append(p)
    total, todo = 0.0, list(kids.get(pid, []))
    while todo:
        p = todo.pop()
        total += table[p][1]
        todo += kids.get(p, [])
    return table.get(pid, (0, 0.0))[1], total


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
    p.add_argument("--request-plane", default="tcp",
                   help="the workers' request plane: tcp (Dynamo's plus our fast path, the "
                   "default), tcp-only (what a Dynamo frontend uses), mux (ours), or a comma "
                   "list to run each and compare")
    p.add_argument("--tools", action="store_true",
                   help="send a tool with every request, frontend --tool-call-parser hermes")
    p.add_argument("--tool-choice", default="auto", choices=["auto", "none"],
                   help="with --tools: auto parses every reply, none sends the same prompt "
                        "unparsed (the difference is the parser's cost)")
    args = p.parse_args()
    levels = parse_levels(args.concurrency)
    planes = [x.strip() for x in args.request_plane.split(",") if x.strip()]
    if not planes or any(x not in _PLANE_ENV for x in planes):
        p.error("--request-plane takes tcp, tcp-only and/or mux")

    if args.url:
        results = run_levels(args.url.rstrip("/"), args.model, levels, args.requests,
                             args.max_tokens, extra_body=_extra(args))
        cpu: dict[str, list[tuple[float, float]]] = {}
    else:
        results, cpu = [], {}
        for plane in planes:
            print(f"== request plane {plane}")
            r, cpu[plane] = run_server(args, levels, plane)
            results = results or r
    if args.plot and results:
        plot_cdfs(results, args.plot,
                  f"e2e: echo engine ({args.delay_ms:g} ms/token), {args.workers} worker(s), "
                  f"{args.max_tokens} tokens/request")
        print(f"plot saved to {args.plot}")
    ttft_all = [v for lvl in results for v in lvl.ttft]
    if ttft_all:
        print(f"(TTFT mean over all levels {statistics.mean(ttft_all) * 1e3:.2f} ms)")
    first = planes[0]
    for plane in planes[1:]:
        if plane in cpu and first in cpu:
            for c, (fp, wp), (f0, w0) in zip(levels, cpu[plane], cpu[first], strict=True):
                print(f"conc {c:>4}: CPU per request {plane} / {first}: workers {wp / w0:.2f}, "
                      f"frontend {fp / f0:.2f}, total {(fp + wp) / (f0 + w0):.2f}")
    return 0


def _extra(args: argparse.Namespace) -> dict[str, Any] | None:
    return {"tools": TOOLS, "tool_choice": args.tool_choice} if args.tools else None


def run_server(args: argparse.Namespace, levels: list[int],
               plane: str) -> tuple[list[Level], list[tuple[float, float]]]:
    """One server on ``plane``: the levels' results and (frontend, workers) CPU ms/request."""
    extra = ["--", "--delay-ms", str(args.delay_ms)] if args.delay_ms else []
    frontend = ["--tool-call-parser", "hermes"] if args.tools else []
    proc, model, url = start_server(args.workers, extra, plane, frontend)
    results, cpu = [], []
    body = _extra(args)
    try:
        run_levels(url, model, [1], 16, args.max_tokens, echo=False, extra_body=body)  # warm-up
        for i, c in enumerate(levels):
            f0, w0 = server_cpu(proc.pid)
            (lvl,) = run_levels(url, model, [c], args.requests, args.max_tokens,
                                echo=i == 0, extra_body=body)
            if i:
                print(lvl.row(), flush=True)
            f1, w1 = server_cpu(proc.pid)
            n = max(1, lvl.requests)
            cpu.append(((f1 - f0) * 1e3 / n, (w1 - w0) * 1e3 / n))
            results.append(lvl)
        for c, (f, w) in zip(levels, cpu, strict=True):
            print(f"conc {c:>4}: server CPU per request: frontend {f:.2f} ms, "
                  f"workers {w:.2f} ms")
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
    return results, cpu


if __name__ == "__main__":
    raise SystemExit(main())
