"""TransformersEngine: a real engine on Hugging Face ``transformers`` + PyTorch, to copy.

It serves any causal LM directory ``AutoModelForCausalLM`` loads (``config.json``, weights,
tokenizer files), on CPU or one CUDA device. It is deliberately simple: one sequence per forward
step, no batching across requests, the KV cache is ``transformers``' own ``past_key_values``.
Needs the ``examples`` extra: ``pip install 'dynamo-backend-common[examples]'``.

- ``start`` loads the model in a thread (``asyncio.to_thread``) so the event loop stays
  responsive, and returns ``EngineConfig(model=<directory name>, context_length=<the config's
  max_position_embeddings>)``. No block-structured KV cache is advertised: KV routing falls back
  to round robin.
- ``generate`` decodes token by token: a prefill forward over the prompt, then one forward per
  token reusing the KV cache (``past_key_values``; ``cache`` in newer ``transformers``). Every
  forward runs on the engine's single model thread, so concurrent requests interleave step by
  step (fair, FIFO) and the event loop never blocks.
- Sampling (``request.sampling_options``): greedy (argmax) when ``temperature`` is 0 or unset,
  otherwise softmax sampling at ``temperature`` restricted by ``top_k`` and ``top_p``; ``seed``
  makes a sampled stream reproducible (a per-request ``torch.Generator``).
- Stop conditions, checked per generated token in this order (as in ``echo.py``):

  * a token in ``request.eos_token_ids`` (unless ``stop_conditions.ignore_eos``): terminal
    ``eos``, the token is not returned.
  * a token in ``stop_conditions.stop_token_ids_hidden``: terminal ``stop`` with
    ``stop_reason`` = the token id, the token is not returned.
  * a token in ``stop_conditions.stop_token_ids``: terminal ``stop``, the token is returned.
  * ``max_tokens`` tokens returned (default ``--max-tokens``, and never past the context
    length): terminal ``length``.

  Stop tokens only count once ``stop_conditions.min_tokens`` tokens were returned.
- Structured output (``sampling_options.guided_decoding``), when ``llguidance`` is installed (it
  is in the ``examples`` extra) and the model directory has a fast tokenizer: ``start``
  advertises ``runtime_data[GUIDED_DECODING_KEY] = ["json", "regex", "choice", "grammar"]``
  (otherwise the key is absent and a guided request raises ``InvalidArgument`` naming why).
  ``json`` is a JSON schema (a dict, or its JSON text), ``regex`` a Rust-syntax regex, ``choice``
  a list of strings, ``grammar`` Lark or GBNF; exactly one per request. The constraint is
  compiled before the first token (a bad one raises ``DynamoError(InvalidArgument)``) and masks
  the logits of every step before greedy / temperature / top-k / top-p picking, so each token
  keeps the output a prefix of a valid instance. When the instance is complete the stream ends
  with ``eos``: the token that completed it is returned with the terminal (a chosen EOS token is
  not). ``max_tokens`` still ends it with ``length`` (truncated output); stop tokens still apply.
  JSON is compact (no whitespace between tokens) unless ``whitespace_pattern`` says otherwise:
  small models otherwise tend to pad with whitespace up to ``max_tokens``. ``backend`` is
  ignored (there is one); ``structural_tag`` raises ``InvalidArgument``.
- Cancellation: ``ctx.is_stopped()`` is checked before every forward step; a stopped request
  ends with a ``cancelled`` terminal and its KV cache is dropped.
- Usage (prompt and completion tokens) is on every terminal.
- An empty prompt, a token id outside the vocabulary or a prompt that fills the context raise
  ``DynamoError(InvalidArgument)``; ``generate`` before ``start`` or after ``cleanup`` raises
  ``DynamoError(EngineShutdown)``. ``cleanup`` is null-safe and idempotent and frees the model.

Why llguidance (PyPI, measured here): its wheel is 3.1 MB with no dependencies, compiles a
small schema in ~0.5 ms and masks a step in ~0.1 ms on CPU, covers JSON schema, regex, Lark and
GBNF, is maintained by Microsoft's guidance team and is a backend of vLLM, SGLang and llama.cpp.
xgrammar (vLLM's and SGLang's default) is 1.3 MB but requires triton (286 MB on Linux x86-64) and
apache-tvm-ffi; outlines-core (2.3 MB, no deps) compiles a schema to a regex and then to an index
over the whole vocabulary, slow for large vocabularies and complex schemas; lm-format-enforcer
(45 KB + pydantic, interegular, pyyaml) walks a character trie in Python on every token.

Serve it (the engine's ``--model`` defaults to ``$DYN_MODEL_PATH``, which ``dynamo-backend
worker`` sets from its ``--model-path``, and ``run`` passes its ``--model`` to every worker)::

    dynamo-backend run --engine examples/transformers_engine.py:TransformersEngine --model DIR

Check it: ``dynamo-backend conformance --engine examples/transformers_engine.py:TransformersEngine
-- --model DIR``.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import gc
import inspect
import json
import logging
import os
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any, TypeVar

from dynamo_backend_common import (
    GUIDED_DECODING_KEY,
    HEALTH_CHECK_KEY,
    DynamoError,
    EngineConfig,
    FinishReason,
    GenerateContext,
    GuidedDecodingOptions,
    LLMEngine,
    LLMEngineOutput,
    PreprocessedRequest,
    SamplingOptions,
    chunk,
    usage,
)

log = logging.getLogger(__name__)

T = TypeVar("T")

_DTYPES = ("auto", "float32", "float16", "bfloat16")

#: The guided-decoding kinds this engine honours (all of GUIDED_DECODING_KINDS, via llguidance).
GUIDED_KINDS = ("json", "regex", "choice", "grammar")


class TransformersEngine(LLMEngine):
    """Serves a Hugging Face causal LM with ``transformers`` + PyTorch, one step at a time."""

    def __init__(
        self,
        model_dir: str,
        *,
        model_name: str | None = None,
        device: str = "auto",
        dtype: str = "auto",
        max_tokens: int = 256,
        grammar_cache_size: int = 64,
    ) -> None:
        if not model_dir:
            raise ValueError("model_dir is required (--model DIR or $DYN_MODEL_PATH)")
        if dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(_DTYPES)}, got {dtype!r}")
        if max_tokens < 0:
            raise ValueError("max_tokens must be >= 0")
        if grammar_cache_size < 0:
            raise ValueError("grammar_cache_size must be >= 0")
        self.model_dir = model_dir
        self.model_name = model_name or os.path.basename(os.path.normpath(model_dir))
        self.device_name = device
        self.dtype_name = dtype
        self.max_tokens = max_tokens
        self.grammar_cache_size = grammar_cache_size
        self.context_length = 0
        self.vocab_size = 0
        self._model: Any = None  # transformers.PreTrainedModel once started
        self._device: Any = None  # torch.device once started
        self._cache_kwarg = "past_key_values"  # ``cache`` in transformers >= 5.x
        # One thread runs every forward: torch calls stay off the event loop and never overlap.
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        # Structured output: set by start when llguidance and a fast tokenizer are there, else
        # the reason it is not (for the InvalidArgument a guided request gets).
        self._grammars: _Grammars | None = None
        self._no_grammars = "the engine is not started"

    @classmethod
    def from_args(cls, argv: Sequence[str] | None = None) -> TransformersEngine:
        """Build from command-line flags (``--help`` lists them)."""
        parser = argparse.ArgumentParser(prog="transformers_engine", description=cls.__doc__)
        parser.add_argument(
            "--model",
            default=os.environ.get("DYN_MODEL_PATH", ""),
            help="Hugging Face model directory (config, weights, tokenizer) [DYN_MODEL_PATH]",
        )
        parser.add_argument(
            "--model-name", default=None, help="advertised model name (default: directory name)"
        )
        parser.add_argument(
            "--device", default="auto", help="torch device: auto (cuda if available), cpu, cuda:N"
        )
        parser.add_argument("--dtype", default="auto", choices=_DTYPES, help="weights dtype")
        parser.add_argument(
            "--max-tokens", type=int, default=256, help="output length when the request sets none"
        )
        args = parser.parse_args(argv)
        if not args.model:
            parser.error("--model DIR is required (or set DYN_MODEL_PATH)")
        return cls(
            args.model,
            model_name=args.model_name,
            device=args.device,
            dtype=args.dtype,
            max_tokens=args.max_tokens,
        )

    # -- lifecycle ------------------------------------------------------------------------------
    async def start(self, worker_id: int) -> EngineConfig:
        log.info("loading %s (worker %x)", self.model_dir, worker_id)
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="transformers-engine"
        )
        # Loading takes seconds to minutes: keep the event loop (health, discovery) alive.
        model, device = await asyncio.to_thread(self._load)
        self._model, self._device = model, device
        config = model.config
        if "cache" in inspect.signature(model.forward).parameters:
            self._cache_kwarg = "cache"
        self.vocab_size = int(model.get_input_embeddings().weight.shape[0])
        self.context_length = int(
            getattr(config, "max_position_embeddings", None)
            or getattr(config, "n_positions", None)
            or 2048
        )
        # Building llguidance's token trie takes up to ~1 s on a large vocabulary: off the loop.
        self._grammars, self._no_grammars = await asyncio.to_thread(self._load_grammars, model)
        log.info(
            "loaded %s on %s (%s, context %d)",
            self.model_name, device, model.dtype, self.context_length,
        )
        runtime_data: dict[str, Any] = {"device": str(device), "dtype": str(model.dtype)}
        if self._grammars is not None:
            runtime_data[GUIDED_DECODING_KEY] = list(GUIDED_KINDS)
        else:
            log.info("structured output disabled: %s", self._no_grammars)
        return EngineConfig(
            model=self.model_name,
            context_length=self.context_length,
            runtime_data=runtime_data,
        )

    def _load(self) -> tuple[Any, Any]:
        import torch
        import transformers

        if self.device_name == "auto":
            device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        else:
            device = torch.device(self.device_name)
        dtype: Any = "auto" if self.dtype_name == "auto" else getattr(torch, self.dtype_name)
        # transformers >= 4.56 calls the argument ``dtype``; older versions ``torch_dtype``.
        major, minor = (int(p) for p in transformers.__version__.split(".")[:2])
        key = "dtype" if (major, minor) >= (4, 56) else "torch_dtype"
        model: Any = transformers.AutoModelForCausalLM.from_pretrained(
            self.model_dir, **{key: dtype}
        )
        model = model.to(device).eval()
        return model, device

    def _load_grammars(self, model: Any) -> tuple[_Grammars | None, str]:
        """llguidance's view of the tokenizer, or None and the reason there is none."""
        try:
            import llguidance.hf
            import transformers
        except ImportError:
            return None, "llguidance is not installed (the 'examples' extra has it)"
        try:
            tokenizer: Any = transformers.AutoTokenizer.from_pretrained(self.model_dir)
        except Exception as exc:  # no tokenizer files at all, or an unreadable one
            return None, f"cannot load the tokenizer of {self.model_dir}: {exc}"
        if not getattr(tokenizer, "is_fast", False):
            return None, "the model's tokenizer is not a fast (tokenizers) one"
        # The mask allows these once an instance is complete; the model may then pick one.
        eos = _eos_ids(model, tokenizer)
        if not eos:
            return None, "neither the model config nor the tokenizer names an EOS token"
        try:
            # n_vocab = the embedding rows, so masks cover every logit (padding rows: never).
            lltok = llguidance.hf.from_tokenizer(tokenizer, n_vocab=self.vocab_size, eos_token=eos)
        except Exception as exc:
            return None, f"llguidance cannot use the tokenizer: {exc}"
        return _Grammars(lltok, self.grammar_cache_size), ""

    async def cleanup(self) -> None:
        # Null-safe (start may have failed half way) and idempotent.
        executor, self._executor = self._executor, None
        model, self._model = self._model, None
        self._grammars, self._no_grammars = None, "the engine is stopped"
        if executor is not None:
            executor.shutdown(wait=False)  # queued steps finish; later ones fail
        if model is None:
            return
        device = self._device
        del model
        gc.collect()
        if device is not None and device.type == "cuda":
            import torch

            torch.cuda.empty_cache()
        log.info("transformers engine stopped")

    async def health_check_payload(self) -> dict[str, Any]:
        return {
            "token_ids": [1],
            "stop_conditions": {"max_tokens": 1, "ignore_eos": True},
            HEALTH_CHECK_KEY: True,
        }

    # -- generation -----------------------------------------------------------------------------
    async def _step(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on the model thread; raises EngineShutdown once cleanup has run."""
        executor = self._executor
        if executor is None:
            raise DynamoError.engine_shutdown("transformers engine is not running")
        try:
            return await asyncio.wrap_future(executor.submit(fn))
        except RuntimeError as exc:  # submit after shutdown
            if self._executor is None:
                raise DynamoError.engine_shutdown("transformers engine stopped") from exc
            raise

    async def generate(
        self, request: PreprocessedRequest, ctx: GenerateContext
    ) -> AsyncIterator[LLMEngineOutput]:
        model = self._model
        if model is None:
            raise DynamoError.engine_shutdown("transformers engine is not running")
        prompt = list(request.token_ids)
        if not prompt:
            raise DynamoError.invalid_argument("token_ids must not be empty")
        bad = [t for t in prompt if not 0 <= t < self.vocab_size]
        if bad:
            raise DynamoError.invalid_argument(
                f"token id {bad[0]} outside the vocabulary [0, {self.vocab_size})"
            )
        room = self.context_length - len(prompt)
        if room <= 0:
            raise DynamoError.invalid_argument(
                f"prompt of {len(prompt)} tokens leaves no room in the context of "
                f"{self.context_length}"
            )
        sc = request.stop_conditions
        max_tokens = min(self.max_tokens if sc.max_tokens is None else sc.max_tokens, room)
        min_tokens = sc.min_tokens or 0
        eos = set() if sc.ignore_eos else set(request.eos_token_ids)
        hidden = set(sc.stop_token_ids_hidden or ())
        visible = set(sc.stop_token_ids or ())
        matcher: Any = None
        grammar_eos: frozenset[int] = frozenset()
        constraint = self._constraint(request.sampling_options.guided_decoding)
        if constraint is not None:
            grammars = self._grammars
            assert grammars is not None  # _constraint checked it
            # Compiling can take a while (cached per constraint): on the model thread, before
            # any token, so a bad schema fails the request cleanly.
            matcher = await self._step(lambda: grammars.matcher(*constraint))
            grammar_eos = grammars.eos
        decoder = _Decoder(
            model, self._device, self._cache_kwarg, prompt, request.sampling_options, matcher
        )

        def done(terminal: LLMEngineOutput, n: int) -> LLMEngineOutput:
            return terminal.with_usage(usage(len(prompt), n))

        n = 0  # tokens returned so far
        try:
            while n < max_tokens:
                if ctx.is_stopped():
                    yield done(LLMEngineOutput.cancelled(), n)
                    return
                token = await self._step(decoder.step)
                if decoder.grammar_error:
                    raise DynamoError.unknown(f"guided decoding failed: {decoder.grammar_error}")
                complete = decoder.grammar_complete
                if complete and token in grammar_eos:
                    # The model ended a complete instance; min_tokens cannot outlast the grammar.
                    yield done(LLMEngineOutput(token_ids=[], finish_reason=FinishReason.EOS), n)
                    return
                if n >= min_tokens:
                    if token in eos:
                        yield done(LLMEngineOutput(token_ids=[], finish_reason=FinishReason.EOS), n)
                        return
                    if token in hidden or token in visible:
                        tokens = [] if token in hidden else [token]
                        yield done(
                            LLMEngineOutput(
                                token_ids=tokens, finish_reason=FinishReason.STOP, stop_reason=token
                            ),
                            n + len(tokens),
                        )
                        return
                n += 1
                if complete:  # nothing may follow: the instance is whole with this token
                    yield done(
                        LLMEngineOutput(token_ids=[token], finish_reason=FinishReason.EOS), n
                    )
                    return
                if n == max_tokens:
                    yield done(LLMEngineOutput.length().with_tokens([token]), n)
                    return
                yield chunk.token(token)
            # Only reached when max_tokens == 0: nothing to generate.
            if ctx.is_stopped():
                yield done(LLMEngineOutput.cancelled(), 0)
            else:
                yield done(LLMEngineOutput.length(), 0)
        finally:
            decoder.release()

    def _constraint(self, guided: GuidedDecodingOptions | None) -> tuple[str, str] | None:
        """``(kind, spec)`` of the request's constraint (None: unconstrained), where ``spec`` is
        the text the compiled matcher is cached by. Raises InvalidArgument for what this engine
        cannot honour."""
        if guided is None:
            return None
        if guided.structural_tag is not None:
            raise DynamoError.invalid_argument("guided decoding: structural_tag is not supported")
        kinds = [k for k in GUIDED_KINDS if getattr(guided, k) is not None]
        if not kinds:
            return None  # only backend / whitespace_pattern: nothing to constrain
        if len(kinds) > 1:
            raise DynamoError.invalid_argument(
                f"guided decoding: give one of json, regex, choice, grammar; got {', '.join(kinds)}"
            )
        if self._grammars is None:
            raise DynamoError.invalid_argument(f"guided decoding unavailable: {self._no_grammars}")
        kind = kinds[0]
        value = getattr(guided, kind)
        if kind == "json":
            if isinstance(value, str):
                try:
                    value = json.loads(value)
                except ValueError as exc:
                    raise DynamoError.invalid_argument(
                        f"guided decoding: json is not valid JSON: {exc}"
                    ) from exc
            if not isinstance(value, dict):
                raise DynamoError.invalid_argument(
                    "guided decoding: json must be a JSON schema (an object)"
                )
            # Key order is kept: it is the order llguidance emits properties in.
            spec = json.dumps(
                {"schema": value, "whitespace": guided.whitespace_pattern},
                separators=(",", ":"),
            )
        elif kind == "choice":
            if not value or not all(isinstance(c, str) for c in value):
                raise DynamoError.invalid_argument(
                    "guided decoding: choice must be a non-empty list of strings"
                )
            spec = json.dumps(value)
        else:
            if not isinstance(value, str) or not value:
                raise DynamoError.invalid_argument(f"guided decoding: {kind} must be a string")
            spec = value
        return kind, spec


def _eos_ids(model: Any, tokenizer: Any) -> list[int]:
    """The model's EOS ids: generation config, then model config, then tokenizer."""
    for source in (getattr(model, "generation_config", None), model.config, tokenizer):
        value = getattr(source, "eos_token_id", None)
        if value is None:
            continue
        ids = [value] if isinstance(value, int) else list(value)
        if ids:
            return [int(i) for i in ids]
    return []


class _Grammars:
    """Compiles guided-decoding constraints into llguidance matchers for one tokenizer.

    Compiled matchers are kept, unused, in a bounded LRU keyed by ``(kind, spec)``; a request
    gets a ``deep_copy`` (microseconds) to advance. Only the model thread calls ``matcher``,
    so the cache needs no lock.
    """

    def __init__(self, tokenizer: Any, capacity: int) -> None:
        self.tokenizer = tokenizer
        self.eos = frozenset(int(t) for t in tokenizer.eos_tokens)
        self.capacity = capacity
        self._cache: OrderedDict[tuple[str, str], Any] = OrderedDict()

    def matcher(self, kind: str, spec: str) -> Any:
        """A fresh matcher for the constraint; InvalidArgument if it does not compile."""
        key = (kind, spec)
        compiled = self._cache.get(key)
        if compiled is None:
            compiled = self._compile(kind, spec)
            if self.capacity:
                self._cache[key] = compiled
                if len(self._cache) > self.capacity:
                    self._cache.popitem(last=False)
        else:
            self._cache.move_to_end(key)
        return compiled.deep_copy()

    def _compile(self, kind: str, spec: str) -> Any:
        import llguidance

        m = llguidance.LLMatcher
        try:
            if kind == "json":
                parsed = json.loads(spec)
                options: Any = {"whitespace_flexible": False}
                if parsed["whitespace"] is not None:
                    options = {"whitespace_pattern": parsed["whitespace"]}
                grammar = m.grammar_from_json_schema(parsed["schema"], defaults=options)
            elif kind == "regex":
                grammar = m.grammar_from_regex(spec)
            elif kind == "choice":
                # Lark string literals take JSON string escapes.
                alternatives = " | ".join(json.dumps(c) for c in json.loads(spec))
                grammar = m.grammar_from_lark(f"start: {alternatives}")
            else:  # Lark, or GBNF (llguidance converts it)
                grammar = llguidance.grammar_from("grammar", spec)
        except (ValueError, TypeError) as exc:
            raise DynamoError.invalid_argument(f"guided decoding: invalid {kind}: {exc}") from exc
        # Compile errors do not raise: the matcher enters its error state instead.
        matcher = m(self.tokenizer, grammar, log_level=0)
        if matcher.is_error():
            raise DynamoError.invalid_argument(
                f"guided decoding: invalid {kind}: {matcher.get_error()}"
            )
        return matcher


class _Decoder:
    """One sequence's decoding state: KV cache and sampler. ``step`` runs on the model thread."""

    def __init__(
        self,
        model: Any,
        device: Any,
        cache_kwarg: str,
        prompt: list[int],
        sampling: SamplingOptions,
        matcher: Any = None,
    ) -> None:
        self.model = model
        self.device = device
        self.cache_kwarg = cache_kwarg
        self.pending = prompt  # tokens not yet fed to the model
        self.past: Any = None
        temperature = sampling.temperature
        self.greedy = not temperature  # None or 0.0
        self.temperature = temperature or 1.0
        self.top_k = sampling.top_k if sampling.top_k and sampling.top_k > 0 else 0
        self.top_p = sampling.top_p if sampling.top_p is not None else 1.0
        self.seed = sampling.seed
        self.generator: Any = None
        # Guided decoding: an llguidance matcher advanced with every picked token.
        self.matcher = matcher
        self.grammar_complete = False  # the last token completed the instance
        self.grammar_error = ""
        self._bit_shifts: Any = None

    def step(self) -> int:
        """Feed the pending tokens (the prompt, then the last token) and pick the next one."""
        import torch

        if self.model is None:  # released while this step was queued
            return -1
        with torch.inference_mode():
            input_ids = torch.tensor([self.pending], dtype=torch.long, device=self.device)
            kwargs = {self.cache_kwarg: self.past}
            out = self.model(input_ids=input_ids, use_cache=True, **kwargs)
            self.past = getattr(out, self.cache_kwarg)
            logits = out.logits[0, -1].float()
            matcher = self.matcher
            if matcher is None:
                token = self._pick(logits)
            else:
                token = self._pick_guided(matcher, logits)
        self.pending = [token]
        return token

    def _pick_guided(self, matcher: Any, logits: Any) -> int:
        """Pick among the tokens the grammar allows, then advance it with the pick."""
        import torch

        # One bit per token, little-endian: byte b holds tokens 8b .. 8b+7.
        bits = torch.frombuffer(bytearray(matcher.compute_bitmask()), dtype=torch.uint8)
        if self._bit_shifts is None:
            self._bit_shifts = torch.arange(8, dtype=torch.uint8)
        allowed = ((bits.unsqueeze(1) >> self._bit_shifts) & 1).flatten().bool()
        n = logits.shape[-1]
        if allowed.shape[0] < n:  # a vocabulary larger than the tokenizer's: never those
            allowed = torch.cat([allowed, allowed.new_zeros(n - allowed.shape[0])])
        allowed = allowed[:n].to(logits.device)
        if matcher.is_error() or not bool(allowed.any()):
            self.grammar_error = matcher.get_error() or "no token is allowed"
            return -1
        # Masked before temperature / top-k / top-p, so those only rank allowed tokens.
        token = self._pick(logits.masked_fill(~allowed, float("-inf")))
        if not matcher.consume_token(token):
            self.grammar_error = matcher.get_error() or f"token {token} rejected"
        self.grammar_complete = matcher.is_stopped()
        return token

    def _pick(self, logits: Any) -> int:
        import torch

        if self.greedy:
            return int(torch.argmax(logits).item())
        logits = logits / self.temperature
        if self.top_k and self.top_k < logits.shape[-1]:
            kth = torch.topk(logits, self.top_k).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if self.top_p < 1.0:
            sorted_logits, order = torch.sort(logits, descending=True)
            cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
            # Drop a token once the ones before it already cover top_p (always keep the best).
            drop = cumulative - torch.softmax(sorted_logits, dim=-1) >= self.top_p
            drop[0] = False
            logits = logits.masked_fill(drop.scatter(0, order, drop), float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        if self.generator is None and self.seed is not None:
            self.generator = torch.Generator(device=probs.device).manual_seed(self.seed)
        return int(torch.multinomial(probs, 1, generator=self.generator).item())

    def release(self) -> None:
        self.past = None
        self.model = None
        self.matcher = None
