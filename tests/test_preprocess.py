"""Chat templates, request decoding and the OpenAI -> PreprocessedRequest mapping."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers

from dynamo_backend_common.fixtures import tiny_model_dir
from dynamo_backend_common.frontend.openai_types import (
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    ContentPart,
    RequestError,
    StreamOptions,
    decode_request,
)
from dynamo_backend_common.frontend.preprocess import ChatTemplate, Preprocessor
from dynamo_backend_common.frontend.prompt_tokens import PieceEncoder
from dynamo_backend_common.model_dir import ModelDir

BOS = "<|begin_of_text|>"


@pytest.fixture(scope="module")
def md() -> ModelDir:
    return ModelDir.load(tiny_model_dir())


@pytest.fixture(scope="module")
def pre(md: ModelDir) -> Preprocessor:
    return Preprocessor(md)


def chat(*msgs: tuple[str, str], **kw: Any) -> ChatCompletionRequest:
    return ChatCompletionRequest(
        model="tiny", messages=[ChatMessage(role=r, content=c) for r, c in msgs], **kw
    )


SYS_USER = (("system", "You are helpful."), ("user", "Hi!"))
RENDERED = (
    f"{BOS}<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n"
)


# ------------------------------------------------------------------ ChatTemplate


def test_render_with_and_without_generation_prompt(pre: Preprocessor) -> None:
    t = pre.chat_template
    assert t is not None
    msgs = [{"role": r, "content": c} for r, c in SYS_USER]
    assert t.render(msgs) == RENDERED
    assert t.render(msgs, add_generation_prompt=True) == RENDERED + "<|im_start|>assistant\n"
    # The request path: add_generation_prompt defaults to true.
    assert pre.render_chat(chat(*SYS_USER)) == RENDERED + "<|im_start|>assistant\n"
    assert pre.render_chat(chat(*SYS_USER, add_generation_prompt=False)) == RENDERED


def test_content_parts_flattened_for_string_templates(pre: Preprocessor) -> None:
    assert pre.chat_template is not None and pre.chat_template.content_format == "string"
    req = ChatCompletionRequest(
        model="tiny",
        messages=[
            ChatMessage(
                role="user",
                content=[ContentPart(type="text", text="héllo"),
                         ContentPart(type="text", text="wörld")],
            )
        ],
    )
    assert pre.render_chat(req) == (
        f"{BOS}<|im_start|>user\nhéllo\nwörld<|im_end|>\n<|im_start|>assistant\n"
    )


def test_openai_content_format_detected_and_kept() -> None:
    src = (
        "{% for m in messages %}{% for p in m['content'] %}[{{ p['text'] }}]{% endfor %}"
        "{% endfor %}"
    )
    t = ChatTemplate(src)
    assert t.content_format == "openai"
    parts = [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]
    assert t.render([{"role": "user", "content": parts}]) == "[a][b]"
    # Detection also sees a loop over a variable assigned from the content.
    aliased = "{% for m in messages %}{% set c = m.content %}{% for p in c %}{{ p.text }}" \
              "{% endfor %}{% endfor %}"
    assert ChatTemplate(aliased).content_format == "openai"
    assert ChatTemplate("{{ messages[0]['content'] }}").content_format == "string"


def test_non_text_part_is_refused(pre: Preprocessor) -> None:
    req = ChatCompletionRequest(
        model="tiny",
        messages=[ChatMessage(role="user", content=[
            ContentPart(type="text", text="look"),
            ContentPart(type="image_url", image_url={"url": "http://x/y.png"}),
        ])],
    )
    with pytest.raises(RequestError, match="'image_url' is not supported") as ei:
        pre.preprocess_chat(req)
    assert ei.value.param == "messages[0].content[1].type"
    assert ei.value.status == 400


def test_raise_exception_becomes_request_error(pre: Preprocessor) -> None:
    with pytest.raises(RequestError, match="Unknown role: wizard") as ei:
        pre.preprocess_chat(chat(("wizard", "abracadabra")))
    assert ei.value.param == "messages"


def test_tools_tojson_keeps_order_and_unicode(pre: Preprocessor) -> None:
    tool = {"type": "function", "function": {"name": "météo", "parameters": {"z": 1, "a": 2}}}
    text = pre.render_chat(chat(("user", "?"), tools=[tool]))
    assert f"{BOS}<|im_start|>system\n# Tools\n{json.dumps(tool, ensure_ascii=False)}\n" in text
    assert '"z": 1, "a": 2' in text and "météo" in text


def test_trim_and_lstrip_blocks() -> None:
    src = (
        "{% for m in messages %}\n"
        "    {% if m.role == 'user' %}\n"
        "U: {{ m.content }}\n"
        "    {% endif %}\n"
        "{% endfor %}\n"
    )
    msgs = [{"role": "user", "content": "hi"}, {"role": "system", "content": "x"}]
    assert ChatTemplate(src).render(msgs) == "U: hi\n"


def test_template_variables_and_extra_kwargs() -> None:
    src = "{{ bos_token }}|{{ eos_token }}|{{ tools is none }}|{{ enable_thinking }}|" \
          "{% generation %}{{ messages | length }}{% endgeneration %}"
    t = ChatTemplate(src, bos_token="<s>", eos_token="</s>")
    assert t.render([{"role": "user", "content": "x"}], enable_thinking=False) == \
        "<s>|</s>|True|False|1"


def test_chat_template_kwargs_reach_template(md: ModelDir, tmp_path: Path) -> None:
    d = tmp_path / "m"
    shutil.copytree(tiny_model_dir(), d)
    cfg = json.loads((d / "tokenizer_config.json").read_text("utf-8"))
    cfg["chat_template"] = "{{ greeting }} {{ messages[0].content }}"
    (d / "tokenizer_config.json").write_text(json.dumps(cfg), "utf-8")
    p = Preprocessor(ModelDir.load(d))
    assert p.render_chat(chat(("user", "x"), chat_template_kwargs={"greeting": "hey"})) == "hey x"


def test_sandbox_blocks_mutation_and_dunder_access() -> None:
    for src in (
        "{% set x = [] %}{{ x.append(1) }}",
        "{{ ''.__class__.__mro__ }}",
    ):
        with pytest.raises(RequestError):
            ChatTemplate(src).render([{"role": "user", "content": "x"}])


def test_template_syntax_error() -> None:
    with pytest.raises(ValueError, match="syntax error"):
        ChatTemplate("{% for m in messages %}")


def test_template_type_error_is_a_request_error(pre: Preprocessor) -> None:
    # The fixture template concatenates strings: content=None for an assistant turn becomes "".
    out = pre.render_chat(chat(("user", "q"), ("assistant", None)))  # type: ignore[arg-type]
    assert "<|im_start|>assistant\n<|im_end|>" in out
    t = ChatTemplate("{{ messages[0]['content'] + 1 }}")
    with pytest.raises(RequestError, match="TypeError"):
        t.render([{"role": "user", "content": "x"}])


def test_model_without_chat_template(md: ModelDir, tmp_path: Path) -> None:
    d = tmp_path / "m"
    d.mkdir()
    shutil.copy(tiny_model_dir() / "tokenizer.json", d)
    p = Preprocessor(ModelDir.load(d))
    with pytest.raises(RequestError, match="no chat template"):
        p.preprocess_chat(chat(("user", "x")))
    # Completions still work, without a context limit: max_tokens stays unset.
    r = p.preprocess_completion(CompletionRequest(model="m", prompt="hello"))
    assert r.request.stop_conditions.max_tokens is None


# -------------------------------------------------------------- request mapping


def test_chat_tokens_and_counts(pre: Preprocessor, md: ModelDir) -> None:
    r = pre.preprocess_chat(chat(*SYS_USER))
    prompt = RENDERED + "<|im_start|>assistant\n"
    assert r.prompt == prompt
    assert r.request.token_ids == md.tokenizer.encode(prompt, add_special_tokens=False).ids
    assert r.prompt_tokens == len(r.request.token_ids)
    # The template writes BOS itself: exactly one BOS, first.
    assert r.request.token_ids.count(md.bos_token_id or 0) == 1
    assert r.request.token_ids[0] == md.bos_token_id
    assert r.request.stop_conditions.max_tokens == 2048 - r.prompt_tokens
    assert r.request.eos_token_ids == list(md.eos_token_ids)
    assert r.request.mdc_sum == md.checksum
    assert r.request.model == "tiny"


def test_chat_maps_every_field(pre: Preprocessor) -> None:
    req = chat(
        ("user", "hi"),
        max_tokens=100,
        max_completion_tokens=50,  # wins over max_tokens
        temperature=0.5,
        top_p=0.9,
        top_k=40,
        min_p=0.05,
        seed=1234,
        n=1,
        stop=["\n\n", "END"],
        stop_token_ids=[1],
        stream=True,
        stream_options=StreamOptions(include_usage=True),
        ignore_eos=True,
        min_tokens=5,
        presence_penalty=0.25,
        frequency_penalty=-0.5,
        repetition_penalty=1.1,
        include_stop_str_in_output=True,
        skip_special_tokens=False,
        logprobs=True,
        top_logprobs=3,
        user="u-1",
    )
    r = pre.preprocess_chat(req).request
    sc, so, oo = r.stop_conditions, r.sampling_options, r.output_options
    assert sc.max_tokens == 50
    assert sc.stop == ["\n\n", "END"]
    assert sc.stop_token_ids == [1]
    assert sc.min_tokens == 5
    assert sc.ignore_eos is True
    assert so.temperature == 0.5
    assert so.top_p == 0.9
    assert so.top_k == 40
    assert so.min_p == 0.05
    assert so.seed == 1234
    assert so.n == 1
    assert so.presence_penalty == 0.25
    assert so.frequency_penalty == -0.5
    assert so.repetition_penalty == 1.1
    assert so.include_stop_str_in_output is True
    assert oo.logprobs == 3
    assert oo.skip_special_tokens is False
    # The mapped request survives the wire format.
    wire = msgspec.msgpack.decode(msgspec.msgpack.encode(r), type=type(r))
    assert wire == r


def test_chat_defaults_leave_options_unset(pre: Preprocessor) -> None:
    r = pre.preprocess_chat(chat(("user", "hi"))).request
    assert r.stop_conditions.stop is None and r.stop_conditions.ignore_eos is None
    assert r.sampling_options.temperature is None and r.sampling_options.n is None
    assert r.output_options.logprobs is None
    # max_tokens alone is used when max_completion_tokens is absent.
    assert pre.preprocess_chat(chat(("user", "hi"), max_tokens=7)).request.stop_conditions \
        .max_tokens == 7
    # logprobs without top_logprobs asks for the sampled token's logprob only.
    assert pre.preprocess_chat(chat(("user", "hi"), logprobs=True)).request.output_options \
        .logprobs == 0


def test_stop_as_single_string(pre: Preprocessor) -> None:
    r = pre.preprocess_chat(chat(("user", "hi"), stop="###")).request
    assert r.stop_conditions.stop == ["###"]


def test_completion_text_prompt(pre: Preprocessor, md: ModelDir) -> None:
    r = pre.preprocess_completion(
        CompletionRequest(model="tiny", prompt="héllo wörld", max_tokens=16, logprobs=2,
                          temperature=0.0, echo=True)
    )
    ids = r.request.token_ids
    assert ids[0] == md.bos_token_id and ids.count(md.bos_token_id or 0) == 1
    assert md.tokenizer.decode(ids) == "héllo wörld"
    assert r.prompt == "héllo wörld" and r.prompt_tokens == len(ids)
    assert r.request.output_options.logprobs == 2
    assert r.request.sampling_options.temperature == 0.0
    assert r.request.stop_conditions.max_tokens == 16


def test_add_bos_token_false_drops_bos(tmp_path: Path) -> None:
    d = tmp_path / "m"
    shutil.copytree(tiny_model_dir(), d)
    cfg = json.loads((d / "tokenizer_config.json").read_text("utf-8"))
    cfg["add_bos_token"] = False
    (d / "tokenizer_config.json").write_text(json.dumps(cfg), "utf-8")
    md = ModelDir.load(d)
    r = Preprocessor(md).preprocess_completion(CompletionRequest(model="m", prompt="hello"))
    assert md.bos_token_id not in r.request.token_ids


@pytest.mark.parametrize(
    "prompt", [[5, 6, 7], [[5, 6, 7]]], ids=["ids", "one-element-batch-of-ids"]
)
def test_completion_token_prompt(pre: Preprocessor, prompt: list[object]) -> None:
    r = pre.preprocess_completion(CompletionRequest(model="tiny", prompt=prompt))  # type: ignore[arg-type]
    assert r.request.token_ids == [5, 6, 7]  # verbatim: no BOS added
    assert r.prompt is None
    assert r.request.stop_conditions.max_tokens == 2048 - 3


def test_completion_single_string_in_list(pre: Preprocessor) -> None:
    a = pre.preprocess_completion(CompletionRequest(model="tiny", prompt=["hello"]))
    b = pre.preprocess_completion(CompletionRequest(model="tiny", prompt="hello"))
    assert a.request.token_ids == b.request.token_ids


def test_echo_of_token_prompt_decodes_it(pre: Preprocessor, md: ModelDir) -> None:
    ids = md.tokenizer.encode("echo me", add_special_tokens=False).ids
    r = pre.preprocess_completion(CompletionRequest(model="tiny", prompt=list(ids), echo=True))
    assert r.prompt == "echo me"


def test_max_n(md: ModelDir) -> None:
    p = Preprocessor(md, max_n=2)
    assert p.preprocess_chat(chat(("user", "x"), n=2)).request.sampling_options.n == 2
    with pytest.raises(RequestError) as ei:
        p.preprocess_chat(chat(("user", "x"), n=3))
    assert ei.value.param == "n"


# ------------------------------------------------------------------------ errors


def test_context_too_long_with_max_tokens(pre: Preprocessor) -> None:
    r = pre.preprocess_chat(chat(("user", "hi")))
    room = 2048 - r.prompt_tokens
    assert pre.preprocess_chat(chat(("user", "hi"), max_tokens=room)).request \
        .stop_conditions.max_tokens == room
    with pytest.raises(RequestError) as ei:
        pre.preprocess_chat(chat(("user", "hi"), max_tokens=room + 1))
    e = ei.value
    assert (e.status, e.code, e.param) == (400, "context_length_exceeded", "max_tokens")
    assert "maximum context length is 2048 tokens" in e.message
    assert f"{r.prompt_tokens} in the messages, {room + 1} in the completion" in e.message


def test_context_too_long_prompt_alone(pre: Preprocessor) -> None:
    with pytest.raises(RequestError) as ei:
        pre.preprocess_completion(CompletionRequest(model="tiny", prompt=[5] * 2048))
    assert (ei.value.code, ei.value.param) == ("context_length_exceeded", "prompt")
    long_text = "The quick brown fox jumps over the lazy dog. " * 300
    with pytest.raises(RequestError) as ei:
        pre.preprocess_chat(chat(("user", long_text)))
    assert (ei.value.code, ei.value.param) == ("context_length_exceeded", "messages")


def test_n_greater_than_one(pre: Preprocessor) -> None:
    with pytest.raises(RequestError, match="n=2 is not supported") as ei:
        pre.preprocess_chat(chat(("user", "x"), n=2))
    assert (ei.value.param, ei.value.code) == ("n", "unsupported_value")
    with pytest.raises(RequestError):
        pre.preprocess_completion(CompletionRequest(model="tiny", prompt="x", n=4))


def test_bad_stop_type_on_decode() -> None:
    body = b'{"model": "tiny", "messages": [{"role": "user", "content": "x"}], "stop": 5}'
    with pytest.raises(RequestError) as ei:
        decode_request(body, ChatCompletionRequest)
    assert (ei.value.status, ei.value.param, ei.value.code) == (400, "stop", "invalid_type")


@pytest.mark.parametrize(
    ("stop", "pattern"),
    [
        ([1, 2], "stop must be a string or a list of strings"),
        (["a"] * 17, "at most 16 stop sequences"),
        (["ok", ""], "must not be empty"),
    ],
)
def test_bad_stop_values(pre: Preprocessor, stop: object, pattern: str) -> None:
    with pytest.raises(RequestError, match=pattern) as ei:
        pre.preprocess_chat(chat(("user", "x"), stop=stop))
    assert ei.value.param == "stop"


@pytest.mark.parametrize(
    "prompt",
    [["a", "b"], [[1, 2], [3]]],
    ids=["texts", "token-lists"],
)
def test_batch_prompt_refused(pre: Preprocessor, prompt: object) -> None:
    with pytest.raises(RequestError, match="batched prompts are not supported") as ei:
        pre.preprocess_completion(CompletionRequest(model="tiny", prompt=prompt))  # type: ignore[arg-type]
    assert (ei.value.param, ei.value.code) == ("prompt", "unsupported_value")


@pytest.mark.parametrize(
    ("prompt", "pattern"),
    [
        (["a", 1], "prompt must be a string, a list of token ids"),
        ([], "non-empty"),
        ([[]], "the prompt is empty"),
        ([1, 99999], "outside the vocabulary"),
        ([-1], "outside the vocabulary"),
    ],
)
def test_bad_prompts(pre: Preprocessor, prompt: object, pattern: str) -> None:
    with pytest.raises(RequestError, match=pattern):
        pre.preprocess_completion(CompletionRequest(model="tiny", prompt=prompt))  # type: ignore[arg-type]


def test_other_refusals(pre: Preprocessor) -> None:
    with pytest.raises(RequestError) as ei:
        pre.preprocess_completion(CompletionRequest(model="tiny", prompt="x", suffix="y"))
    assert ei.value.param == "suffix"
    with pytest.raises(RequestError) as ei:
        pre.preprocess_chat(chat(("user", "x"), top_logprobs=2))
    assert ei.value.param == "top_logprobs"
    with pytest.raises(RequestError) as ei:
        pre.preprocess_chat(chat(("user", "x"), max_tokens=3, min_tokens=4))
    assert ei.value.param == "min_tokens"
    with pytest.raises(RequestError) as ei:
        pre.preprocess_chat(chat(("user", "x"), stop_token_ids=[5000]))
    assert ei.value.param == "stop_token_ids"


def test_decode_request_accepts_openai_body(pre: Preprocessor) -> None:
    body = json.dumps({
        "model": "tiny",
        "messages": [
            {"role": "system", "content": "You are helpful."},
            {"role": "user", "content": [{"type": "text", "text": "Hi!"}]},
        ],
        "max_completion_tokens": 9,
        "stream": True,
        "stream_options": {"include_usage": True},
        "logit_bias": {"5": 1},  # decoded; request_fields.check_fields refuses it
        "response_format": {"type": "text"},
    })
    req = decode_request(body, ChatCompletionRequest)
    assert req.stream and req.stream_options == StreamOptions(include_usage=True)
    assert pre.render_chat(req) == RENDERED + "<|im_start|>assistant\n"


@pytest.mark.parametrize(
    ("body", "param", "code"),
    [
        (b'{"model": "m", "messages": []}', "messages", "invalid_value"),
        (b'{"model": "m", "messages": [{"content": "x"}]}', "messages[0].role",
         "missing_required_parameter"),
        (b'{"messages": [{"role": "user"}]}', "model", "missing_required_parameter"),
        (b'{"model": "m", "messages": [{"role": "user"}], "temperature": 2.5}', "temperature",
         "invalid_value"),
        (b'{"model": "m", "messages": [{"role": "user"}], "top_p": 0}', "top_p",
         "invalid_value"),
        (b'{"model": "m", "messages": [{"role": "user"}], "n": "2"}', "n", "invalid_type"),
        (b'{"model": "m", "messages": [{"role": "user", "content": 3}]}',
         "messages[0].content", "invalid_type"),
        (b'{"model": "m", "messages": [', None, "invalid_json"),
    ],
)
def test_decode_errors(body: bytes, param: str | None, code: str) -> None:
    with pytest.raises(RequestError) as ei:
        decode_request(body, ChatCompletionRequest)
    assert (ei.value.param, ei.value.code, ei.value.status) == (param, code, 400)
    err = msgspec.json.decode(msgspec.json.encode(ei.value.to_response()))
    assert err["error"]["param"] == param and err["error"]["type"] == "invalid_request_error"


def test_decode_completion_prompt_shapes() -> None:
    for prompt in ("x", ["x"], [1, 2], [[1, 2]]):
        body = json.dumps({"model": "m", "prompt": prompt}).encode()
        assert decode_request(body, CompletionRequest).prompt == prompt
    with pytest.raises(RequestError) as ei:
        decode_request(b'{"model": "m", "prompt": {"a": 1}}', CompletionRequest)
    assert ei.value.param == "prompt"


# ------------------------------------------------------------------ PieceEncoder

# Text with added tokens (and pieces of them) anywhere.
PIECE_TEXT = st.lists(st.sampled_from(list("ab xyz,.!\n\t") + list("éü你好🎉") + [
    "<|im_start|>", "<|im_end|>", "<|begin_of_text|>", "<|end_of_text|>", "<|im", "|>"]),
    max_size=40).map("".join)


@settings(max_examples=300, deadline=None)
@given(texts=st.lists(PIECE_TEXT, min_size=1, max_size=4))
def test_piece_encoder_matches_the_tokenizer(md: ModelDir, texts: list[str]) -> None:
    enc = PieceEncoder.for_tokenizer(md.tokenizer)
    assert enc is not None
    for text in texts * 2:  # the second time from the cache
        assert enc.encode(text) == md.tokenizer.encode(text, add_special_tokens=False).ids


def test_piece_encoder_caches_pieces_between_added_tokens(md: ModelDir) -> None:
    enc = PieceEncoder.for_tokenizer(md.tokenizer)
    assert enc is not None
    system = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    first = system + "<|im_start|>user\nHi!<|im_end|>\n"
    enc.encode(first)
    hits = enc.hits
    # The next turn sends the system prompt and the first turn again: only new pieces miss.
    second = first + "<|im_start|>assistant\nHello.<|im_end|>\n<|im_start|>user\nMore?<|im_end|>"
    assert enc.encode(second) == md.tokenizer.encode(second, add_special_tokens=False).ids
    assert enc.hits - hits >= 3
    # Handed-out ids are copies: changing them leaves the cache alone.
    ids = enc.encode(first)
    ids.clear()
    assert enc.encode(first) == md.tokenizer.encode(first, add_special_tokens=False).ids


def test_piece_encoder_cache_is_bounded(md: ModelDir) -> None:
    enc = PieceEncoder.for_tokenizer(md.tokenizer, max_chars=100)
    assert enc is not None
    for i in range(50):
        enc.encode(f"<|im_start|>user\nmessage number {i}<|im_end|>")
    assert enc._chars <= 100


def test_piece_encoder_refuses_position_dependent_tokenizers() -> None:
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
    assert PieceEncoder.for_tokenizer(tok) is None
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.add_special_tokens([AddedToken("<sep>", lstrip=True)])
    assert PieceEncoder.for_tokenizer(tok) is None


def test_chat_uses_the_piece_encoder(pre: Preprocessor, md: ModelDir) -> None:
    assert pre.piece_encoder is not None
    req = chat(*SYS_USER)
    out = pre.preprocess_chat(req)
    assert out.request.token_ids == md.tokenizer.encode(
        pre.render_chat(req), add_special_tokens=False).ids
