"""KV blocks: free lists, reference counts and block tables, on the GPU and in the CPU swap pool.

Owns blocks and nothing else: it never touches tensors. Copies that a swap needs are
returned as (source block, destination block) pairs for the runner to carry out.
"""

from __future__ import annotations

from collections import deque

from ondo.engine.sequence import Sequence


class BlockPool:
    """A fixed set of blocks with a free list and reference counts."""

    def __init__(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks
        self.ref_counts = [0] * num_blocks
        self.free_blocks: deque[int] = deque(range(num_blocks))

    @property
    def num_free(self) -> int:
        return len(self.free_blocks)

    def allocate(self) -> int:
        block = self.free_blocks.popleft()
        self.ref_counts[block] = 1
        return block

    def fork(self, block: int) -> None:
        self.ref_counts[block] += 1

    def release(self, block: int) -> None:
        """Drop one reference; the block returns to the free list when none is left."""
        count = self.ref_counts[block]
        if count <= 0:
            raise RuntimeError(f"block {block} released more often than it was allocated")
        self.ref_counts[block] = count - 1
        if count == 1:
            self.free_blocks.append(block)


class BlockManager:
    def __init__(self, num_gpu_blocks: int, num_cpu_blocks: int, block_size: int) -> None:
        self.block_size = block_size
        self.gpu = BlockPool(num_gpu_blocks)
        self.cpu = BlockPool(num_cpu_blocks)
        self.num_swapped_out_blocks = 0  # cumulative, for stats
        self.num_swapped_in_blocks = 0

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

    # -- GPU blocks ----------------------------------------------------------
    def num_new_blocks(self, seq: Sequence, num_new_tokens: int) -> int:
        """Blocks to add so that the cache covers the computed tokens plus the new ones."""
        need = self.blocks_needed(seq.num_computed_tokens + num_new_tokens)
        return max(0, need - len(seq.block_table))

    def can_allocate(self, num_blocks: int) -> bool:
        return num_blocks <= self.gpu.num_free

    def allocate_slots(self, seq: Sequence, num_new_tokens: int) -> bool:
        """Grow the block table for `num_new_tokens` more tokens; False (and no change) if short."""
        n = self.num_new_blocks(seq, num_new_tokens)
        if n > self.gpu.num_free:
            return False
        for _ in range(n):
            seq.block_table.append(self.gpu.allocate())
        return True

    def free(self, seq: Sequence) -> None:
        for block in reversed(seq.block_table):
            self.gpu.release(block)
        seq.block_table = []
        for block in reversed(seq.cpu_block_table):
            self.cpu.release(block)
        seq.cpu_block_table = []

    # -- swapping -----------------------------------------------------------
    def can_swap_out(self, seq: Sequence) -> bool:
        return len(seq.block_table) <= self.cpu.num_free

    def swap_out(self, seq: Sequence) -> list[tuple[int, int]]:
        """Move a sequence's blocks to the CPU pool; returns (gpu block, cpu block) copies."""
        mapping = []
        for gpu_block in seq.block_table:
            cpu_block = self.cpu.allocate()
            mapping.append((gpu_block, cpu_block))
            self.gpu.release(gpu_block)
        seq.cpu_block_table = [c for _, c in mapping]
        seq.block_table = []
        self.num_swapped_out_blocks += len(mapping)
        return mapping

    def can_swap_in(self, seq: Sequence, num_new_tokens: int) -> bool:
        need = max(len(seq.cpu_block_table), self.blocks_needed(seq.num_computed_tokens + num_new_tokens))
        return need <= self.gpu.num_free

    def swap_in(self, seq: Sequence) -> list[tuple[int, int]]:
        """Bring a sequence's blocks back; returns (cpu block, gpu block) copies."""
        mapping = []
        for cpu_block in seq.cpu_block_table:
            gpu_block = self.gpu.allocate()
            mapping.append((cpu_block, gpu_block))
            self.cpu.release(cpu_block)
        seq.block_table = [g for _, g in mapping]
        seq.cpu_block_table = []
        self.num_swapped_in_blocks += len(mapping)
        return mapping

    def slot(self, seq: Sequence, position: int) -> int:
        return seq.block_table[position // self.block_size] * self.block_size + position % self.block_size
