"""Per-token cost of the worker path, and how fast a client's stop reaches the engine.

    python benchmarks/worker_path.py [--tokens 200000] [--streams 1,64] [--cancels 500]
                                     [--repeat 5] [--loop uvloop|asyncio] [--no-validate]
                                     [--request-plane tcp,mux]

The engine costs nothing: it yields one-token chunks without awaiting, so every figure is
framework overhead. Three paths, each at every concurrency level (``--streams``), ``--tokens``
tokens per run split over the streams, best of ``--repeat`` (5) runs. Two figures per path:
wall time per token (tokens/s, µs/token: what a client sees, sensitive to other load on the
machine) and CPU time per token of the process doing the work (``cpu µs/token``: this process
for ``direct`` and ``adapter``, the worker process for ``worker``, so the client's decoding is
not in it; barely affected by other load):

- ``direct``: ``engine.generate(request, ctx)`` consumed in this process (the floor);
- ``adapter``: the worker's :class:`EngineAdapter` (admission, cancellation monitor, stream
  validator, metrics, first-token timing) plus msgpack encoding of every chunk, in-process;
- ``worker tcp`` / ``worker mux``: a real :class:`Worker` in another process per request
  plane (``--request-plane``): ``tcp`` is Dynamo 1.6.1's as a Dynamo frontend uses it (request
  frames, a call-home connection per request; the worker's mux fast path, which our frontend
  would take, is off), ``mux`` our multiplexed one (one connection, streams interleaved).
  Streamed with :class:`WorkerClient` (what our frontend uses), each chunk
  decoded to ``LLMEngineOutput`` here. Its µs/token is wall time per token with the work split
  over two processes (the worker encodes while the client decodes), so at high concurrency it
  can come out below ``adapter``, which does both on one core. A last line per level gives
  the worker's CPU per token on ``tcp`` over that on ``mux``.

Then cancellation: a request waits in the engine; the client calls ``ctx.stop_generating()``
and we measure, on the system-wide monotonic clock, when the engine's ``await ctx.stopped()``
woke, when ``engine.abort(ctx)`` was called, and when the cancelled terminal reached the client.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import os
import statistics
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import msgspec

from dynamo_backend_common import (
    EngineConfig,
    GenerateContext,
    LLMEngine,
    LLMEngineOutput,
    PreprocessedRequest,
    StopConditions,
    chunk,
)
from dynamo_backend_common.protocols.codec import from_msgpack, to_msgpack
from dynamo_backend_common.protocols.discovery import InstanceInfo
from dynamo_backend_common.runtime.context import Context
from dynamo_backend_common.runtime.transport.dispatch import WorkerClient
from dynamo_backend_common.worker import CONTROL_ENDPOINT, EngineAdapter, RequestTracker, Worker
from dynamo_backend_common.worker.config import ShutdownConfig, WorkerConfig

PROBE = "probe"


class ZeroCostEngine(LLMEngine):
    """``max_tokens`` one-token chunks, no awaits. A request with ``extra_args={"probe": 1}``
    yields one token, waits for ``ctx.stopped()``, and puts the wake-up time (monotonic ns) in
    its cancelled terminal's ``text``; ``abort`` records its call time per request id."""

    def __init__(self) -> None:
        self.aborts: dict[str, int] = {}

    async def start(self, worker_id: int) -> EngineConfig:
        return EngineConfig(model="zero")

    async def generate(
        self, request: PreprocessedRequest, ctx: GenerateContext
    ) -> AsyncIterator[LLMEngineOutput]:
        if request.extra_args:
            yield chunk.token(0)
            await ctx.stopped()
            woke = time.monotonic_ns()
            yield msgspec.structs.replace(LLMEngineOutput.cancelled(), text=str(woke))
            return
        n = request.stop_conditions.max_tokens or 1
        for i in range(n - 1):
            yield chunk.token(i)
        yield LLMEngineOutput.length().with_tokens([n - 1])

    async def abort(self, ctx: Context) -> None:
        self.aborts[ctx.id] = time.monotonic_ns()

    async def cleanup(self) -> None:
        return None

    async def supported_controls(self) -> list[str]:
        return ["abort_times", "cpu_time"]

    async def engine_control(self, control: str, body: Any) -> Any:
        if control == "cpu_time":  # this (worker) process's CPU seconds so far
            return time.process_time()
        return self.aborts


def _run(loop_kind: str, main: Awaitable[Any]) -> Any:
    if loop_kind == "uvloop":
        import uvloop

        return uvloop.run(main)  # type: ignore[arg-type]
    return asyncio.run(main)  # type: ignore[arg-type]


def serve(loop_kind: str, validate: bool, plane: str, conn: Any) -> None:
    """Worker process: serve :class:`ZeroCostEngine` on request plane ``plane`` until told to
    quit; sends its instance record (JSON) first."""
    os.environ["DYN_VALIDATE_STREAMS"] = "1" if validate else "0"

    async def main() -> None:
        bus = uuid.uuid4().hex
        # tcp alone (no mux fast path): the path a Dynamo frontend takes.
        worker = Worker(ZeroCostEngine(), WorkerConfig(
            discovery=f"memory://{bus}", events=f"memory://{bus}", status_port=None,
            request_plane=plane, mux_fastpath=False,
            shutdown=ShutdownConfig(router_grace_secs=0, total_secs=5)))
        task = asyncio.create_task(worker.run())
        await worker.ready.wait()
        assert worker.instance_info is not None
        conn.send(msgspec.json.encode(worker.instance_info))
        await asyncio.get_running_loop().run_in_executor(None, conn.recv)  # until told to quit
        worker.request_shutdown("benchmark done")
        await task

    _run(loop_kind, main())


def request(n: int, **extra: Any) -> PreprocessedRequest:
    return PreprocessedRequest(token_ids=[1, 2, 3], stop_conditions=StopConditions(max_tokens=n),
                               extra_args=extra or None)


Consume = Callable[[int], Awaitable[int]]


CpuClock = Callable[[], Awaitable[float]]


async def rate(consume: Consume, tokens: int, streams: int,
               cpu: CpuClock) -> tuple[float, float]:
    """(tokens per second, CPU µs per token) with ``streams`` concurrent requests sharing
    ``tokens``; ``cpu`` reads the CPU clock of the process doing the work."""
    per = max(1, tokens // streams)
    c0 = await cpu()
    t0 = time.perf_counter()
    counts = await asyncio.gather(*(consume(per) for _ in range(streams)))
    elapsed = time.perf_counter() - t0
    c1 = await cpu()
    assert all(c == per for c in counts), counts
    return per * streams / elapsed, (c1 - c0) * 1e6 / (per * streams)


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


async def bench(workers: dict[str, InstanceInfo], args: argparse.Namespace) -> None:
    streams = [int(s) for s in args.streams.split(",")]
    engine = ZeroCostEngine()
    await engine.start(0)
    adapter = EngineAdapter(engine, tracker=RequestTracker(), validate=args.validate)
    client = WorkerClient()

    async def direct(n: int) -> int:
        got = 0
        async for out in engine.generate(request(n), GenerateContext(Context())):
            got += len(out.token_ids)
        return got

    async def via_adapter(n: int) -> int:
        got = 0
        async for raw in adapter.handle(to_msgpack(request(n)), Context(), {}):
            got += len(from_msgpack(raw, LLMEngineOutput).token_ids)
        return got

    def via_worker(info: InstanceInfo) -> Consume:
        async def consume(n: int) -> int:
            got = 0
            async for raw in client.stream(info, to_msgpack(request(n))):
                got += len(from_msgpack(raw, LLMEngineOutput).token_ids)
            return got

        return consume

    async def control(info: InstanceInfo, name: str) -> Any:
        raw = await client.call(info, to_msgpack({"control": name}), endpoint=CONTROL_ENDPOINT)
        return msgspec.msgpack.decode(raw)

    async def own_cpu() -> float:
        return time.process_time()

    def worker_cpu(info: InstanceInfo) -> CpuClock:
        async def read() -> float:
            return float(await control(info, "cpu_time"))

        return read

    paths: list[tuple[str, Consume, CpuClock]] = [
        ("direct", direct, own_cpu), ("adapter", via_adapter, own_cpu)]
    paths += [(f"worker {plane}", via_worker(info), worker_cpu(info))
              for plane, info in workers.items()]
    for _, fn, cpu in paths:  # warm-up
        await rate(fn, 5000, 8, cpu)

    print(f"{'path':<11} {'streams':>7} {'tokens/s':>12} {'µs/token':>9} {'x direct':>9} "
          f"{'cpu µs/token':>13} {'x direct':>9}")
    for n in streams:
        base = base_cpu = 0.0
        cpu_of: dict[str, float] = {}
        for label, fn, cpu in paths:
            runs = [await rate(fn, args.tokens, n, cpu) for _ in range(args.repeat)]
            best = max(r for r, _ in runs)
            cpu_us = min(c for _, c in runs)
            cpu_of[label] = cpu_us
            base = base or best
            base_cpu = base_cpu or cpu_us
            print(f"{label:<11} {n:>7} {best:>12,.0f} {1e6 / best:>9.2f} {base / best:>9.1f} "
                  f"{cpu_us:>13.2f} {cpu_us / base_cpu:>9.1f}")
        if "worker tcp" in cpu_of and "worker mux" in cpu_of:
            print(f"{'':<11} {n:>7} worker CPU per token, tcp / mux: "
                  f"{cpu_of['worker tcp'] / cpu_of['worker mux']:.2f}")

    for plane, info in workers.items():
        woke: list[float] = []
        starts: dict[str, int] = {}
        terminal: list[float] = []
        for _ in range(args.cancels):
            ctx = Context()
            stream = client.stream(info, to_msgpack(request(2, probe=1)), ctx)
            await anext(stream)
            t0 = time.monotonic_ns()
            ctx.stop_generating()
            last = from_msgpack(await anext(stream), LLMEngineOutput)
            t1 = time.monotonic_ns()
            assert last.finish_reason is not None and last.text is not None
            woke.append((int(last.text) - t0) / 1e3)
            terminal.append((t1 - t0) / 1e3)
            starts[ctx.id] = t0
            await stream.aclose()
        aborted: dict[str, int] = await control(info, "abort_times")
        abort_us = [(aborted[rid] - t0) / 1e3 for rid, t0 in starts.items()]
        assert len(abort_us) == args.cancels, "every stop must reach engine.abort once"

        print()
        print(f"{f'cancellation on {plane} (µs), n={args.cancels}':<38} {'p50':>8} {'p99':>8}")
        for label, values in (
            ("stop -> engine ctx.stopped() woke", woke),
            ("stop -> engine.abort() called", abort_us),
            ("stop -> cancelled terminal at client", terminal),
        ):
            print(f"{label:<38} {statistics.median(values):>8.1f} {pct(values, 0.99):>8.1f}")
    await client.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    ap.add_argument("--loop", choices=["asyncio", "uvloop"], default="uvloop")
    ap.add_argument("--tokens", type=int, default=200_000, help="tokens per run (all streams)")
    ap.add_argument("--streams", default="1,64", help="comma-separated concurrency levels")
    ap.add_argument("--cancels", type=int, default=500, help="cancellation samples per plane")
    ap.add_argument("--repeat", type=int, default=5, help="runs per figure (the best is shown)")
    ap.add_argument("--no-validate", dest="validate", action="store_false",
                    help="turn the stream contract validator off (DYN_VALIDATE_STREAMS=0)")
    ap.add_argument("--request-plane", default="tcp,mux",
                    help="worker request planes to measure, comma-separated: tcp (Dynamo's, "
                    "the default) and/or mux (ours)")
    args = ap.parse_args()
    planes = [p.strip() for p in args.request_plane.split(",") if p.strip()]
    if not planes or any(p not in ("tcp", "mux") for p in planes):
        ap.error("--request-plane takes tcp and/or mux")

    procs = []
    workers: dict[str, InstanceInfo] = {}
    ctx = mp.get_context("spawn")
    for plane in planes:
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=serve, args=(args.loop, args.validate, plane, child),
                           daemon=True)
        proc.start()
        procs.append((proc, parent))
        workers[plane] = msgspec.json.decode(parent.recv(), type=InstanceInfo)
    print(f"python {sys.version.split()[0]}, loop={args.loop}, validator "
          f"{'on' if args.validate else 'off'}, workers: "
          + ", ".join(f"{plane} pid {p.pid} at {workers[plane].address}"
                      for (p, _), plane in zip(procs, planes, strict=True)))
    try:
        _run(args.loop, bench(workers, args))
    finally:
        for proc, parent in procs:
            parent.send("quit")
            proc.join(10)


if __name__ == "__main__":
    main()
