"""Incremental detokenization, stop strings, finish reasons, the stream postprocessor, and the
OpenAI response shapes (parsed by the official ``openai`` client's models)."""

from __future__ import annotations

import itertools

import msgspec
import openai.types as oai
import openai.types.chat as oai_chat
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from dynamo_backend_common.fixtures import tiny_model_dir
from dynamo_backend_common.frontend.byte_pieces import byte_pieces
from dynamo_backend_common.frontend.openai_types import (
    ChatChoice,
    ChatChoiceLogprobs,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatDelta,
    ChatMessage,
    ChatResponseMessage,
    ChatTokenLogprob,
    ChunkChoice,
    Completion,
    CompletionChoice,
    CompletionChunk,
    CompletionLogprobs,
    ModelInfo,
    ModelList,
    RequestError,
    TopLogprob,
    Usage,
)
from dynamo_backend_common.frontend.postprocess import (
    IncrementalDetokenizer,
    StopStringMatcher,
    StreamDelta,
    StreamPostprocessor,
    finish_reason_to_openai,
)
from dynamo_backend_common.frontend.preprocess import Preprocessor
from dynamo_backend_common.model_dir import ModelDir
from dynamo_backend_common.protocols.common import (
    CompletionUsage,
    FinishReason,
    LLMEngineOutput,
    PromptTokensDetails,
)

MD = ModelDir.load(tiny_model_dir())
TOK = MD.tokenizer
END, IM_END = MD.eos_token_ids  # sorted: <|end_of_text|> = 1, <|im_end|> = 3
assert (IM_END, END) == (TOK.token_to_id("<|im_end|>"), TOK.token_to_id("<|end_of_text|>"))
MIXED = "héllo wörld 你好 🎉 The quick brown fox 🚀😀 ça va? 日本語 ✨"

# A mixed alphabet: ASCII, accented Latin, CJK (some merged, most split), emoji, whitespace.
ALPHABET = st.sampled_from(
    list("abcxyz ,.!?\n") + list("éöüçñß") + list("你好世界日本語中文") + list("🎉🚀😀👍🤖✨")
)
TEXTS = st.text(ALPHABET, min_size=0, max_size=40)


def encode(text: str) -> list[int]:
    return list(TOK.encode(text, add_special_tokens=False).ids)


def chunked(ids: list[int], cuts: list[int]) -> list[list[int]]:
    points = sorted({c % (len(ids) + 1) for c in cuts} | {0, len(ids)})
    return [ids[a:b] for a, b in itertools.pairwise(points)]


# ------------------------------------------------------------ detokenizer


def test_one_token_at_a_time_emits_exact_text() -> None:
    ids = encode(MIXED)
    d = IncrementalDetokenizer(TOK)
    deltas = [d.add([i]) for i in ids]
    tail = d.flush()
    assert "".join(deltas) + tail == MIXED
    assert tail == ""
    assert not any("\ufffd" in x for x in deltas)
    # Multi-byte characters really were split: some tokens completed nothing on their own.
    assert deltas.count("") >= 5
    # ... and each character came out whole, in the delta of the token that completed it.
    assert any(x.endswith("🎉") for x in deltas) and "你" in deltas


def test_left_context_from_prompt_is_not_emitted() -> None:
    prompt = encode("<|im_start|>assistant\n")
    ids = encode(" hello 你好")
    d = IncrementalDetokenizer(TOK, prompt[-6:])
    assert "".join(d.add([i]) for i in ids) + d.flush() == " hello 你好"


@settings(max_examples=200, deadline=None)
@given(text=TEXTS, cuts=st.lists(st.integers(min_value=0, max_value=200), max_size=8),
       prefix=TEXTS)
def test_detokenizer_property(text: str, cuts: list[int], prefix: str) -> None:
    ids = encode(text)
    d = IncrementalDetokenizer(TOK, encode(prefix)[-6:])
    deltas = [d.add(c) for c in chunked(ids, cuts)]
    out = "".join(deltas) + d.flush()
    assert out == text == TOK.decode(ids)
    assert not any("\ufffd" in x for x in deltas)


def _context_dependent_tokenizer(kind: str) -> Tokenizer:
    """A small trained SentencePiece-style (Metaspace) or WordPiece tokenizer: their decode of a
    token depends on its left context (a leading space, a ``##`` continuation)."""
    corpus = ["The quick brown fox jumps over the lazy dog.", "héllo wörld, ça va? Grüße!",
              "Hello there, general Kenobi. You are a bold one."] * 10
    if kind == "metaspace":
        tok = Tokenizer(models.BPE(unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.Metaspace()
        tok.decoder = decoders.Metaspace()
        trainer: trainers.Trainer = trainers.BpeTrainer(vocab_size=100, special_tokens=["<unk>"])
    else:
        tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.decoder = decoders.WordPiece()
        trainer = trainers.WordPieceTrainer(vocab_size=100, special_tokens=["[UNK]"])
    tok.train_from_iterator(corpus, trainer)
    return tok


@pytest.mark.parametrize("kind", ["metaspace", "wordpiece"])
def test_detokenizer_left_context_dependent_decoders(kind: str) -> None:
    tok = _context_dependent_tokenizer(kind)
    text = "Hello there, the lazy fox. Grüße, héllo wörld, general Kenobi! " * 4
    ids = tok.encode(text).ids
    for context in (0, 1, 3):
        for size in (1, 2, 3, 5):
            d = IncrementalDetokenizer(tok, ids[:context], special_token_ids=())
            rest = ids[context:]
            out = "".join(d.add(rest[i : i + size]) for i in range(0, len(rest), size))
            full = tok.decode(ids)
            assert out + d.flush() == full[len(tok.decode(ids[:context])) :], (context, size)


def test_skip_special_tokens() -> None:
    ids = [*encode("a"), IM_END, *encode("b"), END]
    for skip in (True, False):
        d = IncrementalDetokenizer(TOK, skip_special_tokens=skip)
        out = "".join(d.add([i]) for i in ids) + d.flush()
        assert out == TOK.decode(ids, skip_special_tokens=skip)
    assert TOK.decode(ids, skip_special_tokens=False) == "a<|im_end|>b<|end_of_text|>"
    # A chunk of only special tokens completes nothing.
    assert IncrementalDetokenizer(TOK).add([IM_END, END]) == ""


def test_incomplete_character_held_until_flush() -> None:
    ids = encode("🎉")
    assert len(ids) > 1
    d = IncrementalDetokenizer(TOK)
    assert d.add(ids[:1]) == ""
    tail = d.flush()
    assert tail == TOK.decode(ids[:1]) and "\ufffd" in tail
    assert d.flush() == ""


def test_invalid_bytes_are_not_held_forever() -> None:
    # A byte token that can never complete a character: after max_holdback tokens the
    # detokenizer gives up waiting and emits the replacement characters.
    lead = encode("🎉")[1]  # a continuation-byte token, invalid on its own
    assert TOK.decode([lead]) == "\ufffd"
    d = IncrementalDetokenizer(TOK, max_holdback=4)
    out = [d.add([lead]) for _ in range(6)]
    assert any("\ufffd" in x for x in out)
    assert "".join(out) + d.flush() == TOK.decode([lead] * 6)


def test_window_stays_small() -> None:
    ids = encode(MIXED * 40)
    d = IncrementalDetokenizer(TOK)
    max_window = 0
    for i in ids:
        d.add([i])
        max_window = max(max_window, len(d._ids))  # the decode window, not the whole stream
    # At most _WINDOW (4) done tokens of left context, plus the pending tail of a character.
    assert len(ids) > 500 and max_window <= 8


def test_byte_pieces_of_byte_level_tokenizers_only() -> None:
    pieces = byte_pieces(TOK)
    assert pieces is not None and len(pieces) == TOK.get_vocab_size(with_added_tokens=True)
    assert pieces[IM_END] == b"<|im_end|>"
    assert byte_pieces(_context_dependent_tokenizer("metaspace")) is None
    assert byte_pieces(_context_dependent_tokenizer("wordpiece")) is None


_BYTE_TOKENS = [i for i, p in enumerate(byte_pieces(TOK) or ()) if len(p) == 1]


@settings(max_examples=300, deadline=None)
@given(ids=st.lists(st.one_of(st.sampled_from(_BYTE_TOKENS),
                              st.integers(min_value=0, max_value=1600)), max_size=30),
       cuts=st.lists(st.integers(min_value=0, max_value=40), max_size=8),
       skip=st.booleans())
def test_byte_level_path_equals_decode_on_any_bytes(ids: list[int], cuts: list[int],
                                                    skip: bool) -> None:
    # Single byte tokens make split and invalid UTF-8 of every kind; ids past the vocabulary
    # (1520) decode to nothing.
    d = IncrementalDetokenizer(TOK, skip_special_tokens=skip)
    out = "".join(d.add(c) for c in chunked(ids, cuts)) + d.flush()
    assert out == TOK.decode(ids, skip_special_tokens=skip)


# ------------------------------------------------------------------ stops


def test_stop_across_chunks() -> None:
    m = StopStringMatcher(["STOP"])
    assert m.feed("hello S") == ("hello ", False)  # "S" may start STOP: held back
    assert m.feed("T") == ("", False)
    assert m.feed("OP and more") == ("", True)
    assert m.matched == "STOP" and m.stopped
    assert m.feed("later") == ("", True)
    assert m.flush() == ""


def test_false_start_is_released() -> None:
    m = StopStringMatcher(["STOP"])
    assert m.feed("ST") == ("", False)
    assert m.feed("ART") == ("START", False)
    assert m.feed("S") == ("", False)
    assert m.flush() == "S"


def test_include_stop_str_in_output() -> None:
    m = StopStringMatcher(["</a>"], include_stop_str_in_output=True)
    assert m.feed("x</") == ("x", False)
    assert m.feed("a>tail") == ("</a>", True)


def test_earliest_completed_stop_wins() -> None:
    assert StopStringMatcher(["abcd", "bc"]).feed("abcd") == ("a", True)
    # Same end: the one that starts first.
    assert StopStringMatcher(["cd", "bcd"]).feed("abcd") == ("a", True)
    with pytest.raises(ValueError):
        StopStringMatcher(["ok", ""])
    assert StopStringMatcher([]).feed("anything") == ("anything", False)


def reference_stop(text: str, stops: list[str], include: bool) -> tuple[str, bool]:
    """Scan the text one character at a time; stop at the first completed stop string."""
    for end in range(1, len(text) + 1):
        hits = [(end - len(s), s) for s in stops if text[:end].endswith(s)]
        if hits:
            start, _ = min(hits)
            return text[: end if include else start], True
    return text, False


@settings(max_examples=300, deadline=None)
@given(
    text=st.text(st.sampled_from("abcé🎉 "), max_size=30),
    stops=st.lists(st.text(st.sampled_from("abcé🎉 "), min_size=1, max_size=4), min_size=1,
                   max_size=3),
    cuts=st.lists(st.integers(min_value=0, max_value=30), max_size=6),
    include=st.booleans(),
)
def test_stop_split_invariance(text: str, stops: list[str], cuts: list[int],
                               include: bool) -> None:
    whole = StopStringMatcher(stops, include)
    out, stopped = whole.feed(text)
    if not stopped:
        out += whole.flush()
    assert (out, stopped) == reference_stop(text, stops, include)

    points = sorted({c % (len(text) + 1) for c in cuts} | {0, len(text)})
    m = StopStringMatcher(stops, include)
    emitted, split_stopped = [], False
    for a, b in itertools.pairwise(points):
        piece, split_stopped = m.feed(text[a:b])
        emitted.append(piece)
        if split_stopped:
            break
    if not split_stopped:
        emitted.append(m.flush())
    assert ("".join(emitted), split_stopped) == (out, stopped)


# ------------------------------------------------------------ finish reasons


@pytest.mark.parametrize(
    ("fr", "expected"),
    [
        (None, None),
        (FinishReason.EOS, "stop"),
        (FinishReason.STOP, "stop"),
        (FinishReason.LENGTH, "length"),
        (FinishReason.CONTENT_FILTER, "content_filter"),
        (FinishReason.CANCELLED, "stop"),
        (FinishReason.error("boom"), "error"),
    ],
)
def test_finish_reason_to_openai(fr: FinishReason | None, expected: str | None) -> None:
    assert finish_reason_to_openai(fr) == expected


# ---------------------------------------------------------- postprocessor


def token_chunks(text: str, size: int = 1) -> list[LLMEngineOutput]:
    ids = encode(text)
    return [LLMEngineOutput(token_ids=ids[i:i + size]) for i in range(0, len(ids), size)]


def run(pp: StreamPostprocessor, outs: list[LLMEngineOutput]) -> tuple[str, list[StreamDelta]]:
    text, deltas = "", []
    for o in outs:
        d = pp.process(o)
        deltas.append(d)
        text += d.text
        if d.finished:
            break
    return text, deltas


def test_stream_stop_string_cuts_and_flags() -> None:
    pp = StreamPostprocessor(TOK, prompt_tokens=10, stop=["brown"])
    outs = token_chunks("The quick brown fox jumps", size=2)
    text, deltas = run(pp, [*outs, LLMEngineOutput.length()])
    last = deltas[-1]
    assert text == "The quick "
    assert last.stop_matched and last.finish_reason == "stop" and pp.finished
    consumed = sum(len(o.token_ids) for o in outs[: len(deltas)])
    assert last.usage == CompletionUsage(prompt_tokens=10, completion_tokens=consumed,
                                         total_tokens=10 + consumed)
    assert len(deltas) < len(outs)  # the caller can cancel the engine stream here
    after = pp.process(outs[-1])
    assert after.text == "" and not after.finished and pp.completion_tokens == consumed


def test_stream_eos_terminal_hides_eos_token() -> None:
    pp = StreamPostprocessor(TOK, prompt_tokens=3, eos_token_ids=[IM_END],
                             skip_special_tokens=False)
    outs = token_chunks("ça va 🎉")
    final = LLMEngineOutput(token_ids=[IM_END], finish_reason=FinishReason.EOS)
    text, deltas = run(pp, [*outs, final])
    assert text == "ça va 🎉"
    assert deltas[-1].finish_reason == "stop" and not deltas[-1].stop_matched
    assert deltas[-1].usage is not None
    assert deltas[-1].usage.completion_tokens == len(outs) + 1  # eos counted


def test_stream_length_and_engine_usage() -> None:
    pp = StreamPostprocessor(TOK, prompt_tokens=4)
    eu = CompletionUsage(prompt_tokens=4, completion_tokens=99, total_tokens=103,
                         prompt_tokens_details=PromptTokensDetails(cached_tokens=2))
    final = LLMEngineOutput(token_ids=encode("!"), finish_reason=FinishReason.LENGTH,
                            completion_usage=eu)
    text, deltas = run(pp, [*token_chunks("hi there"), final])
    assert text == "hi there!"
    u = deltas[-1].usage
    assert deltas[-1].finish_reason == "length"
    assert u is not None and u.completion_tokens == 99 and u.total_tokens == 103
    assert u.prompt_tokens_details == PromptTokensDetails(cached_tokens=2)


def test_stream_error_terminal() -> None:
    pp = StreamPostprocessor(TOK, prompt_tokens=1)
    _, deltas = run(pp, [*token_chunks("ok"), LLMEngineOutput.error("CUDA out of memory")])
    assert deltas[-1].finish_reason == "error"
    assert deltas[-1].error == "CUDA out of memory"


def test_stream_min_tokens_delays_stop_matching() -> None:
    outs = token_chunks("ab ab ab cd")
    n_first_ab = len(encode("ab"))
    pp = StreamPostprocessor(TOK, prompt_tokens=1, stop=["ab"], min_tokens=n_first_ab + 1)
    text, deltas = run(pp, [*outs, LLMEngineOutput.stop()])
    assert text.startswith("ab") and deltas[-1].stop_matched
    assert text == "ab "  # the first "ab" is before min_tokens; the second one stops
    pp = StreamPostprocessor(TOK, prompt_tokens=1, stop=["ab"])
    assert run(pp, outs)[0] == ""


def test_stream_text_only_chunks_and_finish() -> None:
    pp = StreamPostprocessor(TOK, prompt_tokens=1, stop=["END"])
    assert pp.process(LLMEngineOutput(token_ids=[], text="hello E")).text == "hello "
    # The stream breaks (client left / engine raised): held-back text is flushed.
    d = pp.finish(FinishReason.CANCELLED)
    assert (d.text, d.finish_reason, d.stop_matched) == ("E", "stop", False)
    assert pp.finish(FinishReason.CANCELLED).finish_reason is None  # already finished


def test_stream_for_request_end_to_end() -> None:
    pre = Preprocessor(MD)
    req = ChatCompletionRequest(
        model="tiny", messages=[ChatMessage(role="user", content="Say hi")],
        stop=["\n\n"], min_tokens=1,
    )
    p = pre.preprocess_chat(req)
    pp = StreamPostprocessor.for_request(MD, p.request)
    reply = "héllo wörld 你好 🎉\n\nignored"
    outs = [LLMEngineOutput(token_ids=[i]) for i in encode(reply)]
    text, deltas = run(pp, [*outs, LLMEngineOutput(token_ids=[IM_END],
                                                   finish_reason=FinishReason.EOS)])
    assert text == "héllo wörld 你好 🎉"
    assert deltas[-1].stop_matched
    assert deltas[-1].usage is not None and deltas[-1].usage.prompt_tokens == p.prompt_tokens


# ------------------------------------------------------ response shapes


def roundtrip(obj: object) -> dict[str, object]:
    out = msgspec.json.decode(msgspec.json.encode(obj))
    assert isinstance(out, dict)
    return out


def test_chat_completion_parses_with_openai_client() -> None:
    resp = ChatCompletion(
        id="chatcmpl-1", created=1700000000, model="tiny",
        choices=[ChatChoice(
            index=0, message=ChatResponseMessage(content="héllo 🎉"), finish_reason="stop",
            logprobs=ChatChoiceLogprobs(content=[ChatTokenLogprob(
                token="h", logprob=-0.5, bytes=[104],
                top_logprobs=[TopLogprob(token="h", logprob=-0.5, bytes=[104])])]),
        )],
        usage=Usage(prompt_tokens=3, completion_tokens=2, total_tokens=5),
    )
    raw = roundtrip(resp)
    assert raw["object"] == "chat.completion" and raw["system_fingerprint"] is None
    parsed = oai_chat.ChatCompletion.model_validate(raw)
    assert parsed.choices[0].message.content == "héllo 🎉"
    assert parsed.choices[0].message.role == "assistant"
    assert parsed.choices[0].finish_reason == "stop"
    assert parsed.choices[0].logprobs is not None
    assert parsed.choices[0].logprobs.content is not None
    assert parsed.choices[0].logprobs.content[0].top_logprobs[0].logprob == -0.5
    assert parsed.usage is not None and parsed.usage.total_tokens == 5


def test_chat_chunks_parse_with_openai_client() -> None:
    first = ChatCompletionChunk(
        id="c", created=1, model="tiny",
        choices=[ChunkChoice(index=0, delta=ChatDelta(role="assistant", content=""))],
    )
    raw = roundtrip(first)
    # OpenAI writes finish_reason/logprobs as null; usage is absent unless include_usage.
    assert raw["choices"] == [{"index": 0, "delta": {"role": "assistant", "content": ""},
                               "logprobs": None, "finish_reason": None}]
    assert "usage" not in raw and raw["object"] == "chat.completion.chunk"
    assert oai_chat.ChatCompletionChunk.model_validate(raw).choices[0].delta.role == "assistant"

    mid = ChatCompletionChunk(id="c", created=1, model="tiny", usage=None,
                              choices=[ChunkChoice(index=0, delta=ChatDelta(content="x"))])
    raw = roundtrip(mid)
    assert raw["usage"] is None and raw["choices"][0]["delta"] == {"content": "x"}  # type: ignore[index]

    last = ChatCompletionChunk(
        id="c", created=1, model="tiny", choices=[],
        usage=Usage(prompt_tokens=1, completion_tokens=2, total_tokens=3),
    )
    parsed = oai_chat.ChatCompletionChunk.model_validate(roundtrip(last))
    assert parsed.choices == [] and parsed.usage is not None and parsed.usage.total_tokens == 3
    fin = ChatCompletionChunk(id="c", created=1, model="tiny", choices=[
        ChunkChoice(index=0, delta=ChatDelta(), finish_reason="length")])
    raw = roundtrip(fin)
    assert raw["choices"][0]["delta"] == {}  # type: ignore[index]
    assert oai_chat.ChatCompletionChunk.model_validate(raw).choices[0].finish_reason == "length"


def test_completions_parse_with_openai_client() -> None:
    resp = Completion(
        id="cmpl-1", created=2, model="tiny",
        choices=[CompletionChoice(
            index=0, text="ça va", finish_reason="length",
            logprobs=CompletionLogprobs(tokens=["ça", " va"], token_logprobs=[-1.0, -0.1],
                                        top_logprobs=[{"ça": -1.0}, {" va": -0.1}],
                                        text_offset=[0, 2]),
        )],
        usage=Usage(prompt_tokens=1, completion_tokens=2, total_tokens=3),
    )
    parsed = oai.Completion.model_validate(roundtrip(resp))
    assert parsed.object == "text_completion" and parsed.choices[0].text == "ça va"
    assert parsed.choices[0].logprobs is not None
    assert parsed.choices[0].logprobs.tokens == ["ça", " va"]
    chunk = CompletionChunk(id="cmpl-1", created=2, model="tiny",
                            choices=[CompletionChoice(index=0, text="x")])
    raw = roundtrip(chunk)
    assert "usage" not in raw and raw["choices"][0]["finish_reason"] is None  # type: ignore[index]
    # The client builds stream chunks without validation (finish_reason is null until the
    # end, which its Literal type does not list), the way construct() does.
    built = oai.Completion.construct(**raw)  # type: ignore[arg-type]
    assert isinstance(built.choices[0], oai.CompletionChoice)
    assert built.choices[0].text == "x" and built.choices[0].finish_reason is None


def test_model_list_and_error_shapes() -> None:
    ml = ModelList(data=[ModelInfo(id="tiny", created=3)])
    parsed = oai.Model.model_validate(roundtrip(ml)["data"][0])  # type: ignore[index]
    assert (parsed.id, parsed.object, parsed.owned_by) == ("tiny", "model", "dynamo")
    err = RequestError("too long", code="context_length_exceeded", param="messages")
    assert roundtrip(err.to_response()) == {"error": {
        "message": "too long", "type": "invalid_request_error", "param": "messages",
        "code": "context_length_exceeded"}}
