"""Sends preprocessed requests to workers: routing, failover and mid-stream migration.

- Before the first token, a worker that refuses (cannot connect, unknown endpoint, draining) is
  skipped and another is tried; each worker at most once per request.
- After tokens have flowed, a broken stream (``Disconnected`` / ``StreamIncomplete``) is moved to
  another worker up to ``migration_limit`` times: the new request's prompt is the original
  prompt plus every token already delivered, and ``max_tokens`` shrinks accordingly, so the
  client sees one unbroken stream. The terminal chunk's usage is rebased onto the original
  request (prompt = the original prompt, completion = all tokens of the stream).
- A model with prefill or decode workers (disaggregated serving) has each attempt prepared by
  the :class:`~.disagg.PrefillRouter` first (the prefill hop); a decode worker that refuses
  the prepared request is replaced without prefilling again; a migration prefills the
  continuation anew.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

import msgspec

from ..errors import BackendError, DynamoError
from ..protocols.codec import from_msgpack, to_msgpack
from ..protocols.common import LLMEngineOutput, PreprocessedRequest, RoutingHints, usage
from ..runtime.context import Context
from ..runtime.transport.dispatch import WorkerClient
from .disagg import PrefillRouter, Prepared
from .model_manager import ModelManager
from .routing import Routed, Router

log = logging.getLogger("dynamo_backend_common.frontend")

#: Errors meaning "this worker did not take the request": try another one.
_REFUSED = {BackendError.CannotConnect, BackendError.EngineShutdown,
            BackendError.ConnectionTimeout}
#: Errors meaning "the stream broke after it started": migrate.
_BROKEN = {BackendError.Disconnected, BackendError.StreamIncomplete}


class NoWorkersError(DynamoError):
    def __init__(self, model: str, detail: str = "") -> None:
        super().__init__(BackendError.CannotConnect,
                         f"no worker available for model {model!r}" + (f": {detail}" if detail
                                                                       else ""))


class EngineClient:
    """Streams ``LLMEngineOutput`` for a model from its workers."""

    def __init__(
        self,
        models: ModelManager,
        router: Router,
        *,
        transport: WorkerClient | None = None,
        prefill: PrefillRouter | None = None,
    ) -> None:
        self.models = models
        self.router = router
        self.transport = transport or WorkerClient()
        #: The prefill router of disaggregated models (``None``: every model aggregated).
        self.prefill = prefill
        #: Streams moved to another worker after a mid-stream failure (all requests).
        self.migrations = 0

    async def close(self) -> None:
        await self.transport.close()

    async def generate(
        self, model: str, request: PreprocessedRequest, ctx: Context
    ) -> AsyncIterator[LLMEngineOutput]:
        entry = self.models.models.get(model)
        if entry is None:
            raise NoWorkersError(model)
        limit = entry.card.migration_limit
        delivered: list[int] = []
        tried: set[int] = set()
        migrations = 0
        base_max = request.stop_conditions.max_tokens
        current = request
        prefill = self.prefill
        prepared: Prepared | None = None
        finished = False
        broken: DynamoError | None = None  # the failure the current attempt migrates from
        try:
            while True:
                entry = self.models.models.get(model)
                if entry is None:
                    raise NoWorkersError(model, "all workers left")
                exclude = tried
                if prefill is not None and prefill.applies(model):
                    if prepared is None:
                        prepared = await prefill.prepare(model, entry, current, ctx)
                    if prepared.exclude:
                        exclude = tried | prepared.exclude
                sending = current if prepared is None else prepared.request
                try:
                    routed: Routed = self.router.route(model, entry, sending.token_ids, exclude)
                except LookupError:
                    if broken is not None:  # a stream to migrate, and nowhere to take it
                        raise DynamoError(broken.kind, f"{broken.message} (no other worker to "
                                          "continue the stream on)") from broken
                    raise NoWorkersError(model, f"tried {len(tried)} worker(s)") from None
                worker = routed.worker
                tried.add(worker.instance_id)
                if prepared is not None:
                    assert prefill is not None
                    prefill.count_role(model, worker)
                started = False
                try:
                    sent = _with_target(sending, worker.instance_id, routed)
                    stream = self.transport.stream(worker.info, to_msgpack(sent), ctx,
                                                   headers={"x-request-id": ctx.id})
                    offset = len(delivered)  # tokens earlier attempts already delivered
                    try:
                        async for raw in stream:
                            out = from_msgpack(raw, LLMEngineOutput)
                            if not started:
                                started = True
                                self.router.first_token(routed)
                            delivered.extend(out.token_ids)
                            if offset and out.completion_usage is not None:
                                out = _rebase_usage(out, len(request.token_ids), offset)
                            if out.finish_reason is not None:
                                finished = True
                            yield out
                            if finished:
                                return
                    finally:
                        await stream.aclose()
                    # The worker ended the stream without a terminal chunk.
                    raise DynamoError(BackendError.StreamIncomplete,
                                      "stream ended without a terminal chunk")
                except DynamoError as exc:
                    if ctx.is_stopped():
                        raise
                    if not started and not delivered and exc.kind in _REFUSED:
                        log.info("worker %x refused request %s (%s); trying another",
                                 worker.instance_id, ctx.id, exc.kind.value)
                        continue
                    if exc.kind in _BROKEN or (exc.kind in _REFUSED and delivered):
                        if migrations >= limit:
                            raise DynamoError(exc.kind, f"{exc.message} (migration limit "
                                              f"{limit} reached)") from exc
                        migrations += 1
                        self.migrations += 1
                        log.warning("request %s: worker %x failed mid-stream (%s); migrating "
                                    "with %d tokens generated (%d/%d)", ctx.id,
                                    worker.instance_id, exc.kind.value, len(delivered),
                                    migrations, limit)
                        current = _continuation(request, delivered, base_max)
                        tried = {worker.instance_id}
                        broken = exc
                        if prepared is not None and prepared.hop is not None:
                            await prepared.hop.finish(False)
                        prepared = None  # the continuation is prefilled anew
                        continue
                    raise
                finally:
                    self.router.finished(routed)
        finally:
            if prepared is not None and prepared.hop is not None:
                await prepared.hop.finish(finished)


def _with_target(
    request: PreprocessedRequest, instance_id: int, routed: Routed
) -> PreprocessedRequest:
    routing = request.routing or RoutingHints()
    routing = msgspec.structs.replace(routing, dp_rank=routed.dp_rank)
    return msgspec.structs.replace(
        request,
        routing=routing,
        backend_instance_id=instance_id,
        estimated_prefix_hit_num_blocks=routed.decision.overlap_blocks or None,
    )


def _rebase_usage(out: LLMEngineOutput, prompt_len: int, offset: int) -> LLMEngineOutput:
    """A migrated attempt's usage counts the delivered tokens as prompt; report them as the
    client sees them: the original prompt, and every completion token of the whole stream."""
    cu = out.completion_usage
    assert cu is not None
    fixed = usage(prompt_len, cu.completion_tokens + offset)
    fixed.prompt_tokens_details = cu.prompt_tokens_details
    fixed.completion_tokens_details = cu.completion_tokens_details
    return msgspec.structs.replace(out, completion_usage=fixed)


def _continuation(
    request: PreprocessedRequest, delivered: list[int], base_max: int | None
) -> PreprocessedRequest:
    stop = request.stop_conditions
    if base_max is not None:
        stop = msgspec.structs.replace(stop, max_tokens=max(1, base_max - len(delivered)))
    if stop.min_tokens is not None:
        stop = msgspec.structs.replace(stop, min_tokens=max(0, stop.min_tokens - len(delivered)))
    return msgspec.structs.replace(
        request, token_ids=[*request.token_ids, *delivered], stop_conditions=stop
    )
