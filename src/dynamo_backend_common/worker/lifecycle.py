"""The worker lifecycle: start the engine, register, serve, and shut down in order.

Startup: discovery (lease -> ``worker_id``) -> request plane and status server -> event plane ->
``engine.start(worker_id)`` -> ``setup_metrics`` -> KV event sources -> canary and controls ->
register instance and model card (ready).

Shutdown (SIGTERM/SIGINT, lease loss, or :meth:`Worker.request_shutdown`) runs named stages, each
once, under one budget armed at the signal: ``unregister -> router_grace -> stop_admission ->
inflight -> kv_transfer (drain) -> cleanup``, then the runtime is torn down. Each stage is logged
and recorded as ``dynamo_component_shutdown_stage_seconds{stage,reason}``. ``cleanup()`` runs
exactly once if ``start()`` was called (also after a failed start, with a 5 s floor) and never
if shutdown came first. A watchdog force-exits (70) past budget + 5 s; a second signal exits
(70) at once.

The pieces live beside it: :mod:`.config` (``WorkerConfig`` and its flags),
:mod:`.registration` (the instance record and model card), :mod:`.publishing` (KV events and
load snapshots on the event plane), :mod:`.health` (the canary and ``/health``),
:mod:`.shutdown` (the stages, their outcomes and the stage runner), :mod:`.adapter` (requests
into ``generate``) and :mod:`.metrics`.
"""

from __future__ import annotations

import asyncio
import enum
import inspect
import logging
import os
import signal
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any

import msgspec

from ..engine import (
    EngineConfig,
    LLMEngine,
    MetricsCtx,
)
from ..errors import DynamoError
from ..protocols.codec import from_msgpack, to_builtins, to_json, to_msgpack
from ..protocols.discovery import (
    InstanceInfo,
    ModelCard,
    endpoint_path,
    instance_key,
    model_key,
)
from ..runtime.context import Context
from ..runtime.discovery import Discovery, open_discovery
from ..runtime.events import (
    EventPlane,
    default_event_url,
    open_event_plane,
)
from ..runtime.loop import run_coroutine
from ..runtime.publishers import KvEventPublisher, SnapshotPublisher
from ..runtime.status_server import StatusServer
from ..runtime.tasks import cancel_and_wait
from ..runtime.transport import RequestPlaneServer
from ..runtime.transport.callhome import CallHomeServer
from .adapter import EngineAdapter
from .config import DisaggregationMode, WorkerConfig, env_health_check_payload
from .health import canary_loop, health_verdict, run_canary
from .metrics import WorkerMetrics
from .publishing import load_sink, start_kv_events
from .registration import build_instance_info, build_model_card, metadata_base, serve_metadata
from .shutdown import Outcome, Stage, run_stage
from .tracker import RequestTracker

log = logging.getLogger("dynamo_backend_common.worker")

CONTROL_ENDPOINT = "engine_control"
FORCE_EXIT_CODE = 70
CLEANUP_FLOOR_S = 5.0
# At most this long, shutdown waits for accepted requests to dial home before unregistering.
UNREGISTER_DIAL_WAIT_S = 1.0


class _State(enum.Enum):
    INIT = "init"
    RUNNING = "running"
    START_FAILED = "start_failed"
    STOPPED = "stopped"


class ControlRequest(msgspec.Struct):
    control: str
    body: Any = None


_ASYNC_METHODS = {
    "start": "async def start(self, worker_id: int) -> EngineConfig:",
    "cleanup": "async def cleanup(self) -> None:",
    "abort": "async def abort(self, ctx: Context) -> None:",
    "drain": "async def drain(self) -> None:",
}


def check_engine_methods(engine: LLMEngine | type[LLMEngine]) -> None:
    """Reject, before anything starts, the engine shapes that would fail on the first call:
    a plain ``def`` where the contract awaits (``start``, ``cleanup``, ``abort``, ``drain``), and
    a ``generate`` written as an ``async def`` without ``yield`` (a coroutine, not an async
    iterator). Takes an engine or its class; raises ``TypeError`` saying what to write."""
    cls = engine if isinstance(engine, type) else type(engine)
    if not issubclass(cls, LLMEngine):
        raise TypeError(f"{cls.__name__} is not an LLMEngine (subclass "
                        "dynamo_backend_common.LLMEngine)")
    name = cls.__name__
    problems = []
    for method, signature in _ASYNC_METHODS.items():
        fn = getattr(cls, method, None)
        if fn is not None and not inspect.iscoroutinefunction(fn):
            problems.append(f"{name}.{method} must be a coroutine: write `{signature}`")
    gen = getattr(cls, "generate", None)
    if gen is not None and inspect.iscoroutinefunction(gen):
        problems.append(f"{name}.generate is an `async def` without `yield`, so it returns one "
                        "coroutine instead of streaming: write `async def generate(self, "
                        "request, ctx):` and `yield` each LLMEngineOutput chunk")
    if problems:
        raise TypeError("; ".join(problems))


class Worker:
    """Serves one engine. Single-shot: call :meth:`run` once."""

    def __init__(self, engine: LLMEngine, config: WorkerConfig | None = None) -> None:
        check_engine_methods(engine)
        self.engine = engine
        self.config = config or WorkerConfig()
        self.config.validate()
        self.worker_id: int | None = None
        self.engine_config: EngineConfig | None = None
        self.ready = asyncio.Event()
        self._state = _State.INIT
        self._shutdown = asyncio.Event()
        self._shutdown_reason = ""
        self._shutdown_started: float | None = None
        self._signals = 0
        self._watchdog: threading.Timer | None = None
        self._tracker = RequestTracker()
        self._discovery: Discovery | None = None
        self._events: EventPlane | None = None
        self._server: RequestPlaneServer | CallHomeServer | None = None
        self._mux_server: RequestPlaneServer | None = None  # the fast path beside tcp
        self._status: StatusServer | None = None
        self._metrics: WorkerMetrics | None = None
        self._adapter: EngineAdapter | None = None
        self._registered_keys: list[str] = []
        self._publishers: list[KvEventPublisher | SnapshotPublisher] = []
        self._relays: list[Any] = []
        self._controls: list[str] = []
        self._publishes_kv_events = False
        #: The instance record this worker registered (valid once :attr:`ready` is set).
        self.instance_info: InstanceInfo | None = None
        self._canary: dict[str, Any] | None = None
        self._canary_task: asyncio.Task[None] | None = None
        self._health: dict[str, Any] = {"canary": "disabled"}
        self._cleanup_abandoned = False

    # -- public surface -------------------------------------------------------------------
    @property
    def address(self) -> str | None:
        return self._server.address if self._server else None

    @property
    def status_port(self) -> int | None:
        return self._status.port if self._status else None

    @property
    def metrics(self) -> WorkerMetrics | None:
        return self._metrics

    def request_shutdown(self, reason: str = "requested") -> None:
        """Begin graceful shutdown (what SIGTERM does, minus the watchdog)."""
        if not self._shutdown.is_set():
            self._shutdown_reason = reason
            self._shutdown_started = time.monotonic()
            self._shutdown.set()

    async def run(self) -> int:
        """Run until shut down. Returns the process exit code (0 = clean)."""
        loop = asyncio.get_running_loop()
        installed = self._install_signals(loop)
        try:
            return await self._run()
        finally:
            for sig in installed:
                loop.remove_signal_handler(sig)
            if self._watchdog is not None:
                self._watchdog.cancel()

    # -- signals --------------------------------------------------------------------------
    def _install_signals(self, loop: asyncio.AbstractEventLoop) -> list[int]:
        if threading.current_thread() is not threading.main_thread():
            return []
        installed: list[int] = []
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                loop.add_signal_handler(sig, self._on_signal, sig)
                installed.append(sig)
            except (NotImplementedError, RuntimeError):  # pragma: no cover - non-Unix
                pass
        return installed

    def _on_signal(self, sig: int) -> None:
        self._signals += 1
        name = signal.Signals(sig).name
        if self._signals > 1:
            log.warning("%s received again; exiting now", name)
            os._exit(FORCE_EXIT_CODE)
        log.info("%s received", name)
        self.request_shutdown(name)
        budget = self.config.shutdown.resolved().total + CLEANUP_FLOOR_S
        self._watchdog = threading.Timer(budget, self._force_exit, args=(budget,))
        self._watchdog.daemon = True
        self._watchdog.start()

    @staticmethod
    def _force_exit(budget: float) -> None:
        log.error("shutdown exceeded its %.1fs budget; forcing exit", budget)
        logging.shutdown()
        os._exit(FORCE_EXIT_CODE)

    # -- main sequence --------------------------------------------------------------------
    async def _run(self) -> int:
        cfg = self.config
        try:
            self._discovery = open_discovery(cfg.discovery)
            await self._discovery.start()
        except Exception as exc:
            log.error("discovery unavailable (%s): %s", cfg.discovery or "default", exc)
            if self._discovery is not None:
                await _quietly(self._discovery.close())
            return 1
        self.worker_id = self._discovery.instance_id
        if self._shutdown.is_set():
            log.info("shutdown requested before engine start; exiting without cleanup")
            await self._teardown()
            return 0

        exit_code = 0
        cancelled = False
        try:
            await self._start_runtime()
            if self._shutdown.is_set():
                # Runtime setup can take a moment (event plane connect): a signal that came
                # meanwhile still came before start(), so the engine is neither started nor
                # cleaned up.
                log.info("shutdown requested before engine start; not starting the engine")
            else:
                await self._start_and_serve()
        except asyncio.CancelledError:
            # The task running the worker was cancelled (an embedding application shutting
            # down): shut down in order like a signal would, then let the cancellation through.
            log.warning("worker task cancelled; shutting down")
            cancelled = True
            self.request_shutdown("cancelled")
        except Exception as exc:
            log.error("worker failed: %s", exc, exc_info=not isinstance(exc, DynamoError))
            exit_code = 1
            self.request_shutdown("error")
        if self._shutdown_started is None:
            self._shutdown_started = time.monotonic()
        await self._orchestrate_shutdown()
        if cancelled:
            raise asyncio.CancelledError
        if exit_code == 0 and (self._cleanup_abandoned or self._shutdown_reason == "lease_lost"):
            # A lost lease means discovery already dropped this worker: it shut down cleanly,
            # but not because it was asked to, so a supervisor should restart it.
            exit_code = 1
        return exit_code

    async def _start_and_serve(self) -> None:
        cfg = self.config
        assert self.worker_id is not None
        log.info("starting engine %s (worker_id=%x)", type(self.engine).__name__,
                 self.worker_id)
        t0 = time.perf_counter()
        self._state = _State.RUNNING
        try:
            engine_cfg = await self.engine.start(self.worker_id)
            if not isinstance(engine_cfg, EngineConfig):
                raise DynamoError.invalid_argument(
                    f"start() must return EngineConfig, got {type(engine_cfg).__name__}"
                )
            engine_cfg.validate()
        except BaseException:
            self._state = _State.START_FAILED
            raise
        self.engine_config = engine_cfg
        load_time = time.perf_counter() - t0
        log.info("engine started in %.2fs: model=%s", load_time, engine_cfg.model)
        await self._setup_after_start(engine_cfg, load_time)
        if not self._shutdown.is_set():
            await self._register(engine_cfg)
            log.info(
                "Serving %s on %s.%s.%s at %s",
                engine_cfg.display_name if not cfg.served_model_name
                else cfg.served_model_name,
                cfg.namespace, cfg.component, cfg.endpoint, self.address,
            )
            await self._wait_for_shutdown()

    async def _start_runtime(self) -> None:
        cfg = self.config
        assert self._discovery is not None and self.worker_id is not None
        self._adapter = EngineAdapter(
            self.engine,
            tracker=self._tracker,
            decode_mode=cfg.disaggregation_mode is DisaggregationMode.DECODE,
        )
        if cfg.request_plane == "mux":
            self._server = RequestPlaneServer(cfg.host, cfg.port)
            self._server.add_endpoint(cfg.endpoint, self._adapter.handle)
            self._server.add_endpoint(CONTROL_ENDPOINT, self._control_handler)
        else:
            # Dynamo's TCP request plane: endpoints are keyed by their full path.
            self._server = CallHomeServer(cfg.host, cfg.port)
            self._server.add_endpoint(self.endpoint_path, self._adapter.handle)
            self._server.add_endpoint(
                endpoint_path(self.worker_id, cfg.namespace, cfg.component, CONTROL_ENDPOINT),
                self._control_handler)
            if cfg.mux_fastpath:
                self._mux_server = RequestPlaneServer(cfg.host, 0)
                self._mux_server.add_endpoint(cfg.endpoint, self._adapter.handle)
                self._mux_server.add_endpoint(CONTROL_ENDPOINT, self._control_handler)
                await self._mux_server.start()
        await self._server.start()
        if cfg.status_port is not None:
            self._status = StatusServer(
                cfg.status_host, cfg.status_port, metrics=self._render_metrics,
                health=self._health_check,
            )
            self._status.add_route("POST", "/engine/control", self._http_control)
            await self._status.start()
            log.info("status server on http://%s:%d (/metrics /health /live)",
                     cfg.status_host, self._status.port)
        events_url = cfg.events or default_event_url(self._discovery)
        self._events = open_event_plane(events_url, discovery=self._discovery,
                                        endpoint=cfg.endpoint)
        await self._events.start()

    async def _setup_after_start(self, engine_cfg: EngineConfig, load_time: float) -> None:
        cfg = self.config
        assert self._events is not None and self._adapter is not None
        assert self.worker_id is not None
        loop = asyncio.get_running_loop()
        # Built after start(): the model labels are only known now.
        metrics = self._metrics = WorkerMetrics(
            namespace=cfg.namespace,
            component=cfg.component,
            endpoint=cfg.endpoint,
            worker_id=f"{self.worker_id:x}",
            model=engine_cfg.model,
            model_name=self._served_name(engine_cfg),
            extra_labels=cfg.metrics_labels,
        )
        self._adapter.metrics = metrics
        metrics.set_model_load_time(load_time)

        bindings = await self.engine.setup_metrics(
            MetricsCtx(
                model=engine_cfg.model,
                component=cfg.component,
                model_load_time_seconds=load_time,
                metrics=metrics.engine_metrics,
            )
        )
        if bindings.dp_ranks:
            metrics.declare_dp_ranks(bindings.dp_ranks)
            sink = load_sink(self._events, cfg, self.worker_id, metrics.on_snapshot)
            publisher = SnapshotPublisher(bindings.dp_ranks, sink, loop)
            self._publishers.append(publisher)
            if bindings.on_publisher_ready is not None:
                bindings.on_publisher_ready(publisher)

        if cfg.enable_kv_routing:
            started = await start_kv_events(self.engine, engine_cfg, self._events, cfg,
                                            self.worker_id, loop)
            if started is not None:
                self._publishers.extend(started[0])
                self._relays.extend(started[1])
                self._publishes_kv_events = True
            # The channels are announced before the worker registers: a router that finds the
            # worker is already following its events (the ZMQ plane loses what it publishes
            # before a subscriber connects).
            try:
                await self._events.flush()
            except Exception as exc:  # events are best effort; serving goes on
                log.warning("event plane flush failed: %s", exc)

        payload = cfg.health_check_payload or env_health_check_payload()
        disabled = os.environ.get("DYN_HEALTH_CHECK_ENABLED", "").strip().lower() in (
            "0", "false", "no", "off")
        if disabled:
            log.info("health canary disabled (DYN_HEALTH_CHECK_ENABLED)")
            payload = None
        elif payload is None:
            try:
                payload = await self.engine.health_check_payload()
            except Exception as exc:
                log.warning("engine.health_check_payload() failed; canary disabled: %s", exc)
                payload = None
        if payload is not None and not isinstance(payload, dict):
            log.warning("health check payload is not a JSON object; canary disabled")
            payload = None
        if (payload is not None and cfg.disaggregation_mode is DisaggregationMode.DECODE
                and payload.get("prefill_result") is None):
            # A decode engine may require a prefill result; the canary has none to carry.
            payload = {**payload, "prefill_result": {"disaggregated_params": {}}}
        self._canary = payload
        self._health = {"canary": "pending" if payload is not None else "disabled"}
        self._controls = list(await self.engine.supported_controls())

    @property
    def endpoint_path(self) -> str:
        """Dynamo's request-plane path of the serving endpoint, ``{id:x}/{ns}/{comp}/{ep}``."""
        assert self.worker_id is not None
        cfg = self.config
        return endpoint_path(self.worker_id, cfg.namespace, cfg.component, cfg.endpoint)

    def _served_name(self, engine_cfg: EngineConfig) -> str:
        return self.config.served_model_name or engine_cfg.display_name

    async def _register(self, engine_cfg: EngineConfig) -> None:
        cfg = self.config
        assert self._discovery is not None and self.worker_id is not None
        assert self._server is not None
        info = build_instance_info(
            cfg, self.worker_id, self._server.address,
            self._mux_server.address if self._mux_server is not None else None,
            self._status.port if self._status is not None else None)
        card = self.build_model_card(engine_cfg)
        if self._status is not None:
            serve_metadata(self._status, cfg, card)
        ikey = instance_key(cfg.namespace, cfg.component, cfg.endpoint, self.worker_id)
        mkey = model_key(cfg.namespace, cfg.component, cfg.endpoint, self.worker_id)
        self.instance_info = info
        await self._discovery.put(ikey, to_json(info))
        self._registered_keys.append(ikey)
        await self._discovery.put(mkey, to_json(card))
        self._registered_keys.append(mkey)
        self.ready.set()
        if self._canary is not None:
            self._canary_task = asyncio.get_running_loop().create_task(
                self._canary_loop(), name="health-canary"
            )

    def build_model_card(self, engine_cfg: EngineConfig) -> ModelCard:
        """The model card this worker registers (:func:`.registration.build_model_card`)."""
        assert self.worker_id is not None
        display_name = self._served_name(engine_cfg)
        port = self._status.port if self._status is not None else None
        return build_model_card(
            self.config, engine_cfg, self.worker_id, display_name=display_name,
            files_url_base=metadata_base(self.config, port, display_name),
            publishes_kv_events=self._publishes_kv_events, controls=self._controls)

    async def _wait_for_shutdown(self) -> None:
        assert self._discovery is not None
        waiters = [
            asyncio.ensure_future(self._shutdown.wait()),
            asyncio.ensure_future(self._discovery.lease_lost.wait()),
        ]
        try:
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        finally:
            await cancel_and_wait(waiters)
        if self._discovery.lease_lost.is_set() and not self._shutdown.is_set():
            log.error("discovery lease lost; shutting down")
            self.request_shutdown("lease_lost")

    def _render_metrics(self) -> bytes:
        return self._metrics.render() if self._metrics is not None else b""

    # -- health (worker/health.py) ---------------------------------------------------------
    async def _health_check(self) -> tuple[bool, dict[str, Any]]:
        return health_verdict(
            ready=self.ready.is_set(),
            shutdown_reason=self._shutdown_reason if self._shutdown.is_set() else None,
            worker_id=self.worker_id, health=self._health)

    async def run_canary(self) -> None:
        """Send the canary through the same adapter as real requests; record the outcome."""
        assert self._adapter is not None and self._canary is not None
        outcome = await run_canary(self._adapter, self._canary,
                                   self.config.health_check_timeout_secs)
        if outcome is not None:
            self._health = outcome

    async def _canary_loop(self) -> None:
        await canary_loop(self.run_canary, self._shutdown,
                          self.config.health_check_interval_secs)

    # -- engine controls ------------------------------------------------------------------
    async def control(self, name: str, body: Any) -> Any:
        """Dispatch one engine control; unknown names raise ``InvalidArgument``.

        Only while the worker serves: before registration and once shutdown began it raises
        ``EngineShutdown`` (the engine may not be started yet, or be draining or cleaned up).
        """
        if not self.ready.is_set() or self._shutdown.is_set():
            state = "shutting down" if self._shutdown.is_set() else "starting"
            raise DynamoError.engine_shutdown(
                f"engine controls are unavailable while the worker is {state}")
        if name not in self._controls:
            raise DynamoError.invalid_argument(
                f"unknown engine control {name!r}; supported: {sorted(self._controls)}"
            )
        return await self.engine.engine_control(name, body)

    async def _control_handler(
        self, payload: bytes, ctx: Context, headers: Mapping[str, str]
    ) -> AsyncIterator[bytes]:
        try:
            req = from_msgpack(payload, ControlRequest)
        except Exception as exc:
            raise DynamoError.invalid_argument(f"bad control request: {exc}") from None
        result = await self.control(req.control, req.body)
        yield to_msgpack(to_builtins(result))

    async def _http_control(self, body: bytes) -> tuple[int, str, bytes]:
        try:
            req = msgspec.json.decode(body, type=ControlRequest)
        except msgspec.MsgspecError as exc:
            return 400, "application/json", to_json({"status": "error", "message": str(exc)})
        try:
            result = await self.control(req.control, req.body)
        except DynamoError as exc:
            return exc.kind.http_status, "application/json", to_json(
                {"status": "error", "message": exc.message, "kind": exc.kind.value})
        return 200, "application/json", to_json(result)

    # -- shutdown -------------------------------------------------------------------------
    async def _orchestrate_shutdown(self) -> None:
        budget = self.config.shutdown.resolved()
        assert self._shutdown_started is not None
        deadline = self._shutdown_started + budget.total
        started_engine = self._state in (_State.RUNNING, _State.START_FAILED)
        serving = self.ready.is_set()
        self.ready.clear()
        log.info("shutdown (%s): budget %.1fs", self._shutdown_reason or "exit", budget.total)

        def remaining() -> float:
            return max(0.0, deadline - time.monotonic())

        await self._stage(Stage.UNREGISTER, self._unregister(), remaining())
        if serving and budget.router_grace > 0 and remaining() > 0:
            await self._stage(Stage.ROUTER_GRACE, asyncio.sleep(min(budget.router_grace,
                                                                remaining())), None)
        else:
            self._record(Stage.ROUTER_GRACE, Outcome.SKIPPED, 0.0)
        t = time.perf_counter()
        self._tracker.stop_accepting()
        self._record(Stage.STOP_ADMISSION, Outcome.COMPLETED, time.perf_counter() - t)
        await self._stage(Stage.INFLIGHT, self._wait_inflight(), min(budget.inflight, remaining()),
                          zero_ok=True)
        if self._canary_task is not None:
            await cancel_and_wait([self._canary_task])
        if started_engine and self._state is _State.RUNNING:
            t = time.perf_counter()
            await self._stage(Stage.KV_TRANSFER, self._drain(),
                              min(budget.kv_transfer, remaining()))
            if self._metrics is not None:
                self._metrics.set_drain_time(time.perf_counter() - t)
        else:
            self._record(Stage.KV_TRANSFER, Outcome.SKIPPED, 0.0)
        if started_engine:
            await self._cleanup_once(max(min(budget.cleanup, remaining()),
                                         min(budget.cleanup, CLEANUP_FLOOR_S)))
        else:
            self._record(Stage.CLEANUP, Outcome.SKIPPED, 0.0)
        await self._teardown()

    async def _unregister(self) -> None:
        assert self._discovery is not None
        if isinstance(self._server, CallHomeServer) and self._registered_keys:
            # A Dynamo frontend fails requests whose response stream is not yet connected when
            # this instance leaves its view; let those connect first (bounded: new requests
            # keep arriving until the keys are gone).
            if not await self._server.wait_dialed(UNREGISTER_DIAL_WAIT_S):
                log.warning("unregistering with requests still calling home")
        for key in reversed(self._registered_keys):
            await self._discovery.delete(key)
        self._registered_keys.clear()

    async def _wait_inflight(self) -> None:
        if not await self._tracker.wait_idle(None):  # pragma: no cover - unbounded wait
            raise TimeoutError
        # The engine.abort() calls of those requests belong to them: drain() and cleanup()
        # must not overlap one.
        if self._adapter is not None:
            await self._adapter.wait_aborts()

    async def _drain(self) -> None:
        try:
            await self.engine.drain()
        except Exception as exc:
            log.warning("engine drain failed (continuing shutdown): %s", exc)

    async def _cleanup_once(self, timeout: float) -> None:
        if self._state in (_State.INIT, _State.STOPPED):
            self._state = _State.STOPPED
            return
        t = time.perf_counter()
        reason = Outcome.COMPLETED
        task = asyncio.ensure_future(self.engine.cleanup())
        done, _ = await asyncio.wait([task], timeout=timeout)
        if not done:
            reason = Outcome.TIMED_OUT
            self._cleanup_abandoned = True
            task.cancel()
            log.error("engine cleanup exceeded its %.1fs budget; abandoning it", timeout)
        elif task.exception() is not None:
            log.error("engine cleanup failed: %s", task.exception())
        else:
            log.info("Engine cleanup complete")
        elapsed = time.perf_counter() - t
        self._record(Stage.CLEANUP, reason, elapsed)
        if self._metrics is not None:
            self._metrics.set_cleanup_time(elapsed)
        for p in self._publishers:
            p.close()
        self._state = _State.STOPPED

    async def _stage(self, stage: Stage, aw: Awaitable[Any], timeout: float | None, *,
                     zero_ok: bool = False) -> Outcome:
        outcome, seconds = await run_stage(stage, aw, timeout, zero_ok=zero_ok)
        self._record(stage, outcome, seconds)
        return outcome

    def _record(self, stage: Stage, reason: Outcome, seconds: float) -> None:
        level = logging.WARNING if reason is Outcome.TIMED_OUT else logging.INFO
        extra = (f" ({self._tracker.inflight} still in flight)" if stage is Stage.INFLIGHT
                 else "")
        log.log(level, "shutdown stage %s %s in %.3fs%s", stage, reason, seconds, extra)
        if self._metrics is not None:
            self._metrics.record_shutdown_stage(stage, reason, seconds)

    async def _teardown(self) -> None:
        if self._adapter is not None:
            await self._adapter.close()
        for relay in self._relays:
            await _quietly(relay.close())
        if self._server is not None:
            await _quietly(self._server.close(timeout=1.0))
        if self._mux_server is not None:
            await _quietly(self._mux_server.close(timeout=1.0))
        if self._events is not None:
            await _quietly(self._events.close())
        if self._status is not None:
            await _quietly(self._status.close())
        if self._discovery is not None:
            await _quietly(self._discovery.close())


async def _quietly(aw: Awaitable[Any]) -> None:
    try:
        await aw
    except Exception as exc:
        log.warning("teardown step failed: %s", exc)


def run(
    engine: LLMEngine | Callable[[], LLMEngine],
    config: WorkerConfig | None = None,
    *,
    install_uvloop: bool = True,
) -> int:
    """Serve ``engine`` until SIGTERM/SIGINT; returns the exit code (``sys.exit`` it).

    ``engine`` may be an instance or a zero-argument factory called inside the event loop.

    Without ``config`` the worker is configured exactly as ``dynamo-backend worker`` with no
    flags: from the ``DYN_*`` variables its flags fall back to (``DYN_MODEL_PATH``,
    ``DYN_SERVED_MODEL_NAME``, ``DYN_DISCOVERY``, ``DYN_NAMESPACE``, ...; see docs/worker.md),
    so ``DYN_MODEL_PATH=DIR python serve.py`` registers DIR's tokenizer files as the CLI does.
    An invalid value raises ``ValueError`` (``SystemExit`` for a non-integer port) before
    anything starts. The config's ``model_path``, when set, is exported as
    ``$DYN_MODEL_PATH`` before a factory ``engine`` is called, for engines that load weights
    from it, and its ``disaggregation_mode`` as ``$DYN_DISAGGREGATION_MODE`` (``aggregated``,
    ``prefill`` or ``decode``) for engines that take a role.
    """
    from ..log_setup import configure_logging
    from .config import worker_config_from_argv

    configure_logging()
    if config is None:
        config = worker_config_from_argv([])
    if config.model_path:
        os.environ["DYN_MODEL_PATH"] = config.model_path
    # Engines with a disaggregated role (the mocker) read it as Dynamo's engines read CommonArgs.
    os.environ["DYN_DISAGGREGATION_MODE"] = config.disaggregation_mode.value

    async def main() -> int:
        eng = engine if isinstance(engine, LLMEngine) else engine()
        return await Worker(eng, config).run()

    return run_coroutine(main(), use_uvloop=install_uvloop)


__all__ = ["CONTROL_ENDPOINT", "Worker", "check_engine_methods", "run"]
