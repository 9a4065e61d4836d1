"""OpenAI API request and response shapes as ``msgspec`` Structs, plus :class:`RequestError`.

Requests validate on decode (:func:`decode_request`): a wrong type or an out-of-range value is a
:class:`RequestError` (HTTP 400) naming the offending parameter. An unknown top-level field is a
400 ``unknown_parameter`` naming it (``unknown="ignore"`` drops it instead), so a client never
believes a field it sent took effect when it did not; fields we know but do not honour are
decoded so :mod:`.request_fields` can refuse them by name. Extensions beyond OpenAI's API follow
vLLM's names: ``top_k``, ``min_p``, ``repetition_penalty``, ``ignore_eos``, ``min_tokens``,
``stop_token_ids``, ``include_stop_str_in_output``, ``skip_special_tokens``,
``chat_template_kwargs``, ``add_generation_prompt``, ``guided_json`` / ``guided_regex`` /
``guided_choice`` / ``guided_grammar`` (and ``structured_outputs``); ``timeout`` (seconds) is ours.

Responses encode to OpenAI's JSON: fields OpenAI always writes (``finish_reason``, ``logprobs``,
``system_fingerprint``) are written even when ``null``; ``usage`` on stream chunks is left out
unless set (:data:`msgspec.UNSET`), and set to ``None`` on non-final chunks when the client asked
for ``stream_options.include_usage``, as OpenAI does. The official ``openai`` client parses them.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Final, Literal, TypeVar

import msgspec
from msgspec import UNSET, UnsetType

from ..protocols.common import CompletionTokensDetails, CompletionUsage, PromptTokensDetails

__all__ = [
    "ChatChoice",
    "ChatChoiceLogprobs",
    "ChatCompletion",
    "ChatCompletionChunk",
    "ChatCompletionRequest",
    "ChatDelta",
    "ChatMessage",
    "ChatResponseMessage",
    "ChatTokenLogprob",
    "ChunkChoice",
    "Completion",
    "CompletionChoice",
    "CompletionChunk",
    "CompletionLogprobs",
    "CompletionRequest",
    "ContentPart",
    "DetokenizeRequest",
    "DetokenizeResponse",
    "ErrorDetail",
    "ErrorResponse",
    "FunctionCall",
    "JsonSchemaFormat",
    "ModelInfo",
    "ModelList",
    "RequestError",
    "ResponseFormat",
    "StreamOptions",
    "TokenizeRequest",
    "TokenizeResponse",
    "ToolCallDelta",
    "ToolCallItem",
    "TopLogprob",
    "Usage",
    "decode_request",
]


class RequestError(Exception):
    """A client error the HTTP layer turns into an OpenAI error body.

    ``status`` is the HTTP status (400 unless stated), ``type`` OpenAI's error type
    (``invalid_request_error``), ``code`` a machine-readable code (``context_length_exceeded``,
    ``unsupported_value``, ``invalid_value``, ``invalid_type``, ...), ``param`` the offending
    request field (dotted/indexed path, e.g. ``messages[1].content``) or ``None``.
    """

    def __init__(
        self,
        message: str,
        *,
        status: int = 400,
        code: str | None = None,
        param: str | None = None,
        type: str = "invalid_request_error",
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.code = code
        self.param = param
        self.type = type

    def to_response(self) -> ErrorResponse:
        """The OpenAI error body: ``{"error": {"message", "type", "param", "code"}}``."""
        return ErrorResponse(
            error=ErrorDetail(message=self.message, type=self.type, param=self.param,
                              code=self.code)
        )

    def __repr__(self) -> str:
        return (f"RequestError({self.message!r}, status={self.status}, code={self.code!r}, "
                f"param={self.param!r})")


# --------------------------------------------------------------------------- requests

_Temperature = Annotated[float, msgspec.Meta(ge=0.0, le=2.0)]
_TopP = Annotated[float, msgspec.Meta(gt=0.0, le=1.0)]
_Penalty = Annotated[float, msgspec.Meta(ge=-2.0, le=2.0)]
_NonNeg = Annotated[int, msgspec.Meta(ge=0)]
_Pos = Annotated[int, msgspec.Meta(ge=1)]


class StreamOptions(msgspec.Struct, kw_only=True):
    include_usage: bool = False
    #: vLLM's usage on every chunk: refused (see :mod:`.request_fields`).
    continuous_usage_stats: bool | None = None


class JsonSchemaFormat(msgspec.Struct, kw_only=True):
    """``response_format.json_schema``: ``schema`` is the JSON schema the output must match."""

    name: str = "response"
    description: str | None = None
    schema: dict[str, Any] | None = msgspec.field(default=None, name="schema")
    strict: bool | None = None


class ResponseFormat(msgspec.Struct, kw_only=True):
    """``response_format``: ``{"type": "text" | "json_object" | "json_schema", ...}``."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class ContentPart(msgspec.Struct, kw_only=True):
    """One part of a message's content. Only ``{"type": "text", "text": ...}`` is supported by
    the text-only preprocessor; other types are decoded so the error can name them."""

    type: str
    text: str | None = None
    image_url: Any = None
    input_audio: Any = None


class ChatMessage(msgspec.Struct, kw_only=True):
    role: str
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None


class _SamplingFields(msgspec.Struct, kw_only=True):
    """Fields common to chat and text completions."""

    model: str
    max_tokens: _NonNeg | None = None
    temperature: _Temperature | None = None
    top_p: _TopP | None = None
    top_k: Annotated[int, msgspec.Meta(ge=-1)] | None = None
    min_p: Annotated[float, msgspec.Meta(ge=0.0, le=1.0)] | None = None
    seed: int | None = None
    n: _Pos | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[_NonNeg] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool | None = None
    min_tokens: _NonNeg | None = None
    presence_penalty: _Penalty | None = None
    frequency_penalty: _Penalty | None = None
    repetition_penalty: Annotated[float, msgspec.Meta(gt=0.0)] | None = None
    include_stop_str_in_output: bool | None = None
    skip_special_tokens: bool | None = None
    user: str | None = None
    #: Seconds until the request is stopped and answered with a 504 (our extension).
    timeout: Annotated[float, msgspec.Meta(gt=0)] | None = None
    response_format: ResponseFormat | None = None
    guided_json: Any = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    guided_decoding_backend: str | None = None
    guided_whitespace_pattern: str | None = None
    structured_outputs: dict[str, Any] | None = None
    # Known but not honoured: decoded only so that request_fields can refuse them by name.
    logit_bias: dict[str, float] | None = None
    metadata: dict[str, Any] | None = None
    store: bool | None = None
    service_tier: str | None = None
    prompt_cache_key: str | None = None
    safety_identifier: str | None = None


class ChatCompletionRequest(_SamplingFields, kw_only=True):
    """``POST /v1/chat/completions``. ``max_completion_tokens`` wins over ``max_tokens``."""

    messages: Annotated[list[ChatMessage], msgspec.Meta(min_length=1)]
    max_completion_tokens: _NonNeg | None = None
    logprobs: bool | None = None
    top_logprobs: Annotated[int, msgspec.Meta(ge=0, le=20)] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    add_generation_prompt: bool = True
    #: Passed to the chat template as ``reasoning_effort`` (as vLLM does).
    reasoning_effort: str | None = None
    # Known but not honoured (see request_fields).
    functions: Any = None
    function_call: Any = None
    audio: Any = None
    modalities: list[str] | None = None
    prediction: Any = None
    web_search_options: Any = None
    verbosity: str | None = None


class CompletionRequest(_SamplingFields, kw_only=True):
    """``POST /v1/completions``. ``prompt`` is text, token ids, or a one-element batch of
    either (larger batches are refused by the preprocessor)."""

    # msgspec allows one array-like member per union, hence the mixed element type; the
    # preprocessor checks that the list is homogeneous.
    prompt: str | list[str | int | list[int]]
    echo: bool = False
    logprobs: Annotated[int, msgspec.Meta(ge=0, le=20)] | None = None
    suffix: str | None = None
    best_of: _Pos | None = None


class TokenizeRequest(msgspec.Struct, kw_only=True):
    """``POST /tokenize`` (vLLM's shape): either ``prompt`` (text) or ``messages`` (rendered
    by the chat template first). ``model`` may be left out when one model is served.
    ``add_special_tokens`` defaults to true for ``prompt`` and false for ``messages`` (the
    template writes them)."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool | None = None
    add_generation_prompt: bool = True
    return_token_strs: bool = False
    tools: list[dict[str, Any]] | None = None
    chat_template_kwargs: dict[str, Any] | None = None


class TokenizeResponse(msgspec.Struct, kw_only=True):
    count: int
    max_model_len: int | None
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeRequest(msgspec.Struct, kw_only=True):
    """``POST /detokenize`` (vLLM's shape)."""

    model: str | None = None
    tokens: list[int]


class DetokenizeResponse(msgspec.Struct, kw_only=True):
    prompt: str


_T = TypeVar("_T", bound=msgspec.Struct)
_PATH_RE = re.compile(r" - at `\$\.?(.*)`$")
_MISSING_RE = re.compile(r"missing required field `([^`]*)`")
_UNKNOWN_RE = re.compile(r"unknown field `([^`]*)`")


class _StrictChat(ChatCompletionRequest, kw_only=True, forbid_unknown_fields=True):
    pass


class _StrictCompletion(CompletionRequest, kw_only=True, forbid_unknown_fields=True):
    pass


class _StrictTokenize(TokenizeRequest, kw_only=True, forbid_unknown_fields=True):
    pass


class _StrictDetokenize(DetokenizeRequest, kw_only=True, forbid_unknown_fields=True):
    pass


_STRICT: Final[dict[type[Any], type[Any]]] = {
    ChatCompletionRequest: _StrictChat, CompletionRequest: _StrictCompletion,
    TokenizeRequest: _StrictTokenize, DetokenizeRequest: _StrictDetokenize}


def decode_request(data: bytes | str, type: type[_T],
                   unknown: Literal["reject", "ignore"] = "reject") -> _T:
    """Decode and validate a JSON request body.

    Raises :class:`RequestError` (400) with ``param`` set to the failing field's path
    (``messages[0].content``) and ``code`` one of ``invalid_type`` (wrong JSON type),
    ``invalid_value`` (out of range), ``missing_required_parameter``, ``invalid_json`` or, for a
    top-level field this server does not know (unless ``unknown="ignore"``),
    ``unknown_parameter``. The result is an instance of ``type`` (or of a subclass).
    """
    target = _STRICT.get(type, type) if unknown == "reject" else type
    try:
        decoded: _T = msgspec.json.decode(data, type=target)
        return decoded
    except msgspec.ValidationError as e:
        msg = str(e)
        m = _PATH_RE.search(msg)
        param = (m.group(1) or None) if m else None
        missing = _MISSING_RE.search(msg)
        extra = _UNKNOWN_RE.search(msg)
        if extra and not param:
            raise RequestError(
                f"Unrecognized request argument supplied: {extra.group(1)} (this server does "
                "not support it; see docs/frontend.md for the fields it serves)",
                code="unknown_parameter", param=extra.group(1)) from e
        if missing:
            code = "missing_required_parameter"
            param = f"{param}.{missing.group(1)}" if param else missing.group(1)
        elif ", got `" in msg:
            code = "invalid_type"
        else:
            code = "invalid_value"
        raise RequestError(f"invalid request: {msg}", code=code, param=param) from e
    except msgspec.DecodeError as e:
        raise RequestError(f"invalid JSON body: {e}", code="invalid_json") from e


# -------------------------------------------------------------------------- responses


class ErrorDetail(msgspec.Struct, kw_only=True):
    message: str
    type: str = "invalid_request_error"
    param: str | None = None
    code: str | None = None


class ErrorResponse(msgspec.Struct, kw_only=True):
    error: ErrorDetail


class Usage(msgspec.Struct, kw_only=True, omit_defaults=True):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None
    completion_tokens_details: CompletionTokensDetails | None = None

    @classmethod
    def from_completion_usage(cls, u: CompletionUsage) -> Usage:
        return cls(
            prompt_tokens=u.prompt_tokens,
            completion_tokens=u.completion_tokens,
            total_tokens=u.total_tokens,
            prompt_tokens_details=u.prompt_tokens_details,
            completion_tokens_details=u.completion_tokens_details,
        )


class TopLogprob(msgspec.Struct, kw_only=True):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(msgspec.Struct, kw_only=True):
    token: str
    logprob: float
    bytes: list[int] | None = None
    top_logprobs: list[TopLogprob] = msgspec.field(default_factory=list)


class ChatChoiceLogprobs(msgspec.Struct, kw_only=True):
    content: list[ChatTokenLogprob] | None = None
    refusal: list[ChatTokenLogprob] | None = None


class FunctionCall(msgspec.Struct, kw_only=True):
    name: str
    #: The arguments object as JSON text, as OpenAI sends it.
    arguments: str


class ToolCallItem(msgspec.Struct, kw_only=True):
    """A complete tool call of a chat message."""

    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ToolCallDelta(msgspec.Struct, kw_only=True):
    """A tool call in a stream chunk. We send each call whole, in one chunk: ``index`` orders
    the calls of the choice, and ``id``, ``type``, ``function.name`` and the whole
    ``function.arguments`` come together (clients that concatenate fragments get the same)."""

    index: int
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatResponseMessage(msgspec.Struct, kw_only=True):
    role: Literal["assistant"] = "assistant"
    content: str | None = None
    refusal: str | None = None
    tool_calls: list[ToolCallItem] | UnsetType = UNSET
    #: The model's reasoning, split off by the frontend's reasoning parser.
    reasoning_content: str | UnsetType = UNSET


class ChatChoice(msgspec.Struct, kw_only=True):
    index: int
    message: ChatResponseMessage
    logprobs: ChatChoiceLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletion(msgspec.Struct, kw_only=True):
    """A non-streamed chat completion (``object: "chat.completion"``)."""

    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


class ChatDelta(msgspec.Struct, kw_only=True, omit_defaults=True):
    """A streamed message fragment: only the fields that changed are written (``{}`` on the
    final chunk); the first chunk carries ``role`` and usually ``content: ""``."""

    role: str | None = None
    content: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None


class ChunkChoice(msgspec.Struct, kw_only=True):
    index: int
    delta: ChatDelta
    logprobs: ChatChoiceLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(msgspec.Struct, kw_only=True):
    """One SSE event of a streamed chat completion (``object: "chat.completion.chunk"``)."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    system_fingerprint: str | None = None
    choices: list[ChunkChoice]
    usage: Usage | UnsetType | None = UNSET


class CompletionLogprobs(msgspec.Struct, kw_only=True):
    tokens: list[str] = msgspec.field(default_factory=list)
    token_logprobs: list[float] = msgspec.field(default_factory=list)
    top_logprobs: list[dict[str, float]] = msgspec.field(default_factory=list)
    text_offset: list[int] = msgspec.field(default_factory=list)


class CompletionChoice(msgspec.Struct, kw_only=True):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None


class Completion(msgspec.Struct, kw_only=True):
    """A non-streamed text completion (``object: "text_completion"``)."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


class CompletionChunk(msgspec.Struct, kw_only=True):
    """One SSE event of a streamed text completion; OpenAI keeps ``object:
    "text_completion"`` for chunks too."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    system_fingerprint: str | None = None
    usage: Usage | UnsetType | None = UNSET


class ModelInfo(msgspec.Struct, kw_only=True):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "dynamo"


class ModelList(msgspec.Struct, kw_only=True):
    object: Literal["list"] = "list"
    data: list[ModelInfo]
