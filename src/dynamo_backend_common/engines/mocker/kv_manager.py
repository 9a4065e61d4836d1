"""A paged KV cache with prefix caching, as vLLM keeps one, reduced to block accounting.

The cache holds ``num_blocks`` blocks of ``block_size`` tokens. A block is in one of three
states:

- **private**: owned by one sequence and not shareable. That is a block still being filled (the
  trailing partial block of a sequence) or one whose tokens are not computed yet. Private blocks
  have no hash and are never published.
- **hashed**: a full, computed block, keyed by its chained ``block_hash``
  (:func:`dynamo_backend_common.kv.hashing.block_hashes`, the hash routers compute from a prompt)
  and reference counted. Any sequence whose prefix has the same hash shares it.
- **evictable**: a hashed block with refcount 0. It stays cached (a later request with the same
  prefix reuses it) until its space is needed; then the least recently released one is evicted.

Events (the ``sink``): a hashed block entering the cache emits :class:`KvStored` (blocks in
sequence order, ``parent_hash`` = the block before the first one); evicting blocks emits
:class:`KvRemoved`. Nothing else changes the set of hashed blocks, so replaying the events gives
exactly :meth:`KvManager.cached_hashes`.

Pins (disaggregated serving, :mod:`.disagg`): :meth:`KvManager.pin` takes over blocks a finished
sequence still holds (its hashed references and private blocks) into a :class:`KvPin`, outside
any sequence, so neither the scheduler nor eviction can touch them until :meth:`KvManager.unpin`.
Each pinned block is recorded as ``(block id, allocation generation)``: the id is the block hash
of a hashed block and a fresh negative number for a private one; the generation is a counter
value that the manager replaces whenever that block is freed while pinned (evicted, or
:meth:`KvManager.force_free`, the fault-injection hook of tests). :meth:`KvManager.verify` thus
tells a reader whether a pin still names the very allocations it took, not reused ones. A
manager with no pins does no pin bookkeeping at all (the aggregated hot path is unchanged).

Invariants (checked by :meth:`KvManager.check_invariants`): every refcount is >= 0, a block is
evictable iff its refcount is 0, ``used + cached + free == total`` with each term >= 0, pinned
private blocks are a part of the private ones, and every pinned hashed block is cached with at
least one reference per pin.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from typing import NamedTuple

from ...protocols.kv import KvEventData, KvRemoved, KvStored, StoredBlock

__all__ = ["KvManager", "KvPin", "KvStats"]


class KvStats(NamedTuple):
    """Block counts of one cache. ``used + cached + free == total``."""

    #: Blocks referenced by live sequences (hashed with refcount > 0, plus private blocks).
    used_blocks: int
    #: Hashed blocks no sequence references: reusable by a prefix hit, evictable.
    cached_blocks: int
    #: Blocks holding nothing.
    free_blocks: int
    total: int


class KvPin:
    """Blocks held outside any sequence (see the module docs). Build with :meth:`KvManager.pin`;
    release with :meth:`KvManager.unpin` (idempotent)."""

    __slots__ = ("blocks", "hashes", "n_private", "released")

    def __init__(self, hashes: list[int], n_private: int, blocks: list[tuple[int, int]]) -> None:
        #: Hashed blocks (one reference each), in sequence order.
        self.hashes = hashes
        #: Private blocks owned (the trailing partial block, or all without prefix caching).
        self.n_private = n_private
        #: ``(block id, allocation generation)`` of every block: hashed ones, then private ones.
        self.blocks = blocks
        self.released = False

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    def __repr__(self) -> str:
        state = "released" if self.released else "held"
        return f"KvPin({len(self.hashes)} hashed + {self.n_private} private, {state})"


class KvManager:
    """Block accounting of one data-parallel rank's KV cache. Not thread safe (one event loop).

    ``sink`` receives every stored/removed event, in order, synchronously.
    With ``prefix_caching=False`` nothing is ever hashed: every block is private and no events
    are emitted.
    """

    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        *,
        prefix_caching: bool = True,
        sink: Callable[[KvEventData], None] | None = None,
    ) -> None:
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError("num_blocks and block_size must be positive")
        self.total_blocks = num_blocks
        self.block_size = block_size
        self.prefix_caching = prefix_caching
        self.sink = sink
        # block_hash -> refcount of every hashed block.
        self._blocks: dict[int, int] = {}
        # Insertion order = release order: the first entry is the least recently used.
        self._evictable: OrderedDict[int, None] = OrderedDict()
        self._private = 0
        # Pins: block id -> generation of the allocation pinned (empty without pins), pins per
        # hashed block, private blocks owned by pins (a part of ``_private``).
        self._pin_gen: dict[int, int] = {}
        self._pin_refs: dict[int, int] = {}
        self._pinned_private = 0
        self._next_gen = 0
        self._next_private_id = 0

    # -- queries --------------------------------------------------------------------------
    def stats(self) -> KvStats:
        cached = len(self._evictable)
        used = len(self._blocks) - cached + self._private
        return KvStats(used, cached, self.total_blocks - used - cached, self.total_blocks)

    @property
    def used_blocks(self) -> int:
        return len(self._blocks) - len(self._evictable) + self._private

    @property
    def private_blocks(self) -> int:
        """Blocks held privately (partial or not yet computed), across all sequences."""
        return self._private

    @property
    def pinned_private_blocks(self) -> int:
        """Private blocks owned by pins (not by sequences)."""
        return self._pinned_private

    @property
    def pinned_blocks(self) -> int:
        """Distinct blocks pinned (a hashed block two pins share counts once)."""
        return len(self._pin_refs) + self._pinned_private

    def available(self) -> int:
        """Blocks an allocation can get: free ones plus evictable ones."""
        return self.total_blocks - len(self._blocks) - self._private + len(self._evictable)

    def refcount(self, block_hash: int) -> int:
        """References to a hashed block (0 = evictable); -1 when it is not cached."""
        return self._blocks.get(block_hash, -1)

    def cached_hashes(self) -> set[int]:
        """Every hashed block (referenced or evictable): what the published events describe."""
        return set(self._blocks)

    def match_prefix(self, hashes: Sequence[int]) -> int:
        """How many leading ``hashes`` are cached (referenced or evictable)."""
        if not self.prefix_caching:
            return 0
        n = 0
        for h in hashes:
            if h not in self._blocks:
                break
            n += 1
        return n

    def evictable_among(self, hashes: Iterable[int]) -> int:
        """How many of the (cached) ``hashes`` are evictable: acquiring them uses up that much
        of :meth:`available`."""
        return sum(1 for h in hashes if h in self._evictable)

    # -- mutations ------------------------------------------------------------------------
    def acquire(self, hashes: Iterable[int]) -> None:
        """Take one reference on each cached block of ``hashes`` (a prefix hit)."""
        for h in hashes:
            self._take(h)

    def allocate(self, n: int) -> bool:
        """Reserve ``n`` private blocks, evicting least recently used cached blocks as needed.

        Returns False, changing nothing, when fewer than ``n`` blocks are available.
        """
        if n <= 0:
            return n == 0
        if n > self.available():
            return False
        shortfall = n - (self.total_blocks - len(self._blocks) - self._private)
        if shortfall > 0:
            evicted: list[int] = []
            for _ in range(shortfall):
                h, _none = self._evictable.popitem(last=False)
                del self._blocks[h]
                evicted.append(h)
            if self._pin_gen:
                # A pinned block is never evictable; if one ever is (a refcount bug), its pin
                # must see it as gone.
                for h in evicted:
                    self._invalidate(h)
            self._emit(KvRemoved(block_hashes=evicted))
        self._private += n
        return True

    def commit(self, blocks: Sequence[tuple[int, int]], parent: int | None) -> None:
        """Turn ``len(blocks)`` of the caller's private blocks into hashed ones.

        ``blocks`` are ``(block_hash, tokens_hash)`` of consecutive full blocks of one sequence,
        in order; ``parent`` is the hash of the block before the first (None at the start).
        A block whose hash is already cached (another sequence computed the same prefix) is
        shared instead: the private copy is dropped and no event is emitted for it. One
        :class:`KvStored` is emitted per run of newly cached blocks.
        """
        if not blocks:
            return
        if len(blocks) > self._private:
            raise RuntimeError("commit of more blocks than are privately allocated")
        self._private -= len(blocks)
        run: list[StoredBlock] = []
        run_parent = parent
        for h, local in blocks:
            if h not in self._blocks:
                self._blocks[h] = 1
                run.append(StoredBlock(block_hash=h, tokens_hash=local))
            else:
                if run:
                    self._emit(KvStored(blocks=run, parent_hash=run_parent))
                    run = []
                self._take(h)
                run_parent = h
        if run:
            self._emit(KvStored(blocks=run, parent_hash=run_parent))

    def release(self, hashes: Sequence[int], n_private: int) -> None:
        """Drop one reference on each of ``hashes`` (a sequence's blocks, in order) and free
        ``n_private`` private blocks.

        Blocks are released tail first, so a sequence's last blocks are evicted before its first
        ones (which more requests share).
        """
        if n_private < 0 or n_private > self._private:
            raise RuntimeError(f"release of {n_private} private blocks; {self._private} held")
        self._private -= n_private
        blocks = self._blocks
        for h in reversed(hashes):
            refs = blocks[h]
            if refs <= 0:
                raise RuntimeError(f"refcount of block {h:#x} would go negative")
            blocks[h] = refs - 1
            if refs == 1:
                self._evictable[h] = None

    # -- pins -----------------------------------------------------------------------------
    def pin(self, hashes: Sequence[int], n_private: int) -> KvPin:
        """Take over a caller's blocks: one reference on each of ``hashes`` (cached blocks it
        references, in sequence order) and ``n_private`` of the private blocks it allocated.
        The caller must forget them; :meth:`unpin` releases them."""
        if n_private < 0 or n_private > self._private - self._pinned_private:
            raise RuntimeError(f"pin of {n_private} private blocks; {self._private} held")
        gen, refs, cached = self._pin_gen, self._pin_refs, self._blocks
        blocks: list[tuple[int, int]] = []
        for h in hashes:
            if cached.get(h, 0) <= 0:
                raise RuntimeError(f"pin of block {h:#x}, which the caller does not reference")
            g = gen.get(h)
            if g is None:  # shared by two pins: one allocation, one generation
                g = gen[h] = self._new_gen()
            refs[h] = refs.get(h, 0) + 1
            blocks.append((h, g))
        for _ in range(n_private):
            self._next_private_id += 1
            bid = -self._next_private_id
            g = gen[bid] = self._new_gen()
            blocks.append((bid, g))
        self._pinned_private += n_private
        return KvPin(list(hashes), n_private, blocks)

    def verify(self, pin: KvPin) -> list[int]:
        """Ids of the blocks of ``pin`` that are no longer the allocation it took (freed or
        reused since); empty when the pin is intact."""
        gen, cached = self._pin_gen, self._blocks
        return [
            bid
            for bid, g in pin.blocks
            if gen.get(bid) != g or (bid >= 0 and cached.get(bid, 0) <= 0)
        ]

    def unpin(self, pin: KvPin) -> None:
        """Release a pin's blocks that are still its own (hashed blocks lose the pin's
        reference and may become evictable; private ones are freed). Idempotent."""
        if pin.released:
            return
        pin.released = True
        gen, refs = self._pin_gen, self._pin_refs
        keep: list[int] = []
        n_private = 0
        for bid, g in pin.blocks:
            intact = gen.get(bid) == g
            if bid >= 0:
                left = refs[bid] - 1
                if left:
                    refs[bid] = left
                else:
                    del refs[bid]
                    del gen[bid]
                if intact and self._blocks.get(bid, 0) > 0:
                    keep.append(bid)
            elif intact:
                del gen[bid]
                n_private += 1
        self._pinned_private -= n_private
        self.release(keep, n_private)

    def force_free(self, block_id: int) -> bool:
        """Free one pinned block behind its pin's back: the fault a KV transfer must detect
        (tests only; a correct engine never calls it). A hashed block leaves the cache (a
        :class:`KvRemoved` is emitted) whatever its references. False when ``block_id`` is not
        pinned."""
        if block_id not in self._pin_gen:
            return False
        if block_id >= 0:
            if block_id in self._blocks:
                del self._blocks[block_id]
                self._evictable.pop(block_id, None)
                self._emit(KvRemoved(block_hashes=[block_id]))
        else:
            self._private -= 1
            self._pinned_private -= 1
        self._invalidate(block_id)
        return True

    def _invalidate(self, block_id: int) -> None:
        if block_id in self._pin_gen:
            self._pin_gen[block_id] = self._new_gen()  # never matches a pin's recorded one

    def _new_gen(self) -> int:
        self._next_gen += 1
        return self._next_gen

    def check_invariants(self) -> None:
        """Raise ``AssertionError`` when the accounting is inconsistent (tests, debugging)."""
        used, cached, free, total = self.stats()
        assert self._private >= 0, f"negative private blocks: {self._private}"
        assert used >= 0 and cached >= 0 and free >= 0, self.stats()
        assert used + cached + free == total
        for h, refs in self._blocks.items():
            assert refs >= 0, f"negative refcount on {h:#x}"
            assert (refs == 0) == (h in self._evictable), f"evictable set wrong: {h:#x}"
        assert all(h in self._blocks for h in self._evictable)
        assert 0 <= self._pinned_private <= self._private, (self._pinned_private, self._private)
        for h, pins in self._pin_refs.items():
            if self._pin_gen.get(h) is not None and h in self._blocks:
                assert self._blocks[h] >= pins, f"pinned block {h:#x} under-referenced"

    def _take(self, h: int) -> None:
        refs = self._blocks[h]
        if refs == 0:
            del self._evictable[h]
        self._blocks[h] = refs + 1

    def _emit(self, data: KvEventData) -> None:
        if self.sink is not None:
            self.sink(data)
