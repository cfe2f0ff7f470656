"""The Triton kernels and block swaps on a CUDA GPU, in the dtypes the engine serves.

References run in fp32 on the same (rounded) inputs, so the tolerance only covers the
kernels' own low-precision steps (P cast to bf16/fp16 before the P@V dot).
"""

import dataclasses

import pytest
import torch

from ondo.kernels.testing import PagedBatch, make_paged_batch

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():  # collected on CPU machines, never run there
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

from ondo.kernels.block_copy import copy_blocks, swap_in, swap_out  # noqa: E402
from ondo.kernels.reference import paged_attention_ref, write_kv_cache_ref  # noqa: E402
from ondo.kernels.triton_attention import (  # noqa: E402
    paged_attention_triton,
    paged_decode_attention_triton,
    paged_prefill_attention_triton,
    prefill_tiles,
)
from ondo.kernels.triton_kv_write import write_kv_cache_triton  # noqa: E402

TOLERANCE = {torch.bfloat16: 2e-2, torch.float16: 5e-3, torch.float32: 1e-4}


def _batch(query_lens, context_lens, heads, head_dim, dtype, block_size=16, seed=0):
    return make_paged_batch(
        query_lens,
        context_lens,
        num_q_heads=heads[0],
        num_kv_heads=heads[1],
        head_dim=head_dim,
        block_size=block_size,
        dtype=dtype,
        device="cuda",
        seed=seed,
    )


def _check(b: PagedBatch, attend=paged_attention_triton) -> None:
    scale = b.query.shape[-1] ** -0.5
    k_ref, v_ref = b.k_cache.float(), b.v_cache.float()
    write_kv_cache_ref(b.key.float(), b.value.float(), k_ref, v_ref, b.meta.slot_mapping)
    expect = paged_attention_ref(b.query.float(), k_ref, v_ref, b.meta, scale)

    write_kv_cache_triton(b.key, b.value, b.k_cache, b.v_cache, b.meta.slot_mapping)
    assert torch.equal(b.k_cache.float(), k_ref) and torch.equal(b.v_cache.float(), v_ref)
    out = attend(b.query, b.k_cache, b.v_cache, b.meta, scale)
    assert out.dtype == b.query.dtype
    tol = TOLERANCE[b.query.dtype]
    torch.testing.assert_close(out.float(), expect, atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize(
    "heads, head_dim",
    [((32, 8), 128), ((8, 8), 64), ((16, 2), 128), ((8, 2), 256), ((4, 1), 32)],
)
def test_decode_on_gpu(dtype, heads, head_dim):
    # 3000 tokens with 4 sequences makes the heuristic split the context.
    b = _batch([1] * 4, [3000, 17, 1, 640], heads, head_dim, dtype)
    _check(b)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_decode_forced_splits_on_gpu(dtype):
    b = _batch([1, 1, 0, 1], [1000, 64, 9, 333], (32, 8), 128, dtype)
    _check(b, lambda *a: paged_decode_attention_triton(*a, split_tokens=128))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize(
    "heads, head_dim",
    [((32, 8), 128), ((8, 8), 64), ((16, 2), 128), ((8, 2), 256), ((4, 1), 32)],
)
def test_mixed_prefill_on_gpu(dtype, heads, head_dim):
    # Fresh prompt, chunked prefill over a long prefix, decode rows, an idle sequence.
    b = _batch([300, 1, 77, 0, 1, 129], [300, 900, 1100, 40, 5, 129], heads, head_dim, dtype)
    _check(b)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_prefill_longest_tiles_first_on_gpu(dtype):
    """Programs taken from the grid's end: the reference's output, and the grid order's
    bit for bit."""
    b = _batch([300, 1, 77, 0, 1, 129], [300, 900, 1100, 40, 5, 129], (16, 8), 128, dtype)
    scale = 128 ** -0.5
    write_kv_cache_triton(b.key, b.value, b.k_cache, b.v_cache, b.meta.slot_mapping)
    tiles = [prefill_tiles(b.query, b.k_cache)._replace(longest_first=first) for first in (False, True)]
    outs = [paged_prefill_attention_triton(b.query, b.k_cache, b.v_cache, b.meta, scale, tiles=t) for t in tiles]
    assert torch.equal(outs[0], outs[1])
    _check(b, lambda *a: paged_prefill_attention_triton(*a, tiles=tiles[1]))


@pytest.mark.parametrize("mode", [1, 2])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("heads", [(16, 8), (32, 8)])
def test_prefill_reading_the_steps_own_kv_on_gpu(mode, dtype, heads):
    """The new tokens' keys from the step's K (its own tensor) and V (a view of the fused
    projection, as the model hands them over), by pointers or tensor descriptors."""
    b = _batch([300, 1, 77, 0, 1, 129, 2048], [300, 900, 1100, 40, 5, 129, 2048], heads, 128, dtype)
    t, h, d = b.value.shape
    wide = torch.empty(t, (heads[0] + 2 * h) * d, dtype=dtype, device="cuda")
    value = wide[:, (heads[0] + h) * d:].view(t, h, d)
    value.copy_(b.value)
    _check(b, lambda *a: paged_prefill_attention_triton(*a, key=b.key, value=value, new_kv=mode))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("heads", [(16, 8), (32, 8), (32, 4)])
def test_decode_rows_in_a_tile_of_their_own_on_gpu(heads, dtype, monkeypatch):
    """ONDO_PREFILL_DECODE_TILE=1: decode rows kept in the prefill kernel (beside prompts)
    take 16-row tiles, on every way of reading the step's own keys."""
    monkeypatch.setenv("ONDO_PREFILL_DECODE_TILE", "1")
    b = _batch([300, 1, 77, 1, 0, 1, 2048], [300, 900, 1100, 5, 40, 2100, 2048], heads, 128, dtype)
    for mode in (0, 1, 2):
        _check(b, lambda *a, mode=mode: paged_prefill_attention_triton(
            *a, split_decode_rows=False, key=b.key, value=b.value, new_kv=mode))


@pytest.mark.parametrize("mode", [1, 2])
def test_prefill_reading_the_own_kv_of_a_step_smaller_than_a_tile_on_gpu(mode):
    """Fewer tokens in the step than a K/V tile holds: the descriptor's box is taller
    than its tensor (a graph for steps with a prefill captured at 16 tokens)."""
    b = _batch([9, 1, 3], [9, 40, 20], (16, 8), 128, torch.bfloat16)
    _check(b, lambda *a: paged_prefill_attention_triton(*a, key=b.key, value=b.value, new_kv=mode))


@pytest.mark.parametrize("switch", ["ONDO_MIXED_DECODE_OVERLAP", "ONDO_MIXED_DECODE_BESIDE"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_decode_rows_on_a_second_stream_beside_the_prompts_on_gpu(dtype, switch, monkeypatch):
    """ONDO_MIXED_DECODE_OVERLAP=1 (the decode kernel on a stream of its own) and
    ONDO_MIXED_DECODE_BESIDE=1 (the persistent decode kernel there), eager and in a CUDA
    graph (the fork and the join captured, the rows read from the device's flag): within
    the reference's tolerance, and the graph the same bits as the eager step. The overlap's
    decode kernel sums as the two kernels one after the other do, so there the bits are
    theirs too."""
    b = _batch([300, 1, 77, 1, 0, 1, 2048], [300, 900, 1100, 5, 40, 2100, 2048], (16, 8), 128, dtype)
    scale = 128 ** -0.5
    write_kv_cache_triton(b.key, b.value, b.k_cache, b.v_cache, b.meta.slot_mapping)

    def attend(meta):
        return paged_prefill_attention_triton(b.query, b.k_cache, b.v_cache, meta, scale, key=b.key, value=b.value)

    def one_after_the_other():
        monkeypatch.setenv(switch, "0")
        out = paged_prefill_attention_triton(
            b.query, b.k_cache, b.v_cache, b.meta, scale, split_decode_rows=True, key=b.key, value=b.value)
        monkeypatch.setenv(switch, "1")
        return out

    monkeypatch.setenv(switch, "1")
    _check(b, lambda *a: paged_prefill_attention_triton(*a, key=b.key, value=b.value))
    eager = attend(dataclasses.replace(b.meta, split_choices={}))
    if switch == "ONDO_MIXED_DECODE_OVERLAP":
        assert torch.equal(eager, one_after_the_other())

    graph_meta = dataclasses.replace(b.meta, query_lens_cpu=None, context_lens_cpu=None, split_choices={},
                                     split_decode_rows=torch.ones(1, dtype=torch.int32, device="cuda"))
    attend(graph_meta)  # compiled before the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = attend(graph_meta)
    graph.replay()
    assert torch.equal(captured, eager)
    b.query.copy_(torch.randn_like(b.query))  # a new step's queries, same shapes
    graph.replay()
    assert torch.equal(captured, attend(dataclasses.replace(b.meta, split_choices={})))
    if switch == "ONDO_MIXED_DECODE_OVERLAP":
        assert torch.equal(captured, one_after_the_other())


@pytest.mark.parametrize("block_size", [1, 8, 32, 128])
def test_block_sizes_on_gpu(block_size):
    b = _batch([1, 1, 1], [513, 77, 2], (32, 8), 128, torch.bfloat16, block_size=block_size)
    _check(b)
    b = _batch([50, 1, 3], [513, 77, 3], (32, 8), 128, torch.bfloat16, block_size=block_size)
    _check(b, paged_prefill_attention_triton)


def test_swap_round_trip_and_copy_on_write_on_gpu():
    gpu = [torch.randn(64, 16, 8, 128, device="cuda", dtype=torch.bfloat16) for _ in range(4)]
    pool = [torch.zeros(32, 16, 8, 128, dtype=torch.bfloat16, pin_memory=True) for _ in gpu]
    saved = [t[[3, 4, 5, 60]].clone() for t in gpu]
    out = swap_out(gpu, pool, [(3, 10), (4, 11), (5, 12), (60, 0)])
    out.wait()  # compute may now overwrite the GPU blocks
    for t in gpu:
        t[[3, 4, 5, 60]] = 0
    back = swap_in(pool, gpu, [(10, 20), (11, 21), (12, 22), (0, 7)])
    back.wait()
    for t, old in zip(gpu, saved, strict=True):
        assert torch.equal(t[[20, 21, 22, 7]], old)
    copy_blocks(gpu, [(20, 30), (7, 31)])
    for t, old in zip(gpu, saved, strict=True):
        assert torch.equal(t[30], old[0]) and torch.equal(t[31], old[3])
    back.synchronize()
    assert out.done() and back.done()


def test_one_pass_sampling_on_gpu_at_a_real_vocabulary():
    """The Gumbel-max kernel at Qwen3's vocabulary and the W1 batch: greedy rows equal
    torch.argmax, sampled rows follow softmax(logits / T) (chi-square over the 40 most
    likely tokens of a peaked row), a seeded row draws alike alone and in the batch."""
    import numpy as np
    from scipy.stats import chisquare

    from ondo.kernels.triton_sampling import gumbel_max_sample

    vocab, n = 151_936, 256
    g = torch.Generator(device="cuda").manual_seed(0)
    logits = torch.randn(n, vocab, device="cuda", generator=g) * 3
    ones = torch.ones(n, device="cuda")
    greedy = gumbel_max_sample(logits, ones, torch.zeros(n, dtype=torch.int32, device="cuda"),
                               torch.arange(n, device="cuda"))
    assert torch.equal(greedy, logits.argmax(-1))
    row = torch.full((vocab,), -30.0, device="cuda")
    row[:40] = torch.linspace(0.0, 2.0, 40, device="cuda")
    draws = 10_000
    batch = row.expand(draws, vocab).contiguous()
    temp = 0.7
    tokens = gumbel_max_sample(batch, torch.full((draws,), 1 / temp, device="cuda"),
                               torch.ones(draws, dtype=torch.int32, device="cuda"),
                               torch.arange(draws, device="cuda") * 7919 + 3)
    assert int(tokens.max()) < 40
    p = torch.softmax(row.double() / temp, -1)[:40].cpu().numpy()
    counts = np.bincount(tokens.cpu().numpy(), minlength=40)
    assert chisquare(counts, p / p.sum() * draws).pvalue > 1e-3
    alone = gumbel_max_sample(batch[5:6], torch.full((1,), 1 / temp, device="cuda"),
                              torch.ones(1, dtype=torch.int32, device="cuda"),
                              torch.tensor([5 * 7919 + 3], device="cuda"))
    assert alone.item() == tokens[5].item()


def test_sampler_on_bf16_logits_at_a_real_vocabulary():
    """W1's batch as the engine samples it: bf16 logits of Qwen3's vocabulary, read by the
    one-pass kernel as they are. Greedy and seeded rows draw what their float32 copy draws."""
    from ondo.engine.sampler import fused_sampling, sample_on_device
    from ondo.engine.sampling_params import SamplingParams

    vocab, n = 151_936, 256
    assert fused_sampling(torch.device("cuda"))  # the default on CUDA
    g = torch.Generator(device="cuda").manual_seed(3)
    logits = (torch.randn(n, vocab, device="cuda", generator=g) * 3).bfloat16()
    params = [SamplingParams(temperature=0.0) if i % 4 == 0 else SamplingParams(temperature=0.6, seed=i)
              for i in range(n)]
    lens = list(range(n))
    narrow = sample_on_device(logits, params, lens).to_host().token_ids
    wide = sample_on_device(logits.float(), params, lens).to_host().token_ids
    assert narrow == wide
    top = logits.float().argmax(-1).tolist()
    assert narrow[::4] == top[::4]
    # The sampled rows draw: many do not pick their maximum.
    assert sum(narrow[i] != top[i] for i in range(n) if i % 4) > 20


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fused_qk_norm_rope_against_eager_and_under_torch_compile(dtype):
    """ONDO_FUSED_QK_NORM_ROPE=1: Qwen3-0.6B's heads (16 / 8, D 128) over 8,200 tokens of
    mixed positions. Within two steps of the dtype of eager's values (at the row's scale),
    as close to a float64 reference as eager, and nearer eager's bits than the compiled
    default path (Inductor keeps float32 between eager's roundings: on an H100, 51 % of
    eager's bits against the kernel's 78 %); inside a compiled region (dynamic token
    counts) Inductor calls the operator rather than generating the norms."""
    import functools

    import torch.nn.functional as F
    from torch._inductor.utils import run_and_get_code

    from ondo.model.layers import RotaryEmbedding
    from ondo.model.llama import _norm_and_rotate, _qkv, _RegionShape

    g = torch.Generator(device="cuda").manual_seed(0)
    hq, hkv, d, hidden = 16, 8, 128, 1024
    weights = (torch.randn((hq + 2 * hkv) * d, hidden, device="cuda", generator=g) / hidden**0.5).to(dtype)
    q_norm_w = (1 + 0.3 * torch.randn(d, device="cuda", generator=g)).to(dtype)
    k_norm_w = (1 + 0.3 * torch.randn(d, device="cuda", generator=g)).to(dtype)
    rope = RotaryEmbedding(d, 1_000_000.0, None)
    eager = functools.partial(_qkv, _RegionShape(hq, hkv, d, 1e-6))
    fused = torch.compile(functools.partial(_qkv, _RegionShape(hq, hkv, d, 1e-6, True)), dynamic=True)
    default = torch.compile(functools.partial(_qkv, _RegionShape(hq, hkv, d, 1e-6)), dynamic=True)
    step = 2.0**-7 if dtype == torch.bfloat16 else 2.0**-10
    for tokens in (8200, 300, 17):
        x = torch.randn(tokens, hidden, device="cuda", generator=g).to(dtype)
        cos, sin = rope(torch.randint(0, 40_000, (tokens,), device="cuda", generator=g))
        want = eager(x, weights, None, q_norm_w, k_norm_w, cos, sin)
        q, k = torch.ops.ondo.qk_norm_rope(F.linear(x, weights), q_norm_w, k_norm_w, cos, sin, hq, hkv, d, 1e-6)
        today = default(x, weights, None, q_norm_w, k_norm_w, cos, sin)
        # The model's path on the same values in float64 (its norm's statistics in float32).
        exact = _norm_and_rotate(_RegionShape(hq, hkv, d, 1e-6), F.linear(x, weights).double(),
                                 q_norm_w.double(), k_norm_w.double(), cos.double(), sin.double())
        for a, b, c, e in zip((q, k), want, today, exact):
            assert a.shape == b.shape and a.is_contiguous()
            assert ((a.float() - b.float()).abs() <= 2 * step * b.float().abs().amax(-1, keepdim=True)).all()
            assert (a == b).float().mean() >= (c == b).float().mean()
            assert (a.double() - e).abs().mean() <= (b.double() - e).abs().mean()
        got, codes = run_and_get_code(fused, x, weights, None, q_norm_w, k_norm_w, cos, sin)
        assert torch.equal(got[2], want[2])  # v untouched
        for a, b in zip(got[:2], want[:2]):
            torch.testing.assert_close(a, b, atol=TOLERANCE[dtype], rtol=TOLERANCE[dtype])
        if tokens == 8200:  # the first call compiles
            assert any("ondo.qk_norm_rope" in code for code in codes)
            assert not any("rsqrt" in code for code in codes)  # no norm of Inductor's own


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fused_gate_up_silu_against_the_compiled_path_and_under_torch_compile(dtype):
    """ONDO_FUSED_GATE_UP_SILU=1: the 0.6B shape's MLP (1,024 -> 2 x 3,072) at a W3 step's
    8,200 tokens and at 1,030 (ragged last tiles), and the 8B shape's (4,096 -> 2 x 14,336)
    at 1,100. Each projection is rounded once, as cuBLAS rounds it, and SiLU and the product
    taken in float32, as Inductor's kernel takes them: as close to the path in float64 as
    the compiled default path, within a few steps of the dtype everywhere. Inside a
    compiled region (dynamic token counts) Inductor calls the operator and generates no
    SiLU of its own; under the token threshold the same graph runs, and the operator takes
    cuBLAS and its SiLU-and-mul kernel: the default path's bits."""
    import functools

    from torch._inductor.utils import run_and_get_code

    from ondo.kernels.gate_up_silu import GATE_UP_SILU_MIN_TOKENS
    from ondo.model.llama import _gate_up_act, _RegionShape

    g = torch.Generator(device="cuda").manual_seed(0)
    default = torch.compile(functools.partial(_gate_up_act, _RegionShape(16, 8, 128, 1e-6)), dynamic=True)
    fused = torch.compile(functools.partial(_gate_up_act, _RegionShape(16, 8, 128, 1e-6, fused_gate_up_silu=True)),
                          dynamic=True)
    step = 2.0**-7 if dtype == torch.bfloat16 else 2.0**-10
    for tokens, hidden, inter in ((8200, 1024, 3072), (1030, 1024, 3072), (1100, 4096, 14336)):
        x = torch.randn(tokens, hidden, device="cuda", generator=g).to(dtype)
        w = (torch.randn(2 * inter, hidden, device="cuda", generator=g) / hidden**0.5).to(dtype)
        exact = _gate_up_act(_RegionShape(16, 8, 128, 1e-6), x.double(), w.double())
        today = default(x, w)
        got, codes = run_and_get_code(fused, x, w)
        assert got.shape == (tokens, inter) and got.dtype == dtype and got.is_contiguous()
        assert (got.double() - exact).abs().mean() <= 1.05 * (today.double() - exact).abs().mean()
        scale = exact.abs().amax(-1, keepdim=True)
        assert ((got.double() - exact).abs() <= 4 * step * scale).all()
        if tokens == 8200:  # run_and_get_code compiles afresh at each call: the first checked
            assert any("ondo.gate_up_silu" in code for code in codes)
            assert not any("sigmoid" in code for code in codes)  # no SiLU of Inductor's own
    # Under the threshold (a decode step, and two rows): no second graph (run_and_get_code
    # above starts Dynamo afresh each time, so graphs are counted here), the default path's bits.
    from torch._dynamo.utils import counters

    assert counters["stats"]["unique_graphs"] > 0
    for rows in (GATE_UP_SILU_MIN_TOKENS - 1, 256, 2):
        small = x[:rows].clone()
        graphs = counters["stats"]["unique_graphs"]
        got = fused(small, w)
        assert counters["stats"]["unique_graphs"] == graphs
        want = default(small, w)
        torch.testing.assert_close(got, want, atol=0, rtol=step)
        assert (got == want).float().mean() > 0.99


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_persistent_gate_up_silu_takes_its_tiles_by_size_and_rounds_as_the_default_tiles(dtype, monkeypatch):
    """The persistent grid (the default; set here all the same): at sizes with two waves of 128 x 128 output tiles or more
    (the 0.6B shape at 2,048 and 8,200 tokens, the 8B shape at 1,100) the operator runs the
    persistent, warp-specialized grid; each output element is the same sum, tiled another
    way, so within a few rounding steps of the default tiles' and as close to float64. Under two
    waves (the 0.6B shape at 1,030 tokens) the default tiles' bits."""
    from ondo.kernels import triton_gate_up_silu as module
    from ondo.kernels.gate_up_silu import GATE_UP_PERSISTENT_ENV
    from ondo.model.llama import _gate_up_act, _RegionShape

    monkeypatch.setenv(GATE_UP_PERSISTENT_ENV, "1")
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    launched = []
    real_launch = module._launch
    monkeypatch.setattr(module, "_launch", lambda x, w, out, tiles, d: (launched.append(tiles), real_launch(x, w, out, tiles, d)))
    g = torch.Generator(device="cuda").manual_seed(1)
    step = 2.0**-7 if dtype == torch.bfloat16 else 2.0**-10
    for tokens, hidden, inter in ((8200, 1024, 3072), (2048, 1024, 3072), (1030, 1024, 3072), (1100, 4096, 14336)):
        x = torch.randn(tokens, hidden, device="cuda", generator=g).to(dtype)
        w = (torch.randn(2 * inter, hidden, device="cuda", generator=g) / hidden**0.5).to(dtype)
        launched.clear()
        got = torch.ops.ondo.gate_up_silu(x, w)
        want = module.gate_up_silu_triton(x, w, module.DEFAULT_TILES)
        exact = _gate_up_act(_RegionShape(16, 8, 128, 1e-6), x.double(), w.double())
        persistent = module.persistent_tiles(tokens, inter, sms) == module.PERSISTENT_TILES
        assert persistent == (tokens != 1030) and launched[0] == module.persistent_tiles(tokens, inter, sms)
        if not persistent:
            assert torch.equal(got, want)
            continue
        scale = exact.abs().amax(-1, keepdim=True)
        assert ((got.double() - want.double()).abs() <= 4 * step * scale).all()
        assert (got.double() - exact).abs().mean() <= 1.05 * (want.double() - exact).abs().mean()
