"""The mocker's structured output: schema instances, the scripted sequence, and the engine end to
end with the packaged tiny tokenizer."""

from __future__ import annotations

import json
import math
import random
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import pytest
from tokenizers import Tokenizer

from dynamo_backend_common import (
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
from dynamo_backend_common.engines.mocker import (
    KvManager,
    MockerArgs,
    MockerEngine,
    Scheduler,
    SchedulerConfig,
    ScriptedSequence,
    StopRules,
    guided_text,
    instance_for_schema,
)
from dynamo_backend_common.fixtures import tiny_model_dir
from dynamo_backend_common.testing import mock_context

FAST: dict[str, Any] = {"speedup_ratio": 0, "check_invariants": True}


# -- a hand-written validator for the keywords instance_for_schema covers -----------------------
def _resolve(ref: str, root: Any) -> Any:
    node = root
    for part in ref[1:].split("/")[1:]:
        node = node[part.replace("~1", "/").replace("~0", "~")]
    return node


def valid(value: Any, schema: Any, root: Any = None) -> bool:
    """Whether ``value`` satisfies ``schema`` (the subset of JSON schema the mocker covers)."""
    root = schema if root is None else root
    if schema is True or schema == {}:
        return True
    if schema is False:
        return False
    if "$ref" in schema:
        rest = {k: v for k, v in schema.items() if k != "$ref"}
        if not valid(value, _resolve(schema["$ref"], root), root):
            return False
        return valid(value, rest, root)
    if "anyOf" in schema and not any(valid(value, s, root) for s in schema["anyOf"]):
        return False
    if "oneOf" in schema and sum(valid(value, s, root) for s in schema["oneOf"]) != 1:
        return False
    if "allOf" in schema and not all(valid(value, s, root) for s in schema["allOf"]):
        return False
    if "const" in schema and value != schema["const"]:
        return False
    if "enum" in schema and value not in schema["enum"]:
        return False
    kinds = schema.get("type")
    if kinds is not None:
        kinds = kinds if isinstance(kinds, list) else [kinds]
        checks = {
            "object": isinstance(value, dict),
            "array": isinstance(value, list),
            "string": isinstance(value, str),
            "integer": isinstance(value, int) and not isinstance(value, bool),
            "number": isinstance(value, int | float) and not isinstance(value, bool),
            "boolean": isinstance(value, bool),
            "null": value is None,
        }
        if not any(checks[k] for k in kinds):
            return False
    if isinstance(value, dict):
        props = schema.get("properties", {})
        if any(r not in value for r in schema.get("required", [])):
            return False
        extra = schema.get("additionalProperties", True)
        for k, v in value.items():
            sub = props.get(k, extra)
            if not valid(v, sub, root):
                return False
    if isinstance(value, list):
        if not schema.get("minItems", 0) <= len(value) <= schema.get("maxItems", math.inf):
            return False
        if not all(valid(v, schema.get("items", True), root) for v in value):
            return False
    if isinstance(value, str):
        if not schema.get("minLength", 0) <= len(value) <= schema.get("maxLength", math.inf):
            return False
    if isinstance(value, int | float) and not isinstance(value, bool):
        if value < schema.get("minimum", -math.inf) or value > schema.get("maximum", math.inf):
            return False
        if value <= schema.get("exclusiveMinimum", -math.inf):
            return False
        if value >= schema.get("exclusiveMaximum", math.inf):
            return False
    return True


PERSON: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "ok": {"type": "boolean"},
        "color": {"enum": ["red", "green", "blue"]},
    },
    "required": ["name", "age", "ok", "color"],
    "additionalProperties": False,
}

# What pydantic v2 emits for a model with an Optional field, a nested model and a list of enums.
PYDANTIC: dict[str, Any] = {
    "$defs": {
        "Kind": {"enum": ["a", "b"], "title": "Kind", "type": "string"},
        "Inner": {
            "properties": {"x": {"title": "X", "type": "number", "exclusiveMinimum": 0}},
            "required": ["x"],
            "title": "Inner",
            "type": "object",
        },
    },
    "properties": {
        "id": {"title": "Id", "type": "integer", "description": "an id"},
        "note": {"anyOf": [{"type": "string"}, {"type": "null"}], "default": None},
        "inner": {"$ref": "#/$defs/Inner", "description": "nested"},
        "kinds": {"items": {"$ref": "#/$defs/Kind"}, "type": "array", "minItems": 1},
        "when": {"type": "string", "format": "date-time"},
    },
    "required": ["id", "inner", "kinds", "when"],
    "title": "Model",
    "type": "object",
}

SCHEMAS: list[Any] = [
    {"type": "boolean"},
    {"type": "null"},
    {"type": "integer", "minimum": 3, "maximum": 5},
    {"type": "integer", "exclusiveMinimum": 0, "exclusiveMaximum": 2},
    {"type": "integer", "minimum": 2.5, "maximum": 3.5},
    {"type": "number", "minimum": -1.5, "maximum": 1.5},
    {"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 0.01},
    {"type": "number", "maximum": -1000},
    {"type": "string", "minLength": 2, "maxLength": 4, "format": "email"},
    {"type": "string", "minLength": 30},
    {"type": ["integer", "null"]},
    {"enum": ["a", 1, None, {"k": [1]}]},
    {"const": {"x": [1, 2]}},
    {"type": "array", "items": {"type": "integer"}, "minItems": 2, "maxItems": 2},
    {"type": "array", "items": {"type": "array", "items": {"type": "boolean"}}, "maxItems": 1},
    {"type": "array"},
    {"anyOf": [{"type": "integer"}, {"type": "string"}]},
    {"oneOf": [{"const": 1}, {"const": 2}]},
    {"allOf": [{"type": "string", "maxLength": 3}], "title": "t"},
    {"definitions": {"n": {"type": "integer"}}, "$ref": "#/definitions/n"},
    {"type": "object"},
    {"type": "object", "additionalProperties": {"type": "integer", "maximum": 0}},
    {"type": "object", "required": ["free"]},
    {"properties": {"a": {"type": "null"}}},
    {"x-custom": 1, "type": "boolean"},
    # An optional property no value satisfies is left out.
    {"type": "object", "properties": {"p": {"type": "string", "minLength": 5, "maxLength": 4}}},
    # A recursive tree: optional children end once the generator goes shallow.
    {
        "type": "object",
        "properties": {"v": {"type": "integer"}, "kids": {"type": "array", "items": {"$ref": "#"}}},
        "required": ["v"],
    },
    True,
    {},
    PERSON,
    PYDANTIC,
]


@pytest.mark.parametrize("schema", SCHEMAS, ids=lambda s: json.dumps(s)[:60])
def test_instance_for_schema_satisfies_the_schema(schema: Any) -> None:
    for seed in range(25):
        value = instance_for_schema(schema, random.Random(seed))
        assert json.loads(json.dumps(value)) == value  # plain JSON
        assert valid(value, schema), (seed, value)


def test_instance_for_schema_is_deterministic_by_seed_and_varies_across_seeds() -> None:
    for schema in (PERSON, PYDANTIC):
        a = [instance_for_schema(schema, random.Random(s)) for s in range(10)]
        b = [instance_for_schema(schema, random.Random(s)) for s in range(10)]
        assert a == b
        assert len({json.dumps(v) for v in a}) > 5
    # Properties come out in schema order (as a constrained model writes them).
    assert list(instance_for_schema(PERSON, random.Random(0))) == ["name", "age", "ok", "color"]


@pytest.mark.parametrize(
    ("schema", "words"),
    [
        ({"type": "string", "pattern": "a+"}, "'pattern'"),
        ({"not": {"type": "null"}}, "'not'"),
        ({"allOf": [{}, {}]}, "allOf"),
        ({"type": "object", "anyOf": [{"required": ["a"]}]}, "anyOf next to type"),
        ({"type": "object", "required": ["a"], "additionalProperties": False}, "'a'"),
        ({"type": "integer", "minimum": 5, "maximum": 4}, "no integer"),
        ({"type": "integer", "minimum": 1.2, "maximum": 1.8}, "no integer"),
        ({"type": "number", "exclusiveMinimum": 1, "maximum": 1}, "no number"),
        ({"type": "string", "minLength": 5, "maxLength": 4}, "minLength"),
        ({"type": "array", "minItems": -1}, "minItems"),
        ({"type": "array", "items": [{}]}, "tuple"),
        ({"$ref": "#/$defs/missing"}, "points nowhere"),
        ({"$ref": "https://example.com/s.json"}, "local"),
        ({"$ref": "#"}, "cycle"),
        ({"type": "object", "properties": {"n": {"$ref": "#"}}, "required": ["n"]}, "deeply"),
        ({"type": "wat"}, "unknown type"),
        ({"enum": []}, "enum"),
        ({"type": "object", "properties": {"p": {"type": "string", "minLength": 9,
                                                 "uniqueItems": True}}}, "#/properties/p"),
        (False, "false"),
        ([1, 2], "must be an object"),
    ],
)
def test_instance_for_schema_rejects_what_it_cannot_satisfy(schema: Any, words: str) -> None:
    with pytest.raises(DynamoError) as info:
        instance_for_schema(schema, random.Random(0))
    assert info.value.kind == BackendError.InvalidArgument
    assert words in str(info.value), str(info.value)


def test_guided_text_kinds() -> None:
    rng = random.Random(1)
    assert guided_text(GuidedDecodingOptions(choice=["x", "y"]), rng) in ("x", "y")
    text = guided_text(GuidedDecodingOptions(json=json.dumps(PERSON)), rng)
    assert text is not None and " " not in text.replace('"', "") and valid(json.loads(text), PERSON)
    assert guided_text(GuidedDecodingOptions(backend="xgrammar"), rng) is None
    for bad in (
        GuidedDecodingOptions(regex="a+"),
        GuidedDecodingOptions(grammar="start: 'a'"),
        GuidedDecodingOptions(json={"type": "null"}, choice=["a"]),
        GuidedDecodingOptions(structural_tag={"type": "tag"}),
        GuidedDecodingOptions(choice=[]),
        GuidedDecodingOptions(json="{not json"),
        GuidedDecodingOptions(json=3),
    ):
        with pytest.raises(DynamoError) as info:
            guided_text(bad, rng)
        assert info.value.kind == BackendError.InvalidArgument


def test_scripted_sequences_survive_preemption() -> None:
    # 6 blocks of 4 tokens: two sequences growing to 6 + 16 tokens cannot both fit.
    kv = KvManager(6, 4)
    sched = Scheduler(kv, SchedulerConfig(), check_invariants=True)
    scripts = [list(range(100 + 20 * i, 116 + 20 * i)) for i in range(2)]
    seqs = [
        ScriptedSequence(f"r{i}", [i + 1] * 6, StopRules(max_tokens=99, max_len=24),
                         block_size=4, seed=i, vocab_size=1000, script=scripts[i])
        for i in range(2)
    ]
    for s in seqs:
        sched.add(s)
    while sched.has_work():
        sched.step()
    assert sched.num_preemptions > 0
    for seq, script in zip(seqs, scripts, strict=True):
        assert seq.outbox == script and seq.finish_reason == FinishReason.EOS
    assert kv.stats().used_blocks == 0


# -- the engine end to end ---------------------------------------------------------------------
@pytest.fixture
async def engine() -> AsyncIterator[MockerEngine]:
    e = MockerEngine(**FAST, model_path=str(tiny_model_dir()))
    config = await e.start(1)
    assert config.runtime_data == {GUIDED_DECODING_KEY: ["json", "choice"]}
    yield e
    await e.cleanup()


def _tokenizer() -> Tokenizer:
    return Tokenizer.from_file(str(tiny_model_dir() / "tokenizer.json"))


def guided_req(
    guided: GuidedDecodingOptions, max_tokens: int | None = 512, seed: int | None = 5
) -> PreprocessedRequest:
    return PreprocessedRequest(
        token_ids=list(range(10, 30)),
        eos_token_ids=[1],
        stop_conditions=StopConditions(max_tokens=max_tokens),
        sampling_options=SamplingOptions(seed=seed, guided_decoding=guided),
    )


async def run(
    engine: MockerEngine, request: PreprocessedRequest
) -> tuple[list[int], list[LLMEngineOutput]]:
    chunks = [c async for c in engine.generate(request, mock_context())]
    assert all(c.finish_reason is None for c in chunks[:-1])
    return [t for c in chunks for t in c.token_ids], chunks


async def test_mocker_json_schema_output_decodes_to_a_valid_instance(
    engine: MockerEngine,
) -> None:
    tok = _tokenizer()
    for schema in (PERSON, PYDANTIC, {"type": "object"}):
        tokens, chunks = await run(engine, guided_req(GuidedDecodingOptions(json=schema)))
        assert valid(json.loads(tok.decode(tokens)), schema)
        terminal = chunks[-1]
        assert terminal.finish_reason == FinishReason.EOS
        assert terminal.completion_usage is not None
        assert terminal.completion_usage.completion_tokens == len(tokens)
        assert len(chunks) > 2  # streamed a token per step, not all at once
        assert engine.kv_stats().used_blocks == 0
    # The same seed gives the same instance; another seed (almost surely) another.
    again, _ = await run(engine, guided_req(GuidedDecodingOptions(json=PERSON)))
    first, _ = await run(engine, guided_req(GuidedDecodingOptions(json=PERSON)))
    other, _ = await run(engine, guided_req(GuidedDecodingOptions(json=PERSON), seed=6))
    assert again == first != other


async def test_mocker_guided_runs_at_the_normal_pace_through_the_scheduler() -> None:
    e = MockerEngine(speedup_ratio=1000.0, model_path=str(tiny_model_dir()))
    await e.start(1)
    try:
        tokens, _ = await run(e, guided_req(GuidedDecodingOptions(json=PERSON)))
        # One prefill step (which samples the first token), then one decode step per token.
        steps = e.step_stats()
        assert len(steps) == len(tokens)
        assert steps[0].prefill_tokens == 20 and all(s.decode_seqs == 1 for s in steps[1:])
        assert e.scheduler().sim_time_s > 0.012 * (len(tokens) - 1)
    finally:
        await e.cleanup()


async def test_mocker_choice_and_max_tokens_cut(engine: MockerEngine) -> None:
    tok = _tokenizer()
    choices = ["positive", "negative", "neutral"]
    seen = set()
    for seed in range(12):
        tokens, chunks = await run(
            engine, guided_req(GuidedDecodingOptions(choice=choices), seed=seed)
        )
        assert tok.decode(tokens) in choices and chunks[-1].finish_reason == FinishReason.EOS
        seen.add(tok.decode(tokens))
    assert len(seen) > 1
    whole, _ = await run(engine, guided_req(GuidedDecodingOptions(json=PERSON)))
    cut, chunks = await run(engine, guided_req(GuidedDecodingOptions(json=PERSON), max_tokens=4))
    assert cut == whole[:4] and chunks[-1].finish_reason == FinishReason.LENGTH
    # A max_tokens equal to the instance's length: it is whole, so eos.
    exact, chunks = await run(
        engine, guided_req(GuidedDecodingOptions(json=PERSON), max_tokens=len(whole))
    )
    assert exact == whole and chunks[-1].finish_reason == FinishReason.EOS
    # The empty choice: no token, eos.
    tokens, chunks = await run(engine, guided_req(GuidedDecodingOptions(choice=[""])))
    assert tokens == [] and chunks[-1].finish_reason == FinishReason.EOS


async def test_mocker_guided_errors_are_invalid_argument_before_any_token(
    engine: MockerEngine,
) -> None:
    for bad in (
        GuidedDecodingOptions(regex="[a-z]+"),
        GuidedDecodingOptions(grammar="root ::= 'a'"),
        GuidedDecodingOptions(json={"type": "string", "pattern": "x"}),
    ):
        stream = engine.generate(guided_req(bad), mock_context())
        with pytest.raises(DynamoError) as info:
            await stream.__anext__()
        assert info.value.kind == BackendError.InvalidArgument
    assert engine.num_active_requests() == 0


async def test_mocker_without_a_tokenizer_advertises_nothing_and_refuses(tmp_path: Path) -> None:
    for path, why in ((None, "--model-path"), (str(tmp_path), "no tokenizer.json")):
        e = MockerEngine(**FAST, model_path=path)
        config = await e.start(1)
        try:
            assert GUIDED_DECODING_KEY not in config.runtime_data
            with pytest.raises(DynamoError) as info:
                await run(e, guided_req(GuidedDecodingOptions(json=PERSON)))
            assert info.value.kind == BackendError.InvalidArgument
            assert why in str(info.value), str(info.value)
            # Unguided requests are served as always.
            tokens, _ = await run(e, guided_req(GuidedDecodingOptions(), max_tokens=3))
            assert len(tokens) == 3
        finally:
            await e.cleanup()


async def test_unguided_output_is_unchanged_by_the_tokenizer(engine: MockerEngine) -> None:
    plain = MockerEngine(**FAST)
    await plain.start(1)
    try:
        request = guided_req(GuidedDecodingOptions(), max_tokens=16)
        request.sampling_options.guided_decoding = None
        a, _ = await run(engine, request)
        b, _ = await run(plain, request)
        assert a == b and len(a) == 16
    finally:
        await plain.cleanup()


def test_model_path_defaults_to_dyn_model_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DYN_MODEL_PATH", "/models/x")
    assert MockerArgs.from_args([]).model_path == "/models/x"
    assert MockerArgs.from_args(["--model-path", "/m"]).model_path == "/m"
    monkeypatch.delenv("DYN_MODEL_PATH")
    assert MockerArgs.from_args([]).model_path is None


def test_valid_checker_rejects_bad_values() -> None:
    # The hand-written validator must be able to say no, or the table above proves nothing.
    assert not valid({"name": "x"}, PERSON)
    assert not valid({**instance_for_schema(PERSON, random.Random(0)), "extra": 1}, PERSON)
    assert not valid(7, {"type": "integer", "maximum": 5})
    assert not valid("abcde", {"type": "string", "maxLength": 4})
    assert not valid([1], {"type": "array", "items": {"type": "string"}})
    assert not valid(0, {"type": "number", "exclusiveMinimum": 0})
    assert not valid({"id": 1}, PYDANTIC)
    assert isinstance(PYDANTIC["$defs"], Mapping)
