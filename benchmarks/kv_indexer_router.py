"""KV indexer ingestion rate and KV router decision latency.

Setup (defaults): 16 workers x 100k cached blocks each, filled by ``stored`` events of 16 blocks
(100k events). Part of every worker's cache is a random prefix of some "hot" 4k-token prompts
built on 8 shared system prompts, so lookups see real, varied overlaps; the rest is filler.
Then 4k-token prompts (256 blocks at block size 16) are routed.

Prints: events/s and blocks/s ingested (from decoded events, and from msgpack bytes as they
arrive off the event plane), and per decision p50/p99 latency and decisions/s for
``find_matches`` alone, ``select`` with precomputed block hashes, and ``select`` from tokens
(hashing included, what the frontend pays).

    .venv/bin/python benchmarks/kv_indexer_router.py [--workers 16] [--blocks 100000]
"""

from __future__ import annotations

import argparse
import gc
import random
import statistics
import time
from collections.abc import Callable

import msgspec

from dynamo_backend_common.kv.hashing import block_hashes
from dynamo_backend_common.protocols.kv import KvCacheEvent, KvStored, RouterEvent, StoredBlock
from dynamo_backend_common.router import KvIndexer, KvRouter, KvRouterConfig, WorkerKey


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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workers", type=int, default=16)
    ap.add_argument("--blocks", type=int, default=100_000, help="cached blocks per worker")
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--prompt-tokens", type=int, default=4096)
    ap.add_argument("--decisions", type=int, default=5000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rng = random.Random(args.seed)

    t0 = time.perf_counter()
    events, hot = build_events(args.workers, args.blocks, args.block_size, args.prompt_tokens, rng)
    print(f"setup: {len(events)} events built in {time.perf_counter() - t0:.1f} s")

    idx = KvIndexer()
    t0 = time.perf_counter()
    for e in events:
        idx.apply(e)
    dt = time.perf_counter() - t0
    n_blocks = sum(len(e.event.data.blocks) for e in events if isinstance(e.event.data, KvStored))
    print(
        f"ingest (decoded):  {len(events) / dt:>10,.0f} events/s  {n_blocks / dt:>12,.0f} blocks/s"
        f"  ({dt:.2f} s; index: {idx.num_workers} workers, {idx.num_blocks:,} distinct blocks)"
    )

    wire = [msgspec.msgpack.encode(e) for e in events]
    dec = msgspec.msgpack.Decoder(RouterEvent)
    idx2 = KvIndexer()
    t0 = time.perf_counter()
    for raw in wire:
        idx2.apply(dec.decode(raw))
    dt = time.perf_counter() - t0
    print(
        f"ingest (msgpack):  {len(events) / dt:>10,.0f} events/s  {n_blocks / dt:>12,.0f} blocks/s"
    )
    # Drop the event objects (1.7M GC-tracked structs) before timing routes: a live frontend
    # does not keep them, and full GC passes over them would inflate the tail latency.
    del idx2, wire, events
    gc.collect()

    cfg = KvRouterConfig(block_size=args.block_size)
    router = KvRouter(idx, cfg, random.Random(args.seed))
    workers: list[WorkerKey] = [(w, 0) for w in range(args.workers)]
    for w in workers:
        router.add_worker(w)
    # Route hot prompts with a fresh user tail (the last block differs), as a next turn would.
    prompts = [
        p[: -args.block_size] + [rng.randrange(32000) for _ in range(args.block_size)] for p in hot
    ]
    hashes = [block_hashes(p, args.block_size) for p in prompts]
    n = args.decisions
    m = len(prompts)
    overlaps = [max(idx.find_matches(h).values(), default=0) for h in hashes]
    print(
        f"route: {args.workers} workers, {len(hashes[0])}-block prompts, best overlap "
        f"mean {statistics.fmean(overlaps):.0f} blocks"
    )
    for label, fn in (
        ("find_matches", lambda i: idx.find_matches(hashes[i % m])),
        (
            "select (hashes given)",
            lambda i: router.select(prompts[i % m], block_hashes=hashes[i % m]),
        ),
        ("select (from tokens)", lambda i: router.select(prompts[i % m])),
        ("block_hashes only", lambda i: block_hashes(prompts[i % m], args.block_size)),
    ):
        time_calls(fn, min(n, 200))  # warm up
        p50, p99, rate = percentiles(time_calls(fn, n))
        print(f"  {label:<22} p50 {p50:8.1f} us  p99 {p99:8.1f} us  {rate:>10,.0f} /s")


if __name__ == "__main__":
    main()
