"""examples/transformers_engine.py on a tiny, randomly initialised Llama built offline."""

from __future__ import annotations

import asyncio
import json
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from dynamo_backend_common import (  # noqa: E402
    GUIDED_DECODING_KEY,
    BackendError,
    DynamoError,
    FinishReason,
    GuidedDecodingOptions,
    LLMEngineOutput,
    PreprocessedRequest,
    SamplingOptions,
    StopConditions,
)
from dynamo_backend_common.fixtures import make_tiny_llama  # noqa: E402
from dynamo_backend_common.model_dir import ModelDir  # noqa: E402
from dynamo_backend_common.testing import mock_context, run_conformance  # noqa: E402
from examples.transformers_engine import TransformersEngine  # noqa: E402
from tests.test_readme import tiny_model_commands  # noqa: E402

REPO = Path(__file__).resolve().parent.parent

PROMPT = [5, 17, 300, 42, 99, 7]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer Llama with the bundled tiny tokenizer's vocabulary, saved with its tokenizer
    (the builder ``scripts/make_tiny_model.py`` uses too)."""
    return make_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


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


# -- structured output (guided decoding, llguidance) --------------------------------------------

#: Ends within a few dozen tokens even for a random model: every key is forced, two values vary.
SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "ok": {"type": "boolean"},
        "color": {"enum": ["red", "green", "blue"]},
    },
    "required": ["ok", "color"],
    "additionalProperties": False,
}


def _guided(max_tokens: int = 64, **sampling: object) -> PreprocessedRequest:
    req = _request(max_tokens, **sampling)
    req.sampling_options.guided_decoding = GuidedDecodingOptions(json=SCHEMA)
    return req


def _guided_with(schema: Any) -> PreprocessedRequest:
    req = _request(8)
    req.sampling_options.guided_decoding = GuidedDecodingOptions(json=schema)
    return req


def _text(model_dir: Path, tokens: list[int]) -> str:
    from tokenizers import Tokenizer

    return str(Tokenizer.from_file(str(model_dir / "tokenizer.json")).decode(tokens))


def _check_instance(text: str) -> None:
    value = json.loads(text)
    assert isinstance(value, dict) and set(value) == {"ok", "color"}, value
    assert isinstance(value["ok"], bool) and value["color"] in ("red", "green", "blue"), value


async def _invalid(engine: TransformersEngine, request: PreprocessedRequest) -> DynamoError:
    with pytest.raises(DynamoError) as info:
        await _collect(engine, request)
    assert info.value.kind == BackendError.InvalidArgument, info.value
    return info.value


async def test_guided_json_schema_output_is_a_valid_instance(model_dir: Path) -> None:
    pytest.importorskip("llguidance")
    engine = TransformersEngine.from_args(["--model", str(model_dir)])
    config = await engine.start(3)
    try:
        assert config.runtime_data[GUIDED_DECODING_KEY] == ["json", "regex", "choice", "grammar"]
        runs: list[list[int]] = []
        for sampling in ({}, {"temperature": 1.0, "top_k": 50, "top_p": 0.9, "seed": 3}):
            tokens, terminal = await _collect(engine, _guided(**sampling))
            _check_instance(_text(model_dir, tokens))
            assert terminal.finish_reason == FinishReason.EOS
            assert terminal.completion_usage.completion_tokens == len(tokens)
            runs.append(tokens)
        greedy = runs[0]
        # Unconstrained, the same prompt is not JSON: the mask did the work.
        free, _ = await _collect(engine, _request(len(greedy)))
        assert not _text(model_dir, free).startswith('{"ok":')
        # max_tokens still cuts the instance short.
        cut, terminal = await _collect(engine, _guided(3))
        assert cut == greedy[:3] and terminal.finish_reason == FinishReason.LENGTH
    finally:
        await engine.cleanup()


async def test_guided_greedy_stream_is_the_same_alone_concurrent_or_whole(
    model_dir: Path,
) -> None:
    pytest.importorskip("llguidance")
    engine = TransformersEngine.from_args(["--model", str(model_dir)])
    await engine.start(4)
    try:
        whole, _ = await _collect(engine, _guided())
        # Chunk by chunk, interleaved on the model thread with another guided request.
        other = _request(16)
        other.sampling_options.guided_decoding = GuidedDecodingOptions(choice=["alpha", "beta"])
        streamed: list[list[int]] = []

        async def stream() -> None:
            async for out in engine.generate(_guided(), mock_context()):
                streamed.append(list(out.token_ids or []))

        _, (choice, _) = await asyncio.gather(stream(), _collect(engine, other))
        assert [t for c in streamed for t in c] == whole
        assert len([c for c in streamed if c]) > 1  # it did stream
        assert "".join(_text(model_dir, c) for c in streamed) == _text(model_dir, whole)
        assert _text(model_dir, choice) in ("alpha", "beta")
    finally:
        await engine.cleanup()


async def test_guided_regex_choice_grammar_and_compile_cache(model_dir: Path) -> None:
    pytest.importorskip("llguidance")
    engine = TransformersEngine(str(model_dir), grammar_cache_size=2)
    await engine.start(5)
    try:
        cases: list[tuple[GuidedDecodingOptions, Any]] = [
            (GuidedDecodingOptions(regex="[0-9]{3}"), lambda t: len(t) == 3 and t.isdigit()),
            (GuidedDecodingOptions(choice=["yes", "no"]), lambda t: t in ("yes", "no")),
            (GuidedDecodingOptions(grammar='start: "up" | "down"'), lambda t: t in ("up", "down")),
            (GuidedDecodingOptions(grammar='root ::= "on" | "off"'), lambda t: t in ("on", "off")),
        ]
        for guided, ok in cases:
            req = _request(32)
            req.sampling_options.guided_decoding = guided
            tokens, terminal = await _collect(engine, req)
            assert ok(_text(model_dir, tokens)), (guided, _text(model_dir, tokens))
            assert terminal.finish_reason == FinishReason.EOS
        grammars = engine._grammars
        assert grammars is not None and len(grammars._cache) == 2  # bounded LRU
        key = next(reversed(grammars._cache))
        compiled = grammars._cache[key]
        assert grammars.matcher(*key) is not compiled and grammars._cache[key] is compiled
    finally:
        await engine.cleanup()


async def test_guided_bad_or_unsupported_constraints_are_invalid_argument(
    model_dir: Path,
) -> None:
    pytest.importorskip("llguidance")
    engine = TransformersEngine.from_args(["--model", str(model_dir)])
    await engine.start(6)
    try:
        bad: list[GuidedDecodingOptions] = [
            GuidedDecodingOptions(json={"type": "objectx"}),
            GuidedDecodingOptions(json={"type": "object", "properties": {"a": {"$ref": "#/no"}}}),
            GuidedDecodingOptions(json="{not json"),
            GuidedDecodingOptions(json=[1, 2]),
            GuidedDecodingOptions(regex="a(b"),
            GuidedDecodingOptions(choice=[]),
            GuidedDecodingOptions(grammar="start: ("),
            GuidedDecodingOptions(regex="a", choice=["a"]),
            GuidedDecodingOptions(structural_tag={"type": "structural_tag"}),
        ]
        for guided in bad:
            req = _request(8)
            req.sampling_options.guided_decoding = guided
            await _invalid(engine, req)
        error = await _invalid(engine, _guided_with({"type": "objectx"}))
        assert "objectx" in str(error)
        # Nothing to constrain (only a backend hint) is a plain request.
        req = _request(4)
        req.sampling_options.guided_decoding = GuidedDecodingOptions(backend="xgrammar")
        tokens, _ = await _collect(engine, req)
        assert len(tokens) == 4
    finally:
        await engine.cleanup()


@pytest.fixture
def untokenized_dir(model_dir: Path, tmp_path: Path) -> Path:
    """``model_dir`` without its tokenizer files."""
    bare = tmp_path / "no-tokenizer"
    bare.mkdir()
    for path in model_dir.iterdir():
        if not path.name.startswith("tokenizer"):
            shutil.copy(path, bare / path.name)
    return bare


async def test_guided_unavailable_without_a_tokenizer(untokenized_dir: Path) -> None:
    engine = TransformersEngine(str(untokenized_dir))
    config = await engine.start(7)
    try:
        assert GUIDED_DECODING_KEY not in config.runtime_data
        error = await _invalid(engine, _guided())
        assert "unavailable" in str(error), error
        tokens, _ = await _collect(engine, _request(2))  # unguided requests still work
        assert len(tokens) == 2
    finally:
        await engine.cleanup()


def test_make_tiny_model_script_as_the_readme_runs_it(tmp_path: Path, model_dir: Path) -> None:
    """README's ``python scripts/make_tiny_model.py DEST`` (from a clone's root) writes a
    directory that transformers loads, the frontend reads, and the greedy model does not end
    at once on EOS; it is the fixture's model (one builder, one seed)."""
    make, _serve = tiny_model_commands()
    python, script, _dest = shlex.split(make)
    assert python == "python"
    dest = tmp_path / "tiny"
    r = subprocess.run([sys.executable, script, str(dest)], cwd=REPO, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.strip().splitlines()[-1] == str(dest)
    assert {p.name for p in dest.iterdir()} >= {
        "config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
        "tokenizer_config.json"}

    model = transformers.AutoModelForCausalLM.from_pretrained(dest)
    tokenizer = transformers.AutoTokenizer.from_pretrained(dest)
    card = ModelDir.load(dest)  # what the frontend reads
    assert model.config.vocab_size == card.tokenizer.get_vocab_size() == len(tokenizer)
    assert card.chat_template
    reference = transformers.AutoModelForCausalLM.from_pretrained(model_dir).state_dict()
    assert all(torch.equal(t, reference[k]) for k, t in model.state_dict().items())

    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Hello there"}],
                                           add_generation_prompt=True, tokenize=False)
    ids = tokenizer(prompt, add_special_tokens=False).input_ids
    out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids),
                         dtype=torch.long), max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert len(out[0]) - len(ids) == 8  # no EOS: a newcomer's first reply is not empty
