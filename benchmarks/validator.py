"""Cost of the stream contract validator per chunk.

Run: ``.venv/bin/python benchmarks/validator.py [--chunks 200000] [--repeat 5]``

Drains a zero-cost engine stream of ``--chunks`` chunks plain and wrapped in
``validate_stream``, best of ``--repeat`` runs, and prints ns/chunk for both, the difference
(the validator's cost) and the ratio.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import AsyncIterator

from dynamo_backend_common import Context, LLMEngineOutput, chunk
from dynamo_backend_common.validate import validate_stream


async def source(n: int) -> AsyncIterator[LLMEngineOutput]:
    tok = chunk.token(7)
    for _ in range(n - 1):
        yield tok
    yield LLMEngineOutput.length()


async def drain(stream: AsyncIterator[LLMEngineOutput]) -> None:
    async for _ in stream:
        pass


async def measure(n: int, repeat: int) -> tuple[float, float]:
    plain = wrapped = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        await drain(source(n))
        plain = min(plain, time.perf_counter() - t)
        t = time.perf_counter()
        await drain(validate_stream(source(n), Context()))
        wrapped = min(wrapped, time.perf_counter() - t)
    return plain / n * 1e9, wrapped / n * 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--chunks", type=int, default=200_000)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    plain, wrapped = asyncio.run(measure(args.chunks, args.repeat))
    print(f"chunks per run      {args.chunks}")
    print(f"plain stream        {plain:8.1f} ns/chunk")
    print(f"validated stream    {wrapped:8.1f} ns/chunk")
    print(f"validator cost      {wrapped - plain:8.1f} ns/chunk  (x{wrapped / plain:.2f})")


if __name__ == "__main__":
    main()
