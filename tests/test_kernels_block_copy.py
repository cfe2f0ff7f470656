"""Block copy-on-write and GPU<->CPU swap; on a CPU-only machine the reference path."""

import torch

from ondo.kernels.block_copy import _contiguous_runs, copy_blocks, swap_in, swap_out

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
NUM_LAYERS, NUM_BLOCKS, POOL_BLOCKS = 2, 10, 6
BLOCK_SHAPE = (4, 2, 8)  # block_size, Hkv, D


def _cache(num_blocks: int, device: str, seed: int) -> list[torch.Tensor]:
    """Every layer's k_cache and v_cache, blocks on dim 0."""
    gen = torch.Generator().manual_seed(seed)
    return [
        torch.randn(num_blocks, *BLOCK_SHAPE, generator=gen).to(device)
        for _ in range(2 * NUM_LAYERS)
    ]


def test_copy_blocks_copies_every_layer_and_leaves_other_blocks_alone():
    cache = _cache(NUM_BLOCKS, DEVICE, seed=0)
    before = [t.clone() for t in cache]
    copy_blocks(cache, [(2, 7), (5, 1), (2, 3)])  # one source shared by two forks
    for new, old in zip(cache, before, strict=True):
        assert torch.equal(new[7], old[2]) and torch.equal(new[3], old[2])
        assert torch.equal(new[1], old[5])
        untouched = [i for i in range(NUM_BLOCKS) if i not in (7, 1, 3)]
        assert torch.equal(new[untouched], old[untouched])


def test_swap_out_then_in_restores_blocks_exactly_at_new_places():
    gpu = _cache(NUM_BLOCKS, DEVICE, seed=1)
    pin = DEVICE == "cuda"
    pool = [torch.zeros(POOL_BLOCKS, *BLOCK_SHAPE, pin_memory=pin) for _ in gpu]
    saved = [t[[4, 5, 9]].clone() for t in gpu]

    swap_out(gpu, pool, [(4, 0), (5, 1), (9, 3)]).synchronize()
    for t in gpu:  # the blocks are freed and reused by other sequences
        t[[4, 5, 9]] = 0.0
    handle = swap_in(pool, gpu, [(0, 2), (1, 3), (3, 8)])
    handle.wait()

    for t, old in zip(gpu, saved, strict=True):
        assert torch.equal(t[[2, 3, 8]], old)
    assert handle.done()


def test_swap_with_no_blocks_is_a_finished_no_op():
    gpu = _cache(NUM_BLOCKS, DEVICE, seed=2)
    pool = [torch.zeros(POOL_BLOCKS, *BLOCK_SHAPE) for _ in gpu]
    handle = swap_out(gpu, pool, [])
    assert handle.done()
    assert all(int(p.count_nonzero()) == 0 for p in pool)


def test_consecutive_blocks_are_grouped_into_single_copies():
    assert _contiguous_runs([(5, 1), (3, 8), (4, 0), (6, 2), (7, 4)]) == [
        (3, 8, 1),
        (4, 0, 3),
        (7, 4, 1),
    ]
