"""ONDO_FUSED_GATE_UP_SILU: the MLP's gate/up matmul with SiLU-and-mul in its epilogue,
against the model's own path (`silu_and_mul(F.linear(x, gate_up_w))`, the path checked
against transformers).

Without a GPU the kernel runs in Triton's interpreter (tests/conftest.py), tensor
descriptors included; float32 there, whose matmuls the interpreter takes in float32."""

import re

import pytest
import torch
import torch.nn.functional as F

from ondo.kernels.gate_up_silu import (
    FUSED_GATE_UP_SILU_ENV,
    GATE_UP_PERSISTENT_ENV,
    check_gate_up_tiles,
    fused_gate_up_silu,
    gate_up_persistent,
    gate_up_silu_max_hidden,
)
from ondo.kernels.triton_gate_up_silu import (
    DEFAULT_TILES,
    GATE_UP_TILES_ENV,
    PERSISTENT_TILES,
    GateUpTiles,
    configured_tiles,
    gate_up_silu_triton,
    parse_tiles,
    persistent_min_tokens,
    persistent_tiles,
)
from ondo.model.layers import silu_and_mul

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SMALL = GateUpTiles(16, 16, 32, 2, 4, 2)  # many tiles and groups on a few rows


def _inputs(num_tokens: int, hidden: int, intermediate: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(num_tokens, hidden, generator=g).to(DEVICE)
    weight = (torch.randn(2 * intermediate, hidden, generator=g) / hidden**0.5).to(DEVICE)
    return x, weight


@pytest.mark.parametrize("tiles", [SMALL, GateUpTiles(32, 16, 32, 3, 4, 2),
                                   # persistent grids: on the CPU two SMs, so each program walks
                                   # several tiles
                                   GateUpTiles(16, 16, 32, 2, 4, 2, 1), GateUpTiles(16, 16, 32, 3, 4, 2, 3, True)],
                         ids=lambda t: t.label)
@pytest.mark.parametrize("num_tokens,hidden,intermediate", [(37, 64, 40), (100, 96, 48), (5, 32, 24)])
def test_the_kernel_equals_the_models_matmul_and_silu(tiles, num_tokens, hidden, intermediate):
    """Ragged sizes: rows, columns and the hidden size each end inside a tile; a last column
    tile whose gate rows run into up's rows keeps only the columns that exist. A persistent
    grid covers every tile once, however many each program walks."""
    x, weight = _inputs(num_tokens, hidden, intermediate)
    want = silu_and_mul(F.linear(x, weight))
    got = gate_up_silu_triton(x, weight, tiles)
    assert got.shape == (num_tokens, intermediate) and got.dtype == x.dtype
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # Not the gate alone, nor up alone: both halves of the weight are in the product.
    gate, up = F.linear(x, weight).chunk(2, dim=-1)
    assert (got - F.silu(gate)).abs().max() > 0.1 and (got - up).abs().max() > 0.1


def test_the_operator_picks_its_kernels_by_the_token_count_and_gives_torch_compile_its_shapes(monkeypatch):
    """From GATE_UP_SILU_MIN_TOKENS tokens the fused kernel; under it the matmul and the
    operator's SiLU-and-mul kernel. Either way one graph for torch.compile: the operator, not
    the region, branches on the token count."""
    import ondo.kernels.triton_gate_up_silu as kernel_module
    from ondo.kernels.gate_up_silu import GATE_UP_SILU_MIN_TOKENS

    calls = []
    for name in ("gate_up_silu_triton", "silu_and_mul_triton"):
        real = getattr(kernel_module, name)
        monkeypatch.setattr(kernel_module, name,
                            lambda *a, _n=name, _r=real: calls.append((_n, a[0].shape[0])) or _r(*a))
    big, weight = _inputs(GATE_UP_SILU_MIN_TOKENS, 64, 24)
    small = big[:19].clone()
    for x in (big, small):
        torch.testing.assert_close(torch.ops.ondo.gate_up_silu(x, weight), silu_and_mul(F.linear(x, weight)),
                                   atol=1e-5, rtol=1e-5)
    assert calls == [("gate_up_silu_triton", GATE_UP_SILU_MIN_TOKENS), ("silu_and_mul_triton", 19)]
    from torch._subclasses.fake_tensor import FakeTensorMode

    mode = FakeTensorMode()
    fx, fw = mode.from_tensor(small), mode.from_tensor(weight)
    with mode:
        out = torch.ops.ondo.gate_up_silu(fx, fw)
    assert out.shape == (19, 24)
    # Traced by torch.compile through the fake (dynamic token counts), run as is, and traced
    # once for both sides of the threshold.
    from torch._dynamo.testing import CompileCounter

    counter = CompileCounter()
    traced = torch.compile(lambda a, b: torch.ops.ondo.gate_up_silu(a, b) * 2, backend=counter, dynamic=True)
    calls.clear()
    for x in (small, big, big[:GATE_UP_SILU_MIN_TOKENS - 1].clone()):
        torch.testing.assert_close(traced(x, weight), 2 * silu_and_mul(F.linear(x, weight)), atol=1e-5, rtol=1e-5)
    assert counter.frame_count == 1
    assert [name for name, _ in calls] == ["silu_and_mul_triton", "gate_up_silu_triton", "silu_and_mul_triton"]
    # Rows tensor descriptors cannot read (252 bytes): the matmul and SiLU-and-mul at any size.
    x, weight = _inputs(GATE_UP_SILU_MIN_TOKENS, 63, 24)
    calls.clear()
    torch.testing.assert_close(torch.ops.ondo.gate_up_silu(x, weight), silu_and_mul(F.linear(x, weight)),
                               atol=1e-6, rtol=1e-6)
    assert calls == [("silu_and_mul_triton", GATE_UP_SILU_MIN_TOKENS)]


@pytest.mark.parametrize("num_tokens,intermediate", [(3, 40), (2, 1100), (1, 8)])
def test_the_small_steps_silu_and_mul_kernel_rounds_once_as_the_compiled_path(num_tokens, intermediate):
    """Columns that end inside a block (1,100 = a block and a part), gate and up from one
    row each; float32 as the model's, and bfloat16 rounded once from float32 (Inductor's
    kernel for the compiled path computes it so): within a rounding step of it here, the
    same bits on a GPU."""
    from ondo.kernels.triton_gate_up_silu import silu_and_mul_triton

    g = torch.Generator().manual_seed(1)
    gate_up = (3 * torch.randn(num_tokens, 2 * intermediate, generator=g)).to(DEVICE)
    got = silu_and_mul_triton(gate_up)
    assert got.shape == (num_tokens, intermediate)
    torch.testing.assert_close(got, silu_and_mul(gate_up), atol=1e-6, rtol=1e-6)
    assert (got - gate_up[:, :intermediate]).abs().max() > 0.1  # not the gate passed through
    half = gate_up.to(torch.bfloat16)
    gate, up = half.float().chunk(2, dim=-1)
    want = (F.silu(gate) * up).to(torch.bfloat16)
    got = silu_and_mul_triton(half)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got, want, atol=0, rtol=2.0**-7)
    if DEVICE == "cuda":  # Triton's interpreter rounds to bfloat16 toward zero, a GPU to nearest
        assert torch.equal(got, want)


def test_the_silu_and_mul_kernel_refuses_what_it_cannot_read():
    from ondo.kernels.triton_gate_up_silu import silu_and_mul_triton

    with pytest.raises(ValueError, match=r"gate_up \(4, 7\) .* is not a contiguous \[T, 2 I\]"):
        silu_and_mul_triton(torch.zeros(4, 7, device=DEVICE))
    with pytest.raises(ValueError, match=r"strides \(1, 4\)"):
        silu_and_mul_triton(torch.zeros(8, 4, device=DEVICE).t())
    assert silu_and_mul_triton(torch.zeros(0, 8, device=DEVICE)).shape == (0, 4)


def test_bad_operands_are_refused_with_their_shapes():
    x, weight = _inputs(4, 64, 24)
    with pytest.raises(ValueError, match=r"weight \(48, 32\) torch.float32 is not \[2 I, 64\]"):
        gate_up_silu_triton(x, weight[:, :32].contiguous())
    with pytest.raises(ValueError, match=r"is not \[2 I, 64\] torch.float32"):
        gate_up_silu_triton(x, weight[:47])
    with pytest.raises(ValueError, match="cannot be read by tensor descriptors"):
        gate_up_silu_triton(*_inputs(4, 63, 24))  # rows of 252 bytes
    got = gate_up_silu_triton(x[:, :60], weight[:, :60])  # strided rows, 16-byte aligned: fine
    torch.testing.assert_close(got, silu_and_mul(F.linear(x[:, :60], weight[:, :60])), atol=1e-5, rtol=1e-5)
    assert gate_up_silu_triton(x[:0], weight, DEFAULT_TILES).shape == (0, 24)


def test_the_switch_is_on_by_default_and_is_read_strictly(monkeypatch):
    monkeypatch.delenv(FUSED_GATE_UP_SILU_ENV, raising=False)
    assert fused_gate_up_silu()
    monkeypatch.setenv(FUSED_GATE_UP_SILU_ENV, "0")
    assert not fused_gate_up_silu()
    monkeypatch.setenv(FUSED_GATE_UP_SILU_ENV, "1")
    assert fused_gate_up_silu()
    monkeypatch.setenv(FUSED_GATE_UP_SILU_ENV, "on")
    with pytest.raises(ValueError, match="ONDO_FUSED_GATE_UP_SILU must be 0 or 1"):
        fused_gate_up_silu()


def test_the_tiles_are_read_from_the_environment_by_their_label_and_bad_labels_refused(monkeypatch):
    """ONDO_GATE_UP_TILES names tiles as the bench does; the kernel runs at them, and a bad
    label fails the engine's start with the variable's name."""
    monkeypatch.delenv(GATE_UP_TILES_ENV, raising=False)
    assert configured_tiles() is None  # each size's own tiles (the non-persistent under ONDO_GATE_UP_PERSISTENT=0)
    for tiles in (DEFAULT_TILES, GateUpTiles(128, 128, 64, 8, 8, 3, 1, True), GateUpTiles(64, 64, 32, 4, 4, 3, 2)):
        assert parse_tiles(tiles.label) == tiles
    monkeypatch.setenv(GATE_UP_TILES_ENV, "16x16x32x2x4x2-p1")
    assert configured_tiles() == GateUpTiles(16, 16, 32, 2, 4, 2, 1, False)
    x, weight = _inputs(37, 64, 40)
    torch.testing.assert_close(gate_up_silu_triton(x, weight), silu_and_mul(F.linear(x, weight)), atol=1e-5, rtol=1e-5)
    for bad, why in (("128x64x64x8x4", "is not block_m"), ("128x64x64x8x4x4-q1", "is not block_m"),
                     ("128x64x64x8x4x4-p1-ws-ws", "is not block_m"), ("128x64x64x8x4x4-px", "is not block_m"),
                     ("96x64x64x8x4x4", "powers of two"), ("128x64x64x0x4x4", "group and stages"),
                     ("128x64x64x8x4x4-ws", "needs a persistent grid")):
        monkeypatch.setenv(GATE_UP_TILES_ENV, bad)
        with pytest.raises(ValueError, match=f"ONDO_GATE_UP_TILES: '{re.escape(bad)}'.*{why}"):
            check_gate_up_tiles()


def test_the_persistent_tiles_take_steps_with_two_waves_of_tiles_or_more_unless_switched_off(monkeypatch):
    """On 132 SMs: the 0.6B shape's 1,024 tokens make 8 x 24 = 192 output tiles of 128 x 128
    (the non-persistent tiles), 2,048 tokens 384 (persistent); the 8B shape's 1,024 tokens
    8 x 112 = 896 (persistent). Off, the non-persistent tiles everywhere. The switch is on by
    default, read strictly, and widens the models that take the operator where this Triton
    warp-specializes."""
    from ondo.kernels import triton_gate_up_silu as module

    monkeypatch.setattr(module, "_WARP_SPECIALIZATION_REFUSED", [])
    assert persistent_tiles(1024, 3072, 132) == DEFAULT_TILES
    if module._range_takes_warp_specialize():  # Triton 3.4 and later
        assert persistent_tiles(2048, 3072, 132) == PERSISTENT_TILES and PERSISTENT_TILES.warp_specialize
        assert persistent_tiles(8200, 3072, 132) == PERSISTENT_TILES
        assert persistent_tiles(1024, 14336, 132) == PERSISTENT_TILES
    assert persistent_tiles(2048, 3072, 200) == DEFAULT_TILES  # 384 tiles are under two waves of 200
    # The first count of the persistent grid, where the runner's CUDA graphs warm up anew.
    for intermediate, sms in ((3072, 132), (14336, 132), (3072, 200), (1000, 7)):
        first = persistent_min_tokens(intermediate, sms)
        if module._range_takes_warp_specialize():
            assert persistent_tiles(first, intermediate, sms) == PERSISTENT_TILES
        assert persistent_tiles(first - 1, intermediate, sms) == DEFAULT_TILES
    assert persistent_min_tokens(3072, 132) == 1281 and persistent_min_tokens(14336, 132) == 257

    monkeypatch.delenv(GATE_UP_PERSISTENT_ENV, raising=False)
    monkeypatch.setattr(module, "_range_takes_warp_specialize", lambda: True)
    assert gate_up_persistent() and gate_up_silu_max_hidden() == 4096
    monkeypatch.setenv(GATE_UP_PERSISTENT_ENV, "0")
    assert not gate_up_persistent() and gate_up_silu_max_hidden() == 2048
    monkeypatch.setenv(GATE_UP_PERSISTENT_ENV, "1")
    assert gate_up_persistent() and gate_up_silu_max_hidden() == 4096
    # A Triton without warp specialization, or one that refused to compile it: the
    # non-persistent tiles, which lose to cuBLAS on the 8B shape, so wider models keep cuBLAS.
    monkeypatch.setattr(module, "_range_takes_warp_specialize", lambda: False)
    assert gate_up_silu_max_hidden() == 2048
    monkeypatch.setattr(module, "_range_takes_warp_specialize", lambda: True)
    monkeypatch.setattr(module, "_WARP_SPECIALIZATION_REFUSED", ["PassManager::run failed"])
    assert gate_up_silu_max_hidden() == 2048
    monkeypatch.setenv(GATE_UP_PERSISTENT_ENV, "yes")
    with pytest.raises(ValueError, match="ONDO_GATE_UP_PERSISTENT must be 0 or 1"):
        check_gate_up_tiles()


def test_a_triton_that_cannot_compile_warp_specialization_falls_back_once_and_other_errors_surface(monkeypatch):
    """Off, the non-persistent tiles however large the step. On (the default), the
    warp-specialized tiles refused at compile: that call and every later one take the
    non-persistent tiles, with the same result; an error of another kind is raised as is."""
    from ondo.kernels import triton_gate_up_silu as module

    monkeypatch.delenv(GATE_UP_TILES_ENV, raising=False)
    monkeypatch.setattr(module, "_WARP_SPECIALIZATION_REFUSED", [])
    monkeypatch.setattr(module, "_range_takes_warp_specialize", lambda: True)
    monkeypatch.setattr(module, "_num_sms", lambda x: 1)  # a few rows make two waves
    real_launch, launched = module._launch, []

    def refusing(x, weight, out, tiles, descriptor):
        launched.append(tiles)
        if tiles.warp_specialize:
            raise RuntimeError("PassManager::run failed")
        real_launch(x, weight, out, tiles, descriptor)

    monkeypatch.setattr(module, "_launch", refusing)
    x, weight = _inputs(300, 64, 136)  # 3 x 2 tiles of 128 x 128 on "one SM"
    want = silu_and_mul(F.linear(x, weight))
    monkeypatch.setenv(GATE_UP_PERSISTENT_ENV, "0")
    torch.testing.assert_close(gate_up_silu_triton(x, weight), want, atol=1e-5, rtol=1e-5)
    assert launched == [DEFAULT_TILES]
    launched.clear()
    monkeypatch.delenv(GATE_UP_PERSISTENT_ENV)
    torch.testing.assert_close(gate_up_silu_triton(x, weight), want, atol=1e-5, rtol=1e-5)
    assert launched == [PERSISTENT_TILES, DEFAULT_TILES] and not module.warp_specialization_available()
    torch.testing.assert_close(gate_up_silu_triton(x, weight), want, atol=1e-5, rtol=1e-5)
    assert launched[2:] == [DEFAULT_TILES]  # no second try
    assert module.persistent_tiles(8200, 3072, 132) == DEFAULT_TILES

    monkeypatch.setattr(module, "_WARP_SPECIALIZATION_REFUSED", [])

    def faulting(x, weight, out, tiles, descriptor):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(module, "_launch", faulting)
    with pytest.raises(RuntimeError, match="illegal memory access"):
        gate_up_silu_triton(x, weight)
    assert module.warp_specialization_available()


def test_the_model_reads_the_switch_up_to_its_widest_hidden_size_with_backed_or_unbacked_token_counts(monkeypatch):
    import dataclasses

    from ondo.kernels.gate_up_silu import GATE_UP_SILU_MAX_HIDDEN, GATE_UP_SILU_MIN_TOKENS
    from ondo.model.config import ModelConfig
    from ondo.model.llama import LlamaForCausalLM

    config = ModelConfig("LlamaForCausalLM", vocab_size=64, hidden_size=32, intermediate_size=48,
                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                         rms_norm_eps=1e-6, rope_theta=10_000.0)
    monkeypatch.delenv("ONDO_UNBACKED_TOKENS", raising=False)
    monkeypatch.delenv(FUSED_GATE_UP_SILU_ENV, raising=False)
    model = LlamaForCausalLM(config)
    assert model._shape.fused_gate_up_silu
    # The runner's CUDA graphs warm up on each side of the token count it branches on.
    assert model.token_count_branches == (GATE_UP_SILU_MIN_TOKENS,)
    monkeypatch.setenv(FUSED_GATE_UP_SILU_ENV, "0")
    model = LlamaForCausalLM(config)
    assert not model._shape.fused_gate_up_silu and model.token_count_branches == ()
    monkeypatch.setenv(FUSED_GATE_UP_SILU_ENV, "1")
    assert LlamaForCausalLM(config)._shape.fused_gate_up_silu
    # Without the persistent grid a wider model keeps cuBLAS's matmul (faster than the
    # non-persistent tiles there on an H100).
    wide = dataclasses.replace(config, hidden_size=2 * GATE_UP_SILU_MAX_HIDDEN, num_attention_heads=2 * 128,
                               num_key_value_heads=1)
    monkeypatch.setenv(GATE_UP_PERSISTENT_ENV, "0")
    with torch.device("meta"):
        assert not LlamaForCausalLM(wide)._shape.fused_gate_up_silu
    # With it (the default, on a Triton that warp-specializes), up to the 8B shape's 4,096;
    # wider still not.
    from ondo.kernels import triton_gate_up_silu as module

    monkeypatch.setattr(module, "_range_takes_warp_specialize", lambda: True)
    monkeypatch.setattr(module, "_WARP_SPECIALIZATION_REFUSED", [])
    monkeypatch.delenv(GATE_UP_PERSISTENT_ENV)
    with torch.device("meta"):
        assert LlamaForCausalLM(wide)._shape.fused_gate_up_silu
        wider = dataclasses.replace(wide, hidden_size=2 * wide.hidden_size, num_attention_heads=4 * 128)
        assert not LlamaForCausalLM(wider)._shape.fused_gate_up_silu
    # The operator branches on the token count inside, so unbacked token counts take it too.
    monkeypatch.setenv("ONDO_UNBACKED_TOKENS", "1")
    assert LlamaForCausalLM(config)._shape.fused_gate_up_silu
    monkeypatch.delenv(FUSED_GATE_UP_SILU_ENV)
    assert LlamaForCausalLM(config)._shape.fused_gate_up_silu
