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
- Cancellation: ``ctx.is_stopped()`` is checked before every forward step; a stopped request
  ends with a ``cancelled`` terminal and its KV cache is dropped.
- Usage (prompt and completion tokens) is on every terminal.
- An empty prompt, a token id outside the vocabulary or a prompt that fills the context raise
  ``DynamoError(InvalidArgument)``; ``generate`` before ``start`` or after ``cleanup`` raises
  ``DynamoError(EngineShutdown)``. ``cleanup`` is null-safe and idempotent and frees the model.

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
import logging
import os
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any, TypeVar

from dynamo_backend_common import (
    HEALTH_CHECK_KEY,
    DynamoError,
    EngineConfig,
    FinishReason,
    GenerateContext,
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
    ) -> None:
        if not model_dir:
            raise ValueError("model_dir is required (--model DIR or $DYN_MODEL_PATH)")
        if dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(_DTYPES)}, got {dtype!r}")
        if max_tokens < 0:
            raise ValueError("max_tokens must be >= 0")
        self.model_dir = model_dir
        self.model_name = model_name or os.path.basename(os.path.normpath(model_dir))
        self.device_name = device
        self.dtype_name = dtype
        self.max_tokens = max_tokens
        self.context_length = 0
        self.vocab_size = 0
        self._model: Any = None  # transformers.PreTrainedModel once started
        self._device: Any = None  # torch.device once started
        self._cache_kwarg = "past_key_values"  # ``cache`` in transformers >= 5.x
        # One thread runs every forward: torch calls stay off the event loop and never overlap.
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None

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
        log.info(
            "loaded %s on %s (%s, context %d)",
            self.model_name, device, model.dtype, self.context_length,
        )
        return EngineConfig(
            model=self.model_name,
            context_length=self.context_length,
            runtime_data={"device": str(device), "dtype": str(model.dtype)},
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

    async def cleanup(self) -> None:
        # Null-safe (start may have failed half way) and idempotent.
        executor, self._executor = self._executor, None
        model, self._model = self._model, None
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
        decoder = _Decoder(
            model, self._device, self._cache_kwarg, prompt, request.sampling_options
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


class _Decoder:
    """One sequence's decoding state: KV cache and sampler. ``step`` runs on the model thread."""

    def __init__(
        self,
        model: Any,
        device: Any,
        cache_kwarg: str,
        prompt: list[int],
        sampling: SamplingOptions,
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
            token = self._pick(logits)
        self.pending = [token]
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
