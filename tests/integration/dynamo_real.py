"""The real NVIDIA Dynamo 1.6.1 beside ours, for the interop tests.

The Dynamo frontend (``python -m dynamo.frontend``) and mocker (``python -m dynamo.mocker``)
run from their own venv: ``$DYN_TEST_DYNAMO_PYTHON`` (``.ci/run`` installs it and sets it), else
``.dynamo-venv/bin/python`` in the checkout or ``/work/dynamo/venv/bin/python`` when present.
Without one the tests skip, except under ``DYN_TEST_REQUIRE_DYNAMO=1`` (CI), where they fail:
interop is proved against the real binaries, never skipped.

Every process shares one :class:`Deployment`: a private ``DYN_FILE_KV`` directory and the
loopback-only environment Dynamo's docs give (file discovery, TCP request plane, ZMQ events).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import httpx
import pytest
from conftest import free_port

REPO = Path(__file__).resolve().parents[2]
TINY_MODEL = REPO / "src" / "dynamo_backend_common" / "_data" / "tiny-model"
START_TIMEOUT = 60.0


def dynamo_python() -> str:
    """The Dynamo venv's python, or skip (fail under ``DYN_TEST_REQUIRE_DYNAMO=1``)."""
    candidates = [os.environ.get("DYN_TEST_DYNAMO_PYTHON", ""),
                  str(REPO / ".dynamo-venv" / "bin" / "python"),
                  "/work/dynamo/venv/bin/python"]
    for c in candidates:
        if c and os.path.isfile(c) and os.access(c, os.X_OK):
            return c
    msg = ("the real Dynamo 1.6.1 is not installed (set DYN_TEST_DYNAMO_PYTHON; .ci/run "
           "installs it)")
    if os.environ.get("DYN_TEST_REQUIRE_DYNAMO") == "1":
        pytest.fail(msg)
    pytest.skip(msg)


class Proc:
    """A subprocess whose output lines are collected (and kept in a log file)."""

    def __init__(self, name: str, argv: Sequence[str], env: dict[str, str], log: Path) -> None:
        self.name = name
        self.argv = list(argv)
        self.log_path = log
        self.lines: list[str] = []
        #: ``http://host:port`` of the process's status server (/metrics), where known.
        self.status_url = ""
        self._cond = threading.Condition()
        self.proc = subprocess.Popen(self.argv, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, env=env,
                                     errors="replace")
        self._pump_thread = threading.Thread(target=self._pump, daemon=True)
        self._pump_thread.start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        with open(self.log_path, "a") as log:
            for line in self.proc.stdout:
                log.write(line)
                log.flush()
                with self._cond:
                    self.lines.append(line.rstrip("\n"))
                    self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def wait_line(self, pred: Callable[[str], bool] | str, timeout: float = 30.0) -> str:
        """The first output line (seen so far or later) matching ``pred`` (a substring or a
        predicate); fails after ``timeout`` or when the process exits without one."""
        test = (lambda s: pred in s) if isinstance(pred, str) else pred
        deadline = time.monotonic() + timeout
        seen = 0
        with self._cond:
            while True:
                for line in self.lines[seen:]:
                    if test(line):
                        return line
                seen = len(self.lines)
                left = deadline - time.monotonic()
                if left <= 0 or (self.proc.poll() is not None and not self._pump_thread.is_alive()
                                 and seen == len(self.lines)):
                    raise AssertionError(f"{self.name}: no matching line after {timeout}s "
                                         f"(exit {self.proc.poll()}):\n{self.tail()}")
                self._cond.wait(min(left, 0.5))

    def tail(self, n: int = 60) -> str:
        with self._cond:
            return "\n".join(self.lines[-n:])

    def signal(self, sig: int) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)

    def wait(self, timeout: float = 30.0) -> int:
        return self.proc.wait(timeout)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._pump_thread.join(5)


def wait_until(pred: Callable[[], bool], timeout: float, what: str, interval: float = 0.05) -> None:
    """Poll ``pred`` (an external process's state: there is no event to wait on) until true."""
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


class Deployment:
    """One shared file-discovery root and environment; starts Dynamo's and our processes."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.kv = root / "kv"
        self.kv.mkdir(parents=True, exist_ok=True)
        self.python = dynamo_python()
        home = root / "home"
        home.mkdir(exist_ok=True)
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith(("DYN_", "ETCD_"))},
            "DYN_DISCOVERY_BACKEND": "file", "DYN_FILE_KV": str(self.kv),
            "DYN_REQUEST_PLANE": "tcp", "DYN_EVENT_PLANE": "zmq",
            "DYN_TCP_RPC_HOST": "127.0.0.1", "DYN_TCP_RESPONSE_STREAM_HOST": "127.0.0.1",
            "DYN_EVENT_PLANE_HOST": "127.0.0.1", "DYN_SYSTEM_HOST": "127.0.0.1",
            "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
            # Dynamo's frontend caches model files under $HOME; keep it inside the test.
            "HOME": str(home), "DYN_MDC_CACHE": str(root / "mdc-cache"),
        }
        self.procs: list[Proc] = []
        self._n = 0

    def _spawn(self, name: str, argv: Sequence[str], extra: dict[str, str] | None = None) -> Proc:
        self._n += 1
        p = Proc(name, argv, {**self.env, **(extra or {})},
                 self.root / f"{self._n:02d}-{name}.log")
        self.procs.append(p)
        return p

    # -- Dynamo's processes -------------------------------------------------------------------
    def dynamo_frontend(self, *extra: str, router_mode: str = "round-robin") -> tuple[Proc, str]:
        port = free_port()
        p = self._spawn("dynamo-frontend", [
            self.python, "-m", "dynamo.frontend", "--http-host", "127.0.0.1",
            "--http-port", str(port), "--discovery-backend", "file", "--request-plane", "tcp",
            "--event-plane", "zmq", "--router-mode", router_mode, *extra])
        url = f"http://127.0.0.1:{port}"
        wait_until(_http_ok(url + "/live", p), START_TIMEOUT, "the Dynamo frontend")
        return p, url

    def dynamo_mocker(self, name: str, *extra: str, speedup: float = 1000000,
                      system_port: int | None = None) -> Proc:
        """Dynamo's mocker; its status server (/metrics) on ``system_port`` (0: a free one)."""
        sp: dict[str, str] = {}
        if system_port is not None:
            sp = {"DYN_SYSTEM_PORT": str(system_port or _free_i16_port())}
        p = self._spawn("dynamo-mocker", [
            self.python, "-m", "dynamo.mocker", "--model-path", str(TINY_MODEL),
            "--model-name", name, "--speedup-ratio", str(speedup), "--block-size", "16",
            "--discovery-backend", "file", "--request-plane", "tcp", "--event-plane", "zmq",
            *extra], sp)
        if sp:
            p.status_url = f"http://127.0.0.1:{sp['DYN_SYSTEM_PORT']}"
        return p

    # -- ours ---------------------------------------------------------------------------------
    def our_worker(self, engine: str, name: str, *extra: str,
                   model_path: Path = TINY_MODEL, env: dict[str, str] | None = None) -> Proc:
        """One of our workers (``env``: extra environment variables for it alone)."""
        p = self._spawn(f"our-worker-{engine.rsplit(':', 1)[-1]}", [
            sys.executable, "-m", "dynamo_backend_common.cli", "worker", "--engine", engine,
            "--model-path", str(model_path), "--served-model-name", name, *extra],
            {"DYN_LOG": "info", "PYTHONPATH": str(REPO), **(env or {})})
        p.wait_line("Serving ", START_TIMEOUT)
        # "status server on http://127.0.0.1:PORT (...)": the worker's /metrics
        p.status_url = p.wait_line("status server on ", 5).split(" on ", 1)[1].split()[0]
        return p

    def our_frontend(self, *extra: str, router_mode: str = "round_robin") -> tuple[Proc, str]:
        port = free_port()
        p = self._spawn("our-frontend", [
            sys.executable, "-m", "dynamo_backend_common.cli", "frontend", "--host", "127.0.0.1",
            "--port", str(port), "--router-mode", router_mode, *extra], {"DYN_LOG": "info"})
        url = f"http://127.0.0.1:{port}"
        wait_until(_http_ok(url + "/live", p), START_TIMEOUT, "our frontend")
        return p, url

    def close(self) -> None:
        for p in reversed(self.procs):
            p.stop()


def _free_i16_port() -> int:
    """A free port below 32768: Dynamo 1.6.1 parses ``DYN_SYSTEM_PORT`` as an i16."""
    import random
    import socket

    for _ in range(200):
        port = random.randrange(20000, 32768)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise AssertionError("no free port below 32768")


def _http_ok(url: str, proc: Proc) -> Callable[[], bool]:
    def check() -> bool:
        if proc.proc.poll() is not None:
            raise AssertionError(f"{proc.name} exited with {proc.proc.returncode}:\n"
                                 f"{proc.tail()}")
        try:
            return httpx.get(url, timeout=1.0, trust_env=False).status_code == 200
        except httpx.HTTPError:
            return False

    return check


def models(url: str) -> list[str]:
    """Model ids a frontend lists at ``url`` right now."""
    try:
        r = httpx.get(url + "/v1/models", timeout=5.0, trust_env=False)
    except httpx.HTTPError:
        return []
    if r.status_code != 200:
        return []
    return [m["id"] for m in r.json().get("data", [])]


def wait_for_model(url: str, name: str, timeout: float = START_TIMEOUT) -> None:
    wait_until(lambda: name in models(url), timeout, f"model {name!r} at {url}")


def generate_instances(url: str) -> set[int]:
    """Instance ids of ``generate`` endpoints a Dynamo frontend's ``/health`` lists now."""
    try:
        body = httpx.get(url + "/health", timeout=5.0, trust_env=False).json()
    except (httpx.HTTPError, ValueError):
        return set()
    return {i["instance_id"] for i in body.get("instances", [])
            if i.get("endpoint") == "generate"}


def wait_for_instances(url: str, n: int, timeout: float = START_TIMEOUT) -> None:
    """Until a Dynamo frontend knows ``n`` generate instances (a model is listed as soon as
    the first worker of its pool is)."""
    wait_until(lambda: len(generate_instances(url)) >= n, timeout,
               f"{n} generate instances at {url}")


def metric_at(base_url: str, name: str) -> float:
    """Sum of the samples of ``name`` (no label filter) on ``base_url``'s /metrics; 0 if
    none or unreachable."""
    try:
        text = httpx.get(base_url + "/metrics", timeout=5.0, trust_env=False).text
    except httpx.HTTPError:
        return 0.0
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and line[len(name):len(name) + 1] in ("{", " "):
            total += float(line.rsplit(" ", 1)[1])
    return total


def metric(proc: Proc, name: str) -> float:
    """:func:`metric_at` of a worker's status server."""
    return metric_at(proc.status_url, name)


@pytest.fixture
def deployment(tmp_path: Path) -> Iterator[Deployment]:
    d = Deployment(tmp_path)
    try:
        yield d
    finally:
        d.close()


__all__ = ["Deployment", "Proc", "deployment", "dynamo_python", "generate_instances",
           "metric", "metric_at", "models", "wait_for_instances", "wait_for_model", "wait_until"]
