"""Request-plane throughput and control latency, server and client in separate processes.

    python benchmarks/transport.py [--loop asyncio|uvloop] [--items 20000] [--streams 1,64]

Scenarios (the handler costs nothing, so the figures are the transport's own overhead):

- ``burst``: the handler yields N 20-byte items without awaiting (items ready together: the
  coalescing best case).
- ``per-tick``: the handler awaits ``asyncio.sleep(0)`` between items, like an engine that hands
  over one token per loop iteration (the per-token hot path).

For each: items/s over all streams and per-item cost in µs (wall time / items, both processes
busy). Then: unary request round trip, and STOP latency: from ``ctx.stop_generating()`` on the
client to the handler's ``ctx.stopped()`` waking (one way, system-wide monotonic clock) and to the
handler's reply reaching the client (round trip); p50 and p99.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import statistics
import sys
import time
from collections.abc import AsyncIterator, Mapping
from typing import Any

from dynamo_backend_common.runtime.context import Context
from dynamo_backend_common.runtime.transport import RequestPlaneClient, RequestPlaneServer

ITEM = b"x" * 20


async def burst(payload: bytes, ctx: Context, headers: Mapping[str, str]) -> AsyncIterator[bytes]:
    for _ in range(int(payload)):
        yield ITEM


async def per_tick(
    payload: bytes, ctx: Context, headers: Mapping[str, str]
) -> AsyncIterator[bytes]:
    for _ in range(int(payload)):
        yield ITEM
        await asyncio.sleep(0)


async def echo(payload: bytes, ctx: Context, headers: Mapping[str, str]) -> AsyncIterator[bytes]:
    yield payload


async def stop_probe(
    payload: bytes, ctx: Context, headers: Mapping[str, str]
) -> AsyncIterator[bytes]:
    yield b"started"
    await ctx.stopped()
    yield b"%d" % time.monotonic_ns()


def _run(loop_kind: str, main: Any) -> Any:
    if loop_kind == "uvloop":
        import uvloop

        return uvloop.run(main)
    return asyncio.run(main)


def serve(loop_kind: str, conn: Any) -> None:
    async def main() -> None:
        server = RequestPlaneServer()
        for name, handler in (
            ("burst", burst), ("per_tick", per_tick), ("echo", echo), ("stop", stop_probe)
        ):
            server.add_endpoint(name, handler)
        await server.start()
        conn.send(server.address)
        await asyncio.get_running_loop().run_in_executor(None, conn.recv)  # until told to quit
        await server.close(timeout=1.0)

    _run(loop_kind, main())


async def throughput(
    client: RequestPlaneClient, address: str, endpoint: str, items: int, streams: int
) -> float:
    per_stream = max(1, items // streams)

    async def one() -> int:
        n = 0
        async for _ in client.stream(address, endpoint, b"%d" % per_stream):
            n += 1
        return n

    t0 = time.perf_counter()
    counts = await asyncio.gather(*(one() for _ in range(streams)))
    elapsed = time.perf_counter() - t0
    assert all(c == per_stream for c in counts), counts
    return per_stream * streams / elapsed


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


async def bench(address: str, items: int, streams: list[int]) -> None:
    client = RequestPlaneClient()
    await client.call(address, "echo", b"warm")
    await throughput(client, address, "burst", 2000, 8)  # warm-up

    print(f"{'scenario':<10} {'streams':>7} {'items/s':>12} {'µs/item':>8}")
    for endpoint, label in (("burst", "burst"), ("per_tick", "per-tick")):
        for n in streams:
            best = max([await throughput(client, address, endpoint, items, n) for _ in range(3)])
            print(f"{label:<10} {n:>7} {best:>12,.0f} {1e6 / best:>8.2f}")

    rtt = []
    for _ in range(2000):
        t0 = time.perf_counter()
        await client.call(address, "echo", ITEM)
        rtt.append((time.perf_counter() - t0) * 1e6)

    one_way: list[float] = []
    round_trip: list[float] = []
    for _ in range(1000):
        ctx = Context()
        stream = client.stream(address, "stop", b"", ctx)
        assert await anext(stream) == b"started"
        t0 = time.monotonic_ns()
        ctx.stop_generating()
        reply = await anext(stream)
        t1 = time.monotonic_ns()
        one_way.append((int(reply) - t0) / 1e3)
        round_trip.append((t1 - t0) / 1e3)
        await stream.aclose()

    print()
    print(f"{'latency (µs)':<28} {'p50':>8} {'p99':>8}")
    for label, values in (
        ("unary call round trip", rtt),
        ("STOP -> handler ctx.stopped", one_way),
        ("STOP -> reply at client", round_trip),
    ):
        print(f"{label:<28} {statistics.median(values):>8.1f} {pct(values, 0.99):>8.1f}")
    await client.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    ap.add_argument("--loop", choices=["asyncio", "uvloop"], default="uvloop")
    ap.add_argument("--items", type=int, default=50_000, help="items per run (all streams)")
    ap.add_argument("--streams", default="1,64", help="comma-separated concurrency levels")
    args = ap.parse_args()
    streams = [int(s) for s in args.streams.split(",")]

    parent, child = mp.Pipe()
    proc = mp.get_context("spawn").Process(target=serve, args=(args.loop, child), daemon=True)
    proc.start()
    address = parent.recv()
    print(f"python {sys.version.split()[0]}, loop={args.loop}, server pid {proc.pid} at {address}")
    try:
        _run(args.loop, bench(address, args.items, streams))
    finally:
        parent.send("quit")
        proc.join(5)


if __name__ == "__main__":
    main()
