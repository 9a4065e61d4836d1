"""First-hour papercuts of ``dynamo-backend run`` / ``worker`` / ``worker.run()``, for real:
subprocesses on 127.0.0.1, every wait on an output line (or the exit) with a deadline.

- the served model name resolves as ``--help`` says (``worker``: the engine's names; ``run``:
  the model directory's name; ``--served-model-name`` / ``DYN_SERVED_MODEL_NAME`` beat both);
- ``worker.run(engine)`` from Python honours ``DYN_MODEL_PATH`` and the other ``DYN_*`` vars;
- ``run`` shows its workers' warnings and errors without ``--worker-logs``, rate-limited;
- ``run`` whose stdout reader is gone (``| tee`` killed by the same Ctrl+C) still shuts down.
"""

from __future__ import annotations

import os
import queue
import re
import select
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import httpx
import pytest

from dynamo_backend_common.fixtures import tiny_model_dir

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
TIMEOUT = 60.0
_SERVING = re.compile(r"Serving (\S+) at (http://\S+/v1)")
_PID = re.compile(r"worker \d+/\d+ started \(pid (\d+)\)")

ENGINES = '''
import logging

from dynamo_backend_common import EngineConfig
from dynamo_backend_common.engines.echo import EchoEngine

log = logging.getLogger("noisy")


class Plain(EchoEngine):
    async def start(self, worker_id):
        await super().start(worker_id)
        return EngineConfig(model="plain-model", context_length=8192)


class Named(EchoEngine):
    async def start(self, worker_id):
        await super().start(worker_id)
        return EngineConfig(model="named-model", served_model_name="named-public",
                            context_length=8192)


class Noisy(EchoEngine):
    """max_tokens 5: one ERROR line per request; max_tokens 7: a burst of 60 WARNING lines."""

    async def generate(self, request, ctx):
        if request.stop_conditions.max_tokens == 5:
            log.error("engine failed request %s", ctx.id)
        elif request.stop_conditions.max_tokens == 7:
            for i in range(60):
                log.warning("burst line %d", i)
        async for out in super().generate(request, ctx):
            yield out
'''


class Proc:
    """A ``dynamo-backend`` (or Python) subprocess and its output lines.

    By default stderr is merged into stdout and a thread queues the lines. With
    ``own_stdout`` stderr is read by a thread (into :attr:`err_lines`) while stdout is read
    only inside :meth:`wait_for`, in the caller's thread, so that the test can close it: no
    other thread is blocked reading it, which would keep the pipe open.
    """

    def __init__(self, argv: Sequence[str], *, env: dict[str, str] | None = None,
                 cwd: Path = REPO, own_stdout: bool = False) -> None:
        self.lines: list[str] = []
        self.err_lines: list[str] = []
        self._q: queue.Queue[str | None] = queue.Queue()
        self._own = own_stdout
        self._buf = b""
        self.proc = subprocess.Popen(
            list(argv), cwd=cwd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE if own_stdout else subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1", "DYN_LOG": "info", **(env or {})})
        if own_stdout:
            threading.Thread(target=self._pump_err, daemon=True).start()
        else:
            threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            self._q.put(raw.decode(errors="replace").rstrip("\n"))
        self._q.put(None)

    def _pump_err(self) -> None:
        assert self.proc.stderr is not None
        for raw in self.proc.stderr:
            self.err_lines.append(raw.decode(errors="replace").rstrip("\n"))

    def _next_line(self, timeout: float) -> str | None:
        """The next stdout line; ``None`` at EOF; raises ``queue.Empty`` past ``timeout``."""
        if not self._own:
            return self._q.get(timeout=timeout)
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                raise queue.Empty
            data = os.read(fd, 65536)
            if not data:
                return None
            self._buf += data
        raw, self._buf = self._buf.split(b"\n", 1)
        return raw.decode(errors="replace")

    def output(self) -> str:
        return "\n".join(self.lines + self.err_lines)

    def wait_for(self, pred: Callable[[str], bool], timeout: float = TIMEOUT) -> str:
        """The next output line (after those already returned) satisfying ``pred``."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no matching line after {timeout}s:\n{self.output()}")
            try:
                line = self._next_line(left)
            except queue.Empty:
                continue
            if line is None:
                raise AssertionError(f"the process exited; output:\n{self.output()}")
            self.lines.append(line)
            if pred(line):
                return line

    def wait_line(self, needle: str, timeout: float = TIMEOUT) -> str:
        return self.wait_for(lambda s: needle in s, timeout)

    def stop(self, sig: int = signal.SIGINT, timeout: float = 40.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"still running {timeout}s after the signal:\n"
                                 f"{self.output()}") from None


def cli(*argv: str) -> list[str]:
    return [sys.executable, "-m", "dynamo_backend_common.cli", *argv]


@pytest.fixture
def procs() -> Iterator[Callable[..., Proc]]:
    started: list[Proc] = []

    def start(argv: Sequence[str], *, env: dict[str, str] | None = None,
              own_stdout: bool = False) -> Proc:
        p = Proc(argv, env=env, own_stdout=own_stdout)
        started.append(p)
        return p

    yield start
    for p in started:
        if p.proc.poll() is None:
            p.proc.kill()
            p.proc.wait()


@pytest.fixture
def engines(tmp_path: Path) -> Path:
    f = tmp_path / "papercut_engines.py"
    f.write_text(ENGINES)
    return f


def chat(url: str, model: str, max_tokens: int) -> httpx.Response:
    return httpx.post(f"{url}/chat/completions", timeout=30, trust_env=False, json={
        "model": model, "max_tokens": max_tokens,
        "messages": [{"role": "user", "content": "The quick brown fox"}]})


# -- 1. served model name -------------------------------------------------------------------


def test_served_model_names_resolve_as_the_help_says(
        procs: Callable[..., Proc], engines: Path, tmp_path: Path) -> None:
    model = tmp_path / "my-folder"
    shutil.copytree(tiny_model_dir(), model)
    disc = f"file://{tmp_path / 'kv'}"
    common = ["--model-path", str(model), "--discovery", disc, "--namespace", "names",
              "--graceful-shutdown-grace-secs", "0"]
    # worker: --served-model-name, else EngineConfig.served_model_name, else EngineConfig.model;
    # the model directory does not name it.
    cases = {"plain-model": [f"{engines}:Plain"], "named-public": [f"{engines}:Named"],
             "flag-name": [f"{engines}:Named", "--served-model-name", "flag-name"]}
    workers = {name: procs(cli("worker", "--engine", *spec, *common))
               for name, spec in cases.items()}
    env_worker = procs(cli("worker", "--engine", f"{engines}:Named", *common),
                       env={"DYN_SERVED_MODEL_NAME": "env-name"})
    for name, w in [*workers.items(), ("env-name", env_worker)]:
        line = w.wait_line("Serving ")
        assert f"Serving {name} on names.backend.generate" in line, w.output()
    for w in [*workers.values(), env_worker]:
        assert w.stop(signal.SIGTERM) == 0, w.output()

    # run: --served-model-name / DYN_SERVED_MODEL_NAME, else the directory's name; the
    # engine's EngineConfig names are not used.
    for env, served in (({}, "my-folder"), ({"DYN_SERVED_MODEL_NAME": "env-name"}, "env-name")):
        run = procs(cli("run", "--engine", f"{engines}:Named", "--model", str(model),
                        "--port", "0"), env=env)
        m = _SERVING.search(run.wait_for(lambda s: _SERVING.search(s) is not None))
        assert m is not None and m.group(1) == served, run.output()
        assert chat(m.group(2), served, 3).status_code == 200
        assert run.stop() == 0, run.output()


# -- 2. worker.run() from Python --------------------------------------------------------------


def test_python_run_honours_the_dyn_worker_environment(
        procs: Callable[..., Proc], tmp_path: Path) -> None:
    """``run(EchoEngine())`` with no config: DYN_MODEL_PATH gives the frontend a tokenizer
    (the chat request is served), DYN_SERVED_MODEL_NAME / DYN_NAMESPACE / DYN_DISCOVERY apply."""
    script = tmp_path / "serve.py"
    script.write_text("from dynamo_backend_common.engines.echo import EchoEngine\n"
                      "from dynamo_backend_common.worker import run\n"
                      "raise SystemExit(run(EchoEngine()))\n")
    disc, ns = f"file://{tmp_path / 'kv'}", f"py{uuid.uuid4().hex[:8]}"
    worker = procs([sys.executable, str(script)], env={
        "DYN_MODEL_PATH": str(tiny_model_dir()), "DYN_SERVED_MODEL_NAME": "py-served",
        "DYN_DISCOVERY": disc, "DYN_NAMESPACE": ns,
        "DYN_GRACEFUL_SHUTDOWN_GRACE_PERIOD_SECS": "0"})
    front = procs(cli("frontend", "--port", "0", "--discovery", disc, "--namespace", ns))
    line = front.wait_line("Frontend serving OpenAI API at ")
    url = line.split(" at ", 1)[1].split()[0]
    front.wait_line("model py-served added")
    assert f"Serving py-served on {ns}.backend.generate" in worker.wait_line("Serving ")
    r = chat(url, "py-served", 4)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"]
    assert worker.stop(signal.SIGTERM) == 0, worker.output()
    assert front.stop() == 0


# -- 3. worker errors visible under run -------------------------------------------------------


def test_run_shows_worker_errors_and_warnings_rate_limited(
        procs: Callable[..., Proc], engines: Path) -> None:
    run = procs(cli("run", "--engine", f"{engines}:Noisy", "--port", "0"))
    m = _SERVING.search(run.wait_for(lambda s: _SERVING.search(s) is not None))
    assert m is not None
    model, url = m.group(1), m.group(2)
    for _ in range(3):  # one ERROR line per request, each shown with the worker's number
        assert chat(url, model, 5).status_code == 200
        line = run.wait_line("engine failed request")
        assert line.startswith("[worker 1/1] ") and " ERROR noisy[" in line
    # A burst of 60 warnings: at most 10 a second shown, the rest counted in notes.
    assert chat(url, model, 7).status_code == 200
    shown = suppressed = 0
    note = re.compile(r"^\[worker 1/1\] \((\d+) lines? suppressed; --worker-logs shows all\)$")

    def counted(line: str) -> bool:
        nonlocal shown, suppressed
        if "burst line" in line:
            shown += 1
        elif (n := note.match(line)) is not None:
            suppressed += int(n.group(1))
        return shown + suppressed == 60

    run.wait_for(counted, timeout=10)
    assert 1 <= shown <= 20 and suppressed >= 40, run.output()
    assert run.stop() == 0, run.output()
    echoed = [s for s in run.lines if s.startswith("[worker ")]
    assert not any(" INFO " in s for s in echoed), "info lines are not copied by default"


# -- 5. stdout closed, then Ctrl+C -------------------------------------------------------------


def test_run_shuts_down_cleanly_when_its_stdout_reader_is_gone(
        procs: Callable[..., Proc]) -> None:
    """``dynamo-backend run | tee log`` and Ctrl+C: ``tee`` dies first, the next progress line
    hits a closed pipe; the run still stops its workers, removes its discovery dir, exits 0."""
    run = procs(cli("run", "--engine", "echo", "--port", "0"), own_stdout=True)
    tmp_dir = run.wait_line("discovery: file://").split("file://", 1)[1].split()[0]
    pid_line = run.wait_for(lambda s: _PID.search(s) is not None)
    pm = _PID.search(pid_line)
    assert pm is not None
    worker_pid = int(pm.group(1))
    run.wait_for(lambda s: _SERVING.search(s) is not None)
    assert os.path.isdir(tmp_dir)
    assert run.proc.stdout is not None
    run.proc.stdout.close()  # the reader is gone: writes to the pipe now fail with EPIPE
    assert run.stop() == 0, run.output()
    assert not os.path.exists(tmp_dir), "the temp discovery directory was left behind"
    with pytest.raises(ProcessLookupError):  # the worker was stopped and reaped
        os.kill(worker_pid, 0)
    assert not any("Traceback" in s for s in run.err_lines), run.output()
