"""ONDO_FUSED_QK_NORM_ROPE: Qwen3's q/k norm and rotary in one kernel, against the model's
own eager path (`_qkv` without the switch, the path checked against transformers).

Without a GPU the kernel runs in Triton's interpreter (tests/conftest.py)."""

import pytest
import torch
import torch.nn.functional as F

from ondo.kernels.qk_norm_rope import FUSED_QK_NORM_ROPE_ENV, fused_qk_norm_rope
from ondo.kernels.triton_qk_norm_rope import qk_norm_rope_triton
from ondo.model.layers import RotaryEmbedding
from ondo.model.llama import _qkv, _RegionShape

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _inputs(num_tokens: int, heads: tuple[int, int], head_dim: int, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    hq, hkv = heads
    hidden = 96
    x = torch.randn(num_tokens, hidden, generator=g).to(DEVICE, dtype)
    qkv_w = (torch.randn((hq + 2 * hkv) * head_dim, hidden, generator=g) / hidden**0.5).to(DEVICE, dtype)
    q_norm_w = (1 + 0.3 * torch.randn(head_dim, generator=g)).to(DEVICE, dtype)
    k_norm_w = (1 + 0.3 * torch.randn(head_dim, generator=g)).to(DEVICE, dtype)
    # Positions of a chunk far into its sequence and of a fresh prompt, out of order.
    positions = torch.cat([torch.arange(3000, 3000 + num_tokens // 2), torch.arange(num_tokens - num_tokens // 2)])
    cos, sin = RotaryEmbedding(head_dim, 1_000_000.0, None)(positions[torch.randperm(num_tokens, generator=g)].to(DEVICE))
    return x, qkv_w, q_norm_w, k_norm_w, cos, sin


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads,head_dim,num_tokens", [((16, 8), 128, 37), ((4, 1), 64, 5), ((6, 2), 96, 16)])
def test_the_kernel_equals_the_models_eager_norm_and_rotation(dtype, heads, head_dim, num_tokens):
    x, qkv_w, q_norm_w, k_norm_w, cos, sin = _inputs(num_tokens, heads, head_dim, dtype)
    shape = _RegionShape(heads[0], heads[1], head_dim, 1e-6)
    q_ref, k_ref, v_ref = _qkv(shape, x, qkv_w, None, q_norm_w, k_norm_w, cos, sin)
    qkv = F.linear(x, qkv_w)
    q, k = qk_norm_rope_triton(qkv, q_norm_w, k_norm_w, cos, sin, heads[0], heads[1], head_dim, 1e-6)
    assert q.shape == q_ref.shape and k.shape == k_ref.shape and q.dtype == dtype
    if dtype == torch.float32:
        torch.testing.assert_close(q, q_ref, atol=2e-6, rtol=2e-6)
        torch.testing.assert_close(k, k_ref, atol=2e-6, rtol=2e-6)
        return
    # bf16: each product and sum is rounded where eager rounds it. On a GPU that gives
    # eager's bits but where the norm's float32 sum, taken in another order, moves a value
    # one bf16 step (tests/gpu/test_kernels_gpu.py). Triton's interpreter truncates where
    # the GPU rounds to nearest, so here each of the four roundings may lose up to a step.
    for got, want in ((q, q_ref), (k, k_ref)):
        step = want.float().abs().amax(dim=-1, keepdim=True) * 2.0**-7
        assert ((got.float() - want.float()).abs() <= 4 * step).all()
        assert (got.float() - want.float()).abs().mean() < 0.02 * want.float().abs().mean()


def test_the_operator_and_its_fake_shapes():
    heads, head_dim, num_tokens = (4, 2), 64, 9
    x, qkv_w, q_norm_w, k_norm_w, cos, sin = _inputs(num_tokens, heads, head_dim, torch.float32, seed=1)
    q_ref, k_ref, _ = _qkv(_RegionShape(*heads, head_dim, 1e-6), x, qkv_w, None, q_norm_w, k_norm_w, cos, sin)
    q, k = torch.ops.ondo.qk_norm_rope(F.linear(x, qkv_w), q_norm_w, k_norm_w, cos, sin, *heads, head_dim, 1e-6)
    torch.testing.assert_close(q, q_ref, atol=2e-6, rtol=2e-6)
    torch.testing.assert_close(k, k_ref, atol=2e-6, rtol=2e-6)
    # What torch.compile sees: the shapes alone, from the fake implementation.
    from torch._subclasses.fake_tensor import FakeTensorMode

    mode = FakeTensorMode()
    fakes = [mode.from_tensor(t) for t in (F.linear(x, qkv_w), q_norm_w, k_norm_w, cos, sin)]
    with mode:
        fq, fk = torch.ops.ondo.qk_norm_rope(*fakes, *heads, head_dim, 1e-6)
    assert fq.shape == (num_tokens, 4, head_dim) and fk.shape == (num_tokens, 2, head_dim)


def test_bad_shapes_are_refused_with_the_sizes():
    x, qkv_w, q_norm_w, k_norm_w, cos, sin = _inputs(4, (4, 2), 64, torch.float32)
    qkv = F.linear(x, qkv_w)
    with pytest.raises(ValueError, match=r"is not \[T, \(Hq \+ 2 \* Hkv\) \* D\] rows for Hq=4, Hkv=1, D=64"):
        qk_norm_rope_triton(qkv, q_norm_w, k_norm_w, cos, sin, 4, 1, 64, 1e-6)
    with pytest.raises(ValueError, match="must be \\[T, D\\] rows, T=4"):
        qk_norm_rope_triton(qkv, q_norm_w, k_norm_w, cos[:3], sin[:3], 4, 2, 64, 1e-6)
    q, k = qk_norm_rope_triton(qkv[:0], q_norm_w, k_norm_w, cos[:0], sin[:0], 4, 2, 64, 1e-6)
    assert q.shape == (0, 4, 64) and k.shape == (0, 2, 64)


def test_the_switch_is_on_by_default_and_read_strictly(monkeypatch):
    monkeypatch.delenv(FUSED_QK_NORM_ROPE_ENV, raising=False)
    assert fused_qk_norm_rope()
    monkeypatch.setenv(FUSED_QK_NORM_ROPE_ENV, "0")
    assert not fused_qk_norm_rope()
    monkeypatch.setenv(FUSED_QK_NORM_ROPE_ENV, "1")
    assert fused_qk_norm_rope()
    monkeypatch.setenv(FUSED_QK_NORM_ROPE_ENV, "yes")
    with pytest.raises(ValueError, match="ONDO_FUSED_QK_NORM_ROPE must be 0 or 1"):
        fused_qk_norm_rope()
