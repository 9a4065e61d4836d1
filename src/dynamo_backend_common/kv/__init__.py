"""KV-cache block hashing shared by engines (events) and routers (lookups)."""

from .hashing import XXH3_SEED, block_hashes, local_block_hashes, sequence_hash

__all__ = ["XXH3_SEED", "block_hashes", "local_block_hashes", "sequence_hash"]
