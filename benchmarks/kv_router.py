"""KV-aware routing benchmark: (a) the indexer and router alone, (b) kv vs round_robin end to end.

(a) Indexer and router, in process. 16 workers x 100k cached blocks each, filled by ``stored``
events of 16 blocks (100k events). Part of every worker's cache is a random prefix of some "hot"
4k-token prompts built on 8 shared system prompts, so lookups see real, varied overlaps; the rest
is filler. Prints events/s ingested (decoded, and from msgpack bytes as they come off the event
plane), then per decision p50/p99 latency and decisions/s for ``find_matches`` alone, ``select``
with precomputed block hashes, and ``select`` from tokens (hashing included: what the frontend
pays per request).

(b) Shared-prefix multi-turn chat (``workload.SharedPrefixWorkload``: 16 system prompts of 2k
tokens, 128 conversations x 3 turns, 64 user tokens per turn, 16-48 output tokens) against 4
mocker worker subprocesses (``dynamo-backend worker --engine mocker``, file discovery, ZMQ event
plane), routed by the in-process frontend stack (ModelManager + Router + EngineClient) with
``kv`` and with ``round_robin``, each run on fresh workers, ``--repeat`` runs per mode
interleaved (the figures pool them; a shared or busy host is noisy). Two loads: a closed loop
(``--sessions`` conversations at a time, back to back: throughput at capacity) and an open loop
(``--rate`` new conversations per second, Poisson: the same offered load for both modes, so TTFT
compares at equal load). A conversation's turns go one after another, each sending the whole
history. The mockers run their default cost model (an 8B model on one H100) at
``--speedup-ratio`` 10, with 1024 KV blocks each: a quarter of the prompts' shared prefixes fit
on a worker, all of them do not, so where a prompt goes decides whether its prefix is reused.
The kv router runs with ``--busy-threshold 0.7``. The OpenAI HTTP layer is left out: it is the
same code for both modes. Prints TTFT p50/p99, request and output-token throughput and the
prefix cache hit rate the workers report, side by side, and writes a PNG (``--plot``).

    .venv/bin/python benchmarks/kv_router.py                 # both parts, about 1.5 min
    .venv/bin/python benchmarks/kv_router.py --part index --index-workers 16 --index-blocks 100000
    .venv/bin/python benchmarks/kv_router.py --part e2e --sessions 16 --repeat 1 --plot ''
    .venv/bin/python benchmarks/kv_router.py --help           # every size and router knob
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import math
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from prometheus_client import CollectorRegistry

from dynamo_backend_common import Context, PreprocessedRequest, StopConditions
from dynamo_backend_common.frontend.engine_client import EngineClient
from dynamo_backend_common.frontend.model_manager import ModelManager
from dynamo_backend_common.frontend.routing import Router
from dynamo_backend_common.kv.hashing import block_hashes
from dynamo_backend_common.protocols.codec import to_msgpack
from dynamo_backend_common.protocols.kv import (
    KvCacheEvent,
    KvStored,
    RouterEvent,
    StoredBlock,
    decode_kv_events,
    encode_kv_events,
)
from dynamo_backend_common.router import KvIndexer, KvRouter, KvRouterConfig, WorkerKey
from dynamo_backend_common.runtime.discovery import open_discovery
from dynamo_backend_common.runtime.events import open_event_plane
from dynamo_backend_common.workload import SharedPrefixWorkload, WorkloadRequest

MODEL = "bench"


# -- (a) indexer and router -----------------------------------------------------------------


def build_events(
    workers: int, blocks: int, block_size: int, prompt_tokens: int, rng: random.Random
) -> tuple[list[RouterEvent], list[list[int]]]:
    """Events filling each worker to ``blocks`` blocks, and the hot prompts (token ids)."""
    system = [[rng.randrange(32000) for _ in range(1024)] for _ in range(8)]
    hot = [
        system[i % 8] + [rng.randrange(32000) for _ in range(prompt_tokens - 1024)]
        for i in range(64)
    ]
    hot_hashes = [block_hashes(p, block_size) for p in hot]
    events: list[RouterEvent] = []
    for w in range(workers):
        held: list[int] = []
        seen: set[int] = set()
        for p in rng.sample(range(len(hot)), 24):  # 24 hot prompts, a random prefix of each
            for h in hot_hashes[p][: rng.randrange(1, len(hot_hashes[p]) + 1)]:
                if h not in seen:
                    seen.add(h)
                    held.append(h)
        while len(held) < blocks:  # filler: other requests' blocks (opaque 64-bit hashes)
            held.append(rng.getrandbits(64))
        for eid, i in enumerate(range(0, blocks, 16)):
            chunk = held[i : i + 16]
            data = KvStored(blocks=[StoredBlock(h) for h in chunk])
            events.append(RouterEvent(worker_id=w, event=KvCacheEvent(eid, data)))
    # Interleave workers the way a subscriber would see them.
    events.sort(key=lambda e: (e.event.event_id, e.worker_id))
    return events, hot


def percentiles(samples_ns: list[int]) -> tuple[float, float, float]:
    """p50, p99 (microseconds) and calls per second from per-call nanoseconds."""
    q = statistics.quantiles(samples_ns, n=100, method="inclusive")
    return q[49] / 1e3, q[98] / 1e3, 1e9 / statistics.fmean(samples_ns)


def time_calls(fn: Callable[[int], object], n: int) -> list[int]:
    out = []
    clock = time.perf_counter_ns
    for i in range(n):
        t0 = clock()
        fn(i)
        out.append(clock() - t0)
    return out


def bench_index(args: argparse.Namespace) -> None:
    print(f"== (a) KV indexer and router: {args.index_workers} workers x {args.index_blocks:,} "
          f"blocks, block size {args.index_block_size}")
    rng = random.Random(args.seed)
    bs = args.index_block_size

    t0 = time.perf_counter()
    events, hot = build_events(
        args.index_workers, args.index_blocks, bs, args.index_prompt_tokens, rng
    )
    print(f"  setup: {len(events)} events built in {time.perf_counter() - t0:.1f} s")

    idx = KvIndexer()
    t0 = time.perf_counter()
    for e in events:
        idx.apply(e)
    dt = time.perf_counter() - t0
    n_blocks = sum(len(e.event.data.blocks) for e in events if isinstance(e.event.data, KvStored))
    print(
        f"  ingest (decoded): {len(events) / dt:>10,.0f} events/s  {n_blocks / dt:>12,.0f} blocks/s"
        f"  ({dt:.2f} s; index: {idx.num_workers} workers, {idx.num_blocks:,} distinct blocks)"
    )

    wire = [encode_kv_events([e]) for e in events]  # Dynamo's kv-events messages
    idx2 = KvIndexer()
    t0 = time.perf_counter()
    for raw in wire:
        for e in decode_kv_events(raw)[0]:
            idx2.apply(e)
    dt = time.perf_counter() - t0
    print(
        f"  ingest (msgpack): {len(events) / dt:>10,.0f} events/s  {n_blocks / dt:>12,.0f} blocks/s"
    )
    # Drop the event objects (1.7M GC-tracked structs) before timing routes: a live frontend
    # does not keep them, and full GC passes over them would inflate the tail latency.
    del idx2, wire, events
    gc.collect()

    cfg = KvRouterConfig(block_size=bs)
    router = KvRouter(idx, cfg, random.Random(args.seed))
    workers: list[WorkerKey] = [(w, 0) for w in range(args.index_workers)]
    for w in workers:
        router.add_worker(w)
    # Route hot prompts with a fresh user tail (the last block differs), as a next turn would.
    prompts = [p[:-bs] + [rng.randrange(32000) for _ in range(bs)] for p in hot]
    hashes = [block_hashes(p, bs) for p in prompts]
    n = args.decisions
    m = len(prompts)
    overlaps = [max(idx.find_matches(h).values(), default=0) for h in hashes]
    print(
        f"  route: {args.index_workers} workers, {len(hashes[0])}-block prompts, best overlap "
        f"mean {statistics.fmean(overlaps):.0f} blocks"
    )
    for label, fn in (
        ("find_matches", lambda i: idx.find_matches(hashes[i % m])),
        (
            "select (hashes given)",
            lambda i: router.select(prompts[i % m], block_hashes=hashes[i % m]),
        ),
        ("select (from tokens)", lambda i: router.select(prompts[i % m])),
        ("block_hashes only", lambda i: block_hashes(prompts[i % m], bs)),
    ):
        time_calls(fn, min(n, 200))  # warm up
        p50, p99, rate = percentiles(time_calls(fn, n))
        print(f"    {label:<22} p50 {p50:8.1f} us  p99 {p99:8.1f} us  {rate:>10,.0f} /s")



# -- (b) end to end: kv vs round_robin on mocker workers ------------------------------------


@dataclass
class ModeResult:
    """What one routing mode achieved on the workload."""

    mode: str
    ttft_ms: list[float] = field(default_factory=list)
    requests: int = 0
    output_tokens: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    wall_s: float = 0.0
    predicted_overlap: float | None = None
    per_worker: list[int] = field(default_factory=list)
    per_worker_runs: list[list[int]] = field(default_factory=list)

    def q(self, p: float) -> float:
        return statistics.quantiles(self.ttft_ms, n=1000, method="inclusive")[int(p * 10) - 1]

    def merge(self, other: ModeResult) -> None:
        """Pool ``other`` (another run of the same mode) into this one."""
        self.ttft_ms += other.ttft_ms
        for name in ("requests", "output_tokens", "prompt_tokens", "cached_tokens", "wall_s"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        if other.predicted_overlap is not None:
            runs = len(self.per_worker_runs)
            prev = self.predicted_overlap or 0.0
            self.predicted_overlap = (prev * runs + other.predicted_overlap) / (runs + 1)
        self.per_worker_runs.append(other.per_worker)


def worker_argv(args: argparse.Namespace, discovery_url: str) -> list[str]:
    return [
        sys.executable, "-m", "dynamo_backend_common.cli", "worker", "--engine", "mocker",
        "--discovery", discovery_url, "--events", "zmq://", "--served-model-name", MODEL,
        "--graceful-shutdown-grace-secs", "0",
        "--",
        "--speedup-ratio", str(args.speedup_ratio),
        "--block-size", str(args.block_size),
        "--num-gpu-blocks", str(args.num_gpu_blocks),
        "--max-num-seqs", str(args.max_num_seqs),
    ]  # fmt: skip


def start_workers(args: argparse.Namespace, discovery_url: str, logs: Path) -> list[
    subprocess.Popen[bytes]
]:
    procs = []
    for i in range(args.workers):
        with open(logs / f"worker{i}.log", "wb") as log:
            procs.append(subprocess.Popen(worker_argv(args, discovery_url), stdout=log,
                                          stderr=subprocess.STDOUT))
    return procs


def stop_workers(procs: list[subprocess.Popen[bytes]]) -> None:
    for p in procs:
        if p.poll() is None:
            p.terminate()
    for p in procs:
        try:
            p.wait(20)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


async def send_direct(client: EngineClient, instance_id: int, tokens: list[int]) -> None:
    """Serve a request on one given worker, bypassing the router (warm-up probes)."""
    entry = client.models.models[MODEL]
    worker = entry.workers[instance_id]
    # Several steps, so the worker's load changes and it publishes a snapshot at once (a
    # one-step request starts and ends at zero blocks in use: only the heartbeat would tell).
    request = PreprocessedRequest(token_ids=tokens, stop_conditions=StopConditions(max_tokens=4))
    stream = client.transport.stream(worker.info, to_msgpack(request), Context())
    try:
        async for _ in stream:
            pass
    finally:
        await stream.aclose()


async def warm_up(client: EngineClient, router: Router, rng: random.Random, bs: int) -> None:
    """One tiny probe per worker; in kv mode repeat until the router has seen each worker's KV
    events and a load snapshot (ZMQ subscriptions reach publishers a moment after they are
    made, and what is published before is lost)."""
    ids = list(client.models.models[MODEL].workers)
    for iid in ids:
        for _ in range(50):
            await send_direct(client, iid, [rng.randrange(32000) for _ in range(bs)])
            if router.mode != "kv":
                break
            with contextlib.suppress(TimeoutError):
                await router.wait_for(lambda iid=iid: (iid, 0) in router.indexer.workers()
                                      and router.load((iid, 0)) is not None, timeout=0.2)
                break
        else:
            raise RuntimeError(f"no KV events from worker {iid:x}")


async def drive(
    client: EngineClient,
    conversations: list[list[WorkloadRequest]],
    sessions: int,
    mode: str,
    rate: float = 0.0,
) -> ModeResult:
    result = ModeResult(mode)
    queue = list(reversed(conversations))

    async def one(req: WorkloadRequest) -> None:
        # Output lengths vary (50-150 % of the workload's), the same in every mode: identical
        # lengths would keep requests that start together in lockstep forever.
        max_tokens = random.Random(f"{req.index}").randint(req.max_tokens // 2,
                                                          req.max_tokens * 3 // 2)
        request = PreprocessedRequest(
            token_ids=req.token_ids,
            stop_conditions=StopConditions(max_tokens=max_tokens, ignore_eos=True),
        )
        t0 = time.perf_counter()
        first: float | None = None
        async for chunk in client.generate(MODEL, request, Context()):
            if first is None and chunk.token_ids:
                first = time.perf_counter()
            result.output_tokens += len(chunk.token_ids)
            u = chunk.completion_usage
            if u is not None:
                result.prompt_tokens += u.prompt_tokens
                if u.prompt_tokens_details is not None:
                    result.cached_tokens += u.prompt_tokens_details.cached_tokens or 0
        assert first is not None
        result.ttft_ms.append((first - t0) * 1e3)
        result.requests += 1

    async def session() -> None:
        while queue:
            for req in queue.pop():
                await one(req)

    async def conversation(start: float, turns: list[WorkloadRequest]) -> None:
        await asyncio.sleep(max(0.0, start - time.perf_counter()))  # its arrival time
        for req in turns:
            await one(req)

    t0 = time.perf_counter()
    if rate > 0:  # open loop: conversations arrive as a Poisson process, whatever the speed
        rng = random.Random("arrivals")
        at = t0
        starts = []
        for _ in conversations:
            at += rng.expovariate(rate)
            starts.append(at)
        await asyncio.gather(*(conversation(a, c) for a, c in zip(starts, conversations,
                                                                   strict=True)))
    else:
        await asyncio.gather(*(session() for _ in range(sessions)))
    result.wall_s = time.perf_counter() - t0
    return result


async def run_mode(
    mode: str, args: argparse.Namespace, conversations: list[list[WorkloadRequest]], rate: float
) -> ModeResult:
    tmp = Path(tempfile.mkdtemp(prefix="kv-router-bench-"))
    discovery_url = f"file://{tmp / 'discovery'}"
    procs = start_workers(args, discovery_url, tmp)
    try:
        discovery = open_discovery(discovery_url)
        await discovery.start()
        events = open_event_plane("zmq://", discovery=discovery)
        await events.start()
        models = ModelManager(discovery)
        await models.start()
        registry = CollectorRegistry()
        router = Router(models, mode, events=events, seed=args.seed, registry=registry,
                        overlap_weight=args.kv_overlap_weight,
                        temperature=args.router_temperature,
                        busy_threshold=args.busy_threshold)
        client = EngineClient(models, router)
        try:
            await models.wait_for_model(MODEL, workers=args.workers, timeout=60)
            await warm_up(client, router, random.Random(args.seed), args.block_size)
            result = await drive(client, conversations, args.sessions, mode, rate)
            result.per_worker = sorted(
                (n for (m, _), n in router.decisions.items() if m == MODEL), reverse=True)
            if mode == "kv":
                overlap = _metric_sum(registry, "dynamo_frontend_router_overlap_blocks_total")
                prompt = _metric_sum(registry, "dynamo_frontend_router_prompt_blocks_total")
                result.predicted_overlap = overlap / prompt if prompt else None
        finally:
            await client.close()
            await router.close()
            await models.close()
            await events.close()
            await discovery.close()
    except BaseException:
        dump_logs(tmp)
        raise
    finally:
        stop_workers(procs)
        shutil.rmtree(tmp, ignore_errors=True)
    return result


def dump_logs(tmp: Path) -> None:
    for log in sorted(tmp.glob("worker*.log")):
        print(f"--- {log.name}\n{log.read_text(errors='replace')[-2000:]}", file=sys.stderr)


def _metric_sum(registry: CollectorRegistry, name: str) -> float:
    return sum(
        s.value for metric in registry.collect() for s in metric.samples if s.name == name
    )


def conversations_of(workload: SharedPrefixWorkload) -> list[list[WorkloadRequest]]:
    by_conv: dict[int, list[WorkloadRequest]] = {}
    for req in workload.requests():
        by_conv.setdefault(req.conversation, []).append(req)
    return [sorted(turns, key=lambda r: r.turn) for _, turns in sorted(by_conv.items())]


def report(results: Sequence[ModeResult]) -> None:
    def row(label: str, values: list[float], fmt: str, better: str) -> None:
        cells = "".join(f"{v:>14{fmt}}" for v in values)
        ratio = values[0] / values[1] if len(values) == 2 and values[1] else float("nan")
        print(f"  {label:<26}{cells}{ratio:>12.2f}x  ({better} is better)")

    print(f"  {'':<26}" + "".join(f"{r.mode:>14}" for r in results) + f"{'kv/rr':>13}")
    row("TTFT p50 (ms)", [r.q(50) for r in results], ".1f", "lower")
    row("TTFT p99 (ms)", [r.q(99) for r in results], ".1f", "lower")
    row("TTFT mean (ms)", [statistics.fmean(r.ttft_ms) for r in results], ".1f", "lower")
    row("requests/s", [r.requests / r.wall_s for r in results], ".1f", "higher")
    row("output tokens/s", [r.output_tokens / r.wall_s for r in results], ",.0f", "higher")
    row("prefix cache hit rate (%)",
        [100 * r.cached_tokens / max(1, r.prompt_tokens) for r in results], ".1f", "higher")
    row("wall time, all runs (s)", [r.wall_s for r in results], ".1f", "lower")
    for r in results:
        extra = (f"; router-predicted overlap {100 * r.predicted_overlap:.1f}% of prompt blocks"
                 if r.predicted_overlap is not None else "")
        print(f"  {r.mode}: requests per worker {r.per_worker_runs or r.per_worker}{extra}")


def plot(loads: dict[str, list[ModeResult]], path: str, title: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("  (matplotlib not installed: no plot; pip install matplotlib)")
        return
    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(16, 4.8))
    colors = {"kv": "tab:green", "round_robin": "tab:gray", "random": "tab:orange"}
    styles = ["-", "--", ":"]
    labels, p50s, p99s, tputs, bar_colors = [], [], [], [], []
    for li, (load, results) in enumerate(loads.items()):
        for r in results:
            xs = sorted(r.ttft_ms)
            ys = [(i + 1) / len(xs) for i in range(len(xs))]
            ax1.plot(xs, ys, styles[li % 3], color=colors.get(r.mode), label=f"{r.mode}, {load}")
            labels.append(f"{r.mode}\n{load}")
            p50s.append(r.q(50))
            p99s.append(r.q(99))
            tputs.append(r.output_tokens / r.wall_s)
            bar_colors.append(colors.get(r.mode, "tab:blue"))
    ax1.set_xscale("log")
    # Plain numbers at 1, 2 and 5 x 10^k: the default minor labels of a short log range overlap.
    from matplotlib.ticker import FuncFormatter

    def _label(v: float, _pos: int) -> str:
        lead = round(v / 10 ** math.floor(math.log10(v))) if v > 0 else 0
        return f"{v:g}" if lead in (1, 2, 5) else ""

    ax1.xaxis.set_major_formatter(FuncFormatter(_label))
    ax1.xaxis.set_minor_formatter(FuncFormatter(_label))
    ax1.set_xlabel("TTFT (ms, log scale)")
    ax1.set_ylabel("fraction of requests")
    ax1.set_title("TTFT CDF")
    ax1.legend(fontsize=8)
    ax1.grid(True, which="both", alpha=0.3)
    width = 0.38
    xs = list(range(len(labels)))
    for off, values, label, hatch in ((-0.5, p50s, "p50", ""), (0.5, p99s, "p99", "//")):
        bars = ax2.bar([x + off * width for x in xs], values, width, label=label,
                       color=bar_colors, hatch=hatch, edgecolor="black")
        ax2.bar_label(bars, fmt="%.0f", fontsize=8)
    ax2.set_xticks(xs, labels, fontsize=8)
    ax2.set_ylabel("ms")
    ax2.set_title("TTFT p50 (plain) and p99 (hatched)")
    bars = ax3.bar(xs, tputs, color=bar_colors, edgecolor="black")
    ax3.bar_label(bars, fmt="%.0f", fontsize=8)
    ax3.set_xticks(xs, labels, fontsize=8)
    ax3.set_ylabel("output tokens/s")
    ax3.set_title("Throughput")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"  plot: {path}")


def bench_e2e(args: argparse.Namespace) -> None:
    workload = SharedPrefixWorkload(
        num_system_prompts=args.system_prompts,
        system_prompt_tokens=args.system_prompt_tokens,
        num_conversations=args.conversations,
        turns=args.turns,
        user_tokens=args.user_tokens,
        output_tokens=args.output_tokens,
        seed=args.seed,
    )
    conversations = conversations_of(workload)
    n_req = len(workload)
    prefix_blocks = args.system_prompts * args.system_prompt_tokens // args.block_size
    print(
        f"== (b) end to end: {args.workers} mocker workers (subprocesses, speedup "
        f"{args.speedup_ratio:g}, {args.num_gpu_blocks} KV blocks of {args.block_size} tokens "
        f"each), {n_req} requests ({args.conversations} conversations x {args.turns} turns on "
        f"{args.system_prompts} system prompts of {args.system_prompt_tokens} tokens = "
        f"{prefix_blocks} shared blocks; +{args.user_tokens} user tokens per turn, "
        f"{args.output_tokens // 2}-{args.output_tokens * 3 // 2} output tokens)"
    )
    print("  frontend stack in process (ModelManager + Router + EngineClient, file discovery, "
          "zmq:// events); the OpenAI HTTP layer is left out (same code for both modes)")
    loads: list[tuple[str, float]] = []
    if args.load in ("both", "closed"):
        loads.append((f"closed loop, {args.sessions} sessions", 0.0))
    if args.load in ("both", "open"):
        loads.append((f"open loop, {args.rate:g} conversations/s", args.rate))
    modes = args.modes.split(",")
    pooled: dict[str, list[ModeResult]] = {}
    for label, rate in loads:
        print(f"-- {label}" + (": throughput at capacity" if rate == 0 else
                               ": latency at the same offered load"))
        results = {m: ModeResult(m) for m in modes}
        for rep in range(args.repeat):  # modes interleaved, so slow phases of the host hit both
            for mode in modes:
                t0 = time.perf_counter()
                r = asyncio.run(run_mode(mode, args, conversations, rate))
                results[mode].merge(r)
                print(f"  run {rep + 1}/{args.repeat} {mode}: {time.perf_counter() - t0:.1f} s, "
                      f"TTFT p50 {r.q(50):.1f} ms p99 {r.q(99):.1f} ms, "
                      f"{r.output_tokens / r.wall_s:,.0f} output tokens/s")
        print(f"  {label}, all {args.repeat} runs pooled:")
        pooled[label.split(",")[0]] = list(results.values())
        report(list(results.values()))
    if args.plot:
        plot(pooled, args.plot,
             f"KV-aware vs round-robin routing: {args.workers} mocker workers, speedup "
             f"{args.speedup_ratio:g}, {n_req} shared-prefix chat requests x {args.repeat} runs "
             f"(HTTP layer left out)")


# -- main -------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    ap.add_argument("--part", choices=("all", "index", "e2e"), default="all")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.add_argument_group("(a) indexer and router")
    a.add_argument("--index-workers", type=int, default=16)
    a.add_argument("--index-blocks", type=int, default=100_000, help="cached blocks per worker")
    a.add_argument("--index-block-size", type=int, default=16)
    a.add_argument("--index-prompt-tokens", type=int, default=4096)
    a.add_argument("--decisions", type=int, default=5000)
    b = ap.add_argument_group("(b) end to end")
    b.add_argument("--modes", default="kv,round_robin", help="router modes to compare")
    b.add_argument("--repeat", type=int, default=2,
                   help="runs per mode (interleaved; figures pool them)")
    b.add_argument("--workers", type=int, default=4)
    b.add_argument("--speedup-ratio", type=float, default=10.0)
    b.add_argument("--block-size", type=int, default=16)
    b.add_argument("--num-gpu-blocks", type=int, default=1024, help="KV blocks per worker")
    b.add_argument("--max-num-seqs", type=int, default=256)
    b.add_argument("--sessions", type=int, default=8,
                   help="closed loop: conversations in flight at once")
    b.add_argument("--rate", type=float, default=40.0,
                   help="open loop: new conversations per second (Poisson arrivals), the same "
                   "offered load for every mode, so TTFT compares at equal load")
    b.add_argument("--load", choices=("both", "closed", "open"), default="both",
                   help="closed loop (--sessions: throughput at capacity), open loop (--rate: "
                   "latency at equal load) or both")
    b.add_argument("--system-prompts", type=int, default=16)
    b.add_argument("--system-prompt-tokens", type=int, default=2048)
    b.add_argument("--conversations", type=int, default=128)
    b.add_argument("--turns", type=int, default=3)
    b.add_argument("--user-tokens", type=int, default=64)
    b.add_argument("--output-tokens", type=int, default=32,
                   help="mean output length (each request draws 50-150 %%)")
    b.add_argument("--kv-overlap-weight", type=float, default=1.0)
    b.add_argument("--router-temperature", type=float, default=0.0)
    b.add_argument("--busy-threshold", type=float, default=0.7,
                   help="kv: skip workers whose KV usage is above this fraction")
    b.add_argument("--plot", default="benchmarks/kv_router.png",
                   help="PNG path for (b)'s figure ('' for none)")
    args = ap.parse_args()
    if args.part in ("all", "index"):
        bench_index(args)
    if args.part in ("all", "e2e"):
        bench_e2e(args)


if __name__ == "__main__":
    main()
