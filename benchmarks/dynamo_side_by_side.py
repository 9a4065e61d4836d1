"""The same load through the real Dynamo 1.6.1 frontend to our mocker worker and to Dynamo's.

    python benchmarks/dynamo_side_by_side.py [--concurrency 64] [--requests 2048]
                                             [--max-tokens 64] [--speedup 1000000]
                                             [--dynamo-python PATH]

For each worker kind, in turn: a fresh file-discovery directory, one ``python -m
dynamo.frontend`` (round robin, TCP request plane, ZMQ events) and one worker serving the repo's
tiny model, either ``dynamo-backend worker --engine mocker`` (ours) or ``python -m dynamo.mocker``
(Dynamo's), both at ``--speedup-ratio`` (default 1e6: the simulated time is negligible, so the
figures are serving overhead). The load generator of ``dynamo-backend bench`` drives
``--requests`` streaming chat completions of ``--max-tokens`` tokens (``ignore_eos``) with
``--concurrency`` in flight, after a warm-up. Printed per worker kind: requests/s, output
tokens/s, TTFT p50, and the CPU time (user + system, from ``/proc``) per request of the worker
process and of the frontend process; then the ratios ours / Dynamo's.

The real Dynamo comes from ``--dynamo-python`` (default: ``$DYN_TEST_DYNAMO_PYTHON``, else
``.dynamo-venv/bin/python`` in the checkout, which ``.ci/run`` installs; INSTALL.md of the wire
reference has the recipe). Everything listens on 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from dynamo_backend_common.cli.bench import run_levels

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "src" / "dynamo_backend_common" / "_data" / "tiny-model"
_TICK = os.sysconf("SC_CLK_TCK")


def cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


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


def instances(url: str) -> int:
    try:
        body = httpx.get(url + "/health", timeout=2.0, trust_env=False).json()
    except (httpx.HTTPError, ValueError):
        return 0
    return sum(1 for i in body.get("instances", []) if i.get("endpoint") == "generate")


def one_kind(kind: str, args: argparse.Namespace) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix=f"side-by-side-{kind}-") as root:
        env = {**{k: v for k, v in os.environ.items() if not k.startswith(("DYN_", "ETCD_"))},
               "DYN_DISCOVERY_BACKEND": "file", "DYN_FILE_KV": f"{root}/kv",
               "DYN_REQUEST_PLANE": "tcp", "DYN_EVENT_PLANE": "zmq",
               "DYN_TCP_RPC_HOST": "127.0.0.1", "DYN_TCP_RESPONSE_STREAM_HOST": "127.0.0.1",
               "DYN_EVENT_PLANE_HOST": "127.0.0.1", "DYN_SYSTEM_HOST": "127.0.0.1",
               "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HOME": root,
               "DYN_LOG": "warn"}
        port = free_port()
        name = f"{kind}-mocker"
        if kind == "ours":
            worker_argv = [sys.executable, "-m", "dynamo_backend_common.cli", "worker",
                           "--engine", "mocker", "--model-path", str(TINY),
                           "--served-model-name", name, "--",
                           "--speedup-ratio", str(args.speedup)]
        else:
            worker_argv = [args.dynamo_python, "-m", "dynamo.mocker", "--model-path", str(TINY),
                           "--model-name", name, "--speedup-ratio", str(args.speedup),
                           "--block-size", "16", "--discovery-backend", "file",
                           "--request-plane", "tcp", "--event-plane", "zmq"]
        frontend_argv = [args.dynamo_python, "-m", "dynamo.frontend", "--http-host",
                         "127.0.0.1", "--http-port", str(port), "--discovery-backend", "file",
                         "--request-plane", "tcp", "--event-plane", "zmq", "--router-mode",
                         "round-robin"]
        logs = [open(f"{root}/{n}.log", "wb") for n in ("frontend", "worker")]
        procs = [subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env)
                 for argv, log in ((frontend_argv, logs[0]), (worker_argv, logs[1]))]
        url = f"http://127.0.0.1:{port}"
        try:
            wait_until(lambda: instances(url) >= 1, 90, f"{kind}: the worker in Dynamo's view",
                       procs)
            run_levels(url + "/v1", name, [8], 64, args.max_tokens, echo=False)  # warm-up
            f0, w0 = cpu_s(procs[0].pid), cpu_s(procs[1].pid)
            (lvl,) = run_levels(url + "/v1", name, [args.concurrency], args.requests,
                                args.max_tokens, echo=False)
            f1, w1 = cpu_s(procs[0].pid), cpu_s(procs[1].pid)
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
            raise SystemExit(f"{kind}: {lvl.errors} requests failed")
        n = lvl.requests
        return {"req/s": n / lvl.wall_s, "tok/s": lvl.tokens / lvl.wall_s,
                "ttft_ms": sorted(lvl.ttft)[len(lvl.ttft) // 2] * 1e3,
                "worker_ms": (w1 - w0) * 1e3 / n, "frontend_ms": (f1 - f0) * 1e3 / n}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--requests", type=int, default=2048)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--speedup", type=float, default=1e6, help="both mockers' --speedup-ratio")
    default_py = os.environ.get("DYN_TEST_DYNAMO_PYTHON") or str(
        REPO / ".dynamo-venv" / "bin" / "python")
    p.add_argument("--dynamo-python", default=default_py,
                   help="python of a venv with the real Dynamo 1.6.1 (default: %(default)s)")
    args = p.parse_args()
    if not os.access(args.dynamo_python, os.X_OK):
        p.error(f"no Dynamo python at {args.dynamo_python} (see --dynamo-python)")
    print(f"Dynamo 1.6.1 frontend, round robin, one worker; {args.concurrency} streams x "
          f"{args.max_tokens} tokens, {args.requests} requests")
    rows = {}
    for kind in ("ours", "dynamo"):
        rows[kind] = r = one_kind(kind, args)
        print(f"{kind + ' mocker':<14} {r['req/s']:>8.1f} req/s {r['tok/s']:>9.0f} tok/s  "
              f"TTFT p50 {r['ttft_ms']:>7.2f} ms  worker CPU {r['worker_ms']:>6.3f} ms/req  "
              f"frontend CPU {r['frontend_ms']:>6.3f} ms/req", flush=True)
    o, d = rows["ours"], rows["dynamo"]
    print(f"ours / Dynamo's: req/s {o['req/s'] / d['req/s']:.2f}, worker CPU per request "
          f"{o['worker_ms'] / d['worker_ms']:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
