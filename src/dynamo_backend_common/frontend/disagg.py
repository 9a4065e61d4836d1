"""The prefill router: disaggregated prefill/decode serving, frontend side.

A model with prefill workers (``worker_type`` ``prefill``, kept in
:attr:`.model_manager.ModelManager.prefill`) has each request's prompt computed by one of them,
and the generation continued by a decode worker of its serving pool. Per attempt of
:meth:`.engine_client.EngineClient.generate`, :meth:`PrefillRouter.prepare` picks the prefill
worker (with its own :class:`~.routing.Router`, in the frontend's router mode: KV-aware in
``kv`` mode) and takes one of Dynamo's two paths:

- **standard**: the prefill request (the user's request with ``max_tokens`` 1) runs to its
  terminal chunk; the stream's ``disaggregated_params`` (opaque: the engine's KV handle; on the
  terminal chunk or, as Dynamo's mocker sends them, on an earlier one) become the decode
  request's ``prefill_result``, and the decode request is sent after it.
- **bootstrap**: when the chosen prefill worker's card advertises
  ``runtime_config.disaggregated_endpoint`` (``bootstrap_host``/``bootstrap_port``, from its
  engine's ``EngineConfig``), both requests carry the same :class:`BootstrapInfo` (a fresh
  random ``bootstrap_room`` and, as Dynamo's frontend sends it, a ``handoff_id``: see
  :class:`HandoffBootstrapInfo`) and the decode request is sent at once, concurrently with the
  prefill, whose stream runs in the background (:class:`PrefillHop`).

The decode hop then goes to a ``decode`` worker of the model (an ``aggregated`` one only when
the model has no decode worker). Failures:

- a prefill worker that refuses the request (cannot connect, draining) or breaks before its
  terminal chunk is skipped and another is tried, each at most once per attempt;
- no prefill worker left (none registered, or all failed): the request falls back to the
  serving pool as an aggregated request (decode workers prefill it locally), unless
  ``enforce_disagg`` is set, in which case it fails with ``CannotConnect`` (503);
- a prefill terminal that is an error, or that carries no ``disaggregated_params``, ends the
  request with that error / falls back (counted);
- on the bootstrap path a prefill failure is logged and counted; the decode worker sees its KV
  pull fail and answers per its own policy (recompute or a typed error).

The user's context stops both hops: the standard prefill runs under it; the bootstrap prefill
runs under a child context that the user's context stops. Usage and TTFT are the decode hop's,
i.e. the user's request as a whole (the prefill hop's one token is not shown to the client).

Metrics (``dynamo_frontend_*``, on the frontend's registry):

- ``disagg_requests_total{model,path}``: attempts per path: ``standard``, ``bootstrap``,
  ``aggregated_fallback`` (no prefill worker usable), ``failed`` (``enforce_disagg`` refusal,
  or a prefill error that ended the request);
- ``worker_requests_total{model,role}``: requests sent per worker role (``prefill``,
  ``decode``, ``aggregated``) by the disaggregated path;
- ``prefill_router_decisions_total{model,worker_id}``: prefill workers chosen;
- ``prefill_duration_seconds{model}``: the standard path's prefill hop, sent to terminal;
- ``prefill_errors_total{model,kind}``: prefill attempts that failed (per error kind, or
  ``no_params``).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
import uuid
from dataclasses import dataclass
from typing import Any

import msgspec
from prometheus_client import CollectorRegistry, Counter, Histogram

from ..errors import BackendError, DynamoError
from ..protocols.codec import from_msgpack, to_msgpack
from ..protocols.common import (
    BootstrapInfo,
    FinishReason,
    LLMEngineOutput,
    PrefillResult,
    PreprocessedRequest,
    RoutingHints,
)
from ..runtime.context import Context
from ..runtime.metrics import DURATION_BUCKETS
from ..runtime.tasks import cancel_and_wait
from ..runtime.transport.dispatch import WorkerClient
from .model_manager import DECODE_WORKER_TYPE, ModelEntry, ModelManager, WorkerEntry
from .routing import Routed, Router

log = logging.getLogger("dynamo_backend_common.frontend")

__all__ = ["HandoffBootstrapInfo", "PrefillHop", "PrefillRouter", "Prepared"]

#: Prefill errors meaning "this prefill worker did not do it": try another one.
_RETRY = {BackendError.CannotConnect, BackendError.EngineShutdown,
          BackendError.ConnectionTimeout, BackendError.Disconnected,
          BackendError.StreamIncomplete}
#: How long a finished decode hop waits for its bootstrap prefill stream to end on its own.
BOOTSTRAP_PREFILL_GRACE_S = 5.0


class HandoffBootstrapInfo(BootstrapInfo, kw_only=True):
    """:class:`BootstrapInfo` as Dynamo 1.6.1's frontend sends it: with ``handoff_id``, a UUID
    naming the prefill/decode handoff, the same on both hops. Dynamo's mocker refuses a
    bootstrap request without one ("disaggregated mocker requires a handoff ID"); our workers
    ignore it. On the msgpack codec (the one Dynamo's workers advertise) it is the UUID's 16
    bytes, a msgpack bin, as Dynamo's frontend sends it; Dynamo's mocker rejects the canonical
    string there ("expected a 16 byte array")."""

    handoff_id: bytes | None = None


class PrefillHop:
    """A bootstrap-path prefill stream running beside its decode hop."""

    __slots__ = ("ctx", "task")

    def __init__(self, ctx: Context, task: asyncio.Task[None]) -> None:
        self.ctx = ctx
        self.task = task

    async def finish(self, decode_ok: bool) -> None:
        """After the decode hop: let a prefill that is about done end (bounded), else stop it."""
        if not self.task.done():
            if decode_ok:
                done, _ = await asyncio.wait([self.task], timeout=BOOTSTRAP_PREFILL_GRACE_S)
                if done:
                    return
            self.ctx.stop_generating()
            await cancel_and_wait([self.task])


@dataclass
class Prepared:
    """What :meth:`PrefillRouter.prepare` decided for one attempt."""

    #: The request to send to the decode pool.
    request: PreprocessedRequest
    #: Instance ids of the serving pool the decode hop must not use (aggregated workers when
    #: the model has decode workers and the prompt was prefilled remotely).
    exclude: frozenset[int]
    path: str
    hop: PrefillHop | None = None


class PrefillRouter:
    """Chooses prefill workers and runs the prefill hop (see the module doc)."""

    def __init__(self, models: ModelManager, router: Router, transport: WorkerClient, *,
                 enforce_disagg: bool = False,
                 registry: CollectorRegistry | None = None) -> None:
        self.models = models
        self.router = router
        self.transport = transport
        self.enforce_disagg = enforce_disagg
        #: Attempts per path (see the module doc), all models.
        self.paths: dict[str, int] = {}
        self._rng = random.Random()
        self._disagg_models: set[str] = set()
        models.add_listener(self._on_change)
        models.prefill.add_listener(self._on_change)
        for pool in (models, models.prefill):
            for name, entry in pool.models.items():
                for w in entry.workers.values():
                    self._on_change(name, w, True)
        self._paths_metric = self._roles = self._decisions = self._errors = None
        self._duration: Histogram | None = None
        if registry is not None:
            self._paths_metric = Counter(
                "dynamo_frontend_disagg_requests", "Request attempts per disaggregation path",
                ["model", "path"], registry=registry)
            self._roles = Counter(
                "dynamo_frontend_worker_requests",
                "Requests sent per worker role by the disaggregated path",
                ["model", "role"], registry=registry)
            self._decisions = Counter(
                "dynamo_frontend_prefill_router_decisions", "Prefill workers chosen",
                ["model", "worker_id"], registry=registry)
            self._errors = Counter(
                "dynamo_frontend_prefill_errors", "Prefill attempts that failed",
                ["model", "kind"], registry=registry)
            self._duration = Histogram(
                "dynamo_frontend_prefill_duration_seconds",
                "Prefill hop of the standard path, from sending to its terminal chunk",
                ["model"], buckets=DURATION_BUCKETS, registry=registry)

    def applies(self, model: str) -> bool:
        """Whether requests of ``model`` take the disaggregated path (it has prefill or decode
        workers); a purely aggregated model skips this module."""
        return model in self._disagg_models

    def _on_change(self, model: str, worker: WorkerEntry, added: bool) -> None:
        serving = self.models.models.get(model)
        if model in self.models.prefill.models or (serving is not None and any(
                w.card.worker_type == DECODE_WORKER_TYPE for w in serving.workers.values())):
            self._disagg_models.add(model)
        else:
            self._disagg_models.discard(model)

    def count_role(self, model: str, worker: WorkerEntry) -> None:
        if self._roles is not None:
            self._roles.labels(model, worker.card.worker_type).inc()

    async def prepare(self, model: str, entry: ModelEntry, request: PreprocessedRequest,
                      ctx: Context) -> Prepared:
        """Run (standard path) or start (bootstrap path) the prefill of one attempt."""
        decode_only = self._aggregated_workers(entry)
        tried: set[int] = set()
        while True:
            pool = self.models.prefill.models.get(model)
            if pool is None or not pool.workers or ctx.is_stopped():
                break
            try:
                routed = self.router.route(model, pool, request.token_ids, tried)
            except LookupError:
                break
            worker = routed.worker
            tried.add(worker.instance_id)
            if self._decisions is not None:
                self._decisions.labels(model, f"{worker.instance_id:x}").inc()
            self.count_role(model, worker)
            endpoint = worker.card.runtime_config.disaggregated_endpoint
            if endpoint and endpoint.get("bootstrap_host") and endpoint.get("bootstrap_port"):
                info = HandoffBootstrapInfo(
                    bootstrap_host=str(endpoint["bootstrap_host"]),
                    bootstrap_port=int(endpoint["bootstrap_port"]),
                    bootstrap_room=self._rng.getrandbits(63),
                    handoff_id=uuid.UUID(int=self._rng.getrandbits(128), version=4).bytes)
                hop = self._start_bootstrap(model, routed, request, info, ctx)
                self._count(model, "bootstrap")
                return Prepared(_decode_request(request, worker.instance_id, bootstrap=info),
                                decode_only, "bootstrap", hop)
            started = time.perf_counter()
            try:
                out = await self._run_prefill(routed, _prefill_request(request, worker, routed),
                                              ctx)
            except DynamoError as exc:
                self._error(model, exc.kind.value)
                if ctx.is_stopped():
                    raise
                if exc.kind in _RETRY:
                    log.warning("request %s: prefill worker %x failed (%s: %s); trying another",
                                ctx.id, worker.instance_id, exc.kind.value, exc.message)
                    continue
                self._count(model, "failed")
                raise
            if self._duration is not None:
                self._duration.labels(model).observe(time.perf_counter() - started)
            if out.disaggregated_params is None:
                self._error(model, "no_params")
                log.warning("request %s: prefill worker %x returned no disaggregated_params; "
                            "serving the request aggregated", ctx.id, worker.instance_id)
                break
            details = out.completion_usage.prompt_tokens_details if out.completion_usage else None
            result = PrefillResult(disaggregated_params=out.disaggregated_params,
                                   prompt_tokens_details=details)
            self._count(model, "standard")
            return Prepared(_decode_request(request, worker.instance_id, result=result),
                            decode_only, "standard")
        if self.enforce_disagg and not ctx.is_stopped():
            self._count(model, "failed")
            raise DynamoError(BackendError.CannotConnect,
                              f"no prefill worker available for model {model!r} "
                              f"(tried {len(tried)}) and disaggregation is enforced")
        self._count(model, "aggregated_fallback")
        return Prepared(request, frozenset(), "aggregated_fallback")

    # -- internals --------------------------------------------------------------------------
    @staticmethod
    def _aggregated_workers(entry: ModelEntry) -> frozenset[int]:
        ids = [iid for iid, w in entry.workers.items() if w.card.worker_type != DECODE_WORKER_TYPE]
        return frozenset(ids) if len(ids) < len(entry.workers) else frozenset()

    async def _run_prefill(self, routed: Routed, request: PreprocessedRequest,
                           ctx: Context) -> LLMEngineOutput:
        """Send the prefill request; its terminal chunk (an error chunk raises), carrying the
        stream's ``disaggregated_params``.

        An engine may put them on any chunk: ours put them on the terminal one, Dynamo's
        mocker (1.6.1) on its one token chunk, followed by a terminal without them. The last
        ones seen win; the terminal's own, when it has them."""
        started = False
        params: Any = None
        try:
            stream = self.transport.stream(routed.worker.info, to_msgpack(request), ctx,
                                           headers={"x-request-id": ctx.id})
            try:
                async for raw in stream:
                    out = from_msgpack(raw, LLMEngineOutput)
                    if not started:
                        started = True
                        self.router.first_token(routed)
                    if out.disaggregated_params is not None:
                        params = out.disaggregated_params
                    reason = out.finish_reason
                    if reason is not None:
                        if reason.is_error:
                            raise DynamoError(BackendError.Unknown,
                                              f"prefill worker {routed.worker.instance_id:x}: "
                                              f"{reason.message}")
                        if reason == FinishReason.CANCELLED:
                            raise DynamoError(BackendError.Cancelled, "prefill was cancelled")
                        if out.disaggregated_params is None and params is not None:
                            out = msgspec.structs.replace(out, disaggregated_params=params)
                        return out
            finally:
                await stream.aclose()
            raise DynamoError(BackendError.StreamIncomplete,
                              "prefill stream ended without a terminal chunk")
        finally:
            self.router.finished(routed)

    def _start_bootstrap(self, model: str, routed: Routed, request: PreprocessedRequest,
                         info: BootstrapInfo, ctx: Context) -> PrefillHop:
        # The user's request id on both hops, as Dynamo's frontend sends them: Dynamo's mocker
        # names the handoff by (handoff_id, bootstrap_room, request id) and refuses a decode
        # whose request id differs from its prefill's ("handoff participant identity or
        # backend mismatch").
        child = Context(ctx.id)
        ctx.add_stop_callback(lambda _: child.stop_generating())
        sent = msgspec.structs.replace(_prefill_request(request, routed.worker, routed),
                                       bootstrap_info=info)

        async def run() -> None:
            try:
                await self._run_prefill(routed, sent, child)
            except DynamoError as exc:
                self._error(model, exc.kind.value)
                if not child.is_stopped():
                    log.warning("request %s: bootstrap prefill on worker %x failed (%s: %s)",
                                ctx.id, routed.worker.instance_id, exc.kind.value,
                                exc.message)

        task = asyncio.get_running_loop().create_task(run(), name=f"prefill-{ctx.id}")
        return PrefillHop(child, task)

    def _count(self, model: str, path: str) -> None:
        self.paths[path] = self.paths.get(path, 0) + 1
        if self._paths_metric is not None:
            self._paths_metric.labels(model, path).inc()

    def _error(self, model: str, kind: str) -> None:
        if self._errors is not None:
            self._errors.labels(model, kind).inc()


def _prefill_request(request: PreprocessedRequest, worker: WorkerEntry,
                     routed: Routed) -> PreprocessedRequest:
    stop = msgspec.structs.replace(request.stop_conditions, max_tokens=1, min_tokens=None)
    routing = msgspec.structs.replace(request.routing or RoutingHints(),
                                      prefill_worker_id=worker.instance_id,
                                      prefill_dp_rank=routed.dp_rank, dp_rank=routed.dp_rank)
    return msgspec.structs.replace(
        request, stop_conditions=stop, routing=routing, backend_instance_id=worker.instance_id,
        estimated_prefix_hit_num_blocks=routed.decision.overlap_blocks or None)


def _decode_request(request: PreprocessedRequest, prefill_worker: int, *,
                    result: PrefillResult | None = None,
                    bootstrap: BootstrapInfo | None = None) -> PreprocessedRequest:
    routing = msgspec.structs.replace(request.routing or RoutingHints(),
                                      prefill_worker_id=prefill_worker)
    return msgspec.structs.replace(request, prefill_result=result, bootstrap_info=bootstrap,
                                   routing=routing)
