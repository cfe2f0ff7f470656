"""The one-pass sampling kernel (Gumbel-max): its draws follow softmax(logits / T), its
greedy rows are torch.argmax, a row's draw depends on its seed and logits only.

Without a GPU the kernel runs in Triton's interpreter on CPU tensors (small chunks, so
that it is quick); on a CUDA machine the same checks run on the GPU."""

import os

import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu":
    # Must be set before triton.jit decorates the kernels, i.e. before their import.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from scipy.stats import chisquare  # noqa: E402

from ondo.kernels.triton_sampling import gumbel_max_sample  # noqa: E402

SMALL = {"chunk": 64, "block": 64} if DEVICE == "cpu" else {}


def _draw(logits, scale, noisy, seeds):
    n = logits.shape[0]
    return gumbel_max_sample(
        logits.to(DEVICE),
        torch.as_tensor(scale, dtype=torch.float32).expand(n).contiguous().to(DEVICE),
        torch.as_tensor(noisy, dtype=torch.int32).expand(n).contiguous().to(DEVICE),
        torch.as_tensor(seeds, dtype=torch.int64).to(DEVICE), **SMALL).cpu()


def _counts(tokens: torch.Tensor, vocab: int) -> np.ndarray:
    return np.bincount(tokens.numpy(), minlength=vocab)


def test_draws_follow_the_softmax_at_the_temperature():
    vocab, n, temp = 40, 4000, 0.7
    logits = torch.randn(vocab, generator=torch.Generator().manual_seed(1)) * 1.5
    batch = logits.expand(n, vocab).contiguous()
    tokens = _draw(batch, 1 / temp, 1, torch.arange(n) * 7919 + 11)
    counts = _counts(tokens, vocab)

    def law(t: float) -> np.ndarray:
        p = torch.softmax(logits.double() / t, -1).numpy()
        return p / p.sum() * n

    assert chisquare(counts, law(temp)).pvalue > 1e-3
    # The test can tell: the same draws against the law at another temperature fail.
    assert chisquare(counts, law(1.0)).pvalue < 1e-6


def test_greedy_rows_are_torch_argmax_across_chunks_ties_and_masks():
    g = torch.Generator().manual_seed(2)
    vocab = 300  # five chunks of 64 in the interpreter, the last one partial
    logits = torch.randn(6, vocab, generator=g)
    logits[1, 290] = 9.0  # the maximum in the last, partial chunk
    logits[2, 70] = logits[2, 200] = 9.0  # a tie across chunks: the first wins
    logits[3, 5] = logits[3, 6] = 9.0  # a tie inside a chunk
    logits[4, :] = float("-inf")
    logits[4, 257] = -3.0  # all masked but one
    logits[5, :] = float("-inf")  # all masked: torch.argmax says 0
    tokens = _draw(logits, 1.0, 0, torch.arange(6))
    assert tokens.tolist() == logits.argmax(-1).tolist() == [int(logits[0].argmax()), 290, 70, 5, 257, 0]


def test_a_rows_draw_depends_on_its_seed_and_logits_only():
    g = torch.Generator().manual_seed(3)
    vocab = 100
    a, b = torch.randn(vocab, generator=g), torch.randn(vocab, generator=g)
    seeds = [101, 202, 303, 404]
    first = _draw(torch.stack([a, b, a, b]), 1.0, 1, seeds)
    # The same (seed, logits) pairs in another order, and one alone.
    swapped = _draw(torch.stack([b, a, b, a]), 1.0, 1, [202, 101, 404, 303])
    alone = _draw(a[None], 1.0, 1, [303])
    assert first.tolist() == [swapped[1], swapped[0], swapped[3], swapped[2]]
    assert alone.item() == first[2].item()
    # Other seeds, other draws (a flat law over 100 tokens: 20 rows agreeing is no chance).
    flat = torch.zeros(20, vocab)
    assert len(set(_draw(flat, 1.0, 1, torch.arange(20) + 1).tolist())) > 5


def test_masked_tokens_are_never_drawn_and_scale_sharpens():
    vocab, n = 64, 600
    logits = torch.zeros(n, vocab)
    logits[:, ::2] = float("-inf")  # only odd tokens allowed
    tokens = _draw(logits, 1.0, 1, torch.arange(n))
    assert (tokens % 2 == 1).all() and len(set(tokens.tolist())) > 20
    # A large scale (a low temperature) concentrates the draws on the largest logit.
    peaked = torch.zeros(n, vocab)
    peaked[:, 9] = 1.0
    sharp = _draw(peaked, 50.0, 1, torch.arange(n))
    assert (sharp == 9).float().mean() > 0.99


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_logits_in_either_dtype_and_any_row_stride(dtype):
    g = torch.Generator().manual_seed(4)
    wide = torch.randn(3, 500, generator=g).to(dtype)
    view = wide[:, :300]  # rows 500 apart in memory
    tokens = _draw(view, 1.0, 0, torch.arange(3))
    assert tokens.tolist() == view.float().argmax(-1).tolist()


@pytest.fixture
def fused(monkeypatch):
    import ondo.engine.sampler as sampler

    monkeypatch.setattr(sampler, "fused_sampling", lambda device: True)  # on the CPU too
    return sampler


def test_the_samplers_fused_path_keeps_its_contract(fused):
    from ondo.engine.sampling_params import SamplingParams

    g = torch.Generator().manual_seed(5)
    vocab = 200
    logits = torch.randn(4, vocab, generator=g).to(DEVICE)
    params = [SamplingParams(temperature=0.0),  # greedy
              SamplingParams(temperature=0.8, seed=42),
              SamplingParams(temperature=1.0, top_k=3),
              SamplingParams(temperature=0.9, logprobs=2)]
    host = torch.Generator().manual_seed(0)
    out = fused.sample_on_device(logits.clone(), params, [0, 7, 0, 0],
                                 host_generator=host).to_host()
    assert out.token_ids[0] == int(logits[0].argmax())
    assert out.token_ids[2] in logits[2].topk(3).indices.tolist()
    assert out.logprobs[3] is not None and len(out.logprobs[3]) >= 2
    # The seeded row draws the same token alone, at the same output position.
    alone = fused.sample_on_device(logits[1:2].clone(), params[1:2], [7]).to_host()
    assert alone.token_ids == [out.token_ids[1]]
    # top-k holds over many draws.
    many = fused.sample_on_device(logits[2:3].expand(64, vocab).contiguous(), params[2:3] * 64,
                                  [0] * 64, host_generator=host).to_host()
    assert set(many.token_ids) <= set(logits[2].topk(3).indices.tolist())
    assert len(set(many.token_ids)) > 1


@pytest.mark.parametrize("one_pass", [True, False])
def test_the_sampler_reads_bf16_logits_as_their_float32_copy(monkeypatch, one_pass):
    """The engine's runner hands the sampler bf16 logits on the GPU. Greedy and seeded rows
    draw from them what they draw from the float32 copy (argmax and the one-pass kernel
    widen each value exactly; the PyTorch path works on a float32 copy), and a row's
    logprobs are those of the float32 copy, not of a bf16 softmax."""
    import ondo.engine.sampler as sampler
    from ondo.engine.sampling_params import SamplingParams

    monkeypatch.setattr(sampler, "fused_sampling", lambda device: one_pass)
    g = torch.Generator().manual_seed(9)
    logits = (torch.randn(6, 300, generator=g) * 3).to(torch.bfloat16).to(DEVICE)
    params = [SamplingParams(temperature=0.0), SamplingParams(temperature=0.7, seed=1),
              SamplingParams(temperature=1.3, seed=2), SamplingParams(temperature=0.0),
              SamplingParams(temperature=0.5, seed=3), SamplingParams(temperature=1.0, seed=4)]
    lens = [0, 3, 5, 0, 9, 1]
    narrow = sampler.sample_on_device(logits, params, lens).to_host()
    wide = sampler.sample_on_device(logits.float(), params, lens).to_host()
    assert narrow.token_ids == wide.token_ids
    assert narrow.token_ids[0] == int(logits[0].float().argmax())
    greedy = [SamplingParams(temperature=0.0)] * 6
    assert sampler.sample_on_device(logits, greedy, [0] * 6).to_host().token_ids == \
        logits.float().argmax(-1).tolist()
    asked = sampler.sample_on_device(logits[:1], [SamplingParams(temperature=0.0, logprobs=3)], [0]).to_host()
    top = logits[:1].float().log_softmax(-1).topk(3)
    assert asked.logprobs[0] == dict(zip(top.indices[0].tolist(), top.values[0].tolist()))


def _splitmix_input_for(z: int) -> int:
    """The SplitMix64 state whose finalizer gives `z`: each xor-shift and product undone."""
    mask = (1 << 64) - 1

    def unshift(y: int, s: int) -> int:
        x = y
        for _ in range(64 // s + 1):
            x = y ^ (x >> s)
        return x

    z = unshift(z, 31)
    z = (z * pow(0x94D049BB133111EB, -1, 1 << 64)) & mask
    z = unshift(z, 27)
    z = (z * pow(0xBF58476D1CE4E5B9, -1, 1 << 64)) & mask
    return unshift(z, 30)


def test_the_largest_uniform_stays_below_one():
    """A stream whose first bits are all ones gives the largest uniform the kernel makes; were
    it rounded to 1, its Gumbel would be infinite and a token 30 nats behind would win."""
    golden = 0x9E3779B97F4A7C15
    state = _splitmix_input_for((1 << 64) - 1)
    seed = (state - golden) & ((1 << 64) - 1)  # column 0 reads seed + 1 * golden
    seed -= (1 << 64) if seed >= 1 << 63 else 0
    logits = torch.tensor([[-30.0, 0.0, -1.0, -2.0]])
    assert _draw(logits, 1.0, 1, [seed]).tolist() != [0]
