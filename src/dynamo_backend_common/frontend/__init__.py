"""The OpenAI-compatible frontend: HTTP serving, the per-request pipeline and model discovery.

Submodules: :mod:`.server` (the Starlette app, its routes and :class:`~.server.HttpServer`),
:mod:`.openai_types` (request and response shapes), :mod:`.request_fields` (which fields are
honoured), :mod:`.preprocess` (chat template, tokenization, request mapping),
:mod:`.postprocess` (incremental detokenization, stop strings, finish reasons),
:mod:`.responses` (OpenAI bodies and SSE events), :mod:`.chat_parsing`, :mod:`.tool_calls` and
:mod:`.reasoning` (tool calls and reasoning in model output), :mod:`.model_manager` (models
from discovery), :mod:`.routing` and :mod:`.engine_client` (worker choice, failover,
migration), :mod:`.card_files` (model files named by worker cards), :mod:`.metrics`,
:mod:`.launcher` (``dynamo-backend run``).
"""
