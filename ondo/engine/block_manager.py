"""KV blocks: free lists, reference counts, block tables, the prefix cache and copy-on-write.

Owns blocks and nothing else: it never touches tensors. Copies that a swap or a
copy-on-write needs are returned as (source block, destination block) pairs for the
runner to carry out before the step's forward pass.

Prefix caching (vLLM's automatic prefix caching): every full block whose K/V is
computed is registered under a hash chained from its parent block's hash, its token
ids and an extra key (a model or adapter id), so equal hashes mean equal K/V. A new
sequence takes every cached block of its longest matching prefix. A block whose last
reference goes stays cached on the free list, its content valid; the free list is in
least-recently-freed order, and a block taken from its head for a new use loses its
hash then (eviction). So "free" counts cached-but-unused blocks too.
"""

from __future__ import annotations

import functools
import hashlib
from array import array
from collections import OrderedDict

from ondo.engine.sequence import Sequence

BlockHash = bytes


def hash_block_tokens(parent: BlockHash | None, token_ids: list[int] | tuple[int, ...],
                      extra_key: object = None) -> BlockHash:
    """The hash of one full block: its tokens, everything before them (through the
    parent's hash) and the extra key (through the first block's parent, a hash of the
    key). SHA-256 over the raw token bytes, so a collision is not a practical risk."""
    h = hashlib.sha256(parent if parent is not None else _root_hash(extra_key))
    h.update(array("q", token_ids).tobytes())
    return h.digest()


@functools.lru_cache(maxsize=64)
def _root_hash(extra_key: object) -> BlockHash:
    return hashlib.sha256(repr(("ondo-prefix-root", extra_key)).encode()).digest()


class BlockPool:
    """A fixed set of blocks with a free list (least recently freed first) and reference counts."""

    def __init__(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks
        self.ref_counts = [0] * num_blocks
        self.free_blocks: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self.num_shared = 0  # blocks with ref_count > 1, kept current (stats read it every step)

    @property
    def num_free(self) -> int:
        return len(self.free_blocks)

    def allocate(self) -> int:
        block, _ = self.free_blocks.popitem(last=False)
        self.ref_counts[block] = 1
        return block

    def fork(self, block: int) -> None:
        """One more reference; a free (cached) block leaves the free list."""
        count = self.ref_counts[block]
        if count == 0:
            del self.free_blocks[block]
        elif count == 1:
            self.num_shared += 1
        self.ref_counts[block] = count + 1

    def release(self, block: int) -> None:
        """Drop one reference; the block returns to the free list's tail when none is left."""
        count = self.ref_counts[block]
        if count <= 0:
            raise RuntimeError(f"block {block} released more often than it was allocated")
        self.ref_counts[block] = count - 1
        if count == 1:
            self.free_blocks[block] = None
        elif count == 2:
            self.num_shared -= 1


class BlockManager:
    def __init__(self, num_gpu_blocks: int, num_cpu_blocks: int, block_size: int,
                 enable_prefix_caching: bool = True, extra_key: object = None) -> None:
        self.block_size = block_size
        self.gpu = BlockPool(num_gpu_blocks)
        self.cpu = BlockPool(num_cpu_blocks)
        self.enable_prefix_caching = enable_prefix_caching
        self.extra_key = extra_key
        self.cached_blocks: dict[BlockHash, int] = {}  # hash -> GPU block holding that K/V
        self.block_hashes: list[BlockHash | None] = [None] * num_gpu_blocks
        self.pending_copies: list[tuple[int, int]] = []  # copy-on-write (src, dst), taken by the scheduler
        # Cumulative, for stats.
        self.num_swapped_out_blocks = 0
        self.num_swapped_in_blocks = 0
        self.num_cow_copies = 0
        self.prefix_cache_queries = 0  # tokens looked up
        self.prefix_cache_hits = 0  # tokens found cached

    # -- sizes ---------------------------------------------------------------
    def blocks_needed(self, num_tokens: int) -> int:
        return (num_tokens + self.block_size - 1) // self.block_size

    @property
    def num_total_blocks(self) -> int:
        return self.gpu.num_blocks

    @property
    def num_free_blocks(self) -> int:
        return self.gpu.num_free

    @property
    def num_used_blocks(self) -> int:
        return self.gpu.num_blocks - self.gpu.num_free

    @property
    def num_cpu_blocks_used(self) -> int:
        return self.cpu.num_blocks - self.cpu.num_free

    @property
    def num_shared_blocks(self) -> int:
        return self.gpu.num_shared

    @property
    def num_cached_blocks(self) -> int:
        return len(self.cached_blocks)

    # -- GPU blocks ----------------------------------------------------------
    def _allocate_gpu(self) -> int:
        block = self.gpu.allocate()
        h = self.block_hashes[block]
        if h is not None:  # evict: its content is about to be overwritten
            del self.cached_blocks[h]
            self.block_hashes[block] = None
        return block

    def _needs_cow(self, seq: Sequence) -> bool:
        """The next token lands in a block another sequence also holds."""
        i = seq.num_computed_tokens // self.block_size
        return i < len(seq.block_table) and self.gpu.ref_counts[seq.block_table[i]] > 1

    def has_slot_for_next_token(self, seq: Sequence) -> bool:
        """The next token lands in a block the sequence already holds alone: one more
        token needs no allocation and no copy (`allocate_slots(seq, 1)` would do nothing)."""
        i = seq.num_computed_tokens // self.block_size
        return i < len(seq.block_table) and self.gpu.ref_counts[seq.block_table[i]] == 1

    def num_new_blocks(self, seq: Sequence, num_new_tokens: int) -> int:
        """Blocks to add so that the cache covers the computed tokens plus the new ones."""
        need = self.blocks_needed(seq.num_computed_tokens + num_new_tokens)
        return max(0, need - len(seq.block_table))

    def can_allocate(self, num_blocks: int) -> bool:
        return num_blocks <= self.gpu.num_free

    def allocate_slots(self, seq: Sequence, num_new_tokens: int) -> bool:
        """Grow the block table for `num_new_tokens` more tokens, copying a shared block the
        first of them would write into; False (and no change) if blocks are short."""
        n = self.num_new_blocks(seq, num_new_tokens)
        cow = num_new_tokens > 0 and self._needs_cow(seq)
        if n + cow > self.gpu.num_free:
            return False
        if cow:
            i = seq.num_computed_tokens // self.block_size
            src = seq.block_table[i]
            dst = self._allocate_gpu()
            self.pending_copies.append((src, dst))
            self.gpu.release(src)
            seq.block_table[i] = dst
            self.num_cow_copies += 1
        for _ in range(n):
            seq.block_table.append(self._allocate_gpu())
        return True

    def take_copies(self) -> list[tuple[int, int]]:
        """The copy-on-write copies decided since the last call."""
        copies, self.pending_copies = self.pending_copies, []
        return copies

    def free(self, seq: Sequence) -> None:
        # Tail blocks first, so that they are evicted before the prefix others may share.
        for block in reversed(seq.block_table):
            self.gpu.release(block)
        seq.block_table = []
        seq.num_registered_blocks = 0
        for block in reversed(seq.cpu_block_table):
            self.cpu.release(block)
        seq.cpu_block_table = []

    def fork(self, parent: Sequence, child: Sequence) -> None:
        """The child shares all of the parent's blocks (one more reference each)."""
        for block in parent.block_table:
            self.gpu.fork(block)
        child.block_table = list(parent.block_table)
        child.num_registered_blocks = parent.num_registered_blocks
        child.block_hashes = list(parent.block_hashes)

    # -- prefix cache ---------------------------------------------------------
    def _hashes(self, seq: Sequence, num_blocks: int) -> list[BlockHash]:
        """The chained hashes of the sequence's first `num_blocks` full blocks (memoized)."""
        bs = self.block_size
        hashes = seq.block_hashes
        while len(hashes) < num_blocks:
            i = len(hashes)
            parent = hashes[-1] if hashes else None
            hashes.append(hash_block_tokens(parent, seq.token_ids[i * bs : (i + 1) * bs], self.extra_key))
        return hashes

    def find_cached_prefix(self, seq: Sequence) -> list[int]:
        """GPU blocks holding the longest cached prefix of the sequence's full blocks, leaving
        at least its last token to compute (so that logits exist). Takes nothing."""
        if not self.enable_prefix_caching:
            return []
        max_blocks = (seq.num_tokens - 1) // self.block_size
        found = []
        for h in self._hashes(seq, max_blocks):
            block = self.cached_blocks.get(h)
            if block is None:
                break
            found.append(block)
        return found

    def allocate_with_prefix(self, seq: Sequence, cached: list[int], num_new_tokens: int) -> bool:
        """Admit a sequence with no blocks: take the `cached` prefix blocks (from
        `find_cached_prefix`), count them computed, and allocate for `num_new_tokens` more."""
        assert not seq.block_table
        num_cached_tokens = len(cached) * self.block_size
        n = self.blocks_needed(num_cached_tokens + num_new_tokens) - len(cached)
        n += sum(1 for b in cached if self.gpu.ref_counts[b] == 0)  # they leave the free list
        if n > self.gpu.num_free:
            return False
        for block in cached:
            self.gpu.fork(block)
        seq.block_table = list(cached)
        seq.num_registered_blocks = len(cached)
        seq.num_computed_tokens = num_cached_tokens
        if self.enable_prefix_caching:
            self.prefix_cache_queries += seq.num_tokens
            self.prefix_cache_hits += num_cached_tokens
        return self.allocate_slots(seq, num_new_tokens)

    def cache_full_blocks(self, seq: Sequence) -> None:
        """Register the sequence's blocks that are full and computed (vLLM's rule: never one
        whose K/V is still to be written, nor one holding a token not yet read back from the
        device). Call after each step's forward pass and as tokens arrive."""
        # Most calls (a decode token within its block) end at the first test: no block of
        # the computed tokens beyond those registered is full.
        if seq.num_computed_tokens // self.block_size <= seq.num_registered_blocks:
            return
        if not self.enable_prefix_caching or seq.is_finished:
            return
        num_full = min(seq.num_computed_tokens, seq.num_tokens) // self.block_size
        if num_full <= seq.num_registered_blocks:
            return
        hashes = self._hashes(seq, num_full)
        for i in range(seq.num_registered_blocks, num_full):
            block = seq.block_table[i]
            # Skip a block already registered (a hit, or shared by a fork) and a duplicate
            # of content another block holds: that one stays unhashed and is freed plainly.
            if self.block_hashes[block] is None and hashes[i] not in self.cached_blocks:
                self.block_hashes[block] = hashes[i]
                self.cached_blocks[hashes[i]] = block
        seq.num_registered_blocks = num_full

    # -- swapping -----------------------------------------------------------
    def can_swap_out(self, seq: Sequence) -> bool:
        return len(seq.block_table) <= self.cpu.num_free

    def swap_out(self, seq: Sequence) -> list[tuple[int, int]]:
        """Copy a sequence's blocks to the CPU pool and drop its GPU references; returns
        (gpu block, cpu block) copies. A block others share stays theirs on the GPU; a
        cached one stays cached until evicted."""
        mapping = []
        for gpu_block in seq.block_table:
            cpu_block = self.cpu.allocate()
            mapping.append((gpu_block, cpu_block))
            self.gpu.release(gpu_block)
        seq.cpu_block_table = [c for _, c in mapping]
        seq.block_table = []
        seq.num_registered_blocks = 0
        self.num_swapped_out_blocks += len(mapping)
        return mapping

    def can_swap_in(self, seq: Sequence, num_new_tokens: int) -> bool:
        need = max(len(seq.cpu_block_table), self.blocks_needed(seq.num_computed_tokens + num_new_tokens))
        return need <= self.gpu.num_free

    def swap_in(self, seq: Sequence) -> list[tuple[int, int]]:
        """Bring a sequence's blocks back; returns (cpu block, gpu block) copies. A full
        block whose hash is still cached on the GPU is taken again with no copy."""
        mapping = []
        table = []
        num_full = seq.num_computed_tokens // self.block_size
        hashes = self._hashes(seq, num_full) if self.enable_prefix_caching else []
        for i, cpu_block in enumerate(seq.cpu_block_table):
            cached = self.cached_blocks.get(hashes[i]) if i < len(hashes) else None
            if cached is not None:
                self.gpu.fork(cached)
                table.append(cached)
            else:
                gpu_block = self._allocate_gpu()
                mapping.append((cpu_block, gpu_block))
                table.append(gpu_block)
            self.cpu.release(cpu_block)
        seq.block_table = table
        seq.cpu_block_table = []
        self.num_swapped_in_blocks += len(mapping)
        self.cache_full_blocks(seq)
        return mapping

    def slot(self, seq: Sequence, position: int) -> int:
        return seq.block_table[position // self.block_size] * self.block_size + position % self.block_size
