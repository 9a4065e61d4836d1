"""Tokenizing rendered chat prompts piece by piece, with a cache of the pieces:
:class:`PieceEncoder`.

A chat template's output is text between added tokens (``<|im_start|>``, ``<|im_end|>``, ...).
A Hugging Face tokenizer splits its input at the added tokens first and encodes every piece in
between on its own, so ``encode(text)`` is the concatenation of the pieces' encodings and the
added tokens' ids. Conversations repeat most of their pieces: every turn sends the system prompt
and the whole history again, and many requests share a system prompt. :class:`PieceEncoder`
encodes each piece once and keeps its ids in a bounded LRU cache (by characters), so a request
pays the tokenizer only for the text it is the first to send.

It is exact by construction only for tokenizers that encode each piece independently of where
it is: :meth:`PieceEncoder.for_tokenizer` returns ``None`` (the caller keeps
``tokenizer.encode``) unless every added token matches as a plain literal (no ``lstrip``,
``rstrip``, ``single_word``, ``normalized``), special tokens are split out
(``encode_special_tokens`` off) and the pre-tokenizer is one whose splits do not depend on their
position (byte-level, regex splits, digits, punctuation, whitespace, Metaspace that prepends to
every piece or none; not Metaspace's ``first``); it also compares its ids with
``tokenizer.encode`` on sample texts. Thread-safe (a long prompt is tokenized in a thread).
"""

from __future__ import annotations

import json
import re
import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, Final

from tokenizers import Tokenizer

__all__ = ["DEFAULT_CACHE_CHARS", "PieceEncoder"]

#: Characters of piece text the cache keeps (with their ids: roughly 8 MB at 4 MiB).
DEFAULT_CACHE_CHARS: Final = 4 * 2**20
#: Pieces longer than this are encoded but not cached (a document pasted once).
MAX_PIECE_CHARS: Final = 64 * 1024

_INDEPENDENT_PRETOKENIZERS: Final = frozenset({
    "ByteLevel", "Split", "Digits", "Punctuation", "Whitespace", "WhitespaceSplit",
    "BertPreTokenizer", "CharDelimiterSplit", "UnicodeScripts"})
_SAMPLE_TEXTS: Final = ("", "a", " hello world", "Hello, World!\n\n  x  ", "héllo wörld 你好 🎉",
                        "\n", " ", "1234 + 5.6e7 = ?", "a  b\tc\r\nd")


def _independent(pre: Any) -> bool:
    """Whether a pre-tokenizer (its JSON) splits each piece without regard to its position."""
    if pre is None:
        return True
    kind = pre.get("type")
    if kind == "Sequence":
        return all(_independent(p) for p in pre.get("pretokenizers", ()))
    if kind == "Metaspace":
        return pre.get("prepend_scheme", "always") in ("always", "never")
    return kind in _INDEPENDENT_PRETOKENIZERS


class PieceEncoder:
    """``encode(text)`` = ``tokenizer.encode(text, add_special_tokens=False).ids``, computed
    from the cached ids of the pieces between added tokens (see the module docstring)."""

    def __init__(self, tokenizer: Tokenizer, added: dict[str, int], *,
                 max_chars: int = DEFAULT_CACHE_CHARS) -> None:
        self._tokenizer = tokenizer
        self._added = added
        # ``encode_batch_fast`` (tokenizers >= 0.21) skips the offsets: the same ids for ~20%
        # less CPU (for_tokenizer checks the ids against ``encode``).
        fast = getattr(tokenizer, "encode_batch_fast", None)
        self._encode: Callable[[str], list[int]] = (
            (lambda text: fast([text], add_special_tokens=False)[0].ids) if fast is not None
            else (lambda text: tokenizer.encode(text, add_special_tokens=False).ids))
        # Longest first: at one position the alternation takes the longest token there, which
        # with the leftmost match is the tokenizer's leftmost-longest rule.
        alternatives = "|".join(re.escape(t) for t in sorted(added, key=len, reverse=True))
        self._split = re.compile(f"({alternatives})").split if added else None
        self._cache: OrderedDict[str, list[int]] = OrderedDict()
        self._chars = 0
        self.max_chars = max_chars
        self._lock = threading.Lock()
        #: Pieces found in the cache, and pieces the tokenizer encoded.
        self.hits = 0
        self.misses = 0

    @classmethod
    def for_tokenizer(cls, tokenizer: Tokenizer, *,
                      max_chars: int = DEFAULT_CACHE_CHARS) -> PieceEncoder | None:
        """A :class:`PieceEncoder` when piecewise encoding is exact for ``tokenizer``, else
        ``None``."""
        if getattr(tokenizer, "encode_special_tokens", False):
            return None
        added: dict[str, int] = {}
        for i, tok in tokenizer.get_added_tokens_decoder().items():
            if tok.lstrip or tok.rstrip or tok.single_word or tok.normalized or not tok.content:
                return None
            added[tok.content] = i
        try:
            pre = json.loads(tokenizer.to_str()).get("pre_tokenizer")
        except ValueError:
            return None
        if not _independent(pre):
            return None
        enc = cls(tokenizer, added, max_chars=max_chars)
        tokens = sorted(added)[:16]
        samples = list(_SAMPLE_TEXTS)
        for t in tokens:
            samples += [f"{t}", f"a{t}b", f" {t} {t}\n x", f"{t}user\nhi there{t}\n"]
        if tokens:
            samples.append(" two ".join(tokens) + " héllo 🎉")
        for text in samples:
            if enc.encode(text) != tokenizer.encode(text, add_special_tokens=False).ids:
                return None
        enc.clear()
        return enc

    def clear(self) -> None:
        with self._lock:
            self._cache.clear()
            self._chars = 0
            self.hits = self.misses = 0

    def encode(self, text: str) -> list[int]:
        """The ids of ``text`` (no post-processor special tokens), as the tokenizer has them."""
        if self._split is None:
            return list(self._piece(text))
        ids: list[int] = []
        added = self._added
        for i, part in enumerate(self._split(text)):
            if i % 2:
                ids.append(added[part])
            elif part:
                ids += self._piece(part)
        return ids

    def _piece(self, text: str) -> list[int]:
        with self._lock:
            ids = self._cache.get(text)
            if ids is not None:
                self._cache.move_to_end(text)
                self.hits += 1
                return ids
            self.misses += 1
        ids = self._encode(text)
        if len(text) <= MAX_PIECE_CHARS:
            with self._lock:
                if text not in self._cache:
                    self._cache[text] = ids
                    self._chars += len(text)
                    while self._chars > self.max_chars and self._cache:
                        old, _ = self._cache.popitem(last=False)
                        self._chars -= len(old)
        return ids
