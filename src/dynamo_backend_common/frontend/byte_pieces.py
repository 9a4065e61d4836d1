"""The bytes each token id decodes to, for byte-level BPE tokenizers: :func:`byte_pieces`.

A tokenizer whose decoder is ``ByteLevel`` (GPT-2, Llama 3, Qwen, ...) decodes a sequence of ids
by concatenating each token's bytes and decoding the result as UTF-8 (invalid sequences become
U+FFFD). With each token's bytes known, the incremental detokenizer
(:class:`.postprocess.IncrementalDetokenizer`) decodes a stream with an incremental UTF-8
decoder: a table lookup per token instead of a ``tokenizer.decode`` call on a window.

The table is derived from the tokenizer's own strings (the ``ByteLevel`` alphabet maps each of
the 256 byte values to one printable character; a token with a character outside that alphabet,
an added token, decodes to its UTF-8 as is), then checked against ``tokenizer.decode`` for
every id and for a few random sequences; any difference (another decoder, a tokenizer whose
decode does more) gives ``None``, and the caller keeps decoding with the tokenizer.
"""

from __future__ import annotations

import functools
import random
from typing import Final

from tokenizers import Tokenizer, decoders

__all__ = ["byte_pieces"]

#: Random sequences of each kind :func:`byte_pieces` checks against ``tokenizer.decode``
#: (besides every id alone), and their length.
_CHECK_SEQUENCES: Final = 64
_CHECK_LENGTH: Final = 12


def _byte_alphabet() -> dict[str, int]:
    """GPT-2's ``bytes_to_unicode``, inverted: the character standing for each byte value."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    chars = {b: b for b in printable}
    extra = 0
    for b in range(256):
        if b not in chars:
            chars[b] = 256 + extra
            extra += 1
    return {chr(c): b for b, c in chars.items()}


def _piece(token: str | None, alphabet: dict[str, int]) -> bytes:
    if token is None:
        return b""  # an id with no token decodes to nothing
    try:
        return bytes(alphabet[c] for c in token)
    except KeyError:
        return token.encode()  # not byte-level characters (an added token): as is


@functools.lru_cache(maxsize=8)
def byte_pieces(tokenizer: Tokenizer) -> tuple[bytes, ...] | None:
    """Per token id (special tokens included) the bytes it decodes to, or ``None`` when the
    tokenizer is not a byte-level one whose decode is exactly "join the bytes, decode as UTF-8
    with replacement". Cached per tokenizer object; costs a ``decode`` of every id the first
    time (call it off the event loop, e.g. while loading the model)."""
    if not isinstance(tokenizer.decoder, decoders.ByteLevel):
        return None
    alphabet = _byte_alphabet()
    size = tokenizer.get_vocab_size(with_added_tokens=True)
    if not size:
        return None
    pieces = tuple(_piece(tokenizer.id_to_token(i), alphabet) for i in range(size))
    singles = tokenizer.decode_batch([[i] for i in range(size)], skip_special_tokens=False)
    if any(p.decode("utf-8", "replace") != s for p, s in zip(pieces, singles, strict=True)):
        return None
    # Random sequences of any ids, and of single-byte tokens (mostly invalid or split UTF-8,
    # where the replacement rules of the two decoders would show a difference).
    rng = random.Random(0)
    bytes_ids = [i for i, p in enumerate(pieces) if len(p) == 1] or [0]
    seqs = [[rng.randrange(size) for _ in range(_CHECK_LENGTH)] for _ in range(_CHECK_SEQUENCES)]
    seqs += [[rng.choice(bytes_ids) for _ in range(_CHECK_LENGTH)]
             for _ in range(_CHECK_SEQUENCES)]
    decoded = tokenizer.decode_batch(seqs, skip_special_tokens=False)
    for ids, text in zip(seqs, decoded, strict=True):
        if b"".join(pieces[i] for i in ids).decode("utf-8", "replace") != text:
            return None
    return pieces
