"""Disaggregated vs aggregated serving on a mixed workload, at the mocker's realistic timing.

    python benchmarks/disagg.py [--chat-streams 24] [--chat-requests 240] [--chat-tokens 128]
                                [--long-streams 2] [--long-requests 24] [--long-words 500]
                                [--long-tokens 16] [--plot benchmarks/disagg.png]

Two servers, one after the other, each ``dynamo-backend run --engine mocker --port 0`` with
the mocker at ``--speedup-ratio 1`` (its default cost model: a step costs 5 ms + 0.07 ms per
prompt token prefilled + 12 ms when it decodes, so a long prompt's prefill is one long step
that every running decode waits for), prefix caching off (every long prompt is prefilled in
full, although the benchmark sends the same text each time):

- ``aggregated``: ``--workers 2`` (round robin);
- ``disaggregated``: ``--prefill-workers 1 --decode-workers 1`` (the standard path: the prompt
  is prefilled on the prefill worker, its KV blocks move to the decode worker over the mocker's
  simulated transfer at 0.2 ms per block, and the decode worker continues).

The same two GPUs' worth of mockers either way. On each, the load generator of
``dynamo-backend bench`` (:mod:`dynamo_backend_common.cli.bench`) runs two classes at once, each
keeping its streams in flight until its requests are done: ``chat`` (a one-sentence prompt,
``--chat-tokens`` output tokens, ``--chat-streams`` in flight) and ``long`` (a prompt of
``--long-words`` words, ``--long-tokens`` output tokens, ``--long-streams`` in flight): long
prompts keep arriving among running decodes. Printed per server and class: requests/s, output
tokens/s, TTFT and ITL p50 / p99; then the disaggregated / aggregated ratios. ``--plot`` saves
the chat ITL and the long TTFT distributions of both servers as a PNG (needs matplotlib).

The client shares the machine with both servers (on a 2-core machine, four processes): the
simulated step times dominate here, not CPU, but the figures of a loaded small machine move by
a few ms between runs.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from pathlib import Path

from e2e import start_server  # this directory's e2e.py: the same launcher

from dynamo_backend_common.cli.bench import DEFAULT_PROMPT, Level, drive, percentile

MOCKER = ["--speedup-ratio", "1", "--block-size", "16", "--no-enable-prefix-caching"]
#: Per setup: aggregated workers, and the other ``run`` flags.
SETUPS = {"aggregated": (2, []),
          "disaggregated": (0, ["--prefill-workers", "1", "--decode-workers", "1"])}


def long_prompt(words: int) -> str:
    base = DEFAULT_PROMPT.split()
    return " ".join(base[i % len(base)] for i in range(words))


async def mixed(url: str, model: str, args: argparse.Namespace) -> dict[str, Level]:
    chat, long = await asyncio.gather(
        drive(url, model, args.chat_streams, args.chat_requests, args.chat_tokens),
        drive(url, model, args.long_streams, args.long_requests, args.long_tokens,
              prompt=long_prompt(args.long_words)))
    return {"chat": chat, "long": long}


def row(setup: str, cls: str, lvl: Level) -> str:
    wall = lvl.wall_s or float("nan")

    def ms(values: list[float], q: float) -> str:
        return f"{percentile(values, q) * 1e3:>9.1f}" if values else f"{'-':>9}"

    return (f"{setup:<14} {cls:<5} {lvl.requests / wall:>7.2f} {lvl.tokens / wall:>8.0f} "
            f"{ms(lvl.ttft, 0.5)} {ms(lvl.ttft, 0.99)} {ms(lvl.itl, 0.5)} {ms(lvl.itl, 0.99)} "
            f"{lvl.errors:>6}")


def plot(results: dict[str, dict[str, Level]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for setup, classes in results.items():
        for ax, (cls, attr) in zip(axes, (("chat", "itl"), ("long", "ttft")), strict=True):
            values = sorted(v * 1e3 for v in getattr(classes[cls], attr))
            if values:
                ax.plot(values, [(i + 1) / len(values) for i in range(len(values))],
                        label=setup)
    axes[0].set(title="chat streams: inter-token latency", xlabel="ms", ylabel="CDF",
                xscale="log", xlim=(1, None))  # below 1 ms: chunks that arrived together
    axes[1].set(title="long prompts: time to first token", xlabel="ms", ylabel="CDF")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"plot: {path}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--chat-streams", type=int, default=24)
    p.add_argument("--chat-requests", type=int, default=240)
    p.add_argument("--chat-tokens", type=int, default=128)
    p.add_argument("--long-streams", type=int, default=2)
    p.add_argument("--long-requests", type=int, default=24)
    p.add_argument("--long-words", type=int, default=500)
    p.add_argument("--long-tokens", type=int, default=16)
    p.add_argument("--setups", default="aggregated,disaggregated",
                   help="comma list of: " + ", ".join(SETUPS))
    p.add_argument("--plot", default=str(Path(__file__).with_name("disagg.png")),
                   help="PNG path ('' to skip)")
    args = p.parse_args()
    results: dict[str, dict[str, Level]] = {}
    print(f"{'setup':<14} {'class':<5} {'req/s':>7} {'tok/s':>8} {'TTFT p50':>9} "
          f"{'TTFT p99':>9} {'ITL p50':>9} {'ITL p99':>9} {'errors':>6}   (ms)", flush=True)
    for setup in args.setups.split(","):
        workers, flags = SETUPS[setup]
        print(f"# {setup}: run --engine mocker --workers {workers} {' '.join(flags)} -- "
              f"{' '.join(MOCKER)}", file=sys.stderr, flush=True)
        proc, model, url = start_server(workers, ["--", *MOCKER], frontend=flags,
                                        engine="mocker")
        try:
            results[setup] = asyncio.run(mixed(url, model, args))
        finally:
            proc.send_signal(signal.SIGINT)
            proc.wait(60)
        for cls, lvl in results[setup].items():
            print(row(setup, cls, lvl), flush=True)
    if {"aggregated", "disaggregated"} <= results.keys():
        a, d = results["aggregated"], results["disaggregated"]
        print("\ndisaggregated / aggregated:")
        for cls, attr, q in (("chat", "itl", 0.5), ("chat", "itl", 0.99), ("long", "ttft", 0.5),
                             ("long", "ttft", 0.99), ("chat", "ttft", 0.99)):
            ratio = percentile(getattr(d[cls], attr), q) / percentile(getattr(a[cls], attr), q)
            print(f"  {cls} {attr.upper()} p{int(q * 100)}: {ratio:.2f}x")
        for cls in ("chat", "long"):
            ratio = ((d[cls].tokens / d[cls].wall_s) / (a[cls].tokens / a[cls].wall_s))
            print(f"  {cls} output tokens/s: {ratio:.2f}x")
    if args.plot and results:
        plot(results, args.plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
