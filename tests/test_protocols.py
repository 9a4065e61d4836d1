"""Protocol types: Dynamo-shaped JSON in and out, msgpack round trips, strict decoding."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dynamo_backend_common import (
    CompletionUsage,
    FinishReason,
    LLMEngineOutput,
    PreprocessedRequest,
    ProtocolError,
)
from dynamo_backend_common.protocols import (
    U32_MAX,
    convert,
    from_json,
    from_msgpack,
    to_builtins,
    to_json,
    to_msgpack,
)

# A request as Dynamo's preprocessor serialises it (serde field names, "_HEALTH_CHECK" marker),
# plus a field from a newer peer that this version does not know.
DYNAMO_REQUEST = """
{
  "model": "Qwen/Qwen3-0.6B",
  "token_ids": [151644, 872, 198, 9707],
  "stop_conditions": {
    "max_tokens": 32, "stop": ["</s>"], "stop_token_ids_hidden": [151645],
    "min_tokens": 1, "ignore_eos": false
  },
  "sampling_options": {"n": 1, "temperature": 0.7, "top_p": 0.9, "seed": 42},
  "output_options": {"logprobs": 2, "skip_special_tokens": true},
  "eos_token_ids": [151645, 151643],
  "mdc_sum": "3f1c9a",
  "annotations": ["formatted_prompt"],
  "routing": {"dp_rank": 1, "backend_instance_id": 7},
  "estimated_prefix_hit_num_blocks": 3,
  "prefill_result": null,
  "bootstrap_info": {"bootstrap_host": "10.0.0.5", "bootstrap_port": 8998,
                     "bootstrap_room": 1234567890123},
  "extra_args": {"conversation_id": "c-1"},
  "_HEALTH_CHECK": true,
  "a_field_from_the_future": {"nested": [1, 2, 3]}
}
"""

# Response chunks as Dynamo writes them.
DYNAMO_CHUNKS = {
    "token": '{"token_ids": [9707], "index": 0}',
    "eos": '{"token_ids": [], "finish_reason": "eos", "completion_usage": '
    '{"prompt_tokens": 4, "completion_tokens": 7, "total_tokens": 11}}',
    "error_object": '{"token_ids": [], "finish_reason": {"error": "CUDA out of memory"}}',
    "error_flat": '{"token_ids": [], "finish_reason": "error: CUDA out of memory"}',
    "abort": '{"token_ids": [1], "finish_reason": "abort", "stop_reason": 151645}',
    "unknown_field": '{"token_ids": [5], "engine_data": {"x": 1}, "output_type": "text"}',
}


def test_dynamo_request_json_decodes_with_every_field() -> None:
    req = from_json(DYNAMO_REQUEST, PreprocessedRequest)
    assert req.model == "Qwen/Qwen3-0.6B"
    assert req.token_ids == [151644, 872, 198, 9707]
    assert req.stop_conditions.max_tokens == 32
    assert req.stop_conditions.stop_token_ids_hidden == [151645]
    assert req.stop_conditions.ignore_eos is False
    assert req.sampling_options.temperature == 0.7 and req.sampling_options.seed == 42
    assert req.output_options.logprobs == 2
    assert req.eos_token_ids == [151645, 151643]
    assert req.routing is not None and req.routing.dp_rank == 1
    assert req.bootstrap_info is not None and req.bootstrap_info.bootstrap_port == 8998
    assert req.extra_args == {"conversation_id": "c-1"}
    assert req.health_check is True
    assert req.prefill_result is None


def test_request_json_round_trip_keeps_dynamo_names_and_omits_defaults() -> None:
    req = from_json(DYNAMO_REQUEST, PreprocessedRequest)
    doc = json.loads(to_json(req))
    assert doc["_HEALTH_CHECK"] is True and "health_check" not in doc
    assert "a_field_from_the_future" not in doc  # unknown fields are dropped, not kept
    assert "prefill_result" not in doc  # None/defaults are omitted like serde's skip_if
    assert from_json(to_json(req), PreprocessedRequest) == req
    minimal = json.loads(to_json(PreprocessedRequest(token_ids=[1])))
    assert "_HEALTH_CHECK" not in minimal and minimal["token_ids"] == [1]


def test_request_msgpack_round_trip() -> None:
    req = from_json(DYNAMO_REQUEST, PreprocessedRequest)
    assert from_msgpack(to_msgpack(req), PreprocessedRequest) == req


def test_dynamo_chunks_decode() -> None:
    def load(name: str) -> LLMEngineOutput:
        return from_json(DYNAMO_CHUNKS[name], LLMEngineOutput)

    token = load("token")
    assert token.token_ids == [9707] and token.index == 0 and not token.is_terminal
    eos = load("eos")
    assert eos.finish_reason == FinishReason.EOS and eos.is_terminal
    assert eos.completion_usage == CompletionUsage(
        prompt_tokens=4, completion_tokens=7, total_tokens=11
    )
    for name in ("error_object", "error_flat"):
        err = load(name).finish_reason
        assert err is not None and err.is_error and err.message == "CUDA out of memory"
    aborted = load("abort")
    assert aborted.finish_reason == FinishReason.CANCELLED and aborted.stop_reason == 151645
    assert load("unknown_field").token_ids == [5]


def test_chunk_json_is_dynamo_shaped() -> None:
    assert to_json(LLMEngineOutput.cancelled()) == b'{"token_ids":[],"finish_reason":"cancelled"}'
    assert json.loads(to_json(LLMEngineOutput.error("boom"))) == {
        "token_ids": [],
        "finish_reason": {"error": "boom"},
    }
    # token_ids is always present, even when empty; other defaults are omitted.
    assert json.loads(to_json(LLMEngineOutput(token_ids=[]))) == {"token_ids": []}
    assert to_builtins(LLMEngineOutput.length())["finish_reason"] == "length"


@pytest.mark.parametrize("name", sorted(DYNAMO_CHUNKS))
def test_chunk_msgpack_and_json_round_trip(name: str) -> None:
    out = from_json(DYNAMO_CHUNKS[name], LLMEngineOutput)
    assert from_msgpack(to_msgpack(out), LLMEngineOutput) == out
    assert from_json(to_json(out), LLMEngineOutput) == out


# -- strict decoding --------------------------------------------------------------------------
@pytest.mark.parametrize("data", [b"\xc1", b"\x93\x01", b"", b"not msgpack at all \xff"])
def test_msgpack_garbage_raises_protocol_error_naming_the_type(data: bytes) -> None:
    with pytest.raises(ProtocolError, match="PreprocessedRequest"):
        from_msgpack(data, PreprocessedRequest)


@pytest.mark.parametrize("data", ["{", "[]", "null", '{"token_ids": "abc"}', "{}"])
def test_json_garbage_or_wrong_shape_raises_protocol_error(data: str) -> None:
    with pytest.raises(ProtocolError, match=r"invalid PreprocessedRequest \(JSON\)"):
        from_json(data, PreprocessedRequest)


def test_protocol_error_says_which_field_is_wrong() -> None:
    with pytest.raises(ProtocolError) as info:
        from_json('{"token_ids": [1, 2], "stop_conditions": {"max_tokens": "ten"}}',
                  PreprocessedRequest)
    assert "max_tokens" in str(info.value)
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize("bad", [-1, U32_MAX + 1, 2**64 - 1])
def test_out_of_range_token_ids_are_rejected(bad: int) -> None:
    with pytest.raises(ProtocolError, match="token_ids"):
        from_json(json.dumps({"token_ids": [1, bad]}), PreprocessedRequest)
    with pytest.raises(ProtocolError):
        from_msgpack(to_msgpack({"token_ids": [bad]}), LLMEngineOutput)


def test_largest_token_id_is_accepted() -> None:
    assert from_json(f'{{"token_ids": [{U32_MAX}]}}', PreprocessedRequest).token_ids == [U32_MAX]


def test_unknown_finish_reason_is_rejected() -> None:
    with pytest.raises(ProtocolError, match="finish_reason"):
        from_json('{"token_ids": [], "finish_reason": "exploded"}', LLMEngineOutput)


def test_convert_validates_builtins() -> None:
    req = convert({"token_ids": [1, 2], "_HEALTH_CHECK": True}, PreprocessedRequest)
    assert req.health_check and req.token_ids == [1, 2]
    with pytest.raises(ProtocolError):
        convert({"token_ids": [-5]}, PreprocessedRequest)


def test_finish_reason_is_immutable_and_validated() -> None:
    with pytest.raises(AttributeError):
        FinishReason.STOP.kind = "length"
    with pytest.raises(ValueError, match="unknown finish_reason"):
        FinishReason("exploded")
    assert FinishReason("abort") == FinishReason.CANCELLED
    assert FinishReason.error("x") == FinishReason.error("x") != FinishReason.error("y")


# -- property ---------------------------------------------------------------------------------
token_ids = st.lists(st.integers(min_value=0, max_value=U32_MAX), max_size=8)
u32 = st.integers(min_value=0, max_value=U32_MAX)
finite = st.floats(allow_nan=False, allow_infinity=False)
finish_reasons = st.one_of(
    st.none(),
    st.sampled_from(
        [
            FinishReason.EOS,
            FinishReason.LENGTH,
            FinishReason.STOP,
            FinishReason.CANCELLED,
            FinishReason.CONTENT_FILTER,
        ]
    ),
    st.text(max_size=20).map(FinishReason.error),
)
usages = st.one_of(
    st.none(),
    st.builds(CompletionUsage, prompt_tokens=u32, completion_tokens=u32, total_tokens=u32),
)
outputs = st.builds(
    LLMEngineOutput,
    token_ids=token_ids,
    tokens=st.one_of(st.none(), st.lists(st.one_of(st.none(), st.text(max_size=5)), max_size=4)),
    text=st.one_of(st.none(), st.text(max_size=20)),
    cum_log_probs=st.one_of(st.none(), finite),
    log_probs=st.one_of(st.none(), st.lists(finite, max_size=4)),
    finish_reason=finish_reasons,
    stop_reason=st.one_of(st.none(), st.text(max_size=5), u32),
    index=st.one_of(st.none(), u32),
    completion_usage=usages,
)


@given(outputs)
def test_any_output_round_trips_through_msgpack_and_json(out: LLMEngineOutput) -> None:
    assert from_msgpack(to_msgpack(out), LLMEngineOutput) == out
    # Exact equality, floats included: msgspec writes the shortest round-tripping repr.
    assert from_json(to_json(out), LLMEngineOutput) == out
