"""The OpenAI-compatible frontend: HTTP serving, the per-request pipeline and model discovery.

Submodules: :mod:`.server` (the frontend's configuration, its routes and the request preparation),
:mod:`.generation` (the per-request pipeline and its streamed or unary response),
:mod:`.http` (uvicorn on the event loop),
:mod:`.openai_types` (request and response shapes), :mod:`.request_fields` (which fields are
honoured), :mod:`.preprocess` (chat template, tokenization, request mapping),
:mod:`.postprocess` (incremental detokenization, stop strings, finish reasons),
:mod:`.responses` (OpenAI bodies and SSE events), :mod:`.chat_parsing`, :mod:`.tool_calls` and
:mod:`.reasoning` (tool calls and reasoning in model output), :mod:`.model_manager` (models
from discovery), :mod:`.routing` and :mod:`.engine_client` (worker choice, failover,
migration), :mod:`.card_files` (model files named by worker cards), :mod:`.metrics`,
:mod:`.replicas` and :mod:`.replica_sync` (several frontend processes on one port, their
routers sharing their requests in flight).
``dynamo-backend run``, which hosts a frontend beside its workers, is
:mod:`dynamo_backend_common.cli.launcher`.
"""
