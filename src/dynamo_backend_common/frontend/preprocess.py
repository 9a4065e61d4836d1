"""OpenAI request -> :class:`PreprocessedRequest`: chat template, tokenization, option mapping.

:class:`ChatTemplate` renders a Hugging Face chat template with the semantics of transformers'
``apply_chat_template``; :class:`Preprocessor` turns a decoded OpenAI request into the token
request an engine receives, checking everything the engine should not have to (context length,
unsupported options). Every client mistake raises :class:`RequestError` (HTTP 400).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final, Literal

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

from ..model_dir import ModelDir
from ..protocols.common import (
    GuidedDecodingOptions,
    OutputOptions,
    PreprocessedRequest,
    SamplingOptions,
    StopConditions,
)
from .byte_pieces import byte_pieces
from .chat_parsing import ToolChoice, resolve_tool_choice
from .openai_types import (
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    ContentPart,
    RequestError,
)
from .prompt_tokens import PieceEncoder
from .request_fields import guided_decoding

__all__ = ["ChatTemplate", "ContentFormat", "Preprocessed", "Preprocessor", "RequestError"]

#: ``"string"``: message content reaches the template as one string (list-of-parts content is
#: flattened). ``"openai"``: content lists are kept as ``[{"type": "text", "text": ...}]``.
#: ``"auto"``: ``"openai"`` when the template loops over ``message['content']``, else
#: ``"string"`` (the detection vLLM uses).
ContentFormat = Literal["auto", "string", "openai"]

#: OpenAI allows 4 stop sequences; we accept more since engines handle them fine.
DEFAULT_MAX_STOP: Final = 16


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    x: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # transformers' override: jinja's built-in tojson HTML-escapes and sorts keys.
    return json.dumps(
        x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class _GenerationTag(jinja2.ext.Extension):
    """``{% generation %}...{% endgeneration %}`` (transformers' assistant-mask marker): we do
    not compute masks, so the block simply renders its body."""

    tags = {"generation"}

    def parse(self, parser: Any) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        call = jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body)
        return call.set_lineno(lineno)

    def _render(self, caller: Any) -> str:
        return str(caller())


def _make_env() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True,
        lstrip_blocks=True,
        extensions=[_GenerationTag, jinja2.ext.loopcontrols],
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


def _iterates_content(ast: jinja2.nodes.Template) -> bool:
    """True when the template loops over ``message['content']`` / ``message.content`` (directly
    or through a variable assigned from it): it expects OpenAI content parts."""

    def is_content(n: jinja2.nodes.Node) -> bool:
        if isinstance(n, jinja2.nodes.Getitem):
            return isinstance(n.arg, jinja2.nodes.Const) and n.arg.value == "content"
        if isinstance(n, jinja2.nodes.Getattr):
            return n.attr == "content"
        return False

    aliases = {
        a.target.name
        for a in ast.find_all(jinja2.nodes.Assign)
        if isinstance(a.target, jinja2.nodes.Name) and is_content(a.node)
    }
    for loop in ast.find_all(jinja2.nodes.For):
        it = loop.iter
        if is_content(it) or (isinstance(it, jinja2.nodes.Name) and it.name in aliases):
            return True
    return False


class ChatTemplate:
    """A compiled Hugging Face chat template.

    Rendering follows transformers: sandboxed Jinja (``ImmutableSandboxedEnvironment``),
    ``trim_blocks`` and ``lstrip_blocks``, ``raise_exception(msg)``, a non-escaping ``tojson``,
    ``strftime_now``, ``loopcontrols``; variables ``messages``, ``add_generation_prompt``,
    ``bos_token``, ``eos_token``, ``tools`` plus any extra keyword arguments. A syntax error in
    the template raises ``ValueError`` at construction.
    """

    def __init__(
        self,
        source: str,
        *,
        bos_token: str | None = None,
        eos_token: str | None = None,
        content_format: ContentFormat = "auto",
    ) -> None:
        env = _make_env()
        try:
            ast = env.parse(source)
            self._template = env.from_string(source)
        except jinja2.TemplateSyntaxError as e:
            raise ValueError(f"chat template syntax error (line {e.lineno}): {e.message}") from e
        self.source = source
        self.bos_token = bos_token or ""
        self.eos_token = eos_token or ""
        self.content_format: Literal["string", "openai"] = (
            ("openai" if _iterates_content(ast) else "string")
            if content_format == "auto"
            else content_format
        )

    def render(
        self,
        messages: Sequence[ChatMessage | Mapping[str, Any]],
        *,
        add_generation_prompt: bool = False,
        tools: list[dict[str, Any]] | None = None,
        **kwargs: Any,
    ) -> str:
        """Render ``messages`` (OpenAI message Structs or plain dicts) to the prompt text.

        Raises :class:`RequestError` (400) when the template rejects the conversation
        (``raise_exception``, e.g. roles that do not alternate) or fails on it, and when a
        content part is not text.
        """
        ctx: dict[str, Any] = dict(kwargs)
        ctx.update(
            messages=[self._message(i, m) for i, m in enumerate(messages)],
            add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token,
            eos_token=self.eos_token,
            tools=tools,
        )
        try:
            return self._template.render(ctx)
        except jinja2.TemplateError as e:
            raise RequestError(
                f"chat template rejected the messages: {e}", code="invalid_value",
                param="messages",
            ) from e
        except (TypeError, ValueError, KeyError, IndexError, AttributeError) as e:
            # Templates assume shapes (e.g. string content); a request that breaks them is a
            # client error, not a server bug.
            raise RequestError(
                f"chat template failed on the messages: {type(e).__name__}: {e}",
                code="invalid_value", param="messages",
            ) from e

    def _message(self, i: int, m: ChatMessage | Mapping[str, Any]) -> dict[str, Any]:
        if isinstance(m, ChatMessage):
            d: dict[str, Any] = {"role": m.role, "content": m.content}
            for k in ("name", "tool_calls", "tool_call_id"):
                v = getattr(m, k)
                if v is not None:
                    d[k] = v
        else:
            d = dict(m)
        d["content"] = self._content(i, d.get("content"))
        return d

    def _content(self, i: int, content: Any) -> Any:
        if content is None:
            # A None would render as "None" in string templates (assistant tool-call turns).
            return "" if self.content_format == "string" else content
        if isinstance(content, str):
            return content
        if not isinstance(content, list):
            raise RequestError(
                f"messages[{i}].content must be a string or a list of content parts",
                code="invalid_type", param=f"messages[{i}].content",
            )
        texts: list[str] = []
        for j, part in enumerate(content):
            ptype = part.type if isinstance(part, ContentPart) else (
                part.get("type") if isinstance(part, Mapping) else None
            )
            text = part.text if isinstance(part, ContentPart) else (
                part.get("text") if isinstance(part, Mapping) else None
            )
            if ptype != "text" or not isinstance(text, str):
                raise RequestError(
                    f"content part type {ptype!r} is not supported (text only)",
                    code="unsupported_value", param=f"messages[{i}].content[{j}].type",
                )
            texts.append(text)
        if self.content_format == "string":
            return "\n".join(texts)
        return [{"type": "text", "text": t} for t in texts]


@dataclass(frozen=True, slots=True)
class Preprocessed:
    """The result of preprocessing one request.

    ``request`` is what the engine gets; ``prompt_tokens`` its prompt length (for usage);
    ``prompt`` the rendered chat prompt or completion text (for ``echo``), ``None`` for a
    token-id prompt without ``echo``.
    """

    request: PreprocessedRequest
    prompt_tokens: int
    prompt: str | None
    #: The validated ``tool_choice`` of a chat request (``None`` for completions).
    tool_choice: ToolChoice | None = None


class Preprocessor:
    """Maps OpenAI requests to :class:`PreprocessedRequest` for one model directory.

    Mapping: ``max_completion_tokens`` (chat; wins) / ``max_tokens`` -> ``stop_conditions.
    max_tokens``, defaulting to ``context_length - prompt_tokens``; ``stop`` (str or list, at
    most ``max_stop``, non-empty) -> ``stop_conditions.stop``; ``stop_token_ids``,
    ``min_tokens``, ``ignore_eos`` -> ``stop_conditions``; ``temperature``, ``top_p``,
    ``top_k``, ``min_p``, ``seed``, ``n``, penalties, ``include_stop_str_in_output`` ->
    ``sampling_options``; chat ``logprobs``/``top_logprobs`` (``top_logprobs`` or 0 when
    ``logprobs`` is true) and completion ``logprobs`` (int), ``skip_special_tokens`` ->
    ``output_options``; the model's ``eos_token_ids`` and checksum (``mdc_sum``).

    Refused with :class:`RequestError`: ``n`` (or ``best_of``) above ``max_n``; prompt plus
    ``max_tokens`` over the context length (``code="context_length_exceeded"``); an empty or
    batched prompt; token ids outside the vocabulary; ``suffix``; ``top_logprobs`` without
    ``logprobs``; ``min_tokens > max_tokens``; non-text content parts; chat on a model without
    a chat template; a malformed ``tools`` / ``tool_choice`` or structured-output field.

    Structured output (``response_format``, ``guided_*``, ``structured_outputs``, and the
    constraint of ``tool_choice`` ``required`` / named, see :mod:`.chat_parsing`) becomes
    ``sampling_options.guided_decoding``; whether the engine honours it is the caller's check
    (the model card's ``runtime_data``). ``reasoning_effort`` reaches the chat template.
    """

    def __init__(
        self,
        model_dir: ModelDir,
        *,
        max_n: int = 1,
        max_stop: int = DEFAULT_MAX_STOP,
        content_format: ContentFormat = "auto",
    ) -> None:
        self.model_dir = model_dir
        self.tokenizer = model_dir.tokenizer
        self.max_n = max_n
        self.max_stop = max_stop
        self._vocab_size: int = model_dir.tokenizer.get_vocab_size(with_added_tokens=True)
        # The detokenizers' byte table (byte-level tokenizers), built here, off the event loop
        # (a model is loaded in a thread), rather than by the first request.
        byte_pieces(model_dir.tokenizer)
        #: Chat prompts are tokenized piece by piece (between added tokens) with a cache of
        #: the pieces, where that is exact for the tokenizer (``None``: whole prompts).
        self.piece_encoder = PieceEncoder.for_tokenizer(model_dir.tokenizer)
        self.chat_template: ChatTemplate | None = (
            ChatTemplate(
                model_dir.chat_template,
                bos_token=model_dir.bos_token,
                eos_token=model_dir.eos_token,
                content_format=content_format,
            )
            if model_dir.chat_template is not None
            else None
        )

    # ------------------------------------------------------------------ chat

    def render_chat(self, req: ChatCompletionRequest) -> str:
        """The prompt text for ``req``: its messages through the chat template."""
        if self.chat_template is None:
            raise RequestError(
                f"model {self.model_dir.name!r} has no chat template; use /v1/completions",
                code="model_not_supported", param="messages",
            )
        extra = dict(req.chat_template_kwargs or {})
        if req.reasoning_effort is not None:
            extra.setdefault("reasoning_effort", req.reasoning_effort)
        return self.chat_template.render(
            req.messages,
            add_generation_prompt=req.add_generation_prompt,
            tools=req.tools,
            **extra,
        )

    def preprocess_chat(self, req: ChatCompletionRequest) -> Preprocessed:
        """Render, tokenize and map a chat request. Raises :class:`RequestError`."""
        if req.top_logprobs is not None and not req.logprobs:
            raise RequestError("top_logprobs requires logprobs=true", code="invalid_value",
                               param="top_logprobs")
        tool_choice = resolve_tool_choice(req)
        guided = guided_decoding(req)
        if tool_choice.guided is not None:
            if guided is not None:
                raise RequestError(
                    f"tool_choice {tool_choice.mode!r} constrains the output itself; it cannot "
                    "be combined with response_format or guided decoding",
                    code="invalid_value", param="tool_choice")
            guided = tool_choice.guided
        prompt = self.render_chat(req)
        # The template writes its own BOS/special tokens, as apply_chat_template(tokenize=True).
        # Most of a conversation's pieces were sent before (the system prompt, the history):
        # the piece encoder has their ids.
        pieces = self.piece_encoder
        ids: list[int] = (pieces.encode(prompt) if pieces is not None
                          else self.tokenizer.encode(prompt, add_special_tokens=False).ids)
        max_tokens = (
            req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        )
        param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
        pre = self._build(req, ids, prompt, max_tokens, param, logprobs, "messages", guided)
        return dataclasses.replace(pre, tool_choice=tool_choice)

    # ----------------------------------------------------------- completions

    def preprocess_completion(self, req: CompletionRequest) -> Preprocessed:
        """Tokenize (or take the token ids of) a single prompt and map the request.

        A text prompt is encoded with the tokenizer's special tokens (BOS), honouring
        ``add_bos_token`` from ``tokenizer_config.json``; a token-id prompt is used verbatim.
        """
        if req.suffix is not None:
            raise RequestError("suffix is not supported", code="unsupported_value",
                               param="suffix")
        if req.best_of is not None and req.best_of != (req.n or 1):
            raise RequestError("best_of is not supported (it must equal n)",
                               code="unsupported_value", param="best_of")
        text, ids = self._completion_prompt(req.prompt)
        if ids is None:
            assert text is not None
            ids = self.encode_text(text)
        elif req.echo:
            text = self.tokenizer.decode(ids, skip_special_tokens=False)
        return self._build(req, ids, text, req.max_tokens, "max_tokens", req.logprobs, "prompt",
                           guided_decoding(req))

    def _completion_prompt(self, prompt: Any) -> tuple[str | None, list[int] | None]:
        if isinstance(prompt, str):
            return prompt, None
        if not isinstance(prompt, list) or not prompt:
            raise RequestError("prompt must be a non-empty string or list of token ids",
                               code="invalid_value", param="prompt")
        if all(isinstance(p, str) for p in prompt):
            self._single(len(prompt))
            return prompt[0], None
        if all(isinstance(p, list) for p in prompt):
            self._single(len(prompt))
            return None, self.check_ids(prompt[0], "prompt[0]")
        if all(isinstance(p, int) and not isinstance(p, bool) for p in prompt):
            return None, self.check_ids(prompt, "prompt")
        raise RequestError(
            "prompt must be a string, a list of token ids, or a one-element list of either",
            code="invalid_type", param="prompt",
        )

    @staticmethod
    def _single(n: int) -> None:
        if n != 1:
            raise RequestError(
                f"batched prompts are not supported (got {n}); send one prompt per request",
                code="unsupported_value", param="prompt",
            )

    def check_ids(self, ids: Any, param: str) -> list[int]:
        """``ids`` as a list when every one is a token id of the vocabulary, else 400."""
        if not isinstance(ids, list):
            raise RequestError("token ids must be a list of integers", code="invalid_type",
                               param=param)
        for t in ids:
            if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < self._vocab_size:
                raise RequestError(
                    f"token id {t!r} is outside the vocabulary (0..{self._vocab_size - 1})",
                    code="invalid_value", param=param,
                )
        return list(ids)

    def encode_text(self, text: str) -> list[int]:
        """A completion prompt's ids: with the tokenizer's special tokens, BOS as
        ``tokenizer_config.json``'s ``add_bos_token`` says."""
        md = self.model_dir
        ids: list[int] = self.tokenizer.encode(text, add_special_tokens=True).ids
        bos = md.bos_token_id
        if bos is not None and md.add_bos_token is True and (not ids or ids[0] != bos):
            ids.insert(0, bos)  # tokenizer_config asks for BOS; the post-processor lacks it
        elif (
            bos is not None and md.add_bos_token is False and ids and ids[0] == bos
            and not (md.bos_token and text.startswith(md.bos_token))
        ):
            del ids[0]  # transformers rebuilds the post-processor without BOS in this case
        return ids

    # --------------------------------------------------------------- mapping

    def _build(
        self,
        req: ChatCompletionRequest | CompletionRequest,
        ids: list[int],
        prompt_text: str | None,
        max_tokens: int | None,
        max_tokens_param: str,
        logprobs: int | None,
        prompt_param: str,
        guided: GuidedDecodingOptions | None = None,
    ) -> Preprocessed:
        if not ids:
            raise RequestError("the prompt is empty", code="invalid_value", param=prompt_param)
        n = req.n or 1
        if n > self.max_n:
            raise RequestError(
                f"n={n} is not supported: at most {self.max_n} choice(s) per request",
                code="unsupported_value", param="n",
            )
        prompt_len = len(ids)
        ctx = self.model_dir.context_length
        if ctx is not None:
            if prompt_len >= ctx or (max_tokens is not None and prompt_len + max_tokens > ctx):
                requested = prompt_len + (max_tokens or 0)
                raise RequestError(
                    f"This model's maximum context length is {ctx} tokens. However, you "
                    f"requested {requested} tokens ({prompt_len} in the {prompt_param}, "
                    f"{max_tokens or 0} in the completion). Please reduce the length of the "
                    f"{prompt_param} or completion.",
                    code="context_length_exceeded",
                    param=prompt_param if prompt_len >= ctx else max_tokens_param,
                )
            if max_tokens is None:
                max_tokens = ctx - prompt_len
        if req.min_tokens is not None and max_tokens is not None and req.min_tokens > max_tokens:
            raise RequestError(
                f"min_tokens ({req.min_tokens}) must not exceed max_tokens ({max_tokens})",
                code="invalid_value", param="min_tokens",
            )
        stop_token_ids = (
            self.check_ids(req.stop_token_ids, "stop_token_ids")
            if req.stop_token_ids is not None else None
        )
        request = PreprocessedRequest(
            model=req.model,
            token_ids=ids,
            stop_conditions=StopConditions(
                max_tokens=max_tokens,
                stop=self._stops(req.stop),
                stop_token_ids=stop_token_ids or None,
                min_tokens=req.min_tokens,
                ignore_eos=req.ignore_eos,
            ),
            sampling_options=SamplingOptions(
                n=req.n,
                presence_penalty=req.presence_penalty,
                frequency_penalty=req.frequency_penalty,
                repetition_penalty=req.repetition_penalty,
                temperature=req.temperature,
                top_p=req.top_p,
                top_k=req.top_k,
                min_p=req.min_p,
                seed=req.seed,
                include_stop_str_in_output=req.include_stop_str_in_output,
                guided_decoding=guided,
            ),
            output_options=OutputOptions(
                logprobs=logprobs,
                skip_special_tokens=req.skip_special_tokens,
            ),
            eos_token_ids=list(self.model_dir.eos_token_ids),
            mdc_sum=self.model_dir.checksum,
        )
        return Preprocessed(request=request, prompt_tokens=prompt_len, prompt=prompt_text)

    def _stops(self, stop: Any) -> list[str] | None:
        if stop is None:
            return None
        stops = [stop] if isinstance(stop, str) else stop
        if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
            raise RequestError("stop must be a string or a list of strings",
                               code="invalid_type", param="stop")
        if len(stops) > self.max_stop:
            raise RequestError(f"at most {self.max_stop} stop sequences are allowed",
                               code="invalid_value", param="stop")
        if any(s == "" for s in stops):
            raise RequestError("stop sequences must not be empty", code="invalid_value",
                               param="stop")
        return list(dict.fromkeys(stops)) or None
