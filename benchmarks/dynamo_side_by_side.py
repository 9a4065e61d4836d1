"""The same load through our stack and through the real Dynamo 1.6.1, side by side.

    python benchmarks/dynamo_side_by_side.py [--stacks mixed,dynamo] [--rounds 1]
                                             [--concurrency 64] [--requests 2048]
                                             [--max-tokens 64] [--prompt-words 100]
                                             [--speedup 1000000] [--dynamo-python PATH]
                                             [--base-src DIR] [--unique-prompts]
                                             [--profile DIR]

A *stack* is one frontend and one worker serving the repo's tiny model, each started fresh
with its own file-discovery directory, Dynamo's TCP request plane and ZMQ events, round robin:

- ``ours``: our whole stack, ``dynamo-backend frontend`` + ``dynamo-backend worker --engine
  mocker`` (what ``dynamo-backend run --engine mocker`` starts; the worker serves Dynamo's TCP
  plane and, beside it, our multiplexed fast path, which our frontend takes);
- ``dynamo``: the real Dynamo 1.6.1, ``python -m dynamo.frontend`` + ``python -m dynamo.mocker``;
- ``mixed``: Dynamo's frontend in front of our mocker worker (the worker alone compared);
- ``base``: ``ours`` with ``PYTHONPATH=--base-src`` (an older checkout's ``src``, e.g. from
  ``git worktree add /tmp/base HEAD``), for before/after figures of a change.

Both mockers run at ``--speedup-ratio`` (default 1e6: the simulated time is negligible, so the
figures are serving overhead); ours samples tokens from the model's vocabulary, so its output
decodes to text as Dynamo's does. The load generator of ``dynamo-backend bench`` drives
``--requests`` streaming chat completions of ``--max-tokens`` tokens (``ignore_eos``, usage
included) with ``--concurrency`` in flight, after a warm-up; the user message is a fixed text
of ``--prompt-words`` words. Printed per stack and round: requests/s, output tokens/s, TTFT p50
and the CPU time (user + system, from ``/proc``, each process with its descendants) per
request of the frontend, of the worker, and their total. ``--rounds`` N runs the stacks N
times, alternating their order (a shared machine drifts), and prints each stack's medians and
the median of the per-round ratios to ``dynamo`` (or to the last stack without it).

``--unique-prompts`` gives every measured request its own user message (random words), so no
prompt piece repeats (our frontend caches the tokens of the pieces it has seen). ``--profile
DIR`` runs ``py-spy record`` (``pip install py-spy``; raw collapsed stacks in DIR) on our
processes during the measured load and prints each one's top functions by self and inclusive
share; the profiler's own CPU lands on the machine, so a profiled run's figures are not
comparable with the others.

The default (``--stacks mixed,dynamo``) is the worker comparison: Dynamo's frontend in front of
our mocker, then of Dynamo's. The issue-11 figure (total server CPU per request, ours / Dynamo)
is ``--stacks ours,dynamo --rounds 7 --requests 4096``. A stack whose requests fail (on a loaded
machine a starved worker can miss its discovery heartbeat) runs again once.

The real Dynamo comes from ``--dynamo-python`` (default: ``$DYN_TEST_DYNAMO_PYTHON``, else
``.dynamo-venv/bin/python`` in the checkout, which ``.ci/run`` installs; INSTALL.md of the wire
reference has the recipe). Everything listens on 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx

from dynamo_backend_common.cli.bench import run_levels

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "src" / "dynamo_backend_common" / "_data" / "tiny-model"
_TICK = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_until(pred: object, timeout: float, what: str, procs: list[subprocess.Popen[bytes]]
               ) -> None:
    deadline = time.monotonic() + timeout
    while not pred():  # type: ignore[operator]
        for p in procs:
            if p.poll() is not None:
                raise SystemExit(f"{what}: a process exited with {p.returncode} (logs: see "
                                 f"the temporary directory)")
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.1)


#: What each stack is (see the module docstring).
STACKS = {"ours": "our frontend + our mocker", "dynamo": "Dynamo frontend + Dynamo mocker",
          "mixed": "Dynamo frontend + our mocker", "base": "--base-src frontend + mocker"}
_WORDS = ("the quick brown fox jumps over the lazy dog while a cat watches from the sunny "
          "windowsill and counts birds").split()


def make_prompt(words: int, seed: int | None = None) -> str:
    """A user message of ``words`` words: a summarising request over a repeated text, or with
    ``seed`` over words drawn at random (each seed its own message)."""
    head = "Summarise the following in one sentence:"
    n = max(0, words - len(head.split()))
    if seed is None:
        rest = [_WORDS[i % len(_WORDS)] for i in range(n)]
    else:
        rng = random.Random(seed)
        rest = [rng.choice(_WORDS) for _ in range(n)]
        rest[0] = f"{seed}:"
    return " ".join([head, *rest]) + "."


def tree_cpu_s(pid: int) -> float:
    """CPU seconds (user + system) of ``pid`` and of its live descendants."""
    table: dict[int, tuple[int, float]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            table[int(d)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / _TICK)
    total, todo = 0.0, [pid]
    while todo:
        p = todo.pop()
        total += table.get(p, (0, 0.0))[1]
        todo += [c for c, (pp, _) in table.items() if pp == p]
    return total


def _ready(url: str, name: str, ours: bool) -> bool:
    """The worker is in the frontend's view (Dynamo's ``/health`` lists endpoints; ours
    counts workers per model)."""
    try:
        body = httpx.get(url + "/health", timeout=2.0, trust_env=False).json()
    except (httpx.HTTPError, ValueError):
        return False
    if ours:
        return bool(body.get("models", {}).get(name, 0) >= 1)
    return sum(1 for i in body.get("instances", []) if i.get("endpoint") == "generate") >= 1


class StackFailed(Exception):
    """Requests of a stack's run failed (the run is retried once, then the script stops)."""


def run_stack(stack: str, args: argparse.Namespace) -> dict[str, float]:
    """:func:`one_stack`, once more with fresh processes if requests failed (on a loaded
    machine a starved worker can miss its discovery heartbeat and drop out for a while)."""
    try:
        return one_stack(stack, args)
    except StackFailed as exc:
        print(f"{exc}; running {stack} again", flush=True)
    try:
        return one_stack(stack, args)
    except StackFailed as exc:
        raise SystemExit(str(exc)) from None


def one_stack(stack: str, args: argparse.Namespace) -> dict[str, float]:
    """Start ``stack``'s frontend and worker, run the load, stop them; its figures."""
    ours_front = stack in ("ours", "base")
    ours_worker = stack != "dynamo"
    with tempfile.TemporaryDirectory(prefix=f"side-by-side-{stack}-") as root:
        env = {**{k: v for k, v in os.environ.items() if not k.startswith(("DYN_", "ETCD_"))},
               "DYN_DISCOVERY_BACKEND": "file", "DYN_FILE_KV": f"{root}/kv",
               "DYN_REQUEST_PLANE": "tcp", "DYN_EVENT_PLANE": "zmq",
               "DYN_TCP_RPC_HOST": "127.0.0.1", "DYN_TCP_RESPONSE_STREAM_HOST": "127.0.0.1",
               "DYN_EVENT_PLANE_HOST": "127.0.0.1", "DYN_SYSTEM_HOST": "127.0.0.1",
               "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HOME": root,
               "DYN_LOG": "warn"}
        if stack == "base":
            env["PYTHONPATH"] = os.pathsep.join(
                [args.base_src, *filter(None, [os.environ.get("PYTHONPATH")])])
        port = free_port()
        name = f"{stack}-mocker"
        if ours_worker:
            worker_argv = [sys.executable, "-m", "dynamo_backend_common.cli", "worker",
                           "--engine", "mocker", "--model-path", str(TINY),
                           "--served-model-name", name, "--",
                           "--speedup-ratio", str(args.speedup),
                           "--vocab-size", str(vocab_size())]
        else:
            worker_argv = [args.dynamo_python, "-m", "dynamo.mocker", "--model-path", str(TINY),
                           "--model-name", name, "--speedup-ratio", str(args.speedup),
                           "--block-size", "16", "--discovery-backend", "file",
                           "--request-plane", "tcp", "--event-plane", "zmq"]
        if ours_front:
            frontend_argv = [sys.executable, "-m", "dynamo_backend_common.cli", "frontend",
                             "--host", "127.0.0.1", "--port", str(port),
                             "--discovery-backend", "file", "--event-plane", "zmq",
                             "--router-mode", "round-robin"]
        else:
            frontend_argv = [args.dynamo_python, "-m", "dynamo.frontend", "--http-host",
                             "127.0.0.1", "--http-port", str(port), "--discovery-backend",
                             "file", "--request-plane", "tcp", "--event-plane", "zmq",
                             "--router-mode", "round-robin"]
        logs = [open(f"{root}/{n}.log", "wb") for n in ("frontend", "worker")]
        procs = [subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env)
                 for argv, log in ((frontend_argv, logs[0]), (worker_argv, logs[1]))]
        url = f"http://127.0.0.1:{port}"
        prompt = make_prompt(args.prompt_words)
        # Unique prompts: every measured request its own (the warm-up's are others still).
        prompts = ([make_prompt(args.prompt_words, seed) for seed in range(args.requests)]
                   if args.unique_prompts else None)
        try:
            wait_until(lambda: _ready(url, name, ours_front), 90,
                       f"{stack}: the worker in the frontend's view", procs)
            run_levels(url + "/v1", name, [8], 64, args.max_tokens, prompt=prompt,
                       echo=False)  # warm-up
            spies = start_profilers(args, stack, procs) if ours_worker else []
            f0, w0 = tree_cpu_s(procs[0].pid), tree_cpu_s(procs[1].pid)
            (lvl,) = run_levels(url + "/v1", name, [args.concurrency], args.requests,
                                args.max_tokens, prompt=prompt, prompts=prompts, echo=False)
            f1, w1 = tree_cpu_s(procs[0].pid), tree_cpu_s(procs[1].pid)
            stop_profilers(spies)
        finally:
            for p in procs:
                p.send_signal(signal.SIGINT)
            for p in procs:
                try:
                    p.wait(30)
                except subprocess.TimeoutExpired:
                    p.kill()
            for log in logs:
                log.close()
        if lvl.errors:
            raise StackFailed(f"{stack}: {lvl.errors} requests failed: {lvl.error_reasons}")
        n = lvl.requests
        fms, wms = (f1 - f0) * 1e3 / n, (w1 - w0) * 1e3 / n
        return {"req/s": n / lvl.wall_s, "tok/s": lvl.tokens / lvl.wall_s,
                "ttft_ms": sorted(lvl.ttft)[len(lvl.ttft) // 2] * 1e3,
                "frontend_ms": fms, "worker_ms": wms, "total_ms": fms + wms}


def start_profilers(args: argparse.Namespace, stack: str, procs: list[subprocess.Popen[bytes]]
                    ) -> list[tuple[subprocess.Popen[bytes], Path]]:
    """With ``--profile DIR``: ``py-spy record`` (raw collapsed stacks, non-blocking) on each of
    the stack's Python processes (ours only); the files are ``DIR/STACK-ROLE.txt``."""
    if not args.profile:
        return []
    out = Path(args.profile)
    out.mkdir(parents=True, exist_ok=True)
    spies = []
    roles = ("frontend", "worker")
    for role, proc in zip(roles, procs, strict=True):
        if role == "frontend" and stack not in ("ours", "base"):
            continue
        path = out / f"{stack}-{role}.txt"
        spy = subprocess.Popen(["py-spy", "record", "--nonblocking", "--format", "raw",
                                "--rate", "250", "--output", str(path), "--pid",
                                str(proc.pid)], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
        spies.append((spy, path))
    time.sleep(1.0)  # py-spy attaches
    return spies


def stop_profilers(spies: list[tuple[subprocess.Popen[bytes], Path]]) -> None:
    """Stop the profilers; print each profile's top functions (self and inclusive share)."""
    for spy, _ in spies:
        spy.send_signal(signal.SIGINT)
    for spy, path in spies:
        try:
            spy.wait(30)
        except subprocess.TimeoutExpired:
            spy.kill()
        if path.exists():
            print(profile_summary(path), flush=True)


def profile_summary(path: Path, top: int = 25) -> str:
    """The functions with the most samples in a py-spy raw profile: self share (the frame on
    top of the stack) and inclusive share (anywhere on the stack), of all samples."""
    own: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = [f.rsplit(":", 1)[0] if f.rsplit(":", 1)[-1].isdigit() else f
                  for f in stack.split(";")]
        own[frames[-1]] += n
        for f in set(frames):
            incl[f] += n
    lines = [f"profile {path} ({total} samples): self %, inclusive %, function"]
    for f, n in own.most_common(top):
        lines.append(f"  {100 * n / max(1, total):5.1f} {100 * incl[f] / max(1, total):5.1f}"
                     f"  {f}")
    return "\n".join(lines)


def vocab_size() -> int:
    """The tiny model's vocabulary (with added tokens): our mocker samples from it."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(TINY / "tokenizer.json"))
    return int(tok.get_vocab_size(with_added_tokens=True))


def _row(label: str, r: dict[str, float]) -> str:
    return (f"{label:<22} {r['req/s']:>8.1f} req/s {r['tok/s']:>8.0f} tok/s  TTFT p50 "
            f"{r['ttft_ms']:>7.2f} ms  CPU ms/req frontend {r['frontend_ms']:>6.3f} worker "
            f"{r['worker_ms']:>6.3f} total {r['total_ms']:>6.3f}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--stacks", default="mixed,dynamo",
                   help="comma list of " + ", ".join(f"{k} ({v})" for k, v in STACKS.items())
                   + " (default: %(default)s)")
    p.add_argument("--rounds", type=int, default=1,
                   help="run the stacks this many times, alternating their order; medians")
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--requests", type=int, default=2048)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--prompt-words", type=int, default=100,
                   help="words in the user message (default: %(default)s)")
    p.add_argument("--unique-prompts", action="store_true",
                   help="every request its own user message (random words; default: one "
                        "fixed message for all)")
    p.add_argument("--speedup", type=float, default=1e6, help="both mockers' --speedup-ratio")
    default_py = os.environ.get("DYN_TEST_DYNAMO_PYTHON") or str(
        REPO / ".dynamo-venv" / "bin" / "python")
    p.add_argument("--dynamo-python", default=default_py,
                   help="python of a venv with the real Dynamo 1.6.1 (default: %(default)s)")
    p.add_argument("--base-src", default=None,
                   help="the src directory the base stack imports (an older checkout)")
    p.add_argument("--profile", default=None, metavar="DIR",
                   help="py-spy our processes during the measured load (raw profiles in DIR, "
                        "top functions printed); the profiler costs CPU, so the figures of a "
                        "profiled run are not comparable")
    args = p.parse_args()
    stacks = [s.strip() for s in args.stacks.split(",") if s.strip()]
    if not stacks or any(s not in STACKS for s in stacks):
        p.error(f"--stacks takes a comma list of {', '.join(STACKS)}")
    if "base" in stacks and not args.base_src:
        p.error("the base stack needs --base-src DIR")
    if any(s in ("dynamo", "mixed") for s in stacks) and not os.access(args.dynamo_python,
                                                                         os.X_OK):
        p.error(f"no Dynamo python at {args.dynamo_python} (see --dynamo-python)")
    print(f"{args.concurrency} streams x {args.max_tokens} tokens, {args.prompt_words}-word "
          f"{'unique prompts' if args.unique_prompts else 'prompt'}, {args.requests} requests, "
          f"round robin, one worker, mocker speedup {args.speedup:g}; CPU from /proc "
          "(user + system)", flush=True)
    runs: dict[str, list[dict[str, float]]] = {s: [] for s in stacks}
    for rnd in range(args.rounds):
        for stack in (stacks if rnd % 2 == 0 else stacks[::-1]):
            r = run_stack(stack, args)
            runs[stack].append(r)
            print(_row(f"[{rnd + 1}] {stack}", r), flush=True)
    med = {s: {k: statistics.median(r[k] for r in rs) for k in rs[0]}
           for s, rs in runs.items()}
    print(f"medians of {args.rounds} round(s):")
    for s in stacks:
        print(_row(f"{s} ({STACKS[s]})", med[s]))
    ref = "dynamo" if "dynamo" in stacks else stacks[-1]
    for s in stacks:
        if s == ref:
            continue
        ratio = {k: statistics.median(a[k] / b[k] for a, b in zip(runs[s], runs[ref],
                                                                   strict=True))
                 for k in ("req/s", "frontend_ms", "worker_ms", "total_ms")}
        print(f"{s} / {ref} (median of per-round ratios): req/s {ratio['req/s']:.2f}, CPU per "
              f"request: frontend {ratio['frontend_ms']:.2f}, worker {ratio['worker_ms']:.2f}, "
              f"total {ratio['total_ms']:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
