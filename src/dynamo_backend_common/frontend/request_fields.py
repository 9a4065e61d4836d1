"""Which OpenAI request fields this frontend honours, and the checks that refuse the others.

:data:`CHAT_FIELDS` and :data:`COMPLETION_FIELDS` list every top-level field the request Structs
decode, each with its status: ``"supported"`` (it takes effect), ``"accepted"`` (an identifier
that never changes the output: ``user``, ``safety_identifier``, ``prompt_cache_key``) or
``"refused"`` (a 400 ``unsupported_parameter`` naming it whenever it asks for something; the
no-op values, ``null``, ``false``, ``{}``, ``[]`` or OpenAI's defaults, pass). A field that is
in neither table is refused at decode (``unknown_parameter``, see
:func:`.openai_types.decode_request`). ``docs/frontend.md`` prints the same tables; a test keeps
them equal.

With ``lenient`` (``--unsupported-fields ignore``) a refused field is dropped with one warning
per field name instead, and guided decoding is passed on to engines that did not declare it.

:func:`guided_decoding` maps ``response_format`` and vLLM's ``guided_*`` /
``structured_outputs`` fields to :class:`GuidedDecodingOptions` under Dynamo's names; at most
one constraint per request.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from typing import Any, Final

from ..protocols.common import GuidedDecodingOptions
from .openai_types import ChatCompletionRequest, CompletionRequest, RequestError

log = logging.getLogger("dynamo_backend_common.frontend")

__all__ = ["CHAT_FIELDS", "COMPLETION_FIELDS", "check_fields", "guided_decoding",
           "guided_kinds"]

_COMMON: Final[dict[str, tuple[str, str]]] = {
    "model": ("supported", "a served model name (`GET /v1/models`)"),
    "max_tokens": ("supported", "default: the rest of the context"),
    "temperature": ("supported", "0..2"),
    "top_p": ("supported", "(0, 1]"),
    "top_k": ("supported", "vLLM extension; -1 = off"),
    "min_p": ("supported", "vLLM extension"),
    "seed": ("supported", "choice i of `n` gets seed + i"),
    "n": ("supported", "each choice is its own engine request (at most `--max-n`)"),
    "stop": ("supported", "up to 16 strings; matched by the frontend across chunks"),
    "stop_token_ids": ("supported", "vLLM extension"),
    "stream": ("supported", "SSE, ends with `data: [DONE]`"),
    "stream_options": ("supported", "`include_usage`; `continuous_usage_stats` is refused"),
    "ignore_eos": ("supported", "vLLM extension"),
    "min_tokens": ("supported", "vLLM extension"),
    "presence_penalty": ("supported", "-2..2, passed to the engine"),
    "frequency_penalty": ("supported", "-2..2, passed to the engine"),
    "repetition_penalty": ("supported", "vLLM extension, passed to the engine"),
    "include_stop_str_in_output": ("supported", "vLLM extension"),
    "skip_special_tokens": ("supported", "vLLM extension; default true"),
    "user": ("accepted", "an end-user identifier; no effect on the output"),
    "safety_identifier": ("accepted", "an end-user identifier; no effect on the output"),
    "prompt_cache_key": ("accepted", "a cache hint; routing uses the prompt itself"),
    "timeout": ("supported", "seconds; after it the request is stopped and answered 504"),
    "response_format": ("supported", "`text`, `json_object`, `json_schema`; needs an engine "
                        "that declares guided decoding, else 400"),
    "guided_json": ("supported", "vLLM extension, as `response_format` json_schema"),
    "guided_regex": ("supported", "vLLM extension; needs engine support"),
    "guided_choice": ("supported", "vLLM extension; needs engine support"),
    "guided_grammar": ("supported", "vLLM extension; needs engine support"),
    "guided_decoding_backend": ("supported", "passed to the engine as `backend`"),
    "guided_whitespace_pattern": ("supported", "passed to the engine"),
    "structured_outputs": ("supported", "vLLM's newer form: `json`, `regex`, `choice`, "
                           "`grammar`, `json_object`"),
    "logit_bias": ("refused", "no engine interface for it yet"),
    "metadata": ("refused", "nothing is stored"),
    "store": ("refused", "nothing is stored (`false` passes)"),
    "service_tier": ("refused", "one tier (`auto` and `default` pass)"),
}

#: Every top-level field of ``POST /v1/chat/completions``: name -> (status, note).
CHAT_FIELDS: Final[dict[str, tuple[str, str]]] = {
    **_COMMON,
    "messages": ("supported", "text content parts only"),
    "max_completion_tokens": ("supported", "wins over `max_tokens`"),
    "logprobs": ("supported", "when the engine returns them"),
    "top_logprobs": ("supported", "0..20, needs `logprobs: true`"),
    "tools": ("supported", "rendered by the chat template; output parsed by the tool-call "
              "parser"),
    "tool_choice": ("supported", "`none`, `auto`, `required`, or a named function "
                    "(`required`/named need guided decoding)"),
    "parallel_tool_calls": ("supported", "`false`: at most the first tool call is returned"),
    "chat_template_kwargs": ("supported", "extra template variables"),
    "add_generation_prompt": ("supported", "default true"),
    "reasoning_effort": ("supported", "passed to the chat template"),
    "functions": ("refused", "deprecated by OpenAI; use `tools`"),
    "function_call": ("refused", "deprecated by OpenAI; use `tool_choice`"),
    "audio": ("refused", "text only"),
    "modalities": ("refused", "text only (`[\"text\"]` passes)"),
    "prediction": ("refused", "no predicted outputs"),
    "web_search_options": ("refused", "no web search"),
    "verbosity": ("refused", "not an engine option"),
}

#: Every top-level field of ``POST /v1/completions``: name -> (status, note).
COMPLETION_FIELDS: Final[dict[str, tuple[str, str]]] = {
    **_COMMON,
    "prompt": ("supported", "text or token ids, one prompt per request"),
    "echo": ("supported", "the prompt text starts the choice"),
    "logprobs": ("supported", "0..20 alternatives, when the engine returns them"),
    "suffix": ("refused", "no insertion"),
    "best_of": ("refused", "unless equal to `n`"),
}

_warned: set[str] = set()


def _refuse(field: str, why: str, lenient: bool) -> None:
    if lenient:
        if field not in _warned:
            _warned.add(field)
            log.warning("request field %r is not supported and was ignored (%s)", field, why)
        return
    raise RequestError(f"{field} is not supported by this server: {why}",
                       code="unsupported_parameter", param=field)


def check_fields(req: ChatCompletionRequest | CompletionRequest, *, lenient: bool = False) -> None:
    """Refuse the request fields that ask for something this frontend does not do.

    Raises :class:`RequestError` (400 ``unsupported_parameter``, ``param`` = the field) for the
    first one found, unless ``lenient``. Also refuses ``stream_options`` without ``stream``.
    """
    if req.logit_bias:
        _refuse("logit_bias", CHAT_FIELDS["logit_bias"][1], lenient)
    if req.metadata:
        _refuse("metadata", "nothing is stored", lenient)
    if req.store:
        _refuse("store", "nothing is stored", lenient)
    if req.service_tier not in (None, "auto", "default"):
        _refuse("service_tier", "one tier only", lenient)
    so = req.stream_options
    if so is not None:
        if not req.stream:
            raise RequestError("stream_options is only allowed when stream is true",
                               code="invalid_value", param="stream_options")
        if so.continuous_usage_stats:
            _refuse("stream_options.continuous_usage_stats",
                    "usage comes in the last chunk (include_usage)", lenient)
    if isinstance(req, ChatCompletionRequest):
        for name in ("functions", "function_call", "audio", "prediction", "web_search_options",
                     "verbosity"):
            if getattr(req, name) not in (None, [], {}):
                _refuse(name, CHAT_FIELDS[name][1], lenient)
        if req.modalities not in (None, [], ["text"]):
            _refuse("modalities", "text only", lenient)


def _kinds(g: GuidedDecodingOptions) -> list[str]:
    return [k for k in ("json", "regex", "choice", "grammar") if getattr(g, k) is not None]


def guided_kinds(g: GuidedDecodingOptions | None) -> list[str]:
    """The constraint kinds ``g`` asks for (``json``, ``regex``, ``choice``, ``grammar``)."""
    return [] if g is None else _kinds(g)


def guided_decoding(req: ChatCompletionRequest | CompletionRequest) -> GuidedDecodingOptions | None:
    """The request's guided-decoding constraint, or ``None``.

    ``response_format`` ``json_object`` -> ``json={"type": "object"}``; ``json_schema`` -> its
    ``schema`` (required); ``text`` -> none. ``guided_json`` (a schema object or its JSON text),
    ``guided_regex``, ``guided_choice``, ``guided_grammar`` and ``structured_outputs`` map to the
    field of the same kind. Raises :class:`RequestError` when more than one constraint is given
    or one is malformed.
    """
    found: list[tuple[str, str, Any]] = []  # (param, kind, value)
    rf = req.response_format
    if rf is not None and rf.type != "text":
        if rf.type == "json_object":
            found.append(("response_format", "json", {"type": "object"}))
        else:
            if rf.json_schema is None or not isinstance(rf.json_schema.schema, dict):
                raise RequestError("response_format json_schema needs json_schema.schema "
                                   "(a JSON schema object)", code="invalid_value",
                                   param="response_format.json_schema")
            found.append(("response_format", "json", rf.json_schema.schema))
    if req.guided_json is not None:
        found.append(("guided_json", "json", _schema(req.guided_json, "guided_json")))
    for param, kind in (("guided_regex", "regex"), ("guided_choice", "choice"),
                        ("guided_grammar", "grammar")):
        value = getattr(req, param)
        if value is not None:
            found.append((param, kind, value))
    so = req.structured_outputs
    if so:
        found.extend(_structured_outputs(so))
    if not found:
        return None  # backend / whitespace options alone constrain nothing
    if len(found) > 1:
        raise RequestError(
            "only one structured-output constraint per request (got "
            f"{', '.join(p for p, _, _ in found)})", code="invalid_value", param=found[1][0])
    param, kind, value = found[0]
    if kind == "choice" and (not isinstance(value, list) or not value
                             or not all(isinstance(c, str) for c in value)):
        raise RequestError(f"{param} must be a non-empty list of strings", code="invalid_value",
                           param=param)
    if kind in ("regex", "grammar") and (not isinstance(value, str) or not value):
        raise RequestError(f"{param} must be a non-empty string", code="invalid_value",
                           param=param)
    return GuidedDecodingOptions(
        **{kind: value}, backend=req.guided_decoding_backend,
        whitespace_pattern=req.guided_whitespace_pattern)


def _schema(value: Any, param: str) -> dict[str, Any]:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError as e:
            raise RequestError(f"{param} is not valid JSON: {e}", code="invalid_value",
                               param=param) from e
    if not isinstance(value, dict):
        raise RequestError(f"{param} must be a JSON schema object", code="invalid_type",
                           param=param)
    return value


def _structured_outputs(so: Mapping[str, Any]) -> list[tuple[str, str, Any]]:
    out: list[tuple[str, str, Any]] = []
    for key, value in so.items():
        param = f"structured_outputs.{key}"
        if value is None or value is False:
            continue
        if key == "json":
            out.append((param, "json", _schema(value, param)))
        elif key == "json_object":
            out.append((param, "json", {"type": "object"}))
        elif key in ("regex", "choice", "grammar"):
            out.append((param, key, value))
        else:
            raise RequestError(f"{param} is not supported (json, json_object, regex, choice, "
                               "grammar)", code="unsupported_parameter", param=param)
    return out
