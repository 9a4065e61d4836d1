"""Several frontend processes behind one port: ``dynamo-backend frontend --processes N`` (and
``run --frontend-processes N``).

One Python frontend tops out near one core. With ``--processes N`` (Linux) the command's own
process is frontend process 1 *and* the supervisor: it binds the port with ``SO_REUSEPORT``
(:class:`~.http.HttpServer` ``reuse_port``) and starts N-1 children
(``python -m dynamo_backend_common.frontend.replicas``, their configuration on stdin), each a
full :class:`~.server.Frontend` (its own discovery watch, router, engine client, model files)
listening on the same address, so the kernel spreads new connections over the N processes.

- **Start.** The supervisor starts its own frontend, then the children, and serves once every
  child printed ``frontend process i/N ready (pid P)``. A child that exits before that (or is
  not ready within ``start_timeout_s``) fails the start: the others are stopped and the command
  exits 1.
- **Signals.** SIGTERM / SIGINT to the supervisor are forwarded (SIGTERM) to every child, each
  drains like a single frontend (in-flight responses get up to 5 s), and the supervisor waits
  for them (SIGKILL after ``stop_timeout_s``); a second signal SIGKILLs the children at once.
  Children run in their own session (a terminal's Ctrl+C reaches the supervisor only) and get
  SIGTERM if the supervisor dies.
- **Failures.** Nothing is restarted. A child that dies later is reported and the others keep
  serving: the kernel stops routing new connections to a closed listener at once; the
  connections the dead process had accepted are lost (their clients see a reset).
- **Shared, per process.** Each process has its own discovery watch, router state, connection
  to each worker and metrics. Two things are shared between them: the routers' requests in
  flight (:mod:`.replica_sync`, on when N > 1, ``replica_sync`` forces it on or off), and
  ``GET /metrics``, which whichever process answers merges over all of them
  (:class:`~.metrics.MetricsPeers`: unix sockets in a private temporary directory the
  supervisor creates and removes).

``--processes 1`` (the default) is exactly the single-process frontend: no children, no
replica sync, no metric sockets.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msgspec

from ..log_setup import configure_logging
from ..runtime.events import EventPlane, default_event_url, open_event_plane
from ..runtime.loop import run_coroutine
from ..runtime.processes import ChildProcess, pdeathsig_hook
from ..runtime.tasks import cancel_and_wait
from .http import HttpServer
from .metrics import MetricsPeers
from .replica_sync import ReplicaSync
from .routing import LOAD_TRACKING_MODES, normalize_router_mode
from .server import Frontend, FrontendConfig

log = logging.getLogger("dynamo_backend_common.frontend")

__all__ = [
    "ReplicaOptions",
    "ReplicaProcess",
    "ReplicaServices",
    "ReplicaStartError",
    "ReplicaSupervisor",
    "child_main",
    "ensure_port_free",
    "serve_replicated",
]

_LAST_LINES = 20


@dataclass
class ReplicaOptions:
    """How many frontend processes, and whether their routers share their requests."""

    #: Frontend processes in all (the supervisor's own included); 1 = a single frontend.
    processes: int = 1
    #: Router replica sync: ``None`` = on when ``processes > 1``. On with one process it syncs
    #: with other frontends on the same event plane (several machines).
    replica_sync: bool | None = None
    #: Seconds a child may take to be ready.
    start_timeout_s: float = 60.0
    #: Seconds a child may take to stop after SIGTERM before it is SIGKILLed.
    stop_timeout_s: float = 15.0

    def __post_init__(self) -> None:
        if self.processes < 1:
            raise ValueError(f"processes must be >= 1, got {self.processes}")
        if self.processes > 1 and not sys.platform.startswith("linux"):
            raise ValueError("several frontend processes need Linux (SO_REUSEPORT spreading "
                             "connections over listeners)")

    @property
    def sync(self) -> bool:
        """Whether the routers run replica sync."""
        return self.processes > 1 if self.replica_sync is None else self.replica_sync


class ReplicaStartError(RuntimeError):
    """A child frontend process did not become ready (the message says why)."""


def ensure_port_free(host: str, port: int) -> None:
    """Raise ``OSError`` if ``host:port`` has a listener already (port 0: nothing to check).

    ``SO_REUSEPORT`` lets a socket join any group of the same user on that address, so without
    this check a second ``--processes`` frontend started on a busy port would silently share
    it with the first. A plain bind (no ``SO_REUSEPORT``) fails on any listener there.
    """
    if port == 0:
        return
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    socket.create_server((host, port), family=family).close()


class ReplicaServices:
    """What one frontend process adds for its replicas: replica sync on its router (own event
    plane, from the frontend's ``events`` URL or the default beside its discovery) and, with
    ``state_dir``, its metric state socket there (:class:`~.metrics.MetricsPeers`).

    ``start`` after ``frontend.start()``; at shutdown ``leave`` first (before draining HTTP),
    ``close`` before ``frontend.close()``. Replica sync
    is skipped (logged) in router modes that count no load (``round_robin``, ``random``,
    ``direct``): there is nothing to share.
    """

    def __init__(self, frontend: Frontend, *, sync: bool, state_dir: str | None = None,
                 name: str = "1") -> None:
        self.frontend = frontend
        self.want_sync = sync
        self.state_dir = state_dir
        self.name = name
        self.sync: ReplicaSync | None = None
        self.peers: MetricsPeers | None = None
        self._events: EventPlane | None = None

    async def start(self) -> None:
        fe, cfg = self.frontend, self.frontend.config
        if self.want_sync:
            mode = normalize_router_mode(cfg.router_mode)
            if mode not in LOAD_TRACKING_MODES:
                log.info("router replica sync off: router mode %s counts no load", mode)
            else:
                assert fe.router is not None, "start the frontend first"
                self._events = open_event_plane(
                    cfg.events or default_event_url(fe.discovery), discovery=fe.discovery,
                    endpoint="router")
                await self._events.start()
                self.sync = ReplicaSync(fe.router, self._events, namespace=cfg.namespace,
                                        registry=fe.metrics.registry, close_events=True)
                await self.sync.start()
        if self.state_dir is not None:
            self.peers = MetricsPeers(fe.metrics, self.state_dir, self.name)
            await self.peers.start()

    async def leave(self) -> None:
        """The start of a shutdown: stop sharing routing decisions (the other replicas drop
        this one's requests now), keep serving metrics until :meth:`close`."""
        if self.sync is not None:
            await self.sync.leave()

    async def close(self) -> None:
        if self.peers is not None:
            await self.peers.close()
            self.peers = None
        if self.sync is not None:
            await self.sync.close()  # closes its event plane too
            self.sync = None
        elif self._events is not None:
            await self._events.close()
        self._events = None


class _ChildSpec(msgspec.Struct, kw_only=True):
    """What a child frontend process reads from stdin (one JSON line)."""

    config: dict[str, Any]
    index: int
    total: int
    state_dir: str | None = None
    sync: bool = True
    wait_model: str | None = None
    wait_workers: int = 1
    start_timeout_s: float = 60.0
    log_level: str | None = None


class ReplicaProcess(ChildProcess):
    """One child frontend process. Its stdout lines go to ``say`` (and the last ones are
    kept); its stderr (the log) is the supervisor's."""

    def __init__(self, spec: _ChildSpec, say: Callable[[str], None]) -> None:
        self.spec = spec
        self.index = spec.index
        self.total = spec.total
        self.say = say
        self.lines: deque[str] = deque(maxlen=_LAST_LINES)
        self._ready: asyncio.Future[None] | None = None

    @property
    def name(self) -> str:
        return f"frontend process {self.index}/{self.total}"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._ready = loop.create_future()
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "dynamo_backend_common.frontend.replicas",
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            env=dict(os.environ, PYTHONUNBUFFERED="1"), start_new_session=True,
            preexec_fn=pdeathsig_hook())
        assert self.proc.stdin is not None
        # The configuration goes on stdin, never argv: it may hold the API key.
        self.proc.stdin.write(msgspec.json.encode(self.spec) + b"\n")
        with contextlib.suppress(ConnectionError):
            await self.proc.stdin.drain()
        self.proc.stdin.close()
        self._reader = loop.create_task(self._read(), name=f"{self.name} stdout")

    async def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        ready = f"{self.name} ready"
        async for raw in self.proc.stdout:
            line = raw.decode(errors="replace").rstrip()
            self.lines.append(line)
            self.say(line)
            if line.startswith(ready) and self._ready is not None and not self._ready.done():
                self._ready.set_result(None)

    async def wait_ready(self, timeout: float) -> None:
        """Until the child printed its ready line. Raises :class:`ReplicaStartError` when it
        exits first or takes longer than ``timeout``."""
        assert self._ready is not None and self.proc is not None
        exited: asyncio.Future[Any] = asyncio.ensure_future(self.wait())
        pending: set[asyncio.Future[Any]] = {self._ready, exited}
        try:
            done, _ = await asyncio.wait(pending, timeout=timeout,
                                         return_when=asyncio.FIRST_COMPLETED)
        finally:
            exited.cancel()
        if self._ready in done:
            return
        if exited in done or self.proc.returncode is not None:
            raise ReplicaStartError(f"{self.name} exited with code {self.proc.returncode} "
                                    f"before it was ready")
        raise ReplicaStartError(f"{self.name} not ready after {timeout:g}s")

    def report(self, message: str) -> None:
        self.say(message)


class ReplicaSupervisor:
    """Starts, watches and stops the children of a multi-process frontend (see the module doc).

    The supervisor's own process is frontend process 1; :meth:`services` gives its
    :class:`ReplicaServices`. ``wait_model`` (``run``): a child is ready only once it sees
    ``wait_workers`` workers of that model.
    """

    def __init__(self, config: FrontendConfig, options: ReplicaOptions, *,
                 say: Callable[[str], None] = print, wait_model: str | None = None,
                 wait_workers: int = 1) -> None:
        self.config = config
        self.options = options
        self.say = say
        self.wait_model = wait_model
        self.wait_workers = wait_workers
        self.children: list[ReplicaProcess] = []
        self._exits: dict[asyncio.Future[Any], ReplicaProcess] = {}
        #: Where the processes' metric sockets live (``None`` with one process).
        self.state_dir = (tempfile.mkdtemp(prefix="dynamo-fe-") if options.processes > 1
                          else None)

    def services(self, frontend: Frontend) -> ReplicaServices:
        """Process 1's :class:`ReplicaServices` (not started)."""
        return ReplicaServices(frontend, sync=self.options.sync, state_dir=self.state_dir,
                               name="1")

    async def start_children(self, port: int) -> None:
        """Start processes 2..N on ``port`` (the supervisor's bound port) and wait until each
        is ready. Raises :class:`ReplicaStartError` (after stopping them all) if one is not."""
        n = self.options.processes
        if n == 1:
            return
        config = dataclasses.replace(self.config, port=port)
        level = logging.getLevelName(logging.getLogger().getEffectiveLevel())
        for i in range(2, n + 1):
            spec = _ChildSpec(
                config=dataclasses.asdict(config), index=i, total=n, state_dir=self.state_dir,
                sync=self.options.sync, wait_model=self.wait_model,
                wait_workers=self.wait_workers, start_timeout_s=self.options.start_timeout_s,
                log_level=level if isinstance(level, str) else None)
            child = ReplicaProcess(spec, self.say)
            await child.start()
            self.children.append(child)
            self.say(f"{child.name} started (pid {child.pid})")
        waits = [asyncio.ensure_future(c.wait_ready(self.options.start_timeout_s))
                 for c in self.children]
        done, pending = await asyncio.wait(waits, return_when=asyncio.FIRST_EXCEPTION)
        failed = [exc for t in done if (exc := t.exception()) is not None]
        if failed:
            await cancel_and_wait(pending)
            await self.stop()
            raise failed[0]
        for c in self.children:
            self._exits[asyncio.ensure_future(c.wait())] = c

    def exits(self) -> set[asyncio.Future[Any]]:
        """Futures that finish when a running child exits (see :meth:`exited`)."""
        return set(self._exits)

    def exited(self, done: set[asyncio.Future[Any]]) -> None:
        """Report the children among ``done`` (from :meth:`exits`) that exited; the other
        processes keep serving, nothing is restarted."""
        for fut in list(done):
            child = self._exits.pop(fut, None)
            if child is not None:
                self.say(f"{child.name} (pid {child.pid}) exited with code {fut.result()}; "
                         f"the other frontend processes keep serving")

    def signal_all(self, sig: int) -> None:
        for c in self.children:
            c.signal(sig)

    def kill(self) -> None:
        """SIGKILL every child now (a second signal)."""
        if self.children:
            self.say("second signal: killing the frontend processes")
        self.signal_all(signal.SIGKILL)

    async def stop(self) -> None:
        """SIGTERM every child and wait (SIGKILL after ``stop_timeout_s``). Idempotent."""
        running = [c for c in self.children if c.proc is not None and c.proc.returncode is None]
        codes = await asyncio.gather(*(c.stop(self.options.stop_timeout_s) for c in running))
        for c, code in zip(running, codes, strict=True):
            if code not in (0, -signal.SIGTERM, -signal.SIGKILL):
                self.say(f"{c.name} exited with code {code}")
        await cancel_and_wait(self._exits)
        self._exits.clear()

    def cleanup(self) -> None:
        """Remove the metric socket directory (after everything stopped)."""
        if self.state_dir is not None:
            shutil.rmtree(self.state_dir, ignore_errors=True)


async def serve_replicated(supervisor: ReplicaSupervisor, *, stop: asyncio.Event) -> int:
    """``dynamo-backend frontend --processes N``: serve process 1 here and the children beside
    it until ``stop`` is set (the caller owns the signal handlers; a second signal should call
    :meth:`ReplicaSupervisor.kill`). Returns the exit code: 1 when the port cannot be bound
    or a child fails to start, else 0."""
    config, say = supervisor.config, supervisor.say
    multi = supervisor.options.processes > 1
    frontend = Frontend(config)
    services = supervisor.services(frontend)
    server = HttpServer(frontend.app, config.host, config.port, reuse_port=multi)
    code = 0
    started = False
    try:
        try:
            if multi:
                ensure_port_free(config.host, config.port)
            server.bind()
        except OSError as exc:
            say(f"cannot listen on {config.host}:{config.port}: {exc}")
            return 1
        await frontend.start()
        started = True
        await services.start()
        try:
            await supervisor.start_children(server.port)
        except ReplicaStartError as exc:
            say(f"{exc}; stopping")
            return 1
        await server.start()
        say(f"Frontend serving OpenAI API at {server.url}/v1 (router: {config.router_mode}, "
            f"discovery: {config.discovery or 'file://'}, processes: "
            f"{supervisor.options.processes}, replica sync: "
            f"{'on' if services.sync is not None else 'off'})")
        stop_task: asyncio.Future[Any] = asyncio.ensure_future(stop.wait())
        served: asyncio.Future[Any] = asyncio.ensure_future(server.wait())
        try:
            while not stop.is_set():
                watched: set[asyncio.Future[Any]] = {stop_task, served, *supervisor.exits()}
                done, _ = await asyncio.wait(watched, return_when=asyncio.FIRST_COMPLETED)
                if served in done:
                    say("HTTP server stopped unexpectedly")
                    code = 1
                    break
                supervisor.exited(done)
        finally:
            stop_task.cancel()
            served.cancel()
        say("shutting down")
    finally:
        await services.leave()
        supervisor.signal_all(signal.SIGTERM)  # the children drain while this one does
        await server.stop()
        await supervisor.stop()
        await services.close()
        if started:
            await frontend.close()
        supervisor.cleanup()
    return code


# ------------------------------------------------------------------------------- the child


async def _serve_child(spec: _ChildSpec) -> int:
    name = f"frontend process {spec.index}/{spec.total}"
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    config = FrontendConfig(**spec.config)
    frontend = Frontend(config)
    services = ReplicaServices(frontend, sync=spec.sync, state_dir=spec.state_dir,
                               name=str(spec.index))
    server = HttpServer(frontend.app, config.host, config.port, reuse_port=True)
    stop_task = asyncio.ensure_future(stop.wait())
    try:
        await frontend.start()
        await services.start()
        if spec.wait_model is not None:
            ready = asyncio.ensure_future(frontend.wait_for_model(
                spec.wait_model, workers=spec.wait_workers, timeout=spec.start_timeout_s))
            await asyncio.wait({ready, stop_task}, return_when=asyncio.FIRST_COMPLETED)
            if not ready.done():
                await cancel_and_wait([ready])
                return 0
            try:
                ready.result()
            except TimeoutError:
                print(f"{name}: model {spec.wait_model} not ready after "
                      f"{spec.start_timeout_s:g}s", flush=True)
                return 1
        if stop.is_set():
            return 0
        try:  # bound last: the kernel sends connections here only once we can serve them
            await server.start()
        except OSError as exc:
            print(f"{name}: cannot listen on {config.host}:{config.port}: {exc}", flush=True)
            return 1
        print(f"{name} ready (pid {os.getpid()})", flush=True)
        served = asyncio.ensure_future(server.wait())
        await asyncio.wait({served, stop_task}, return_when=asyncio.FIRST_COMPLETED)
        served.cancel()
        return 0 if stop.is_set() else 1
    finally:
        stop_task.cancel()
        await services.leave()
        await server.stop()
        await services.close()
        await frontend.close()


def child_main() -> int:
    """Entry point of a child frontend process: its :class:`_ChildSpec` is the first line of
    stdin (JSON). Returns the exit code (0 after SIGTERM/SIGINT)."""
    spec = msgspec.json.decode(sys.stdin.buffer.readline(), type=_ChildSpec)
    configure_logging(spec.log_level)
    return run_coroutine(_serve_child(spec))


if __name__ == "__main__":
    sys.exit(child_main())
