"""The OpenAI surface users of vLLM expect, driven by the official ``openai`` client against the
real HTTP frontend (uvicorn on 127.0.0.1) and in-process workers: unsupported fields refused by
name, tool calls (unary and streamed), reasoning, structured output and its capability check,
``/tokenize`` / ``/detokenize`` / ``/v1/models/{id}``, and request timeouts."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import openai
import pytest
from tokenizers import Tokenizer

from dynamo_backend_common import (
    GUIDED_DECODING_KEY,
    EngineConfig,
    FinishReason,
    GenerateContext,
    LLMEngine,
    LLMEngineOutput,
    PreprocessedRequest,
    usage,
)
from dynamo_backend_common.fixtures import tiny_model_dir
from dynamo_backend_common.frontend.request_fields import CHAT_FIELDS, COMPLETION_FIELDS
from dynamo_backend_common.runtime.context import Context
from tests.test_frontend_http import Stack

MODEL_DIR = str(tiny_model_dir())
TOKENIZER = Tokenizer.from_file(str(tiny_model_dir() / "tokenizer.json"))


class ScriptEngine(LLMEngine):
    """Replies with :attr:`reply` (tokenized, two tokens per chunk), then ``eos``; keeps the last
    request. ``guided`` is what it declares in ``runtime_data``."""

    def __init__(self, guided: list[str] | None = None) -> None:
        self.reply = "Hello there."
        self.guided = guided
        self.requests: list[PreprocessedRequest] = []

    async def start(self, worker_id: int) -> EngineConfig:
        data = {GUIDED_DECODING_KEY: self.guided} if self.guided is not None else {}
        return EngineConfig(model="script", context_length=2048, runtime_data=data)

    async def generate(
        self, request: PreprocessedRequest, ctx: GenerateContext
    ) -> AsyncIterator[LLMEngineOutput]:
        self.requests.append(request)
        ids = TOKENIZER.encode(self.reply, add_special_tokens=False).ids
        for i in range(0, len(ids), 2):
            yield LLMEngineOutput(token_ids=ids[i:i + 2])
        yield LLMEngineOutput(token_ids=[], finish_reason=FinishReason.EOS,
                              completion_usage=usage(len(request.token_ids), len(ids)))

    async def cleanup(self) -> None:
        pass


class HangEngine(LLMEngine):
    """Sends one token, then hangs until stopped; counts aborts."""

    def __init__(self) -> None:
        self.aborted = asyncio.Event()
        self.stopped = asyncio.Event()

    async def start(self, worker_id: int) -> EngineConfig:
        return EngineConfig(model="hang", context_length=2048)

    async def generate(
        self, request: PreprocessedRequest, ctx: GenerateContext
    ) -> AsyncIterator[LLMEngineOutput]:
        if request.stop_conditions.max_tokens != 1:
            yield LLMEngineOutput(token_ids=[300])
        await ctx.stopped()
        self.stopped.set()
        yield LLMEngineOutput.cancelled()

    async def abort(self, ctx: Context) -> None:
        self.aborted.set()

    async def cleanup(self) -> None:
        pass


TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}]
MESSAGES: Any = [{"role": "user", "content": "Weather in Paris?"}]


def client(stack: Stack) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=stack.url + "/v1", api_key="x", max_retries=0)


async def post(stack: Stack, path: str, body: dict[str, Any]) -> httpx.Response:
    async with httpx.AsyncClient(base_url=stack.url, timeout=10) as h:
        return await h.post(path, json=body)


def chat_body(**extra: Any) -> dict[str, Any]:
    return {"model": "script", "messages": MESSAGES, "max_tokens": 32, **extra}


# ---------------------------------------------------------------- field policy


REFUSED = [
    # (route, field, value, param, code): one per field this server refuses.
    ("chat", "logit_bias", {"50256": -100}, None, None),
    ("chat", "metadata", {"k": "v"}, None, None),
    ("chat", "store", True, None, None),
    ("chat", "service_tier", "flex", None, None),
    ("chat", "functions", [{"name": "f"}], None, None),
    ("chat", "function_call", "auto", None, None),
    ("chat", "audio", {"voice": "alloy", "format": "wav"}, None, None),
    ("chat", "modalities", ["text", "audio"], None, None),
    ("chat", "prediction", {"type": "content", "content": "x"}, None, None),
    ("chat", "web_search_options", {"search_context_size": "low"}, None, None),
    ("chat", "verbosity", "low", None, None),
    ("chat", "stream_options", {"continuous_usage_stats": True},
     "stream_options.continuous_usage_stats", None),
    ("chat", "structured_outputs", {"xml": "x"}, "structured_outputs.xml", None),
    ("chat", "frobnicate", 1, None, "unknown_parameter"),
    ("completions", "suffix", "x", None, "unsupported_value"),
    ("completions", "best_of", 3, None, "unsupported_value"),
    ("completions", "logit_bias", {"1": 1}, None, None),
    ("completions", "metadata", {"k": "v"}, None, None),
    ("completions", "bogus", 1, None, "unknown_parameter"),
]


@pytest.mark.parametrize(("route", "field", "value", "param", "code"), REFUSED,
                         ids=[f"{r[0]}-{r[1]}" for r in REFUSED])
async def test_a_refused_field_is_a_400_naming_it(route: str, field: str, value: Any,
                                                  param: str | None, code: str | None) -> None:
    async with Stack() as stack:
        await stack.add_worker(ScriptEngine(), "script", MODEL_DIR)
        if route == "chat":
            body = chat_body(**{field: value}, stream=field == "stream_options")
            r = await post(stack, "/v1/chat/completions", body)
        else:
            r = await post(stack, "/v1/completions",
                           {"model": "script", "prompt": "hi", "max_tokens": 4, field: value})
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert err["param"] == (param or field), err
        assert err["code"] == (code or "unsupported_parameter"), err
        assert (param or field).split(".")[0] in err["message"]


async def test_bad_combinations_and_no_op_values() -> None:
    async with Stack() as stack:
        await stack.add_worker(ScriptEngine(), "script", MODEL_DIR)
        cases = [
            (chat_body(stream_options={"include_usage": True}), "stream_options"),
            (chat_body(guided_json={"type": "object"}, guided_regex="a+"), "guided_regex"),
            (chat_body(response_format={"type": "json_schema", "json_schema": {"name": "x"}}),
             "response_format.json_schema"),
            (chat_body(guided_choice=[]), "guided_choice"),
            (chat_body(tool_choice="required"), "tool_choice"),
            (chat_body(tools=[{"type": "function", "function": {}}]), "tools[0]"),
        ]
        for body, param in cases:
            r = await post(stack, "/v1/chat/completions", body)
            assert r.status_code == 400 and r.json()["error"]["param"] == param, (param, r.text)
        # No-op values of refused fields pass.
        r = await post(stack, "/v1/chat/completions", chat_body(
            logit_bias={}, store=False, service_tier="auto", modalities=["text"], user="u1",
            metadata={}, safety_identifier="s", prompt_cache_key="k"))
        assert r.status_code == 200, r.text


async def test_unsupported_fields_ignore_relaxes_the_policy() -> None:
    async with Stack(unsupported_fields="ignore") as stack:
        engine = ScriptEngine()
        await stack.add_worker(engine, "script", MODEL_DIR)
        r = await post(stack, "/v1/chat/completions", chat_body(
            frobnicate=1, logit_bias={"5": 1.0}, store=True,
            response_format={"type": "json_object"}))
        assert r.status_code == 200, r.text
        # The undeclared constraint still reaches the engine: it may honour it.
        assert engine.requests[-1].sampling_options.guided_decoding is not None


def test_field_tables_cover_the_request_structs() -> None:
    from dynamo_backend_common.frontend.openai_types import (
        ChatCompletionRequest,
        CompletionRequest,
    )

    assert set(CHAT_FIELDS) == set(ChatCompletionRequest.__struct_fields__)
    assert set(COMPLETION_FIELDS) == set(CompletionRequest.__struct_fields__)


def test_docs_list_every_request_field_with_its_status() -> None:
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[1] / "docs" / "frontend.md").read_text()
    for table in (CHAT_FIELDS, COMPLETION_FIELDS):
        for name, (status, _note) in table.items():
            assert f"| `{name}` | {status} |" in doc, name


async def test_supported_fields_reach_the_engine() -> None:
    async with Stack() as stack:
        engine = ScriptEngine()
        await stack.add_worker(engine, "script", MODEL_DIR)
        oa = client(stack)
        await oa.chat.completions.create(
            model="script", messages=MESSAGES, max_completion_tokens=7, seed=11,
            presence_penalty=0.5, frequency_penalty=-0.5, user="alice", temperature=0.3)
        so = engine.requests[-1].sampling_options
        assert (so.seed, so.presence_penalty, so.frequency_penalty, so.temperature) == (
            11, 0.5, -0.5, 0.3)
        assert engine.requests[-1].stop_conditions.max_tokens == 7


# ---------------------------------------------------------------- tool calls


HERMES = ('Let me check. <tool_call>\n{"name": "get_weather", "arguments": {"city": '
          '"Paris"}}\n</tool_call>')


async def test_tools_without_a_parser_are_refused() -> None:
    async with Stack(tool_call_parser="auto") as stack:  # the tiny ChatML template: none found
        await stack.add_worker(ScriptEngine(), "script", MODEL_DIR)
        with pytest.raises(openai.BadRequestError) as ei:
            await client(stack).chat.completions.create(model="script", messages=MESSAGES,
                                                        tools=TOOLS)
        assert "tool-call parser" in str(ei.value)
        # tool_choice "none": the output is content, no parser needed.
        r = await client(stack).chat.completions.create(
            model="script", messages=MESSAGES, tools=TOOLS, tool_choice="none")
        assert r.choices[0].message.content == "Hello there."


async def test_hermes_tool_calls_unary_and_streamed() -> None:
    async with Stack(tool_call_parser="hermes") as stack:
        engine = ScriptEngine()
        engine.reply = HERMES
        await stack.add_worker(engine, "script", MODEL_DIR)
        oa = client(stack)
        r = await oa.chat.completions.create(model="script", messages=MESSAGES, tools=TOOLS)
        choice = r.choices[0]
        assert choice.finish_reason == "tool_calls"
        assert choice.message.content == "Let me check. "
        calls = choice.message.tool_calls
        assert calls is not None and len(calls) == 1
        assert calls[0].type == "function" and calls[0].id.startswith("call_")
        assert calls[0].function.name == "get_weather"
        assert json.loads(calls[0].function.arguments) == {"city": "Paris"}
        # The template saw the tools.
        prompt = TOKENIZER.decode(engine.requests[-1].token_ids)
        assert "Weather in Paris?" in prompt

        content, args, names, finish = "", {}, {}, None
        stream = await oa.chat.completions.create(model="script", messages=MESSAGES,
                                                  tools=TOOLS, stream=True)
        async for chunk in stream:
            for c in chunk.choices:
                content += c.delta.content or ""
                for tc in c.delta.tool_calls or []:
                    args[tc.index] = args.get(tc.index, "") + (tc.function.arguments or "")
                    if tc.function.name:
                        names[tc.index] = tc.function.name
                finish = c.finish_reason or finish
        assert (content, names, finish) == ("Let me check. ", {0: "get_weather"}, "tool_calls")
        assert json.loads(args[0]) == {"city": "Paris"}


async def test_the_worker_card_names_the_parsers() -> None:
    # The tiny ChatML template has no tool-call syntax to detect: only the card says hermes.
    async with Stack() as stack:
        engine = ScriptEngine()
        engine.reply = "Hmm.</think>" + HERMES
        await stack.add_worker(engine, "script", MODEL_DIR, tool_call_parser="hermes",
                               reasoning_parser="deepseek_r1")
        card = stack.frontend.models.models["script"].card.runtime_config
        assert (card.tool_call_parser, card.reasoning_parser) == ("hermes", "deepseek_r1")
        r = await client(stack).chat.completions.create(model="script", messages=MESSAGES,
                                                        tools=TOOLS)
        msg = r.choices[0].message
        assert [c.function.name for c in msg.tool_calls or []] == ["get_weather"]
        assert getattr(msg, "reasoning_content", None) == "Hmm."


async def test_mistral_tool_calls_keep_special_tokens_in_the_text() -> None:
    async with Stack(tool_call_parser="mistral") as stack:
        engine = ScriptEngine()
        engine.reply = '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Bern"}}]'
        await stack.add_worker(engine, "script", MODEL_DIR)
        r = await client(stack).chat.completions.create(model="script", messages=MESSAGES,
                                                        tools=TOOLS)
        calls = r.choices[0].message.tool_calls or []
        assert [json.loads(c.function.arguments) for c in calls] == [{"city": "Bern"}]
        # [TOOL_CALLS] is a special token in Mistral's vocabulary: it must reach the parser.
        assert engine.requests[-1].output_options.skip_special_tokens is False


async def test_parallel_tool_calls_false_keeps_the_first_call() -> None:
    async with Stack(tool_call_parser="hermes") as stack:
        engine = ScriptEngine()
        engine.reply = HERMES + HERMES.replace("Paris", "Rome").replace("Let me check. ", "")
        await stack.add_worker(engine, "script", MODEL_DIR)
        oa = client(stack)
        r = await oa.chat.completions.create(model="script", messages=MESSAGES, tools=TOOLS)
        assert [json.loads(c.function.arguments)["city"]
                for c in r.choices[0].message.tool_calls or []] == ["Paris", "Rome"]
        r = await oa.chat.completions.create(model="script", messages=MESSAGES, tools=TOOLS,
                                             parallel_tool_calls=False)
        assert len(r.choices[0].message.tool_calls or []) == 1


async def test_named_and_required_tool_choice_constrain_the_output() -> None:
    async with Stack() as stack:
        engine = ScriptEngine(guided=["json"])
        await stack.add_worker(engine, "script", MODEL_DIR)
        oa = client(stack)
        engine.reply = '{"city": "Oslo"}'
        r = await oa.chat.completions.create(
            model="script", messages=MESSAGES, tools=TOOLS,
            tool_choice={"type": "function", "function": {"name": "get_weather"}})
        assert engine.requests[-1].sampling_options.guided_decoding is not None
        assert engine.requests[-1].sampling_options.guided_decoding.json == (
            TOOLS[0]["function"]["parameters"])
        calls = r.choices[0].message.tool_calls or []
        assert [(c.function.name, json.loads(c.function.arguments)) for c in calls] == [
            ("get_weather", {"city": "Oslo"})]
        engine.reply = '[{"name": "get_weather", "parameters": {"city": "Lima"}}]'
        r = await oa.chat.completions.create(model="script", messages=MESSAGES, tools=TOOLS,
                                             tool_choice="required")
        schema = engine.requests[-1].sampling_options.guided_decoding
        assert schema is not None and schema.json["type"] == "array"
        calls = r.choices[0].message.tool_calls or []
        assert [json.loads(c.function.arguments) for c in calls] == [{"city": "Lima"}]
        assert r.choices[0].finish_reason == "tool_calls"
        with pytest.raises(openai.BadRequestError) as ei:
            await oa.chat.completions.create(
                model="script", messages=MESSAGES, tools=TOOLS,
                tool_choice={"type": "function", "function": {"name": "nope"}})
        assert "nope" in str(ei.value)


async def test_guided_tool_choice_needs_an_engine_that_declares_json() -> None:
    async with Stack() as stack:
        await stack.add_worker(ScriptEngine(), "script", MODEL_DIR)
        r = await post(stack, "/v1/chat/completions",
                       chat_body(tools=TOOLS, tool_choice="required"))
        assert r.status_code == 400 and r.json()["error"]["param"] == "tool_choice"


# ---------------------------------------------------------------- reasoning


async def test_reasoning_content_unary_and_streamed() -> None:
    async with Stack(reasoning_parser="deepseek_r1") as stack:
        engine = ScriptEngine()
        engine.reply = "Two and two.</think>It is 4."
        await stack.add_worker(engine, "script", MODEL_DIR)
        oa = client(stack)
        r = await oa.chat.completions.create(model="script", messages=MESSAGES)
        msg = r.choices[0].message
        assert msg.content == "It is 4."
        assert getattr(msg, "reasoning_content", None) == "Two and two."
        reasoning = content = ""
        stream = await oa.chat.completions.create(model="script", messages=MESSAGES,
                                                  stream=True)
        async for chunk in stream:
            for c in chunk.choices:
                content += c.delta.content or ""
                reasoning += getattr(c.delta, "reasoning_content", None) or ""
        assert (reasoning, content) == ("Two and two.", "It is 4.")


async def test_reasoning_then_tool_call() -> None:
    async with Stack(reasoning_parser="deepseek_r1", tool_call_parser="hermes") as stack:
        engine = ScriptEngine()
        engine.reply = "I should call it.</think>" + HERMES
        await stack.add_worker(engine, "script", MODEL_DIR)
        r = await client(stack).chat.completions.create(model="script", messages=MESSAGES,
                                                        tools=TOOLS)
        msg = r.choices[0].message
        assert getattr(msg, "reasoning_content", None) == "I should call it."
        assert [c.function.name for c in msg.tool_calls or []] == ["get_weather"]


# ---------------------------------------------------------------- structured output


SCHEMA = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}


async def test_json_schema_reaches_the_engine_that_declares_it() -> None:
    async with Stack() as stack:
        engine = ScriptEngine(guided=["json", "choice"])
        engine.reply = '{"ok": true}'
        await stack.add_worker(engine, "script", MODEL_DIR)
        oa = client(stack)
        r = await oa.chat.completions.create(
            model="script", messages=MESSAGES,
            response_format={"type": "json_schema",
                             "json_schema": {"name": "answer", "schema": SCHEMA}})
        assert json.loads(r.choices[0].message.content or "") == {"ok": True}
        g = engine.requests[-1].sampling_options.guided_decoding
        assert g is not None and g.json == SCHEMA
        await oa.chat.completions.create(model="script", messages=MESSAGES,
                                         response_format={"type": "json_object"})
        g = engine.requests[-1].sampling_options.guided_decoding
        assert g is not None and g.json == {"type": "object"}
        await oa.completions.create(model="script", prompt="pick", max_tokens=4,
                                    extra_body={"guided_choice": ["yes", "no"]})
        g = engine.requests[-1].sampling_options.guided_decoding
        assert g is not None and g.choice == ["yes", "no"]
        # Declared json and choice, not regex.
        r2 = await post(stack, "/v1/chat/completions", chat_body(guided_regex="[a-z]+"))
        assert r2.status_code == 400 and r2.json()["error"]["param"] == "guided_regex"
        await oa.chat.completions.create(model="script", messages=MESSAGES,
                                         response_format={"type": "text"})
        assert engine.requests[-1].sampling_options.guided_decoding is None


async def test_json_schema_is_refused_when_the_engine_cannot_honour_it() -> None:
    async with Stack() as stack:
        await stack.add_worker(ScriptEngine(), "script", MODEL_DIR)
        with pytest.raises(openai.BadRequestError) as ei:
            await client(stack).chat.completions.create(
                model="script", messages=MESSAGES,
                response_format={"type": "json_schema",
                                 "json_schema": {"name": "a", "schema": SCHEMA}})
        body: Any = ei.value.body
        assert body["param"] == "response_format" and body["code"] == "unsupported_parameter"


# ---------------------------------------------------------------- utility routes


async def test_tokenize_detokenize_and_model_by_id() -> None:
    async with Stack() as stack:
        await stack.add_worker(ScriptEngine(), "script", MODEL_DIR)
        r = await post(stack, "/tokenize", {"model": "script", "prompt": "Hello world",
                                            "return_token_strs": True})
        assert r.status_code == 200, r.text
        body = r.json()
        ids = TOKENIZER.encode("Hello world", add_special_tokens=True).ids
        assert body["tokens"] == ids and body["count"] == len(ids)
        assert body["max_model_len"] == 2048 and len(body["token_strs"]) == len(ids)
        r = await post(stack, "/tokenize", {"messages": MESSAGES})  # the only model
        chat_ids = r.json()["tokens"]
        assert "Weather in Paris?" in TOKENIZER.decode(chat_ids)
        r = await post(stack, "/detokenize", {"model": "script", "tokens": ids})
        assert r.json() == {"prompt": TOKENIZER.decode(ids, skip_special_tokens=False)}
        r = await post(stack, "/detokenize", {"model": "script", "tokens": [10**7]})
        assert r.status_code == 400 and r.json()["error"]["param"] == "tokens"
        r = await post(stack, "/tokenize", {"model": "nope", "prompt": "x"})
        assert r.status_code == 404
        r = await post(stack, "/tokenize", {"model": "script"})
        assert r.status_code == 400
        m = await client(stack).models.retrieve("script")
        assert m.id == "script"
        with pytest.raises(openai.NotFoundError):
            await client(stack).models.retrieve("nope")


# ---------------------------------------------------------------- timeouts


async def test_a_hung_engine_gets_a_504_and_is_stopped() -> None:
    async with Stack(request_timeout=30) as stack:
        engine = HangEngine()
        await stack.add_worker(engine, "hang", MODEL_DIR)
        r = await post(stack, "/v1/completions",
                       {"model": "hang", "prompt": "hi", "max_tokens": 1, "timeout": 0.3})
        assert r.status_code == 504, r.text
        assert r.json()["error"]["code"] == "ResponseTimeout"
        await asyncio.wait_for(engine.stopped.wait(), 5)
        await asyncio.wait_for(engine.aborted.wait(), 5)


async def test_a_stream_that_hangs_ends_with_a_timeout_error_event() -> None:
    async with Stack(request_timeout=0.3) as stack:
        engine = HangEngine()
        await stack.add_worker(engine, "hang", MODEL_DIR)
        async with httpx.AsyncClient(base_url=stack.url, timeout=10) as h:
            async with h.stream("POST", "/v1/completions", json={
                    "model": "hang", "prompt": "hi", "max_tokens": 5, "stream": True}) as r:
                assert r.status_code == 200
                events = [line async for line in r.aiter_lines() if line.startswith("data:")]
        assert events[-1] == "data: [DONE]"
        assert json.loads(events[-2][5:])["error"]["code"] == "ResponseTimeout"
        assert json.loads(events[0][5:])["choices"][0]["text"]  # the token before the hang
        await asyncio.wait_for(engine.aborted.wait(), 5)


async def test_logprobs_are_null_when_the_engine_sends_none() -> None:
    async with Stack() as stack:
        await stack.add_worker(ScriptEngine(), "script", MODEL_DIR)
        oa = client(stack)
        r = await oa.chat.completions.create(model="script", messages=MESSAGES, logprobs=True)
        assert r.choices[0].message.content == "Hello there." and r.choices[0].logprobs is None
        c = await oa.completions.create(model="script", prompt="hi", logprobs=1, max_tokens=8)
        assert c.choices[0].text == "Hello there." and c.choices[0].logprobs is None


PERSON = {"type": "object", "additionalProperties": False, "required": ["name", "age", "tags"],
          "properties": {"name": {"type": "string", "maxLength": 12},
                         "age": {"type": "integer", "minimum": 0, "maximum": 120},
                         "tags": {"type": "array", "items": {"enum": ["a", "b"]},
                                  "maxItems": 3}}}


def _is_person(obj: Any) -> bool:
    return (isinstance(obj, dict) and set(obj) == {"name", "age", "tags"}
            and isinstance(obj["name"], str) and len(obj["name"]) <= 12
            and isinstance(obj["age"], int) and 0 <= obj["age"] <= 120
            and isinstance(obj["tags"], list) and len(obj["tags"]) <= 3
            and all(t in ("a", "b") for t in obj["tags"]))


async def test_the_mocker_answers_json_schema_through_the_frontend() -> None:
    from dynamo_backend_common.engines.mocker import MockerEngine

    async with Stack() as stack:
        await stack.add_worker(MockerEngine(speedup_ratio=0, model_path=MODEL_DIR), "mock",
                               MODEL_DIR)
        oa = client(stack)
        fmt: Any = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}
        r = await oa.chat.completions.create(model="mock", messages=MESSAGES, seed=3,
                                             max_tokens=200, response_format=fmt)
        unary = r.choices[0].message.content or ""
        assert _is_person(json.loads(unary)) and r.choices[0].finish_reason == "stop"
        stream = await oa.chat.completions.create(model="mock", messages=MESSAGES, seed=3,
                                                  max_tokens=200, response_format=fmt,
                                                  stream=True)
        streamed = "".join([c.choices[0].delta.content or "" async for c in stream
                            if c.choices])
        assert streamed == unary
        # A choice constraint through the completions route.
        c = await oa.completions.create(model="mock", prompt="pick", max_tokens=20,
                                        extra_body={"guided_choice": ["left", "right"]})
        assert c.choices[0].text in ("left", "right")


async def test_an_edited_chat_template_reaches_a_running_frontend(tmp_path: Any) -> None:
    """A worker restarted on an edited chat_template.jinja registers a new card checksum, so the
    running frontend loads the new template instead of serving its cached one."""
    import shutil

    d = tmp_path / "model"
    shutil.copytree(tiny_model_dir(), d)
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    del cfg["chat_template"]  # it would win over chat_template.jinja, as in transformers
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    (d / "chat_template.jinja").write_text("FIRST {{ messages[0]['content'] }}")
    async with Stack() as stack:
        engine = ScriptEngine()
        worker = await stack.add_worker(engine, "tpl", str(d))
        oa = client(stack)
        await oa.chat.completions.create(model="tpl", messages=MESSAGES)
        assert TOKENIZER.decode(engine.requests[-1].token_ids).startswith("FIRST ")
        worker.request_shutdown("test")
        await asyncio.wait_for(stack.tasks[-1], 20)
        await stack.frontend.models.wait_for(lambda: "tpl" not in stack.frontend.models.models,
                                             timeout=10)
        (d / "chat_template.jinja").write_text("SECOND {{ messages[0]['content'] }}")
        engine2 = ScriptEngine()
        await stack.add_worker(engine2, "tpl", str(d))
        await oa.chat.completions.create(model="tpl", messages=MESSAGES)
        assert TOKENIZER.decode(engine2.requests[-1].token_ids).startswith("SECOND ")
