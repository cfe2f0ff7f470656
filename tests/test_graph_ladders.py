"""The batch sizes and token counts CUDA graphs are captured at: every step size up to the
limits has a graph to pad up to, with bounded padding, and no decode graph of one row
(a size the compiled regions would compile a second time for), and a warm-up before
the first capture on each side of the model's token-count branches."""

from __future__ import annotations

import pytest

from ondo.engine.model_runner import (
    _padded_size,
    decode_graph_sizes,
    mixed_graph_sizes,
    warm_up_sizes,
)


@pytest.mark.parametrize("max_num_seqs", [1, 2, 3, 8, 9, 16, 17, 100, 256, 1024])
def test_every_decode_batch_pads_to_a_graph_of_two_rows_or_more(max_num_seqs):
    sizes = decode_graph_sizes(max_num_seqs)
    assert sizes == sorted(set(sizes)) and sizes[-1] == max_num_seqs
    assert (1 in sizes) == (max_num_seqs == 1)
    for n in range(1, max_num_seqs + 1):
        padded = _padded_size(sizes, n)
        assert n <= padded <= max_num_seqs
        assert padded - n < 16  # at most 15 padding rows
    assert _padded_size(sizes, max_num_seqs + 1) == -1  # past the buffers: no graph
    if max_num_seqs >= 2:
        assert _padded_size(sizes, 1) == 2


def test_the_ladder_of_the_default_engine():
    assert decode_graph_sizes(256) == [2, 4, 8, *range(16, 257, 16)]


@pytest.mark.parametrize("max_tokens", [2, 16, 17, 1000, 2048, 8192])
def test_every_token_count_of_a_step_with_a_prefill_pads_to_a_graph(max_tokens):
    sizes = mixed_graph_sizes(max_tokens)
    for n in range(2, max_tokens + 1):
        padded = _padded_size(sizes, n)
        assert n <= padded <= max_tokens
        assert padded - n <= max(15, min(511, n // 4 if n > 1024 else 511))


def test_the_graphs_warm_up_once_on_each_side_of_the_models_branches():
    sizes = mixed_graph_sizes(8192)
    assert warm_up_sizes(sizes, ()) == {8192}  # the same kernels at every size: one warm-up
    # The gate/up kernel's branch at 1,024 tokens: the largest graph under it warms up too.
    assert warm_up_sizes(sizes, (1024,)) == {8192, 768}
    assert warm_up_sizes(sizes, (1024, 4000)) == {8192, 3584, 768}
    assert warm_up_sizes(mixed_graph_sizes(512), (1024,)) == {512}  # nothing past the branch
    assert warm_up_sizes(mixed_graph_sizes(1024), (1024,)) == {1024, 768}
    assert warm_up_sizes([], (1024,)) == set()
