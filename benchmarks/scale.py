"""Scale: 1 -> 1000 concurrent streams through the frontend, CPU per token and memory per stream.

    python benchmarks/scale.py [--levels 1,10,100,1000] [--tokens 64] [--delay-ms 20]
                               [--workers 1] [--slow-readers 64] [--plot benchmarks/scale.png]
    python benchmarks/scale.py --breakdown 500    # where a stream's memory goes, by site

Starts ``dynamo-backend run --engine echo --workers N --port 0 -- --delay-ms D`` (the echo
engine paced at D ms per token, so streams overlap as they do on a real engine), then for each
level keeps that many streaming chat completions in flight (``--tokens`` tokens each) with the
load generator of ``dynamo-backend bench`` in this process, for ``--rounds`` streams per slot.
For every level it prints:

- requests/s and TTFT / ITL p50 and p99;
- the server's CPU per output token, frontend and workers apart (from ``/proc``, less what the
  idle server spends over the same time), and its ratio to the first level: flat means
  per-token work does not grow with the number of streams;
- memory per stream: the peak resident set during the level minus the idle one before it,
  divided by the streams in flight, for the frontend process and the workers together.

``--slow-readers K`` then starts a second server without the delay and opens K streams
(``--slow-n`` choices of ``--slow-tokens`` tokens each, by default all the model's context
leaves: ~3.5 MB of SSE per stream with the test model) whose clients read the status line and
then nothing more (a 4 KiB receive buffer, set before connecting), holds them for
``--slow-hold`` seconds, and prints the frontend's and workers' memory growth per slow stream.

``--processes 1,2`` (the default) then compares frontend processes where the frontend is the
bottleneck: for each count N a server ``run --engine echo --frontend-processes N`` with the
engine at full speed (no delay, so every figure is serving overhead), driven by
``--procs-concurrency`` streams (default 256) for ``--procs-requests`` requests. Printed per
N: requests/s, TTFT p50, and CPU ms per request of the frontend processes (all N together) and
of the workers (the CPU includes the load generator's warm-up of one short request per
connection); then N's requests/s and CPU per request over the first count's. Those servers
run ``--procs-rounds`` times each, alternating (medians).

``--breakdown N`` measures instead where that memory goes: it starts the server (echo at
``--breakdown-delay-ms``, default 1000: open, nearly idle streams) with ``tracemalloc`` on
in the frontend and worker processes, opens N streaming requests that stay open
(``--breakdown-tokens`` tokens each; the client reads them), snapshots every process, opens
N more and snapshots again, and prints each process's growth per stream (what tracemalloc
traces: Python's allocators, not the kernel's socket buffers; the resident set under
tracemalloc is no guide, as its own bookkeeping is several times the traced memory) and its
top allocation sites per stream, with the innermost frame of this package (or of uvicorn)
that led to each. The difference of the two snapshots is N streams exactly, none starting or
ending, so these are per-stream costs at steady state; ``--levels`` figures are peaks of
whole levels (the streams' start and end too). The snapshots are taken by a
``sitecustomize`` module this script writes to a temporary directory on the server's
``PYTHONPATH`` (``SIGUSR1`` dumps one).

The client shares the machine with the server: on a small machine the figures at high levels
include the client's own contention; a second frontend process can only add throughput where
there is an idle core for it (on a 2-core VM shared by client, frontend and worker there is
none, so that comparison shows the cost of the extra process, not its gain). Needs Linux
(``/proc``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import tracemalloc
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from e2e import start_server  # this directory's e2e.py: the same launcher

from dynamo_backend_common.cli.bench import DEFAULT_PROMPT, Level, drive, percentile
from dynamo_backend_common.runtime.loop import run_coroutine

_TICK = os.sysconf("SC_CLK_TCK")
_PAGE = os.sysconf("SC_PAGE_SIZE")


def _children(pid: int) -> list[int]:
    kids: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            kids.setdefault(ppid, []).append(int(d))
    out, todo = [], list(kids.get(pid, []))
    while todo:
        p = todo.pop()
        out.append(p)
        todo += kids.get(p, [])
    return out


def _cpu_s(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / _TICK


def _rss(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * _PAGE
    except OSError:
        return 0


@dataclass
class Server:
    proc: subprocess.Popen[str]
    model: str
    url: str
    workers: list[int] = field(default_factory=list)

    def cpu(self) -> tuple[float, float]:
        return _cpu_s(self.proc.pid), sum(_cpu_s(p) for p in self.workers)

    def rss(self) -> tuple[int, int]:
        return _rss(self.proc.pid), sum(_rss(p) for p in self.workers)

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


@dataclass
class ProcsRow:
    processes: int
    req_s: float
    ttft_ms: float
    front_ms: float
    workers_ms: float
    errors: int


def run_processes(n: int, args: argparse.Namespace) -> ProcsRow:
    """One ``run --frontend-processes n`` server with the echo engine at full speed: requests/s,
    TTFT p50, CPU ms per request of the frontend processes and of the workers."""
    proc, model, url = start_server(args.workers, [], frontend=["--frontend-processes", str(n)])
    try:
        kids = _children(proc.pid)
        fronts = [proc.pid, *(k for k in kids if "frontend.replicas" in _cmdline(k))]
        workers = [k for k in kids if " worker " in _cmdline(k)]
        if len(fronts) != n or len(workers) != args.workers:
            raise SystemExit(f"--frontend-processes {n}: found {len(fronts)} frontend and "
                             f"{len(workers)} worker processes")
        conc = args.procs_concurrency
        run_coroutine(drive(url, model, conc, conc, 16))  # warm-up: every connection
        f0, w0 = sum(map(_cpu_s, fronts)), sum(map(_cpu_s, workers))
        lvl = run_coroutine(drive(url, model, conc, max(conc, args.procs_requests),
                                  args.tokens, prompt=DEFAULT_PROMPT))
        f1, w1 = sum(map(_cpu_s, fronts)), sum(map(_cpu_s, workers))
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
    done = max(1, lvl.requests)
    return ProcsRow(n, lvl.requests / max(lvl.wall_s, 1e-9),
                    percentile(lvl.ttft, 0.5) * 1e3 if lvl.ttft else float("nan"),
                    (f1 - f0) * 1e3 / done, (w1 - w0) * 1e3 / done, lvl.errors)


def compare_processes(args: argparse.Namespace, counts: list[int]) -> list[ProcsRow]:
    """:func:`run_processes` for each count, ``--procs-rounds`` times alternating; medians."""
    runs: dict[int, list[ProcsRow]] = {n: [] for n in counts}
    for rnd in range(args.procs_rounds):
        for n in (counts if rnd % 2 == 0 else counts[::-1]):
            runs[n].append(run_processes(n, args))
    rows = []
    for n in counts:
        rs = runs[n]
        rows.append(ProcsRow(
            n, statistics.median(r.req_s for r in rs), statistics.median(r.ttft_ms for r in rs),
            statistics.median(r.front_ms for r in rs),
            statistics.median(r.workers_ms for r in rs), sum(r.errors for r in rs)))
    print(f"frontend processes: echo at full speed, {args.workers} worker(s), "
          f"{args.procs_concurrency} streams x {args.tokens} tokens, {args.procs_requests} "
          f"requests, medians of {args.procs_rounds} round(s)")
    print(f"{'procs':>5} {'req/s':>8} {'TTFT p50':>9} {'CPU/req front':>13} {'workers':>8} "
          f"{'total':>8} {'req/s x':>7} {'CPU/req x':>9} {'errors':>6}")
    first = rows[0]
    for r in rows:
        total = r.front_ms + r.workers_ms
        print(f"{r.processes:>5} {r.req_s:>8.1f} {r.ttft_ms:>7.1f}ms {r.front_ms:>10.3f} ms "
              f"{r.workers_ms:>5.3f} ms {total:>5.3f} ms {r.req_s / first.req_s:>6.2f}x "
              f"{total / (first.front_ms + first.workers_ms):>8.2f}x {r.errors:>6}", flush=True)
    print(f"(this machine has {os.cpu_count()} cores for the client, the frontend processes "
          "and the workers together)")
    return rows


def start(workers: int, delay_ms: float) -> Server:
    """``dynamo-backend run --engine echo`` at ``delay_ms`` per token (e2e.py's launcher)."""
    extra = ["--", "--delay-ms", str(delay_ms)] if delay_ms else []
    proc, model, url = start_server(workers, extra)
    srv = Server(proc, model, url)
    # The workers are the python processes under the launcher (not multiprocessing helpers).
    srv.workers = [p for p in _children(proc.pid) if _rss(p) > 30 << 20]
    return srv


class PeakRss:
    """Samples the server's resident sets every 20 ms on a thread; keeps the peaks."""

    def __init__(self, srv: Server) -> None:
        self.srv = srv
        self.peak = srv.rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            f, w = self.srv.rss()
            self.peak = (max(self.peak[0], f), max(self.peak[1], w))

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


@dataclass
class Row:
    level: Level
    cpu_front_us: float
    cpu_workers_us: float
    mem_front_kb: float
    mem_workers_kb: float


def idle_cpu_rate(srv: Server, seconds: float = 2.0) -> tuple[float, float]:
    """CPU seconds per second the idle server spends (timers, health canary, keep-alives)."""
    f0, w0 = srv.cpu()
    time.sleep(seconds)
    f1, w1 = srv.cpu()
    return (f1 - f0) / seconds, (w1 - w0) / seconds


def run_level(srv: Server, conc: int, args: argparse.Namespace,
              idle_rate: tuple[float, float]) -> Row:
    idle = srv.rss()
    f0, w0 = srv.cpu()
    t0 = time.monotonic()
    with PeakRss(srv) as peak:
        lvl = run_coroutine(drive(srv.url, srv.model, conc, conc * args.rounds, args.tokens,
                                  prompt=DEFAULT_PROMPT))
    f1, w1 = srv.cpu()
    wall = time.monotonic() - t0
    tokens = max(1, lvl.tokens)
    # What serving the tokens cost: the level's CPU less what the idle server spends anyway.
    front = max(0.0, f1 - f0 - idle_rate[0] * wall)
    workers = max(0.0, w1 - w0 - idle_rate[1] * wall)
    return Row(lvl, front * 1e6 / tokens, workers * 1e6 / tokens,
               max(0, peak.peak[0] - idle[0]) / conc / 1024,
               max(0, peak.peak[1] - idle[1]) / conc / 1024)


def _token_budget(srv: Server) -> int:
    """The tokens the model's context leaves after the benchmark prompt (``POST /tokenize``)."""
    base = srv.url.rsplit("/v1", 1)[0]
    body = json.dumps({"model": srv.model,
                       "messages": [{"role": "user", "content": DEFAULT_PROMPT}]}).encode()
    req = urllib.request.Request(base + "/tokenize", body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        info = json.load(r)
    return int(info["max_model_len"]) - int(info["count"])


def slow_readers(srv: Server, args: argparse.Namespace) -> tuple[float, float, int]:
    """Memory growth per never-reading stream (frontend, workers), in KiB, and the tokens per
    choice asked. ``srv`` should generate at full speed, so the streams back up as fast as
    they can."""
    host, port = srv.url.split("//", 1)[1].split("/", 1)[0].rsplit(":", 1)
    tokens = args.slow_tokens or _token_budget(srv)
    body = json.dumps({"model": srv.model, "max_tokens": tokens, "n": args.slow_n,
                       "stream": True, "ignore_eos": True,
                       "messages": [{"role": "user", "content": DEFAULT_PROMPT}]}).encode()
    request = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\n"
               f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
               ).encode() + body
    idle = srv.rss()
    socks = []
    with PeakRss(srv) as peak:
        for _ in range(args.slow_readers):
            s = socket.socket(socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET)
            # Before connecting, so the window the client advertises stays this small.
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            s.connect((host.strip("[]"), int(port)))
            s.sendall(request)
            socks.append(s)
        for s in socks:
            # The status line only (the request must have been accepted); the body stays unread.
            status = s.recv(12)
            if status != b"HTTP/1.1 200":
                raise SystemExit(f"--slow-readers: the request was refused: {status!r} "
                                 f"{s.recv(600)!r}")
        time.sleep(args.slow_hold)  # the measurement window: the streams back up meanwhile
    for s in socks:
        s.close()
    n = max(1, len(socks))
    return (max(0, peak.peak[0] - idle[0]) / n / 1024,
            max(0, peak.peak[1] - idle[1]) / n / 1024, tokens)


# The server processes' side of --breakdown: tracemalloc from the start, SIGUSR1 dumps a
# snapshot (after a full collection) to DIR/<pid>-<n>.snap and then writes DIR/<pid>-<n>.done.
_SITECUSTOMIZE = """
import os
_dir = os.environ.get("DYN_SCALE_TRACEMALLOC")
if _dir:
    import gc, signal, tracemalloc
    tracemalloc.start(32)
    _count = [0]

    def _dump(*_):
        gc.collect()
        _count[0] += 1
        path = f"{_dir}/{os.getpid()}-{_count[0]}"
        tracemalloc.take_snapshot().dump(path + ".snap")
        open(path + ".done", "w").close()

    signal.signal(signal.SIGUSR1, _dump)
"""


def _site(tb: tracemalloc.Traceback) -> str:
    """An allocation site: its innermost frame, and the innermost one of this package or of
    uvicorn that led to it when that is another."""
    def name(f: tracemalloc.Frame) -> str:
        path = f.filename
        for marker in ("dynamo_backend_common/", "site-packages/", "python3."):
            if marker in path:
                path = path.split(marker, 1)[1]
                if marker == "python3.":
                    path = path.split("/", 1)[-1]
                break
        return f"{path}:{f.lineno}"

    frames = list(tb)  # oldest first
    inner = name(frames[-1])
    for f in reversed(frames):
        if "dynamo_backend_common/" in f.filename or "/uvicorn/" in f.filename:
            ours = name(f)
            return inner if ours == inner else f"{inner} <- {ours}"
    return inner


def breakdown(args: argparse.Namespace) -> None:
    """``--breakdown N``: per-stream memory of N more open streams, by allocation site."""
    n = args.breakdown
    with tempfile.TemporaryDirectory(prefix="scale-tm-") as tmp:
        Path(tmp, "sitecustomize.py").write_text(_SITECUSTOMIZE)
        saved = dict(os.environ)
        os.environ["DYN_SCALE_TRACEMALLOC"] = tmp
        os.environ["PYTHONPATH"] = os.pathsep.join(
            p for p in (tmp, saved.get("PYTHONPATH")) if p)
        try:
            srv = start(args.workers, args.breakdown_delay_ms)
        finally:
            os.environ.clear()
            os.environ.update(saved)
        pids = [srv.proc.pid, *srv.workers]
        host, port = srv.url.split("//", 1)[1].split("/", 1)[0].rsplit(":", 1)
        body = json.dumps({"model": srv.model, "max_tokens": args.breakdown_tokens,
                           "stream": True, "ignore_eos": True,
                           "messages": [{"role": "user", "content": DEFAULT_PROMPT}]}).encode()
        request = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\n"
                   f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
                   ).encode() + body

        async def reader(started: list[int]) -> None:
            r, w = await asyncio.open_connection(host, int(port))
            w.write(request)
            first = await r.read(65536)
            if not first.startswith(b"HTTP/1.1 200"):
                raise SystemExit(f"--breakdown: the request failed: {first[:300]!r}")
            started[0] += 1
            while await r.read(65536):
                pass

        def snapshot(k: int) -> None:
            for pid in pids:
                os.kill(pid, signal.SIGUSR1)
            while not all(os.path.exists(f"{tmp}/{pid}-{k}.done") for pid in pids):
                time.sleep(0.1)

        async def drive_open() -> None:
            started = [0]
            tasks: list[asyncio.Task[None]] = []
            try:
                for k in (1, 2):
                    while len(tasks) < k * n:
                        tasks.append(asyncio.create_task(reader(started)))
                        if len(tasks) % 50 == 0:
                            await asyncio.sleep(0.05)  # a steady ramp, not one burst
                    while started[0] < k * n:
                        if any(t.done() for t in tasks):
                            for t in tasks:
                                if t.done():
                                    t.result()  # the failure, if any
                            raise SystemExit("--breakdown: a stream ended early")
                        await asyncio.sleep(0.1)
                    await asyncio.sleep(1.0)
                    await asyncio.to_thread(snapshot, k)  # the streams keep being read
            finally:
                for t in tasks:
                    t.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)

        try:
            run_coroutine(drive_open())
        finally:
            srv.stop()
        print(f"breakdown: {n} -> {2 * n} open streams (echo at {args.breakdown_delay_ms:g} "
              f"ms/token, {args.breakdown_tokens} tokens each, read as they come); growth per "
              "stream between the two snapshots:")
        drop = [tracemalloc.Filter(False, tracemalloc.__file__)]
        for i, pid in enumerate(pids):
            a = tracemalloc.Snapshot.load(f"{tmp}/{pid}-1.snap").filter_traces(drop)
            b = tracemalloc.Snapshot.load(f"{tmp}/{pid}-2.snap").filter_traces(drop)
            stats = b.compare_to(a, "traceback")
            traced = sum(st.size_diff for st in stats) / n / 1024
            what = "frontend" if i == 0 else f"worker {i}"
            print(f"{what} (pid {pid}): {traced:.1f} KB per stream")
            sites: dict[str, list[float]] = {}
            for st in stats:
                acc = sites.setdefault(_site(st.traceback), [0.0, 0.0])
                acc[0] += st.size_diff / n
                acc[1] += st.count_diff / n
            top = sorted(sites.items(), key=lambda kv: -kv[1][0])[:args.breakdown_top]
            for where, (size, count) in top:
                print(f"  {size:7.0f} B {count:6.2f} blocks  {where}")


def plot(rows: list[Row], path: str, title: str, procs: list[ProcsRow] | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [r.level.concurrency for r in rows]
    fig, axes = plt.subplots(1, 3 if procs else 2, figsize=(16.5 if procs else 11, 4))
    a, b = axes[0], axes[1]
    a.plot(xs, [r.cpu_front_us for r in rows], "o-", label="frontend")
    a.plot(xs, [r.cpu_workers_us for r in rows], "o-", label="workers")
    a.set_title("server CPU per output token")
    a.set_ylabel("µs")
    b.plot(xs, [r.mem_front_kb for r in rows], "o-", label="frontend")
    b.plot(xs, [r.mem_workers_kb for r in rows], "o-", label="workers")
    b.axhline(20, color="grey", linestyle="--", label="20 KB target")
    b.set_title("peak memory per concurrent stream")
    b.set_ylabel("KiB")
    for ax in (a, b):
        ax.set_xscale("log")
        ax.set_xlabel("concurrent streams")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    if procs:
        c = axes[2]
        names = [f"{r.processes} process{'es' if r.processes > 1 else ''}" for r in procs]
        pos = list(range(len(procs)))
        c.bar([x - 0.2 for x in pos], [r.req_s for r in procs], 0.4, label="requests/s")
        c.set_ylabel("requests/s")
        c2 = c.twinx()
        c2.bar([x + 0.2 for x in pos], [r.front_ms + r.workers_ms for r in procs], 0.4,
               color="tab:orange", label="server CPU ms/request")
        c2.set_ylabel("server CPU ms/request")
        c.set_xticks(pos, names)
        c.set_title("frontend processes (echo at full speed)")
        c.legend(loc="lower left")
        c2.legend(loc="lower right")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--levels", default="1,10,100,1000")
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--delay-ms", type=float, default=20.0)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--rounds", type=int, default=2, help="streams per slot and level")
    p.add_argument("--slow-readers", type=int, default=64)
    p.add_argument("--slow-tokens", type=int, default=0,
                   help="tokens per choice of a slow reader's stream (0: all the model's "
                        "context leaves)")
    p.add_argument("--slow-n", type=int, default=8, help="choices per slow reader's stream")
    p.add_argument("--slow-hold", type=float, default=5.0)
    p.add_argument("--processes", default="1,2",
                   help="frontend process counts to compare where the frontend is CPU-bound "
                        "(empty: skip)")
    p.add_argument("--procs-concurrency", type=int, default=256)
    p.add_argument("--procs-requests", type=int, default=4096)
    p.add_argument("--procs-rounds", type=int, default=3)
    p.add_argument("--plot", default=str(Path(__file__).with_name("scale.png")))
    p.add_argument("--breakdown", type=int, default=0, metavar="N",
                   help="only: where the memory of N more open streams goes (tracemalloc "
                        "in the server, by allocation site); see the module doc")
    p.add_argument("--breakdown-delay-ms", type=float, default=1000.0)
    p.add_argument("--breakdown-tokens", type=int, default=1024)
    p.add_argument("--breakdown-top", type=int, default=25,
                   help="allocation sites printed per process")
    args = p.parse_args()
    if args.breakdown:
        breakdown(args)
        return 0
    levels = [int(x) for x in args.levels.split(",") if x.strip()]
    if not levels or min(levels) < 1:
        p.error("--levels takes a comma list of positive integers")
    counts = [int(x) for x in args.processes.split(",") if x.strip()]
    if counts and min(counts) < 1:
        p.error("--processes takes a comma list of positive integers")

    srv = start(args.workers, args.delay_ms)
    rows: list[Row] = []
    try:
        run_coroutine(drive(srv.url, srv.model, 4, 8, 8))  # warm-up
        idle_rate = idle_cpu_rate(srv)
        print(f"{'streams':>7} {'req/s':>8} {'TTFT p50':>9} {'TTFT p99':>9} {'ITL p50':>8} "
              f"{'ITL p99':>8} {'CPU/token front':>15} {'workers':>8} {'x first':>7} "
              f"{'mem/stream front':>16} {'workers':>8} {'errors':>6}", flush=True)
        for conc in levels:
            r = run_level(srv, conc, args, idle_rate)
            rows.append(r)
            lvl, first = r.level, rows[0]
            total = r.cpu_front_us + r.cpu_workers_us
            ratio = total / max(1e-9, first.cpu_front_us + first.cpu_workers_us)

            def ms(v: list[float], q: float) -> str:
                return f"{percentile(v, q) * 1e3:7.1f}ms" if v else f"{'-':>9}"

            print(f"{conc:>7} {lvl.requests / max(lvl.wall_s, 1e-9):>8.1f} {ms(lvl.ttft, .5)} "
                  f"{ms(lvl.ttft, .99)} {ms(lvl.itl, .5)[1:]} {ms(lvl.itl, .99)[1:]} "
                  f"{r.cpu_front_us:>12.1f} µs {r.cpu_workers_us:>5.1f} µs {ratio:>6.2f}x "
                  f"{r.mem_front_kb:>13.1f} KB {r.mem_workers_kb:>5.1f} KB {lvl.errors:>6}",
                  flush=True)
            for reason in lvl.error_reasons:
                print(f"        error: {reason}", file=sys.stderr)
    finally:
        srv.stop()
    if args.slow_readers:
        fast = start(args.workers, 0.0)  # the engine at full speed: streams back up at once
        try:
            run_coroutine(drive(fast.url, fast.model, 2, 4, 8))  # warm-up
            front, workers, tokens = slow_readers(fast, args)
            print(f"slow readers: {args.slow_readers} streams of {args.slow_n} x {tokens} "
                  f"tokens never read for {args.slow_hold:g}s: memory growth per stream "
                  f"frontend {front:.0f} KB, workers {workers:.0f} KB", flush=True)
        finally:
            fast.stop()
    procs = compare_processes(args, counts) if counts else None
    if args.plot and rows:
        plot(rows, args.plot, f"scale: echo engine at {args.delay_ms:g} ms/token, "
             f"{args.tokens} tokens/stream, {args.workers} worker(s)", procs)
        print(f"plot saved to {args.plot}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
