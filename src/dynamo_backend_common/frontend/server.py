"""The OpenAI-compatible HTTP frontend: its configuration, the Starlette app and its routes.

A generation request is decoded, checked and preprocessed here; :mod:`.generation` runs it
(the per-request pipeline and its response) and :mod:`.http` serves the app with uvicorn.

Routes:

- ``POST /v1/chat/completions``, ``POST /v1/completions``: decode and validate the request,
  preprocess it with the model's :class:`ModelDir` (chat template, tokenizer; loaded once per
  card checksum from the files the worker's card names, local or downloaded and verified by
  :func:`.card_files.materialize`), route it to a worker through the
  :class:`EngineClient` (failover, migration), detokenize, apply stop strings, and answer with
  one JSON body or an SSE stream ending in ``data: [DONE]``.
- ``GET /v1/models``: the models discovery currently shows (a model appears with its first worker
  and disappears with its last); ``GET /v1/models/{id}`` one of them.
- ``POST /tokenize``, ``POST /detokenize``: vLLM's shapes, with the model's tokenizer.
- ``GET /health`` (200 ``{"status": "healthy", "models": {name: workers}, "instances": [...]}``
  with each worker's address, status URL and ``worker_type``, prefill workers included),
  ``GET /live``,
  ``GET /metrics`` (Prometheus text; see :mod:`.metrics`).

Errors are OpenAI-shaped (``{"error": {"message", "type", "param", "code"}}``): bad JSON or an
invalid parameter -> 400 naming the parameter; unknown model -> 404 ``model_not_found``; a prompt
that does not fit the context -> 400 ``context_length_exceeded``; a body over
``max_body_bytes`` -> 413; a missing or wrong ``Authorization: Bearer`` key (when ``api_key`` is
set) -> 401 ``invalid_api_key``. Engine errors keep their :class:`BackendError` kind as ``code``:
``InvalidArgument`` -> 400, ``CannotConnect``/``EngineShutdown``/``Cancelled`` -> 503,
``Disconnected``/``StreamIncomplete`` -> 502, ``ResponseTimeout``/``ConnectionTimeout`` -> 504,
anything else 500. An error after an SSE stream started is sent as a ``data: {"error": ...}``
event followed by ``data: [DONE]``.

Streams do not send headers until the engine produced its first chunk, so a request that fails
before generating anything gets a real HTTP error status even when ``stream`` is true. A client
that disconnects (streaming or not) stops the request: ``Context.stop_generating()`` reaches the
worker as a STOP frame and the engine's ``abort`` runs there. One that left before generation
started (while its model directory loaded or its prompt was preprocessed) is noticed before
any worker is asked.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import hmac
import logging
import time
import uuid
from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Literal

import msgspec
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from ..engine import GUIDED_DECODING_KEY
from ..model_dir import ModelDir, ModelDirError
from ..protocols.discovery import ModelCard, ModelDeploymentCard, files_checksum
from ..runtime.context import Context
from ..runtime.discovery import Discovery, open_discovery
from ..runtime.events import EventPlane, default_event_url, open_event_plane
from ..runtime.tasks import cancel_and_wait
from ..runtime.transport.dispatch import WorkerClient
from .card_files import materialize
from .chat_parsing import ChoiceParser, NamedToolParser, RequiredToolParser
from .disagg import PrefillRouter
from .engine_client import EngineClient
from .generation import GenerationResponse, Job, job_deltas
from .metrics import FrontendMetrics
from .model_manager import ModelEntry, ModelManager
from .openai_types import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    DetokenizeResponse,
    ModelInfo,
    ModelList,
    RequestError,
    TokenizeRequest,
    TokenizeResponse,
    decode_request,
)
from .postprocess import StreamDelta
from .preprocess import Preprocessed, Preprocessor
from .reasoning import KEEPS_SPECIAL_TOKENS as REASONING_KEEPS_SPECIAL
from .reasoning import REASONING_PARSERS, make_reasoning_parser
from .request_fields import check_fields, guided_kinds
from .responses import ChatRenderer, CompletionRenderer, Renderer
from .routing import DirectRoutingMiddleware, Router, normalize_router_mode
from .tool_calls import KEEPS_SPECIAL_TOKENS as TOOL_KEEPS_SPECIAL
from .tool_calls import TOOL_CALL_PARSERS, ToolCallParser, detect_tool_call_parser

log = logging.getLogger("dynamo_backend_common.frontend")

__all__ = ["DEFAULT_MAX_BODY_BYTES", "Frontend", "FrontendConfig"]

DEFAULT_MAX_BODY_BYTES: Final = 4 * 1024 * 1024
#: Bodies above this are preprocessed (template + tokenizer) in a thread, off the event loop.
_OFFLOAD_BYTES: Final = 64 * 1024
_encode = msgspec.json.Encoder().encode
#: Cards whose model-state key :meth:`Frontend.model_state` remembers (then it starts over).
_CARD_KEYS_MAX: Final = 256




@dataclass
class FrontendConfig:
    """What ``dynamo-backend frontend`` configures (see ``docs/frontend.md``)."""

    host: str = "127.0.0.1"
    port: int = 8000
    #: Discovery URL (``file://`` default, ``etcd://HOST:PORT``, ``memory://NAME``).
    discovery: str | None = None
    #: Event plane URL, only used by ``router_mode="kv"`` (default: ``zmq://`` beside file or
    #: etcd discovery, in-process beside memory discovery).
    events: str | None = None
    #: Only serve workers registered under this namespace (``None``: all).
    namespace: str | None = None
    #: A router mode in any spelling ``frontend.routing.normalize_router_mode`` accepts:
    #: ``round_robin``, ``random``, ``power_of_two``, ``least_loaded``, ``kv``, ``direct``
    #: (or Dynamo's ``round-robin``, ``power-of-two``, ``least-loaded``, ...).
    router_mode: str = "round_robin"
    kv_overlap_weight: float = 1.0
    router_temperature: float = 0.0
    busy_threshold: float | None = None
    #: ``kv`` mode: index the workers' KV events (``True``), or predict their caches from the
    #: routing decisions with no event plane (``False``, Dynamo's ``--no-kv-events``).
    kv_events: bool = True
    #: ``kv`` mode without KV events: seconds a routed prompt's blocks count as cached on the
    #: worker it went to (Dynamo's ``--router-ttl``).
    router_ttl_secs: float = 120.0
    #: When set, ``/v1/*`` requires ``Authorization: Bearer <api_key>``.
    api_key: str | None = None
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    #: Largest ``n`` (choices per request) accepted; each choice is its own engine request.
    max_n: int = 8
    #: Tool-call parser for ``tools`` requests (:data:`.tool_calls.TOOL_CALL_PARSERS`):
    #: ``"auto"`` takes the worker card's ``tool_call_parser``, else detects it from the chat
    #: template; ``None`` / ``"none"`` parses no tool calls.
    tool_call_parser: str | None = "auto"
    #: Reasoning parser (:data:`.reasoning.REASONING_PARSERS`) for every chat request; ``None``:
    #: the worker card's ``reasoning_parser`` if it names one, else no reasoning split.
    reasoning_parser: str | None = None
    #: Seconds a request may take before it is stopped and answered 504 (``None``: no limit;
    #: a request's own ``timeout`` field may only shorten it).
    request_timeout: float | None = None
    #: ``"reject"``: a request field this server does not honour is a 400 naming it;
    #: ``"ignore"``: it is dropped (logged once per field name), and guided decoding is passed
    #: to engines that did not declare it.
    unsupported_fields: Literal["reject", "ignore"] = "reject"
    #: Disaggregated models: with no prefill worker usable, fail requests (503) instead of
    #: serving them aggregated on the decode workers (Dynamo's ``--enforce-disagg``).
    enforce_disagg: bool = False

    def __post_init__(self) -> None:
        from .reasoning import REASONING_PARSERS
        from .tool_calls import TOOL_CALL_PARSERS

        if self.tool_call_parser == "none":
            self.tool_call_parser = None
        if self.tool_call_parser not in (None, "auto") and (
                self.tool_call_parser not in TOOL_CALL_PARSERS):
            raise ValueError(f"unknown tool-call parser {self.tool_call_parser!r} (known: "
                             f"auto, none, {', '.join(sorted(TOOL_CALL_PARSERS))})")
        if self.reasoning_parser == "none":
            self.reasoning_parser = None
        if self.reasoning_parser is not None and self.reasoning_parser not in REASONING_PARSERS:
            raise ValueError(f"unknown reasoning parser {self.reasoning_parser!r} (known: "
                             f"{', '.join(sorted(REASONING_PARSERS))})")
        if self.request_timeout is not None and not self.request_timeout > 0:
            raise ValueError("request_timeout must be > 0 seconds")
        if self.unsupported_fields not in ("reject", "ignore"):
            raise ValueError("unsupported_fields must be 'reject' or 'ignore'")


def _error_response(err: RequestError, headers: dict[str, str] | None = None) -> Response:
    return Response(_encode(err.to_response()), status_code=err.status,
                    media_type="application/json", headers=headers)


@dataclass(frozen=True, slots=True)
class _ModelState:
    model_dir: ModelDir
    preprocessor: Preprocessor
    #: Resolved parser names for this model (``None``: none).
    tool_call_parser: str | None = None
    reasoning_parser: str | None = None


class Frontend:
    """Owns the serving stack (discovery watch, router, engine client, metrics) and the ASGI app.

    ``await start()`` before serving :attr:`app`, ``await close()`` after. Pass ``discovery``
    (and ``events``) objects to share them (tests, in-process setups); otherwise they are opened
    from the config's URLs and owned (closed) by the frontend.
    """

    def __init__(
        self,
        config: FrontendConfig | None = None,
        *,
        discovery: Discovery | None = None,
        events: EventPlane | None = None,
    ) -> None:
        self.config = config or FrontendConfig()
        if self.config.max_body_bytes <= 0:
            raise ValueError("max_body_bytes must be > 0")
        self._own_discovery = discovery is None
        self.discovery = discovery or open_discovery(self.config.discovery)
        self._own_events = events is None
        self._events = events
        self.metrics = FrontendMetrics()
        self.models = ModelManager(self.discovery, namespace=self.config.namespace)
        self.router: Router | None = None
        #: Routes the prefill pool of disaggregated models (see :mod:`.disagg`).
        self.prefill_router: Router | None = None
        self.client: EngineClient | None = None
        self._states: dict[str, asyncio.Task[_ModelState]] = {}
        #: ``id(card) -> (card, its model-state key)`` (see :meth:`model_state`).
        self._card_keys: dict[int, tuple[ModelCard, str]] = {}
        self._api_key = (self.config.api_key or "").encode() or None
        self._started = False
        self._hot = {"/v1/chat/completions": self._chat, "/v1/completions": self._completions}
        # Bound once: every response keeps these two for its whole stream.
        self._deltas = self.deltas
        self._finished = self.finished
        self._direct = (DirectRoutingMiddleware(self._dispatch)
                        if normalize_router_mode(self.config.router_mode) in ("direct", "kv")
                        else None)
        self._starlette = Starlette(
            routes=[
                Route("/v1/chat/completions", self._chat, methods=["POST"]),
                Route("/v1/completions", self._completions, methods=["POST"]),
                Route("/v1/models", self._list_models, methods=["GET"]),
                Route("/v1/models/{model_id:path}", self._get_model, methods=["GET"]),
                Route("/tokenize", self._tokenize, methods=["POST"]),
                Route("/detokenize", self._detokenize, methods=["POST"]),
                Route("/health", self._health, methods=["GET"]),
                Route("/live", self._live, methods=["GET"]),
                Route("/metrics", self._metrics, methods=["GET"]),
            ],
            exception_handlers={HTTPException: self._http_exception,
                                Exception: self._unhandled},
        )

    def app(self, scope: Scope, receive: Receive, send: Send) -> Awaitable[None]:
        """The ASGI app. The two generation routes skip Starlette's routing and middleware
        (measurably cheaper per request); everything else goes through Starlette. In the
        router modes that honour a target (``direct``, ``kv``) the direct-routing headers
        (``x-worker-instance-id``, ``x-dp-rank``) are read first
        (:class:`~.routing.DirectRoutingMiddleware`). It returns the awaitable of the handler
        it picks rather than awaiting it: no coroutine frame of its own for the whole of
        every stream."""
        if self._direct is not None:
            return self._direct(scope, receive, send)
        return self._dispatch(scope, receive, send)

    async def _dispatch(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            handler = self._hot.get(scope["path"])
            if handler is not None:
                request = Request(scope, receive)
                try:
                    response = await handler(request)
                except Exception as exc:
                    response = await self._unhandled(request, exc)
                del request  # not kept (with its parsed headers) for the whole stream
                await response(scope, receive, send)
                return
        await self._starlette(scope, receive, send)

    # -- lifecycle --------------------------------------------------------------------------
    async def start(self) -> None:
        cfg = self.config
        if self._own_discovery:
            await self.discovery.start()
        mode = normalize_router_mode(cfg.router_mode)
        if mode == "kv" and cfg.kv_events and self._events is None:
            self._events = open_event_plane(cfg.events or default_event_url(self.discovery),
                                            discovery=self.discovery)
            await self._events.start()
        await self.models.start()
        self.router = Router(
            self.models, cfg.router_mode, events=self._events,
            overlap_weight=cfg.kv_overlap_weight, temperature=cfg.router_temperature,
            busy_threshold=cfg.busy_threshold, kv_events=cfg.kv_events,
            router_ttl_secs=cfg.router_ttl_secs, registry=self.metrics.registry)
        await self.router.start()
        # Prefill workers get a router of their own (same mode, same event plane): its policy
        # state (in-flight counts, KV predictions) is about the prefill pool only. A worker the
        # request names (direct routing) is its decode worker, so this router ignores it, and
        # in direct mode takes turns.
        self.prefill_router = Router(
            self.models.prefill, "round_robin" if mode == "direct" else cfg.router_mode,
            events=self._events, overlap_weight=cfg.kv_overlap_weight,
            temperature=cfg.router_temperature, busy_threshold=cfg.busy_threshold,
            kv_events=cfg.kv_events, router_ttl_secs=cfg.router_ttl_secs, targeted=False)
        await self.prefill_router.start()
        transport = WorkerClient()
        prefill = PrefillRouter(self.models, self.prefill_router, transport,
                                enforce_disagg=cfg.enforce_disagg, registry=self.metrics.registry)
        client = self.client = EngineClient(self.models, self.router, transport=transport,
                                            prefill=prefill)
        self.metrics.bind(
            lambda: {n: len(e.workers) for n, e in self.models.models.items()},
            lambda: client.migrations)
        self._started = True

    async def close(self) -> None:
        states, self._states = list(self._states.values()), {}
        await cancel_and_wait(states)
        if self.client is not None:
            await self.client.close()
        if self.router is not None:
            await self.router.close()
        if self.prefill_router is not None:
            await self.prefill_router.close()
        await self.models.close()
        if self._events is not None and self._own_events:
            await self._events.close()
        if self._own_discovery:
            await self.discovery.close()

    async def wait_for_model(self, name: str, *, workers: int = 1,
                             timeout: float = 30.0) -> None:
        """Wait until ``name`` has ``workers`` workers and its model directory is loaded."""
        await self.models.wait_for_model(name, workers=workers, timeout=timeout)
        entry = self.models.models.get(name)
        if entry is not None and entry.card.card_json.files():
            await self.model_state(entry)

    async def model_state(self, entry: ModelEntry) -> _ModelState:
        """The model's tokenizer and preprocessor, loaded once (in a thread) per model dir.

        Raises :class:`RequestError`: 400 ``model_not_supported`` when the card names no model
        directory, 500 ``model_load_failed`` when the directory cannot be read here.
        """
        card = entry.card
        # The card's key, computed once per card object (a request would otherwise list and
        # sort the card's files for it).
        known = self._card_keys.get(id(card))
        if known is not None and known[0] is card:
            key = known[1]
        else:
            if not card.card_json.files():
                raise RequestError(
                    f"model {entry.name!r} was registered without model files (worker flag "
                    "--model-path), so this frontend has no tokenizer for it and cannot serve "
                    "it over the OpenAI routes",
                    code="model_not_supported", param="model")
            key = card.checksum
            if len(self._card_keys) >= _CARD_KEYS_MAX:
                self._card_keys.clear()
            self._card_keys[id(card)] = (card, key)
        task = self._states.get(key)
        if task is None:
            task = self._states[key] = asyncio.get_running_loop().create_task(
                self._load(card.card_json, entry.name, self.config),
                name=f"load {entry.name}")
        try:
            return await asyncio.shield(task)
        except ModelDirError as exc:
            if self._states.get(key) is task:
                del self._states[key]  # retry on the next request (the files may be fixed)
            raise RequestError(
                f"cannot load the model files of {entry.name!r}: {exc}", status=500,
                code="model_load_failed", type="server_error") from exc

    @staticmethod
    async def _load(card: ModelDeploymentCard, name: str, cfg: FrontendConfig) -> _ModelState:
        def load() -> tuple[Path, _ModelState]:
            path = materialize(card)
            # materialize verified every file against the card: its checksum is the dir's.
            md = ModelDir.load(path, name=name, checksum=files_checksum(card.files()))
            rc = card.runtime_config
            tool_parser = cfg.tool_call_parser
            if tool_parser == "auto":
                # The worker's word (Dynamo's --dyn-tool-call-parser) over our guess.
                tool_parser = (rc.tool_call_parser if rc.tool_call_parser in TOOL_CALL_PARSERS
                               else detect_tool_call_parser(md.chat_template))
            reasoning = cfg.reasoning_parser
            if reasoning is None and rc.reasoning_parser in REASONING_PARSERS:
                reasoning = rc.reasoning_parser
            return path, _ModelState(md, Preprocessor(md, max_n=cfg.max_n), tool_parser,
                                     reasoning)

        path, state = await asyncio.to_thread(load)
        log.info("loaded model files of %s from %s (tool-call parser %s, reasoning parser %s)",
                 name, path, state.tool_call_parser, state.reasoning_parser)
        return state

    # -- plumbing ---------------------------------------------------------------------------
    def _check_auth(self, request: Request) -> None:
        if self._api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
                token.strip().encode(), self._api_key):
            raise RequestError("Incorrect or missing API key (send Authorization: Bearer KEY)",
                               status=401, code="invalid_api_key")

    async def _body(self, request: Request) -> bytes:
        limit = self.config.max_body_bytes
        declared = request.headers.get("content-length")
        too_big = RequestError(f"request body exceeds the limit of {limit} bytes", status=413,
                               code="request_too_large")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise too_big
        parts: list[bytes] = []
        size = 0
        async for part in request.stream():
            size += len(part)
            if size > limit:
                raise too_big
            parts.append(part)
        return b"".join(parts)

    async def _http_exception(self, request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        msg = f"{request.method} {request.url.path}: {exc.detail}"
        return _error_response(RequestError(msg, status=exc.status_code, code=code),
                               dict(exc.headers or {}))

    async def _unhandled(self, request: Request, exc: Exception) -> Response:
        log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
        return _error_response(RequestError(f"internal error: {type(exc).__name__}: {exc}",
                                            status=500, code="internal_error",
                                            type="server_error"))

    # -- routes -----------------------------------------------------------------------------
    async def _live(self, request: Request) -> Response:
        return JSONResponse({"status": "live"})

    async def _health(self, request: Request) -> Response:
        models = {n: len(e.workers) for n, e in self.models.models.items()}
        instances = [
            {"model": n, "instance_id": f"{w.instance_id:x}", "address": w.address,
             "status_url": w.info.status_url, "worker_type": w.card.worker_type}
            for pool in (self.models, self.models.prefill)
            for n, e in pool.models.items() for w in e.workers.values()]
        return JSONResponse({"status": "healthy" if self._started else "starting",
                             "models": models, "instances": instances},
                            status_code=200 if self._started else 503)

    async def _metrics(self, request: Request) -> Response:
        # With sibling processes (``--processes N``) this merges theirs: see ``.metrics``.
        return Response(await self.metrics.scrape(),
                        media_type="text/plain; version=0.0.4; charset=utf-8")

    async def _list_models(self, request: Request) -> Response:
        try:
            self._check_auth(request)
        except RequestError as err:
            return _error_response(err)
        data = [ModelInfo(id=e.name, created=e.created)
                for e in sorted(self.models.models.values(), key=lambda e: e.name)]
        return Response(_encode(ModelList(data=data)), media_type="application/json")

    async def _get_model(self, request: Request) -> Response:
        try:
            self._check_auth(request)
            model_id = request.path_params["model_id"]
            entry = self.models.models.get(model_id)
            if entry is None:
                raise self._no_model(model_id)
        except RequestError as err:
            return _error_response(err)
        return Response(_encode(ModelInfo(id=entry.name, created=entry.created)),
                        media_type="application/json")

    def _no_model(self, name: str | None) -> RequestError:
        return RequestError(f"The model `{name}` does not exist (served: "
                            f"{sorted(self.models.models) or 'none yet'}).",
                            status=404, code="model_not_found", param="model")

    async def _utility_state(self, name: str | None) -> _ModelState:
        """The model state for ``/tokenize`` / ``/detokenize``: ``name``, or the only model."""
        if name is None:
            if len(self.models.models) != 1:
                raise RequestError(
                    f"model is required when {len(self.models.models)} models are served",
                    code="missing_required_parameter", param="model")
            name = next(iter(self.models.models))
        entry = self.models.models.get(name)
        if entry is None:
            raise self._no_model(name)
        return await self.model_state(entry)

    async def _tokenize(self, request: Request) -> Response:
        """vLLM's ``POST /tokenize``: ``{count, max_model_len, tokens, token_strs}``."""
        try:
            self._check_auth(request)
            req = decode_request(await self._body(request), TokenizeRequest,
                                 self.config.unsupported_fields)
            if (req.prompt is None) == (req.messages is None):
                raise RequestError("send exactly one of prompt and messages",
                                   code="invalid_value", param="prompt")
            state = await self._utility_state(req.model)
            pp = state.preprocessor
            if req.messages is not None:
                chat = ChatCompletionRequest(
                    model=req.model or "", messages=req.messages, tools=req.tools,
                    add_generation_prompt=req.add_generation_prompt,
                    chat_template_kwargs=req.chat_template_kwargs)
                text = pp.render_chat(chat)
                special = bool(req.add_special_tokens)
            else:
                text = req.prompt or ""
                special = req.add_special_tokens is not False
            ids = (pp.encode_text(text) if special
                   else pp.tokenizer.encode(text, add_special_tokens=False).ids)
        except RequestError as err:
            return _error_response(err)
        tok = pp.tokenizer
        strs = [tok.id_to_token(i) or "" for i in ids] if req.return_token_strs else None
        return Response(_encode(TokenizeResponse(
            count=len(ids), max_model_len=state.model_dir.context_length, tokens=ids,
            token_strs=strs)), media_type="application/json")

    async def _detokenize(self, request: Request) -> Response:
        """vLLM's ``POST /detokenize``: ``{prompt}``, special tokens kept."""
        try:
            self._check_auth(request)
            req = decode_request(await self._body(request), DetokenizeRequest,
                                 self.config.unsupported_fields)
            state = await self._utility_state(req.model)
            ids = state.preprocessor.check_ids(req.tokens, "tokens")
        except RequestError as err:
            return _error_response(err)
        text = state.model_dir.tokenizer.decode(ids, skip_special_tokens=False)
        return Response(_encode(DetokenizeResponse(prompt=text)), media_type="application/json")

    async def _chat(self, request: Request) -> Response:
        return await self._generate(request, "chat_completions")

    async def _completions(self, request: Request) -> Response:
        return await self._generate(request, "completions")

    async def _generate(self, request: Request, endpoint: str) -> Response:
        start = time.perf_counter()
        chat = endpoint == "chat_completions"
        stream = False
        model_label = ""
        try:
            self._check_auth(request)
            body = await self._body(request)
            unknown = self.config.unsupported_fields
            req: ChatCompletionRequest | CompletionRequest = (
                decode_request(body, ChatCompletionRequest, unknown) if chat
                else decode_request(body, CompletionRequest, unknown))
            stream = req.stream
            check_fields(req, lenient=unknown == "ignore")
            entry = self.models.models.get(req.model)
            if entry is None:
                raise self._no_model(req.model)
            model_label = entry.name
            wanted = "Chat" if chat else "Completions"
            if wanted not in entry.card.model_type:
                raise RequestError(
                    f"model {entry.name!r} does not serve {endpoint.replace('_', ' ')} "
                    f"(it serves: {entry.card.model_type})",
                    code="model_not_supported", param="model")
            state = await self.model_state(entry)
            pre = await self._preprocess(state.preprocessor, req, len(body))
            self._check_guided(entry, pre, req)
            parsers = self._parsers(state, pre, req)
            if parsers is not None and req.skip_special_tokens is None and (
                    state.tool_call_parser in TOOL_KEEPS_SPECIAL
                    or state.reasoning_parser in REASONING_KEEPS_SPECIAL):
                # Their markers ([TOOL_CALLS], [THINK]) are special tokens: keep them in the
                # text the parser reads, as vLLM does.
                oo = msgspec.structs.replace(pre.request.output_options,
                                             skip_special_tokens=False)
                pre = dataclasses.replace(pre, request=msgspec.structs.replace(
                    pre.request, output_options=oo))
        except RequestError as err:
            self.metrics.count(model_label, endpoint, stream, "error")
            return _error_response(err)

        ctx = Context(_request_id(request))
        rid = ("chatcmpl-" if chat else "cmpl-") + ctx.id
        created = int(time.time())
        md = state.model_dir
        include_usage = bool(stream and req.stream_options and req.stream_options.include_usage)
        renderer: Renderer
        if isinstance(req, ChatCompletionRequest):
            renderer = ChatRenderer(rid, created, req.model, include_usage=include_usage,
                                    tokenizer=md.tokenizer, logprobs=bool(req.logprobs),
                                    n=req.n or 1, parsers=parsers)
        else:
            renderer = CompletionRenderer(
                rid, created, req.model, include_usage=include_usage, tokenizer=md.tokenizer,
                logprobs=req.logprobs is not None,
                echo_text=pre.prompt if req.echo else None, n=req.n or 1)
        job = Job(
            model=model_label, endpoint=endpoint, stream=stream, pre=pre, model_dir=md,
            renderer=renderer, ctx=ctx,
            timer=self.metrics.request_started(model_label, pre.prompt_tokens, start))
        timeout = self.config.request_timeout
        if req.timeout is not None:
            timeout = req.timeout if timeout is None else min(timeout, req.timeout)
        job.timeout = timeout
        return GenerationResponse(job, self._deltas, self._finished)

    def _check_guided(self, entry: ModelEntry, pre: Preprocessed,
                      req: ChatCompletionRequest | CompletionRequest) -> None:
        """400 when the request asks for a guided-decoding kind the model's engine did not
        declare in its card's ``runtime_data`` (unless fields are ``ignore``)."""
        kinds = guided_kinds(pre.request.sampling_options.guided_decoding)
        if not kinds or self.config.unsupported_fields == "ignore":
            return
        declared = entry.card.runtime_config.runtime_data.get(GUIDED_DECODING_KEY) or ()
        missing = [k for k in kinds if k not in declared]
        if missing:
            tc = pre.tool_choice
            param = ("tool_choice" if tc is not None and tc.guided is not None
                     else "response_format" if req.response_format is not None
                     else "structured_outputs" if req.structured_outputs
                     else f"guided_{missing[0]}")
            raise RequestError(
                f"model {entry.name!r} cannot constrain its output to {missing[0]} (its engine "
                f"declares guided decoding kinds: {list(declared) or 'none'}); this request "
                "needs it", code="unsupported_parameter", param=param)

    def _parsers(self, state: _ModelState, pre: Preprocessed,
                 req: ChatCompletionRequest | CompletionRequest) -> list[ChoiceParser] | None:
        """One :class:`ChoiceParser` per choice, or ``None`` when the output is plain content
        (completions, no reasoning parser and no tool calls to parse)."""
        tc = pre.tool_choice
        if tc is None:
            return None
        tools: Callable[[], ToolCallParser] | None = None
        if tc.mode == "named":
            name = tc.name or ""
            tools = functools.partial(NamedToolParser, name)
        elif tc.mode == "required":
            tools = RequiredToolParser
        elif tc.mode == "auto":
            parser = state.tool_call_parser
            if parser is None:
                raise RequestError(
                    f"model {state.model_dir.name!r} has no tool-call parser, so tool calls "
                    "would come back as plain text: start the frontend with --tool-call-parser "
                    f"({', '.join(sorted(TOOL_CALL_PARSERS))}), or send tool_choice \"none\"",
                    code="unsupported_parameter", param="tools")
            tools = TOOL_CALL_PARSERS[parser]
        reasoning = state.reasoning_parser
        if tools is None and reasoning is None:
            return None
        max_calls = 1 if isinstance(req, ChatCompletionRequest) and (
            req.parallel_tool_calls is False) else None
        return [ChoiceParser(make_reasoning_parser(reasoning) if reasoning else None,
                             tools() if tools is not None else None, max_calls=max_calls)
                for _ in range(pre.request.sampling_options.n or 1)]

    @staticmethod
    async def _preprocess(pp: Preprocessor, req: ChatCompletionRequest | CompletionRequest,
                          size: int) -> Preprocessed:
        def run() -> Preprocessed:
            if isinstance(req, ChatCompletionRequest):
                return pp.preprocess_chat(req)
            return pp.preprocess_completion(req)

        # Templates and tokenizers are CPU work: keep long prompts off the event loop.
        return await asyncio.to_thread(run) if size > _OFFLOAD_BYTES else run()

    def deltas(self, job: Job) -> AsyncGenerator[StreamDelta, None]:
        """The job's deltas through this frontend's engine client (:func:`job_deltas`)."""
        assert self.client is not None
        return job_deltas(self.client, job)

    def finished(self, job: Job, status: str) -> None:
        """Record a finished request in the frontend's metrics."""
        self.metrics.request_finished(job.timer, job.model, job.endpoint, job.stream, status,
                                      sum(p.completion_tokens for p in job.posts),
                                      time.perf_counter())


def _request_id(request: Request) -> str:
    # Always a fresh id, never the client's x-request-id: engines key requests (and abort) by
    # it, so two clients sending the same header must not collide.
    rid = uuid.uuid4().hex
    client_rid = request.headers.get("x-request-id")
    if client_rid and log.isEnabledFor(logging.DEBUG):
        log.debug("request %s: client x-request-id %r", rid, client_rid[:128])
    return rid
