"""Block hashes as Dynamo computes them, so engines and routers agree bit for bit.

- ``tokens_hash`` (local block hash) of a full block = ``xxh3_64(u32-LE token ids, seed)``.
- ``block_hash`` (sequence hash) chains them: ``seq[0] = local[0]``,
  ``seq[i] = xxh3_64(u64-LE seq[i-1] || u64-LE local[i], seed)``.

Only full blocks are hashed; a trailing partial block has no hash (it cannot be shared).
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import Final

import xxhash

XXH3_SEED: Final = 1337

_PAIR = struct.Struct("<QQ")


def local_block_hashes(
    token_ids: Sequence[int], block_size: int, seed: int = XXH3_SEED
) -> list[int]:
    """``tokens_hash`` of every full block of ``token_ids``."""
    if block_size <= 0:
        raise ValueError(f"block_size must be positive, got {block_size}")
    n_full = len(token_ids) // block_size
    if n_full == 0:
        return []
    data = struct.pack(f"<{n_full * block_size}I", *token_ids[: n_full * block_size])
    step = block_size * 4
    h = xxhash.xxh3_64_intdigest
    return [h(data[i * step : (i + 1) * step], seed) for i in range(n_full)]


def sequence_hash(parent: int | None, local: int, seed: int = XXH3_SEED) -> int:
    """Chain one block's local hash onto its parent's sequence hash."""
    if parent is None:
        return local
    return xxhash.xxh3_64_intdigest(_PAIR.pack(parent, local), seed)


def block_hashes(
    token_ids: Sequence[int],
    block_size: int,
    seed: int = XXH3_SEED,
    parent: int | None = None,
) -> list[int]:
    """Chained ``block_hash`` of every full block of ``token_ids`` (optionally after ``parent``)."""
    out: list[int] = []
    h = xxhash.xxh3_64_intdigest
    pack = _PAIR.pack
    for local in local_block_hashes(token_ids, block_size, seed):
        parent = local if parent is None else h(pack(parent, local), seed)
        out.append(parent)
    return out
