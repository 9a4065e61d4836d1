"""CPU cost of an idle file-discovery watch, as a frontend runs it.

Starts ``--workers`` child processes that each register ``--keys`` keys (as workers do), then
in this process opens one discovery object of the same backend with the three
watches a frontend holds (model cards, instances, event channels) and measures this process's
CPU time (``time.process_time``, which other load on the machine does not inflate) over
``--seconds`` of steady state. Then it checks the watch still reacts: a put, a delete and a
SIGKILLed worker, printing how long each took to show up.

``--backend file`` (default) is Dynamo's layout (:class:`FileDiscovery`: owners touch every
file every 3.3 s, a SIGKILLed worker is expired after 10 s); ``--backend lease`` is the private
``file+lease://`` layout (:class:`LeaseFileDiscovery`: one lease file, pid-fast death).

    python benchmarks/file_discovery_idle.py [--backend file|lease] [--seconds 10] [--workers 2]
        [--keys 3]
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
import tempfile
import time
from pathlib import Path

from dynamo_backend_common.runtime.discovery import (
    DiscoveryEvent,
    FileDiscovery,
    LeaseFileDiscovery,
)

CHILD = """
import asyncio, sys
from dynamo_backend_common.runtime.discovery import FileDiscovery, LeaseFileDiscovery

async def main() -> None:
    cls = FileDiscovery if sys.argv[4] == "file" else LeaseFileDiscovery
    d = cls(sys.argv[1], ttl=10.0)
    await d.start()
    for i in range(int(sys.argv[3])):
        await d.put(f"v1/instances/{sys.argv[2]}/{i}", b"x" * 200)
    await d.put(f"v1/mdc/{sys.argv[2]}", b"card" * 100)
    print("ready", flush=True)
    await asyncio.Event().wait()

asyncio.run(main())
"""

PREFIXES = ("v1/mdc/", "v1/instances/", "v1/event_channels/")


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--backend", choices=("file", "lease"), default="file")
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--keys", type=int, default=3)
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="fdidle-"))
    procs = []
    for w in range(args.workers):
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", CHILD, str(root), f"w{w}", str(args.keys), args.backend,
            stdout=asyncio.subprocess.PIPE,
        )
        assert proc.stdout is not None
        assert (await proc.stdout.readline()).startswith(b"ready")
        procs.append(proc)
    cls = FileDiscovery if args.backend == "file" else LeaseFileDiscovery
    d = cls(root, ttl=10.0)
    await d.start()
    queue: asyncio.Queue[tuple[float, DiscoveryEvent]] = asyncio.Queue()

    async def watch(prefix: str) -> None:
        async for ev in d.watch_prefix(prefix):
            queue.put_nowait((time.monotonic(), ev))

    tasks = [asyncio.create_task(watch(p)) for p in PREFIXES]
    await asyncio.sleep(1.0)  # snapshots delivered, steady state
    while not queue.empty():
        queue.get_nowait()
    cpu0, wall0 = time.process_time(), time.monotonic()
    await asyncio.sleep(args.seconds)
    cpu, wall = time.process_time() - cpu0, time.monotonic() - wall0
    print(
        f"idle: {cpu * 1e3:.1f} ms CPU over {wall:.1f} s = {100 * cpu / wall:.2f}% of a core "
        f"({args.backend} backend, {args.workers} workers x {args.keys + 1} files, "
        f"{len(PREFIXES)} watches)"
    )
    assert queue.empty(), "spurious events while idle"

    async def latency(what: str, expect: DiscoveryEvent) -> None:
        t0 = time.monotonic()
        while True:
            t, ev = await asyncio.wait_for(queue.get(), 15)
            if ev == expect:
                print(f"{what}: seen after {1e3 * (t - t0):.0f} ms")
                return

    await d.put("v1/instances/frontend-probe", b"p")
    await latency("put", DiscoveryEvent("put", "v1/instances/frontend-probe", b"p"))
    await d.delete("v1/instances/frontend-probe")
    await latency("delete", DiscoveryEvent("delete", "v1/instances/frontend-probe", None))
    procs[0].send_signal(signal.SIGKILL)
    await latency("SIGKILLed worker", DiscoveryEvent("delete", "v1/mdc/w0", None))
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await d.close()
    for proc in procs:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()


if __name__ == "__main__":
    asyncio.run(main())
