"""Incremental detokenization cost: the prefix/read-offset window vs re-decoding everything.

Run: ``.venv/bin/python benchmarks/detokenize.py [--tokens 1000] [--repeat 5]``

Feeds ``--tokens`` token ids (a multilingual text with accented Latin, CJK and emoji, encoded
with the packaged tiny byte-level BPE) one at a time and prints, best of ``--repeat`` runs, the
CPU microseconds per token (``time.process_time``, so other load on the machine does not
inflate it much) of:

- ``IncrementalDetokenizer.add`` on its byte-level path (the packaged tokenizer is byte-level
  BPE: each token's bytes through an incremental UTF-8 decoder, no ``decode`` call);
- the same on its window path, which tokenizers that are not byte-level take (decodes a window
  of a few tokens per step: O(1) per token; measured here by hiding the tokenizer's decoder
  type from it);
- the naive method: decode the whole sequence so far at every step and emit the new suffix
  (O(n) per token, O(n^2) per stream);
- the full ``StreamPostprocessor`` path (detokenizer + a stop-string matcher with two stops);

and how many ``decode`` calls the window path makes per token, and checks that all of them
produce the same text.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

from tokenizers import Tokenizer

from dynamo_backend_common.fixtures import tiny_model_dir
from dynamo_backend_common.frontend.postprocess import IncrementalDetokenizer, StreamPostprocessor
from dynamo_backend_common.model_dir import ModelDir
from dynamo_backend_common.protocols.common import LLMEngineOutput

TEXT = (
    "The quick brown fox jumps over the lazy dog. héllo wörld, ça va? Schöne Grüße! "
    "你好，世界！今天天气很好。 こんにちは 🎉🚀😀 The model streams tokens to the frontend. "  # noqa: RUF001
)


class _Window:
    """The tokenizer with its decoder type hidden (so the detokenizer takes its window path),
    ``decode`` optionally replaced (to count the calls)."""

    decoder = None

    def __init__(self, tok: Tokenizer, decode: Callable[..., str] | None = None) -> None:
        self._tok = tok
        self.decode = decode or tok.decode

    def __getattr__(self, name: str) -> object:
        return getattr(self._tok, name)


def incremental(tok: Tokenizer, ids: list[int]) -> str:
    d = IncrementalDetokenizer(tok)
    out = [d.add((i,)) for i in ids]
    return "".join(out) + d.flush()


def naive(tok: Tokenizer, ids: list[int]) -> str:
    emitted = ""
    for n in range(1, len(ids) + 1):
        text = tok.decode(ids[:n])
        if not text.endswith("\ufffd") and len(text) > len(emitted):
            emitted = text  # the new suffix text[len(emitted):] would be sent
    final = tok.decode(ids)
    return emitted + final[len(emitted):]  # the flush at the end of the stream


def postprocessor(tok: Tokenizer, ids: list[int]) -> str:
    pp = StreamPostprocessor(tok, prompt_tokens=1, stop=["<never>", "STOP HERE"])
    out = [pp.process(LLMEngineOutput(token_ids=[i])).text for i in ids]
    out.append(pp.process(LLMEngineOutput.length()).text)
    return "".join(out)


def best_us_per_token(fn: Callable[[], str], n_tokens: int, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.process_time()
        fn()
        times.append(time.process_time() - t0)
    return min(times) / n_tokens * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--tokens", type=int, default=1000)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()

    tok = ModelDir.load(tiny_model_dir()).tokenizer
    ids: list[int] = []
    while len(ids) < args.tokens:
        ids.extend(tok.encode(TEXT, add_special_tokens=False).ids)
    ids = ids[: args.tokens]
    expected = tok.decode(ids)
    assert incremental(tok, ids) == expected
    assert naive(tok, ids) == expected
    assert postprocessor(tok, ids) == expected

    window_tok = _Window(tok)
    assert incremental(window_tok, ids) == expected  # type: ignore[arg-type]
    inc = best_us_per_token(lambda: incremental(tok, ids), len(ids), args.repeat)
    win = best_us_per_token(lambda: incremental(window_tok, ids),  # type: ignore[arg-type]
                            len(ids), args.repeat)
    nai = best_us_per_token(lambda: naive(tok, ids), len(ids), args.repeat)
    ppr = best_us_per_token(lambda: postprocessor(tok, ids), len(ids), args.repeat)
    print(f"tokens per stream: {len(ids)} (tiny byte-level BPE, multilingual text)")
    decodes = 0
    real_decode = tok.decode

    def counting_decode(ids: list[int], skip_special_tokens: bool = True) -> str:
        nonlocal decodes
        decodes += 1
        return real_decode(ids, skip_special_tokens=skip_special_tokens)

    incremental(_Window(tok, counting_decode), ids)  # type: ignore[arg-type]
    print(f"incremental, byte-level   : {inc:8.2f} us/token  (no decode calls)")
    print(f"incremental, window path  : {win:8.2f} us/token  ({decodes / len(ids):.2f} decodes)")
    print(f"naive full re-decode      : {nai:8.2f} us/token  ({nai / inc:.1f}x slower)")
    print(f"StreamPostprocessor total : {ppr:8.2f} us/token")


if __name__ == "__main__":
    main()
