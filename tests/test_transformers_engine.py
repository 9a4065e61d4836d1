"""examples/transformers_engine.py on a tiny, randomly initialised Llama built offline."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from dynamo_backend_common import (  # noqa: E402
    FinishReason,
    LLMEngineOutput,
    PreprocessedRequest,
    SamplingOptions,
    StopConditions,
)
from dynamo_backend_common.fixtures import tiny_model_dir  # noqa: E402
from dynamo_backend_common.frontend.model_dir import ModelDir  # noqa: E402
from dynamo_backend_common.testing import mock_context, run_conformance  # noqa: E402
from examples.transformers_engine import TransformersEngine  # noqa: E402

PROMPT = [5, 17, 300, 42, 99, 7]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer Llama with the bundled tiny tokenizer's vocabulary, saved with its tokenizer."""
    tok_dir = Path(tiny_model_dir())
    vocab = ModelDir.load(tok_dir).tokenizer.get_vocab_size()
    out = tmp_path_factory.mktemp("tiny-llama")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=0,
        eos_token_id=1,
    )
    transformers.LlamaForCausalLM(config).save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tok_dir / name, out / name)
    return out


def _request(max_tokens: int, **sampling: object) -> PreprocessedRequest:
    return PreprocessedRequest(
        model="tiny",
        token_ids=list(PROMPT),
        stop_conditions=StopConditions(max_tokens=max_tokens, ignore_eos=True),
        sampling_options=SamplingOptions(**sampling),  # type: ignore[arg-type]
    )


async def _collect(
    engine: TransformersEngine, request: PreprocessedRequest
) -> tuple[list[int], LLMEngineOutput]:
    tokens: list[int] = []
    terminal: LLMEngineOutput | None = None
    async for out in engine.generate(request, mock_context()):
        tokens += out.token_ids or []
        if out.finish_reason is not None:
            terminal = out
    assert terminal is not None
    return tokens, terminal


async def test_conformance(model_dir: Path) -> None:
    t0 = time.monotonic()
    argv = ["--model", str(model_dir)]
    report = await run_conformance(lambda: TransformersEngine.from_args(argv))
    assert report.ok, str(report)
    assert time.monotonic() - t0 < 60


async def test_greedy_matches_hf_generate_and_max_tokens(model_dir: Path) -> None:
    engine = TransformersEngine.from_args(["--model", str(model_dir), "--device", "cpu"])
    config = await engine.start(1)
    try:
        assert config.model == model_dir.name
        assert config.context_length == 512
        first, terminal = await _collect(engine, _request(8, temperature=0.0))
        second, _ = await _collect(engine, _request(8))
        assert first == second and len(first) == 8
        assert terminal.finish_reason == FinishReason.LENGTH
        assert terminal.completion_usage.prompt_tokens == len(PROMPT)
        assert terminal.completion_usage.completion_tokens == 8

        model = transformers.AutoModelForCausalLM.from_pretrained(model_dir)
        expected = model.generate(
            torch.tensor([PROMPT]),
            attention_mask=torch.ones(1, len(PROMPT), dtype=torch.long),
            max_new_tokens=8,
            min_new_tokens=8,
            do_sample=False,
            pad_token_id=0,
        )[0, len(PROMPT) :].tolist()
        assert first == expected

        three, terminal = await _collect(engine, _request(3))
        assert three == first[:3] and terminal.finish_reason == FinishReason.LENGTH
    finally:
        await engine.cleanup()
        await engine.cleanup()


async def test_stop_tokens_and_seeded_sampling(model_dir: Path) -> None:
    engine = TransformersEngine.from_args(["--model", str(model_dir)])
    await engine.start(2)
    try:
        greedy, _ = await _collect(engine, _request(6))
        # A hidden stop token ends the stream without being returned.
        stop_at = greedy[2]
        first = greedy.index(stop_at)
        req = _request(6)
        req.stop_conditions.stop_token_ids_hidden = [stop_at]
        tokens, terminal = await _collect(engine, req)
        assert tokens == greedy[:first]
        assert terminal.finish_reason == FinishReason.STOP and terminal.stop_reason == stop_at
        # min_tokens defers stop tokens.
        req = _request(6)
        req.stop_conditions.stop_token_ids_hidden = [stop_at]
        req.stop_conditions.min_tokens = 6
        tokens, terminal = await _collect(engine, req)
        assert tokens == greedy and terminal.finish_reason == FinishReason.LENGTH
        # EOS stops unless ignore_eos.
        req = _request(6)
        req.stop_conditions.ignore_eos = False
        req.eos_token_ids = [stop_at]
        tokens, terminal = await _collect(engine, req)
        assert tokens == greedy[:first] and terminal.finish_reason == FinishReason.EOS

        a, _ = await _collect(engine, _request(8, temperature=1.0, top_p=0.9, top_k=50, seed=7))
        b, _ = await _collect(engine, _request(8, temperature=1.0, top_p=0.9, top_k=50, seed=7))
        assert a == b and len(a) == 8
    finally:
        await engine.cleanup()


def test_from_args_reads_dyn_model_path(monkeypatch: pytest.MonkeyPatch, model_dir: Path) -> None:
    monkeypatch.setenv("DYN_MODEL_PATH", str(model_dir))
    assert TransformersEngine.from_args([]).model_dir == str(model_dir)
    monkeypatch.delenv("DYN_MODEL_PATH")
    with pytest.raises(SystemExit):
        TransformersEngine.from_args([])
