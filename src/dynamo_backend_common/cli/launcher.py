"""Process-level entry points: ``dynamo-backend frontend`` and ``dynamo-backend run``.

:func:`serve_frontend` runs a :class:`Frontend` behind an :class:`HttpServer` until SIGINT or
SIGTERM. :func:`run_local` is the one-command server: it starts N worker subprocesses
(``python -m dynamo_backend_common.cli worker ...``) sharing a private ``file://`` discovery
directory, serves the frontend in-process once every worker registered, and prints
``Serving MODEL at http://HOST:PORT/v1``. On SIGINT/SIGTERM it stops the HTTP server and the
frontend, then SIGTERMs the workers and waits for them (SIGKILL after ``worker_stop_s``); a
second signal kills the workers at once. A worker that exits early is reported with its last
log lines; during start-up that aborts the run (exit 1), later the other workers keep serving.

Worker output: with ``worker_logs`` every line is copied to stderr as ``[worker i/N] LINE``;
without it only WARNING/ERROR/CRITICAL log records (with their traceback lines) are, at most
:data:`ECHO_LINES_PER_S` lines per second per worker, the rest counted in a
``[worker i/N] (k lines suppressed)`` note. Progress goes to stdout. Neither stream being
closed (``run ... | tee log`` with the ``tee`` gone after Ctrl+C) stops the shutdown: the
stream is pointed at ``/dev/null`` and the run ends as it would have.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import re
import shutil
import signal
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from ..frontend.http import HttpServer
from ..frontend.model_manager import WorkerEntry
from ..frontend.replicas import (
    ReplicaOptions,
    ReplicaStartError,
    ReplicaSupervisor,
    ensure_port_free,
    serve_replicated,
)
from ..frontend.server import Frontend, FrontendConfig
from ..model_dir import ModelDir, ModelDirError
from ..runtime.processes import ChildProcess, pdeathsig_hook
from ..runtime.tasks import cancel_and_wait

__all__ = ["LocalRunConfig", "WorkerProcess", "run_local", "serve_frontend"]

_LOG_LINES = 40
#: Without ``--worker-logs``: the most warning/error lines copied per worker per second.
ECHO_LINES_PER_S = 10
# A record's first line as log_setup formats it: "2024-05-01 12:00:00,123 LEVEL name[pid]: ..."
_RECORD = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ ([A-Z]+) ")
_SHOWN_LEVELS = frozenset({"WARNING", "ERROR", "CRITICAL"})


def _emit(msg: str, stream: TextIO) -> None:
    """Print ``msg`` to ``stream``; if the reader went away (EPIPE, EIO, closed), point the
    stream's descriptor at /dev/null so this and every later write is dropped, never raised
    into the run's shutdown."""
    try:
        print(msg, file=stream, flush=True)
    except (OSError, ValueError):
        with contextlib.suppress(OSError, ValueError):
            devnull = os.open(os.devnull, os.O_WRONLY)
            try:
                os.dup2(devnull, stream.fileno())
            finally:
                os.close(devnull)
        with contextlib.suppress(OSError, ValueError):
            stream.flush()  # what was buffered goes to /dev/null now


def _say(msg: str) -> None:
    """A progress line on stdout (see :func:`_emit`)."""
    _emit(msg, sys.stdout)


async def _wait_for_signal(stop: asyncio.Event, on_second: Callable[[], None] | None = None
                           ) -> list[signal.Signals]:
    """Install SIGINT/SIGTERM handlers that set ``stop`` (the second calls ``on_second``)."""
    loop = asyncio.get_running_loop()
    seen: list[signal.Signals] = []

    def handler(sig: signal.Signals) -> None:
        seen.append(sig)
        if len(seen) > 1 and on_second is not None:
            on_second()
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, handler, sig)
    return seen


def _remove_signal_handlers() -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.remove_signal_handler(sig)


async def serve_frontend(config: FrontendConfig, *, stop: asyncio.Event | None = None,
                         processes: int = 1, replica_sync: bool | None = None) -> int:
    """Serve until SIGINT/SIGTERM (or ``stop`` is set). Returns the exit code.

    ``processes`` > 1 (or ``replica_sync``) runs :func:`~..frontend.replicas.serve_replicated`:
    this process and ``processes - 1`` children on one port; 1 is the plain frontend."""
    stop = stop or asyncio.Event()
    options = ReplicaOptions(processes, replica_sync)
    if options.processes > 1 or options.sync:
        supervisor = ReplicaSupervisor(config, options, say=_say)
        await _wait_for_signal(stop, supervisor.kill)
        try:
            return await serve_replicated(supervisor, stop=stop)
        finally:
            _remove_signal_handlers()
    await _wait_for_signal(stop)
    frontend = Frontend(config)
    await frontend.start()
    server = HttpServer(frontend.app, config.host, config.port)
    try:
        try:
            await server.start()
        except OSError as exc:
            _say(f"cannot listen on {config.host}:{config.port}: {exc}")
            return 1
        _say(f"Frontend serving OpenAI API at {server.url}/v1 (router: {config.router_mode}, "
             f"discovery: {config.discovery or 'file://'})")
        waiter = asyncio.ensure_future(stop.wait())
        served = asyncio.ensure_future(server.wait())
        await asyncio.wait({waiter, served}, return_when=asyncio.FIRST_COMPLETED)
        waiter.cancel()
        served.cancel()
        _say("shutting down")
    finally:
        await server.stop()
        await frontend.close()
        _remove_signal_handlers()
    return 0


# --------------------------------------------------------------------------- workers


class WorkerProcess(ChildProcess):
    """One worker subprocess; keeps its last log lines (stdout and stderr merged).

    ``echo_logs`` copies every line to stderr; otherwise warning/error records are copied,
    rate-limited to ``echo_per_s`` lines per second (see the module doc).
    """

    def __init__(self, index: int, total: int, argv: Sequence[str], *,
                 echo_logs: bool = False, echo_per_s: int = ECHO_LINES_PER_S,
                 role: str = "aggregated") -> None:
        self.index = index
        self.total = total
        self.role = role
        self.argv = list(argv)
        self.echo_logs = echo_logs
        self.echo_per_s = echo_per_s
        self.lines: collections.deque[str] = collections.deque(maxlen=_LOG_LINES)
        self._in_shown_record = False  # the current record is a warning/error
        self._window_start = -1.0
        self._window_lines = 0
        self._suppressed = 0
        self._note: asyncio.TimerHandle | None = None  # reports _suppressed when the window ends

    @property
    def name(self) -> str:
        role = "" if self.role == "aggregated" else f" ({self.role})"
        return f"worker {self.index}/{self.total}{role}"

    async def start(self) -> None:
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.proc = await asyncio.create_subprocess_exec(
            *self.argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT, env=env, start_new_session=True,
            preexec_fn=pdeathsig_hook())
        self._reader = asyncio.get_running_loop().create_task(self._read())

    async def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        try:
            async for raw in self.proc.stdout:
                line = raw.decode(errors="replace").rstrip()
                self.lines.append(line)
                if self.echo_logs:
                    _emit(f"[{self.name}] {line}", sys.stderr)
                else:
                    self._echo_if_shown(line)
        finally:
            self._flush_suppressed()

    def _echo_if_shown(self, line: str) -> None:
        """Copy a warning/error line (a record's first line or its continuation) to stderr
        unless this second's budget is spent; count it for the note then."""
        m = _RECORD.match(line)
        if m is not None:
            self._in_shown_record = m.group(1) in _SHOWN_LEVELS
        if not self._in_shown_record:
            return
        loop = asyncio.get_running_loop()
        now = loop.time()
        if now - self._window_start >= 1.0:
            self._flush_suppressed()
            self._window_start, self._window_lines = now, 0
        if self._window_lines < self.echo_per_s:
            self._window_lines += 1
            _emit(f"[{self.name}] {line}", sys.stderr)
            return
        self._suppressed += 1
        if self._note is None:
            self._note = loop.call_at(self._window_start + 1.0, self._flush_suppressed)

    def _flush_suppressed(self) -> None:
        if self._note is not None:
            self._note.cancel()
            self._note = None
        if self._suppressed:
            k, self._suppressed = self._suppressed, 0
            _emit(f"[{self.name}] ({k} line{'s' if k > 1 else ''} suppressed; "
                  "--worker-logs shows all)", sys.stderr)

    def last_lines(self) -> str:
        return "\n".join(f"    {line}" for line in self.lines) or "    (no output)"

    def report(self, message: str) -> None:
        _say(message)


@dataclass
class LocalRunConfig:
    """``dynamo-backend run`` options."""

    engine: str = "echo"
    engine_args: list[str] = field(default_factory=list)
    model: str | None = None
    served_model_name: str | None = None
    workers: int = 1
    host: str = "127.0.0.1"
    port: int = 8000
    router_mode: str = "round_robin"
    kv_overlap_weight: float = 1.0
    router_temperature: float = 0.0
    api_key: str | None = None
    migration_limit: int = 3
    namespace: str = "dynamo"
    start_timeout_s: float = 60.0
    worker_stop_s: float = 30.0
    worker_logs: bool = False
    #: More :class:`FrontendConfig` fields (parsers, timeout, field policy).
    frontend_options: dict[str, Any] = field(default_factory=dict)
    #: Frontend processes sharing the port (this one and N-1 children, see
    #: :mod:`..frontend.replicas`), and their router replica sync (``None``: on when N > 1).
    frontend_processes: int = 1
    replica_sync: bool | None = None
    #: A disaggregated set: this many ``--disaggregation-mode prefill`` workers and this many
    #: ``decode`` ones, beside the ``workers`` aggregated ones (see docs/disaggregation.md).
    prefill_workers: int = 0
    decode_workers: int = 0

    def roles(self) -> list[str]:
        """Each worker's disaggregation mode, in start order."""
        return (["aggregated"] * self.workers + ["decode"] * self.decode_workers
                + ["prefill"] * self.prefill_workers)


def worker_argv(cfg: LocalRunConfig, model_dir: Path, name: str, discovery: str,
                vocab_size: int | None = None, role: str = "aggregated") -> list[str]:
    """The worker command line. The mocker samples token ids in ``[0, --vocab-size)``; unless
    given, that is set to the model's vocabulary so its output decodes to text."""
    argv = [sys.executable, "-m", "dynamo_backend_common.cli", "worker",
            "--engine", cfg.engine, "--model-path", str(model_dir),
            "--served-model-name", name, "--discovery", discovery,
            "--namespace", cfg.namespace, "--migration-limit", str(cfg.migration_limit),
            "--graceful-shutdown-grace-secs", "0", "--disaggregation-mode", role]
    engine_args = list(cfg.engine_args)
    if (cfg.engine == "mocker" and vocab_size is not None
            and not any(a.startswith("--vocab-size") for a in engine_args)):
        engine_args += ["--vocab-size", str(vocab_size)]
    if engine_args:
        argv += ["--", *engine_args]
    return argv


async def run_local(cfg: LocalRunConfig, *, stop: asyncio.Event | None = None) -> int:
    """The one-command server (see the module doc). Returns the exit code."""
    from ..fixtures import tiny_model_dir

    if min(cfg.workers, cfg.prefill_workers, cfg.decode_workers) < 0:
        _say("--workers, --prefill-workers and --decode-workers must be >= 0")
        return 2
    if cfg.prefill_workers and not (cfg.decode_workers or cfg.workers):
        _say("--prefill-workers needs --decode-workers (or --workers): prefill workers serve "
             "no request on their own")
        return 2
    roles = cfg.roles()
    if not roles:
        _say("--workers must be >= 1")
        return 2
    serving = cfg.workers + cfg.decode_workers  # the workers that make the model listed
    model_dir = Path(cfg.model) if cfg.model else tiny_model_dir()
    try:
        md = await asyncio.to_thread(ModelDir.load, model_dir)
    except ModelDirError as exc:
        _say(f"cannot use model directory: {exc}")
        return 2
    name = cfg.served_model_name or md.name
    stop = stop or asyncio.Event()
    procs: list[WorkerProcess] = []

    try:
        options = ReplicaOptions(cfg.frontend_processes, cfg.replica_sync)
    except ValueError as exc:
        _say(f"--frontend-processes: {exc}")
        return 2
    replicas: ReplicaSupervisor | None = None

    def kill_all() -> None:
        _say("second signal: killing workers")
        for p in procs:
            p.signal(signal.SIGKILL)
        if replicas is not None:
            replicas.kill()

    await _wait_for_signal(stop, kill_all)
    tmp = tempfile.mkdtemp(prefix="dynamo-run-")
    discovery = f"file://{tmp}"
    _say(f"discovery: {discovery} (private to this run, removed when it stops)")
    fe_config = FrontendConfig(
        host=cfg.host, port=cfg.port, discovery=discovery, namespace=cfg.namespace,
        router_mode=cfg.router_mode, kv_overlap_weight=cfg.kv_overlap_weight,
        router_temperature=cfg.router_temperature, api_key=cfg.api_key,
        **cfg.frontend_options)
    frontend = Frontend(fe_config)
    multi = options.processes > 1
    if multi or options.sync:
        replicas = ReplicaSupervisor(fe_config, options, say=_say, wait_model=name,
                                     wait_workers=serving)
    services = replicas.services(frontend) if replicas is not None else None
    server = HttpServer(frontend.app, cfg.host, cfg.port, reuse_port=multi)
    waits: dict[asyncio.Future[Any], WorkerProcess] = {}
    code = 0
    ready = 0

    total = len(roles)

    def on_worker(model: str, worker: WorkerEntry, added: bool) -> None:
        nonlocal ready
        if model == name and added and ready < total:
            ready += 1
            role = worker.card.worker_type
            _say(f"worker {ready}/{total} ready ({role + ', ' if role != 'aggregated' else ''}"
                 f"instance {worker.instance_id:x} at {worker.address})")

    async def all_registered() -> None:
        await frontend.wait_for_model(name, workers=serving, timeout=cfg.start_timeout_s)
        if cfg.prefill_workers:
            def prefill_ready() -> bool:
                entry = frontend.models.prefill.models.get(name)
                return entry is not None and len(entry.workers) >= cfg.prefill_workers
            await frontend.models.wait_for(prefill_ready, timeout=cfg.start_timeout_s)

    try:
        try:  # fail before starting anything when the port is taken
            if multi:
                ensure_port_free(cfg.host, cfg.port)
            server.bind()
        except OSError as exc:
            _say(f"cannot listen on {cfg.host}:{cfg.port}: {exc}")
            return 1
        kinds = ", ".join(f"{n} {r}" for r, n in (("prefill", cfg.prefill_workers),
                                                    ("decode", cfg.decode_workers)) if n)
        _say(f"starting {total} worker{'s' if total > 1 else ''}{f' ({kinds})' if kinds else ''}"
             f" (engine {cfg.engine}, model {name} from {model_dir})...")
        await frontend.start()
        if services is not None:
            await services.start()
        frontend.models.add_listener(on_worker)
        frontend.models.prefill.add_listener(on_worker)
        for i, role in enumerate(roles):
            argv = worker_argv(cfg, model_dir, name, discovery,
                               md.tokenizer.get_vocab_size(with_added_tokens=True), role)
            p = WorkerProcess(i + 1, total, argv, echo_logs=cfg.worker_logs, role=role)
            await p.start()
            procs.append(p)
            assert p.proc is not None
            _say(f"{p.name} started (pid {p.proc.pid})")
            waits[asyncio.ensure_future(p.wait())] = p

        # Start-up: every worker registered, or one exits, or a signal, or the timeout.
        ready_task = asyncio.ensure_future(all_registered())
        stop_task = asyncio.ensure_future(stop.wait())
        done, _ = await asyncio.wait({ready_task, stop_task, *waits},
                                     return_when=asyncio.FIRST_COMPLETED)
        if ready_task not in done:
            ready_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, TimeoutError):
                await ready_task
            for t in done:
                if t in waits:
                    p = waits.pop(t)
                    _say(f"{p.name} exited with code {t.result()} before it was ready; "
                         f"last log lines:\n{p.last_lines()}")
                    code = 1
            return code
        try:
            ready_task.result()
        except TimeoutError:
            _say(f"workers not ready after {cfg.start_timeout_s:g}s; last log lines:\n" +
                 "\n".join(f"  {p.name}:\n{p.last_lines()}" for p in procs))
            return 1

        if replicas is not None:
            try:
                await replicas.start_children(server.port)
            except ReplicaStartError as exc:
                _say(f"{exc}; stopping")
                return 1
        await server.start()
        _say(f"Serving {name} at {server.url}/v1")

        served = asyncio.ensure_future(server.wait())
        while not stop.is_set():
            exits = replicas.exits() if replicas is not None else set()
            done, _ = await asyncio.wait({stop_task, served, *waits, *exits},
                                         return_when=asyncio.FIRST_COMPLETED)
            if served in done:
                _say("HTTP server stopped unexpectedly")
                code = 1
                break
            if replicas is not None:
                replicas.exited(done)
            for t in done:
                if t in waits:
                    p = waits.pop(t)
                    _say(f"{p.name} exited with code {t.result()}; the other workers keep "
                         f"serving. Last log lines:\n{p.last_lines()}")
        served.cancel()
        stop_task.cancel()
        _say("shutting down: stopping the frontend")
        return code
    finally:
        if services is not None:
            await services.leave()
        if replicas is not None:
            replicas.signal_all(signal.SIGTERM)  # they drain while this one does
        await server.stop()
        if replicas is not None:
            await replicas.stop()
        if services is not None:
            await services.close()
        await frontend.close()
        if replicas is not None:
            replicas.cleanup()
        running = [p for p in procs if p.proc is not None and p.proc.returncode is None]
        if running:
            _say(f"stopping {len(running)} worker(s)...")
            codes = await asyncio.gather(*(p.stop(cfg.worker_stop_s) for p in running))
            for p, c in zip(running, codes, strict=True):
                if c not in (0, -signal.SIGTERM):
                    _say(f"{p.name} exited with code {c}; last log lines:\n{p.last_lines()}")
        await cancel_and_wait(waits)
        shutil.rmtree(tmp, ignore_errors=True)
        _remove_signal_handlers()
        _say("stopped")
