"""Publishers dying and leaving under a ZMQ event-plane subscriber, as processes of their own.

Run by ``tests/test_zmq_plane_chaos.py``: what it guards against is libzmq aborting the
subscriber's process (``Assertion failed: !_more (src/fq.cpp:80)``), which no Python code can
catch, so the subscriber runs here and the test reads its exit status. It uses only the plane's
public API and discovery records, so it runs against any version of the plane.

``python tests/zmq_plane_chaos.py publish RATE``: one Dynamo-style publisher (its own PUB socket,
4-frame ``kv-events`` messages) that prints ``ADDRESS PUBLISHER_ID`` and then sends about RATE
messages/s until it is killed; every payload starts with its publisher id (8 bytes).

``python tests/zmq_plane_chaos.py subscribe PUBLISHERS ROUNDS KILL_EVERY RATE``: a
:class:`ZmqEventPlane` on a memory discovery follows PUBLISHERS such processes. Round ``r``
picks publisher ``r % PUBLISHERS`` while every publisher streams; every KILL_EVERY-th round
SIGKILLs it (mid-message, likely) and deletes its record (as when its lease expires), then
announces a fresh publisher and waits until it delivers; the other rounds delete its record and
put it back (the subscriber drops the channel while its messages stream in, then follows it
again). Each round ends when every live publisher has delivered a message after the change.
Prints one JSON line of counters; exits 1 if a round sees no delivery within ``ROUND_TIMEOUT``.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
import time

ROUND_TIMEOUT = 10.0
NS, COMP, TOPIC = "chaos", "worker", "kv-events"
SUBJECT = f"namespace.{NS}.component.{COMP}.>"


def publish(rate: float) -> None:
    import zmq

    from dynamo_backend_common.runtime.events.dynamo_wire import (
        encode_frames,
        random_publisher_id,
    )

    sock = zmq.Context.instance().socket(zmq.PUB)
    sock.bind("tcp://127.0.0.1:0")
    pid = random_publisher_id()
    print(sock.getsockopt_string(zmq.LAST_ENDPOINT), pid, flush=True)
    payload = pid.to_bytes(8, "big") + b"x" * 120
    start = time.monotonic()
    seq = 0
    while True:
        for _ in range(10):
            sock.send_multipart(encode_frames(TOPIC, pid, seq, payload))
            seq += 1
        ahead = seq / rate - (time.monotonic() - start)
        if ahead > 0:
            time.sleep(ahead)  # pacing, not synchronisation


class _Publisher:
    def __init__(self, proc: asyncio.subprocess.Process, address: str, pid: int) -> None:
        self.proc, self.address, self.pid = proc, address, pid


async def subscribe(n_pubs: int, rounds: int, kill_every: int, rate: float) -> int:
    from dynamo_backend_common.runtime.discovery import open_discovery
    from dynamo_backend_common.runtime.events import ZmqEventPlane
    from dynamo_backend_common.runtime.events.dynamo_wire import (
        EndpointRef,
        EventChannel,
        EventScope,
        EventTransport,
        channel_key,
        encode_record,
    )
    from dynamo_backend_common.runtime.processes import pdeathsig_hook

    async def spawn() -> _Publisher:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, __file__, "publish", str(rate), stdout=asyncio.subprocess.PIPE,
            preexec_fn=pdeathsig_hook())  # they die with us, also if libzmq aborts us
        assert proc.stdout is not None
        address, pid = (await proc.stdout.readline()).decode().split()
        return _Publisher(proc, address, int(pid))

    def key(pub: _Publisher) -> str:
        return channel_key(NS, COMP, "generate", TOPIC, pub.pid)

    def record(pub: _Publisher) -> bytes:
        scope = EventScope("endpoint", EndpointRef(NS, COMP, "generate"))
        return encode_record(EventChannel(scope, TOPIC, pub.pid, EventTransport.zmq(pub.address)))

    counts: dict[int, int] = {}
    waiting: set[int] = set()
    arrived = asyncio.Event()

    async def consume() -> None:
        async for msg in sub:
            pid = int.from_bytes(msg.payload[:8], "big")
            counts[pid] = counts.get(pid, 0) + 1
            if pid in waiting:
                waiting.discard(pid)
                if not waiting:
                    arrived.set()

    async def delivered(pids: set[int]) -> None:
        """Until each of ``pids`` has delivered a message from now on."""
        waiting.clear()
        waiting.update(pids)
        arrived.clear()
        await asyncio.wait_for(arrived.wait(), ROUND_TIMEOUT)

    pubs: list[_Publisher] = []
    kills, r = 0, -1  # r: the round (-1: before the first)
    started = time.monotonic()
    async with open_discovery("memory://zmq-plane-chaos") as d, ZmqEventPlane(d) as plane:
        sub = plane.subscribe(SUBJECT)
        consumer = asyncio.create_task(consume())
        try:
            pubs = list(await asyncio.gather(*(spawn() for _ in range(n_pubs))))
            for pub in pubs:
                await d.put(key(pub), record(pub))
            await sub.ready()
            await delivered({p.pid for p in pubs})
            for r in range(rounds):
                i = r % n_pubs
                pub = pubs[i]
                if kill_every and r % kill_every == kill_every - 1:
                    pub.proc.send_signal(signal.SIGKILL)
                    await pub.proc.wait()
                    await d.delete(key(pub))  # its lease expired
                    pubs[i] = pub = await spawn()
                    await d.put(key(pub), record(pub))
                    await sub.ready()  # a new key: now followed
                    kills += 1
                else:
                    await d.delete(key(pub))  # unfollowed while it streams...
                    await d.put(key(pub), record(pub))  # ...and followed again
                await delivered({p.pid for p in pubs})
        except TimeoutError:
            print(f"round {r}: no delivery from {sorted(waiting)} within {ROUND_TIMEOUT} s",
                  file=sys.stderr)
            return 1
        finally:
            consumer.cancel()
            for p in pubs:
                if p.proc.returncode is None:
                    p.proc.kill()
                await p.proc.wait()
        print(json.dumps({
            "rounds": rounds, "kills": kills, "seconds": round(time.monotonic() - started, 3),
            "received": plane.received, "malformed": plane.malformed,
            "unknown_publisher": plane.unknown_publisher, "sequence_gaps": plane.sequence_gaps,
            "publishers_seen": len(counts)}), flush=True)
    return 0


def main(argv: list[str]) -> int:
    if argv[:1] == ["publish"]:
        publish(float(argv[1]))
        return 0
    if argv[:1] == ["subscribe"]:
        n_pubs, rounds, kill_every = (int(a) for a in argv[1:4])
        return asyncio.run(subscribe(n_pubs, rounds, kill_every, float(argv[4])))
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
