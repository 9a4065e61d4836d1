"""Request and response types of the token pipeline, with Dynamo's serde field names.

All types are ``msgspec.Struct`` so they encode to and decode from msgpack and JSON fast, and
decoding validates shapes. Unknown fields are ignored on decode so newer peers interoperate.
Fields left at their default are omitted on encode (Dynamo's ``skip_serializing_if`` behaviour).
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Final

import msgspec

U32_MAX: Final = 2**32 - 1

TokenId = Annotated[int, msgspec.Meta(ge=0, le=U32_MAX)]
U32 = Annotated[int, msgspec.Meta(ge=0, le=U32_MAX)]
# msgspec checks the u64 upper bound itself when decoding.
U64 = Annotated[int, msgspec.Meta(ge=0)]


class FinishReason:
    """Why a stream ended. Wire form: ``"eos" | "length" | "stop" | "cancelled" |
    "content_filter" | {"error": "<message>"}`` (``"abort"`` is read as ``cancelled``).

    Compare with the class constants: ``out.finish_reason == FinishReason.CANCELLED``, or use
    :attr:`is_error`. Instances are immutable and hashable.
    """

    __slots__ = ("kind", "message")

    EOS: ClassVar[FinishReason]
    LENGTH: ClassVar[FinishReason]
    STOP: ClassVar[FinishReason]
    CANCELLED: ClassVar[FinishReason]
    CONTENT_FILTER: ClassVar[FinishReason]

    _SIMPLE: ClassVar[frozenset[str]] = frozenset(
        {"eos", "length", "stop", "cancelled", "content_filter"}
    )
    _ALIASES: ClassVar[dict[str, str]] = {"abort": "cancelled"}

    kind: str
    message: str | None

    def __init__(self, kind: str, message: str | None = None) -> None:
        kind = self._ALIASES.get(kind, kind)
        if kind != "error" and kind not in self._SIMPLE:
            raise ValueError(
                f"unknown finish_reason {kind!r}; expected one of "
                f"{sorted(self._SIMPLE | {'error'})}"
            )
        object.__setattr__(self, "kind", kind)
        object.__setattr__(self, "message", message if kind == "error" else None)

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError("FinishReason is immutable")

    @classmethod
    def error(cls, message: str) -> FinishReason:
        return cls("error", message)

    @property
    def is_error(self) -> bool:
        return self.kind == "error"

    def to_wire(self) -> str | dict[str, str]:
        if self.kind == "error":
            return {"error": self.message or ""}
        return self.kind

    @classmethod
    def from_wire(cls, obj: Any) -> FinishReason:
        if isinstance(obj, str):
            if obj.startswith("error"):
                # Python-side Dynamo writes "error: <msg>" as a flat string.
                return cls("error", obj.partition(":")[2].strip())
            return cls(obj)
        if isinstance(obj, dict) and len(obj) == 1 and "error" in obj:
            return cls("error", str(obj["error"]))
        raise ValueError(f"invalid finish_reason: {obj!r}")

    def __eq__(self, other: object) -> bool:
        if isinstance(other, FinishReason):
            return self.kind == other.kind and self.message == other.message
        return NotImplemented

    def __hash__(self) -> int:
        return hash((self.kind, self.message))

    def __repr__(self) -> str:
        if self.kind == "error":
            return f"FinishReason.error({self.message!r})"
        return f"FinishReason.{self.kind.upper()}"

    def __str__(self) -> str:
        return f"error: {self.message}" if self.kind == "error" else self.kind


FinishReason.EOS = FinishReason("eos")
FinishReason.LENGTH = FinishReason("length")
FinishReason.STOP = FinishReason("stop")
FinishReason.CANCELLED = FinishReason("cancelled")
FinishReason.CONTENT_FILTER = FinishReason("content_filter")


class _Base(msgspec.Struct, omit_defaults=True, kw_only=True):
    pass


class PromptTokensDetails(_Base):
    audio_tokens: U32 | None = None
    cached_tokens: U32 | None = None


class CompletionTokensDetails(_Base):
    accepted_prediction_tokens: U32 | None = None
    audio_tokens: U32 | None = None
    reasoning_tokens: U32 | None = None
    rejected_prediction_tokens: U32 | None = None


class CompletionUsage(_Base):
    """OpenAI-style token usage. Counts are u32 as in Dynamo."""

    prompt_tokens: U32 = 0
    completion_tokens: U32 = 0
    total_tokens: U32 = 0
    prompt_tokens_details: PromptTokensDetails | None = None
    completion_tokens_details: CompletionTokensDetails | None = None


class StopConditions(_Base):
    """When to stop generating. ``None`` means "not set" (the engine's default applies)."""

    max_tokens: U32 | None = None
    stop: list[str] | None = None
    stop_token_ids: list[TokenId] | None = None
    stop_token_ids_hidden: list[TokenId] | None = None
    min_tokens: U32 | None = None
    ignore_eos: bool | None = None
    max_thinking_tokens: U32 | None = None


class GuidedDecodingOptions(_Base):
    json: Any | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    backend: str | None = None
    whitespace_pattern: str | None = None
    structural_tag: Any | None = None


class SamplingOptions(_Base):
    """Sampling knobs, mapped from the OpenAI request by the frontend."""

    n: Annotated[int, msgspec.Meta(ge=1)] | None = None
    best_of: Annotated[int, msgspec.Meta(ge=1)] | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    temperature: Annotated[float, msgspec.Meta(ge=0.0)] | None = None
    top_p: Annotated[float, msgspec.Meta(gt=0.0, le=1.0)] | None = None
    top_k: int | None = None
    min_p: float | None = None
    use_beam_search: bool | None = None
    length_penalty: float | None = None
    seed: int | None = None
    include_stop_str_in_output: bool | None = None
    guided_decoding: GuidedDecodingOptions | None = None
    detokenize: bool | None = None
    allowed_token_ids: list[TokenId] | None = None
    bad_words_token_ids: list[list[TokenId]] | None = None


class OutputOptions(_Base):
    """What to return besides tokens."""

    logprobs: U32 | None = None
    prompt_logprobs: U32 | None = None
    skip_special_tokens: bool | None = None
    formatted_prompt: bool | None = None


class BootstrapInfo(_Base, kw_only=True):
    """Disaggregated prefill handshake: where the decode peer pulls KV from."""

    bootstrap_host: str
    bootstrap_port: Annotated[int, msgspec.Meta(ge=0, le=65535)]
    bootstrap_room: U64


class PrefillResult(_Base):
    """What a prefill worker hands to the decode worker."""

    disaggregated_params: Any = None
    prompt_tokens_details: PromptTokensDetails | None = None


class RoutingHints(_Base):
    backend_instance_id: U64 | None = None
    prefill_worker_id: U64 | None = None
    decode_worker_id: U64 | None = None
    dp_rank: U32 | None = None
    prefill_dp_rank: U32 | None = None
    expected_output_tokens: U32 | None = None
    lora_name: str | None = None
    cache_salt: str | None = None
    priority: int | None = None


class PreprocessedRequest(_Base, kw_only=True):
    """A tokenized request as an engine receives it.

    ``health_check`` is serialised as ``"_HEALTH_CHECK"``: it is ``True`` on the worker's canary
    requests so an engine may treat them specially.
    """

    model: str = ""
    token_ids: list[TokenId]
    stop_conditions: StopConditions = msgspec.field(default_factory=StopConditions)
    sampling_options: SamplingOptions = msgspec.field(default_factory=SamplingOptions)
    output_options: OutputOptions = msgspec.field(default_factory=OutputOptions)
    eos_token_ids: list[TokenId] = msgspec.field(default_factory=list)
    mdc_sum: str | None = None
    annotations: list[str] = msgspec.field(default_factory=list)
    routing: RoutingHints | None = None
    estimated_prefix_hit_num_blocks: U32 | None = None
    backend_instance_id: U64 | None = None
    router_config_override: dict[str, Any] | None = None
    prefill_result: PrefillResult | None = None
    bootstrap_info: BootstrapInfo | None = None
    extra_args: dict[str, Any] | None = None
    health_check: bool = msgspec.field(default=False, name="_HEALTH_CHECK")


class LLMEngineOutput(_Base, kw_only=True):
    """One chunk of a generate stream. A chunk with ``finish_reason`` set is *terminal*.

    Build non-terminal chunks with :func:`dynamo_backend_common.chunk.token` and terminal ones
    with :meth:`stop`, :meth:`length`, :meth:`cancelled`, :meth:`error`; refine them with
    :meth:`with_tokens` / :meth:`with_usage` (both return new objects).
    """

    token_ids: list[TokenId]  # always on the wire, as Dynamo requires
    tokens: list[str | None] | None = None
    text: str | None = None
    cum_log_probs: float | None = None
    log_probs: list[float] | None = None
    top_logprobs: list[list[dict[str, Any]]] | None = None
    finish_reason: FinishReason | None = None
    stop_reason: str | int | None = None
    index: U32 | None = None
    disaggregated_params: Any = None
    extra_args: Any = None
    completion_usage: CompletionUsage | None = None

    @property
    def is_terminal(self) -> bool:
        return self.finish_reason is not None

    @classmethod
    def stop(cls) -> LLMEngineOutput:
        """Terminal chunk: a stop condition (stop token or string) matched."""
        return cls(token_ids=[], finish_reason=FinishReason.STOP)

    @classmethod
    def length(cls) -> LLMEngineOutput:
        """Terminal chunk: ``max_tokens`` (or the context length) was reached."""
        return cls(token_ids=[], finish_reason=FinishReason.LENGTH)

    @classmethod
    def cancelled(cls) -> LLMEngineOutput:
        """Terminal chunk: the request's context was stopped or killed."""
        return cls(token_ids=[], finish_reason=FinishReason.CANCELLED)

    @classmethod
    def error(cls, message: str) -> LLMEngineOutput:
        """Terminal chunk carrying an untyped error. Raise ``DynamoError`` to keep a kind."""
        return cls(token_ids=[], finish_reason=FinishReason.error(message))

    def with_tokens(self, tokens: list[int]) -> LLMEngineOutput:
        """A copy with ``token_ids`` replaced."""
        return msgspec.structs.replace(self, token_ids=list(tokens))

    def with_usage(self, usage: CompletionUsage) -> LLMEngineOutput:
        """A copy with ``completion_usage`` attached."""
        return msgspec.structs.replace(self, completion_usage=usage)


def usage(prompt_tokens: int, completion_tokens: int) -> CompletionUsage:
    """Build a :class:`CompletionUsage`; ``total_tokens`` saturates at ``2**32 - 1``."""
    if prompt_tokens < 0 or completion_tokens < 0:
        raise ValueError("token counts must be non-negative")
    return CompletionUsage(
        prompt_tokens=min(prompt_tokens, U32_MAX),
        completion_tokens=min(completion_tokens, U32_MAX),
        total_tokens=min(prompt_tokens + completion_tokens, U32_MAX),
    )
