"""Mocker engine settings: :class:`MockerArgs`, built in code or from the command line."""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, fields

from ...errors import DynamoError
from ...worker.config import DisaggregationMode
from .scheduler import CostModel, SchedulerConfig

__all__ = ["KV_LOAD_FAILURE_POLICIES", "MockerArgs"]

#: ``--kv-load-failure``: what a decode mocker does when its KV pull fails.
KV_LOAD_FAILURE_POLICIES: tuple[str, ...] = ("recompute", "fail")


@dataclass(frozen=True, kw_only=True)
class MockerArgs:
    """Every knob of :class:`~dynamo_backend_common.engines.mocker.MockerEngine`.

    Invalid values raise ``DynamoError(InvalidArgument)`` at construction.
    """

    #: Advertised model name (``EngineConfig.model``).
    model_name: str = "mocker-model"
    #: Public name; defaults to ``model_name``.
    served_model_name: str | None = None
    #: KV blocks per data-parallel rank.
    num_gpu_blocks: int = 16384
    #: Tokens per KV block.
    block_size: int = 16
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    #: Simulated time runs this many times faster than wall time; 0 or inf: no waiting at all.
    speedup_ratio: float = 1.0
    #: Independent data-parallel ranks (one KV cache and scheduler each).
    dp_size: int = 1
    #: ``max_tokens`` of a request that sets none.
    max_tokens: int = 64
    #: Sampled token ids are in ``[0, vocab_size)``.
    vocab_size: int = 32000
    #: Model directory whose ``tokenizer.json`` the mocker loads at start to honour guided
    #: decoding (json, choice). None, or no such file: no guided decoding. ``from_args``
    #: defaults it to ``$DYN_MODEL_PATH`` (set by ``dynamo-backend worker --model-path``).
    model_path: str | None = None
    #: Longest sequence (prompt + output); always capped by the KV capacity of one rank. None:
    #: that cap alone, and the card reports no context length (0), as Dynamo's mocker does, so
    #: both mockers of one model share a pool behind Dynamo's frontend.
    context_length: int | None = None
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True
    #: Per-token probability of an EOS stop (requests with ``eos_token_ids`` and no ignore_eos).
    eos_rate: float = 0.0
    #: Seed of requests without ``sampling_options.seed`` (mixed with the request id).
    seed: int = 0
    #: Minimum wall interval between two load snapshots of one rank (0: after every change).
    snapshot_interval_ms: float = 50.0
    #: An unchanged snapshot is published again after this long (0: never), so a router that
    #: subscribed late (or lost a message) still learns an idle rank's load and capacity.
    snapshot_heartbeat_ms: float = 1000.0
    #: Check the KV accounting after every scheduler operation (slow; tests).
    check_invariants: bool = False
    prefill_base_ms: float = CostModel.prefill_base_ms
    prefill_ms_per_token: float = CostModel.prefill_ms_per_token
    prefill_ms_per_token_sq: float = CostModel.prefill_ms_per_token_sq
    decode_base_ms: float = CostModel.decode_base_ms
    decode_ms_per_seq: float = CostModel.decode_ms_per_seq
    #: Disaggregated role (:mod:`.disagg`): ``agg``/``aggregated``, ``prefill`` or ``decode``,
    #: stored as :class:`DisaggregationMode` value (``aggregated``, ``prefill``, ``decode``).
    #: ``from_args`` defaults it to ``$DYN_DISAGGREGATION_MODE`` (the worker exports its own
    #: ``--disaggregation-mode`` there).
    disaggregation_mode: str = DisaggregationMode.AGGREGATED.value
    #: Prefill: bind address of the KV transfer server (an ephemeral port).
    transfer_host: str = "127.0.0.1"
    #: Prefill: advertise the transfer server as ``EngineConfig.bootstrap_host``/``port``, so
    #: the frontend routes decode concurrently with prefill (Dynamo's bootstrap path).
    bootstrap: bool = False
    #: Prefill: a hold the decode worker has not pulled after this long is freed (counted).
    kv_hold_timeout_s: float = 30.0
    #: Simulated KV transfer time per block, before ``speedup_ratio`` (0: instant).
    kv_transfer_ms_per_block: float = 0.2
    #: Decode: bound on one KV pull (connect, transfer, reply).
    kv_pull_timeout_s: float = 30.0
    #: Decode: on a failed pull, ``recompute`` the prompt locally or ``fail`` the request.
    kv_load_failure: str = "recompute"

    def __post_init__(self) -> None:
        problems: list[str] = []
        try:
            # An enum member is welcome too (``MockerArgs(disaggregation_mode=mode)``).
            mode = DisaggregationMode.parse(
                str(getattr(self.disaggregation_mode, "value", self.disaggregation_mode))
            )
            object.__setattr__(self, "disaggregation_mode", mode.value)
        except ValueError:
            problems.append(
                f"disaggregation_mode must be agg, aggregated, prefill or decode, got "
                f"{self.disaggregation_mode!r}"
            )
        if self.kv_load_failure not in KV_LOAD_FAILURE_POLICIES:
            problems.append(
                f"kv_load_failure must be recompute or fail, got {self.kv_load_failure!r}"
            )
        if not self.transfer_host.strip():
            problems.append("transfer_host must not be empty")
        for name in (
            "num_gpu_blocks",
            "block_size",
            "max_num_seqs",
            "max_num_batched_tokens",
            "dp_size",
            "vocab_size",
        ):
            if getattr(self, name) <= 0:
                problems.append(f"{name} must be positive")
        if self.context_length is not None and self.context_length <= 0:
            problems.append("context_length must be positive")
        if self.max_tokens < 0:
            problems.append("max_tokens must be >= 0")
        if not self.model_name.strip():
            problems.append("model_name must not be empty")
        if math.isnan(self.speedup_ratio) or self.speedup_ratio < 0:
            problems.append("speedup_ratio must be >= 0 (0 or inf: as fast as possible)")
        if not 0.0 <= self.eos_rate <= 1.0:
            problems.append("eos_rate must be in [0, 1]")
        if self.snapshot_interval_ms < 0:
            problems.append("snapshot_interval_ms must be >= 0")
        if not self.snapshot_heartbeat_ms >= 0:
            problems.append("snapshot_heartbeat_ms must be >= 0")
        for name in (
            "prefill_base_ms",
            "prefill_ms_per_token",
            "prefill_ms_per_token_sq",
            "decode_base_ms",
            "decode_ms_per_seq",
            "kv_transfer_ms_per_block",
        ):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                problems.append(f"{name} must be finite and >= 0")
        for name in ("kv_hold_timeout_s", "kv_pull_timeout_s"):
            value = getattr(self, name)
            if not math.isfinite(value) or value <= 0:
                problems.append(f"{name} must be finite and > 0")
        if problems:
            raise DynamoError.invalid_argument("invalid mocker args: " + "; ".join(problems))

    @property
    def as_fast_as_possible(self) -> bool:
        """True when steps do not wait (``speedup_ratio`` 0 or inf)."""
        return self.speedup_ratio == 0 or math.isinf(self.speedup_ratio)

    @property
    def role(self) -> DisaggregationMode:
        """The disaggregated role, as the worker's enum."""
        return DisaggregationMode(self.disaggregation_mode)

    @property
    def transfer_s_per_block(self) -> float:
        """Wall seconds one KV block takes to transfer (0 when steps do not wait either)."""
        if self.as_fast_as_possible:
            return 0.0
        return self.kv_transfer_ms_per_block / 1000.0 / self.speedup_ratio

    @property
    def max_seq_len(self) -> int:
        """Longest sequence a rank can hold: the context length, capped by the KV capacity."""
        capacity = self.num_gpu_blocks * self.block_size
        return capacity if self.context_length is None else min(self.context_length, capacity)

    def cost_model(self) -> CostModel:
        return CostModel(
            prefill_base_ms=self.prefill_base_ms,
            prefill_ms_per_token=self.prefill_ms_per_token,
            prefill_ms_per_token_sq=self.prefill_ms_per_token_sq,
            decode_base_ms=self.decode_base_ms,
            decode_ms_per_seq=self.decode_ms_per_seq,
        )

    def scheduler_config(self) -> SchedulerConfig:
        return SchedulerConfig(
            max_num_seqs=self.max_num_seqs,
            max_num_batched_tokens=self.max_num_batched_tokens,
            chunked_prefill=self.enable_chunked_prefill,
            cost=self.cost_model(),
        )

    @staticmethod
    def build_parser(prog: str = "mocker") -> argparse.ArgumentParser:
        """The argparse parser behind :meth:`from_args` (``--help`` explains every flag)."""
        d = MockerArgs()
        p = argparse.ArgumentParser(
            prog=prog,
            description="Simulated vLLM-like engine: paged KV cache with prefix caching, "
            "continuous batching, KV events and load snapshots, timing from a cost model. "
            "Step time (ms) = [prefill-base + prefill-ms-per-token*P + prefill-ms-per-token-sq"
            "*A if P>0] + [decode-base + decode-ms-per-seq*D if D>0], with P prompt tokens "
            "computed, A their attention work (P^2 for one fresh prompt), D decoding sequences.",
            formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        )
        add = p.add_argument
        add("--model-name", default=d.model_name, help="advertised model name")
        add("--served-model-name", default=None,
            help="public model name (default: --model-name)")
        add("--num-gpu-blocks", type=int, default=d.num_gpu_blocks,
            help="KV cache blocks per data-parallel rank")
        add("--block-size", type=int, default=d.block_size, help="tokens per KV block")
        add("--max-num-seqs", type=int, default=d.max_num_seqs,
            help="most sequences running at once per rank")
        add("--max-num-batched-tokens", type=int, default=d.max_num_batched_tokens,
            help="token budget of one forward pass")
        add("--speedup-ratio", type=float, default=d.speedup_ratio,
            help="simulated time runs this many times faster than wall time; 0 or inf: no "
            "waiting at all")
        add("--dp-size", type=int, default=d.dp_size,
            help="data-parallel ranks, each with its own KV cache and scheduler")
        add("--max-tokens", type=int, default=d.max_tokens,
            help="output length of a request that sets no max_tokens")
        add("--vocab-size", type=int, default=d.vocab_size,
            help="sampled token ids are in [0, vocab-size)")
        add("--model-path", default=os.environ.get("DYN_MODEL_PATH") or None,
            help="model directory with a tokenizer.json: enables guided decoding (json "
            "schema, choice) [DYN_MODEL_PATH]")
        add("--context-length", type=int, default=d.context_length,
            help="longest prompt + output (always capped by num-gpu-blocks * block-size; "
            "default: that cap alone, and no context length in the model card)")
        add("--enable-prefix-caching", action=argparse.BooleanOptionalAction,
            default=d.enable_prefix_caching, help="reuse cached prefix blocks (and publish "
            "KV events)")
        add("--enable-chunked-prefill", action=argparse.BooleanOptionalAction,
            default=d.enable_chunked_prefill,
            help="split prompts longer than the token budget over several steps")
        add("--eos-rate", type=float, default=d.eos_rate,
            help="per-token probability of an EOS stop for requests with eos_token_ids and "
            "without ignore_eos")
        add("--seed", type=int, default=d.seed,
            help="base seed of requests without sampling_options.seed")
        add("--snapshot-interval-ms", type=float, default=d.snapshot_interval_ms,
            help="minimum wall interval between load snapshots of one rank (0: every change)")
        add("--snapshot-heartbeat-ms", type=float, default=d.snapshot_heartbeat_ms,
            help="publish an unchanged load snapshot again after this long, for routers that "
            "subscribed late (0: never)")
        add("--check-invariants", action="store_true",
            help="verify the KV accounting after every scheduler operation (slow)")
        add("--prefill-base-ms", type=float, default=d.prefill_base_ms,
            help="fixed cost of a step that prefills")
        add("--prefill-ms-per-token", type=float, default=d.prefill_ms_per_token,
            help="cost per prompt token computed")
        add("--prefill-ms-per-token-sq", type=float, default=d.prefill_ms_per_token_sq,
            help="cost per unit of attention work (quadratic in prompt length)")
        add("--decode-base-ms", type=float, default=d.decode_base_ms,
            help="fixed cost of a step that decodes")
        add("--decode-ms-per-seq", type=float, default=d.decode_ms_per_seq,
            help="cost per decoding sequence")
        g = p.add_argument_group("disaggregated serving")
        g.add_argument("--disaggregation-mode",
                       choices=("agg", "aggregated", "prefill", "decode"),
                       default=_env_mode(),
                       help="role: prefill computes the prompt's KV and holds it for a decode "
                       "worker's pull; decode pulls it and generates [DYN_DISAGGREGATION_MODE]")
        g.add_argument("--transfer-host", default=d.transfer_host,
                       help="prefill: bind address of the KV transfer server (ephemeral port)")
        g.add_argument("--bootstrap", action=argparse.BooleanOptionalAction,
                       default=d.bootstrap,
                       help="prefill: advertise the transfer server as the bootstrap endpoint, "
                       "so decode is routed concurrently with prefill")
        g.add_argument("--kv-hold-timeout-s", type=float, default=d.kv_hold_timeout_s,
                       help="prefill: free a KV hold not pulled within this long")
        g.add_argument("--kv-transfer-ms-per-block", type=float,
                       default=d.kv_transfer_ms_per_block,
                       help="simulated KV transfer time per block, divided by speedup-ratio "
                       "(0: instant)")
        g.add_argument("--kv-pull-timeout-s", type=float, default=d.kv_pull_timeout_s,
                       help="decode: bound on one KV pull")
        g.add_argument("--kv-load-failure", choices=KV_LOAD_FAILURE_POLICIES,
                       default=d.kv_load_failure,
                       help="decode: on a failed KV pull, recompute the prompt locally or fail "
                       "the request")
        return p

    @classmethod
    def from_args(cls, argv: Sequence[str] | None = None, prog: str = "mocker") -> MockerArgs:
        """Parse ``argv`` (default ``sys.argv[1:]``); bad values exit through argparse."""
        parser = cls.build_parser(prog)
        ns = parser.parse_args(argv)
        names = {f.name for f in fields(cls)}
        try:
            return cls(**{k: v for k, v in vars(ns).items() if k in names})
        except DynamoError as exc:
            parser.error(exc.message)


def _env_mode() -> str:
    """``$DYN_DISAGGREGATION_MODE`` as a ``--disaggregation-mode`` choice (an unknown value is
    left for ``MockerArgs`` to reject with a message)."""
    raw = os.environ.get("DYN_DISAGGREGATION_MODE", "").strip().lower()
    return raw or "agg"
