"""The MLP's gate/up projection and SiLU-and-mul as one operator of the compiled regions
(`ondo::gate_up_silu`), run by `triton_gate_up_silu` on a GPU with tensor descriptors.
On by default since it was measured (docs/benchmarks.md; ONDO_FUSED_GATE_UP_SILU=0 turns it
off): a CUDA model whose hidden size is at most `gate_up_silu_max_hidden()` calls it in place
of cuBLAS's matmul and the SiLU-and-mul kernel Inductor would generate. From
`GATE_UP_SILU_MIN_TOKENS` tokens a step it runs one Triton matmul with SiLU-and-mul in its
epilogue. Smaller steps (decode) run cuBLAS's matmul and a SiLU-and-mul kernel of the
operator's own, as the compiled path would: there the weight is read once whichever runs
it, and cuBLAS spreads a few rows over every SM. The operator, not the compiled region,
branches on the token count, so the region compiles one graph for every step size, and
unbacked token counts (ONDO_UNBACKED_TOKENS=1) take it too. Without the persistent grid
(below), models wider than `GATE_UP_SILU_MAX_HIDDEN` keep cuBLAS and Inductor's kernel at
every size: the SiLU-and-mul's pass over the [T, 2I] projection costs a
share of the matmul that falls as the hidden size (the matmul's depth) grows, and on the
H100 the Triton matmul's deficit against cuBLAS outweighs it from 2,048 tokens on the 8B
shape (hidden 4,096), while it wins at every step of 1,024 tokens or more on the 0.6B shape
(hidden 1,024): docs/benchmarks.md.

Steps with tiles enough take a persistent, warp-specialized grid
(`triton_gate_up_silu.persistent_tiles`; ONDO_GATE_UP_PERSISTENT=0 turns it off): on an H200
17 % faster than the default tiles at 8,192 tokens of the 0.6B shape, and 10-13 % under
cuBLAS + SiLU-and-mul from 1,024 tokens on the 8B shape, so with it models up to
`GATE_UP_SILU_PERSISTENT_MAX_HIDDEN` take the operator wherever this Triton warp-specializes.
In the engine on an H100 it took W3's step from 25.5 to 24.7 ms on the 0.6B shape and left
W1, W2 and the 8B shape's workloads where they were or a little faster (docs/benchmarks.md).

In float32 on a GPU, or where tensor descriptors cannot read the operands, the operator
itself runs the matmul and SiLU-and-mul.

A custom operator, opaque to Inductor (see `ondo.kernels.qk_norm_rope`). No module-level
`from __future__ import annotations` here: the operator's schema is read from its
annotations.
"""

import torch
import torch.nn.functional as F

from ondo.kernels.switches import on_off

FUSED_GATE_UP_SILU_ENV = "ONDO_FUSED_GATE_UP_SILU"
# From here the fused kernel: with a 128-row tile a program, each weight tile serves eight
# row tiles or more.
GATE_UP_SILU_MIN_TOKENS = 1024
# The widest hidden size it serves (see above); with the persistent grid, the widest measured.
GATE_UP_SILU_MAX_HIDDEN = 2048
GATE_UP_SILU_PERSISTENT_MAX_HIDDEN = 4096
GATE_UP_PERSISTENT_ENV = "ONDO_GATE_UP_PERSISTENT"


def gate_up_persistent() -> bool:
    """Whether steps with tiles enough take the persistent, warp-specialized grid: on
    unless ONDO_GATE_UP_PERSISTENT=0; anything but 0 or 1 is refused."""
    return on_off(GATE_UP_PERSISTENT_ENV, default=True)


def gate_up_silu_max_hidden() -> int:
    """The widest hidden size that takes the operator: the persistent grid's where
    ONDO_GATE_UP_PERSISTENT leaves it on and this Triton warp-specializes (without it the
    non-persistent tiles lose to cuBLAS on the 8B shape), else `GATE_UP_SILU_MAX_HIDDEN`."""
    if not gate_up_persistent():
        return GATE_UP_SILU_MAX_HIDDEN
    try:
        from ondo.kernels.triton_gate_up_silu import warp_specialization_available
    except ImportError:  # no Triton: no GPU kernels at all
        return GATE_UP_SILU_MAX_HIDDEN
    return GATE_UP_SILU_PERSISTENT_MAX_HIDDEN if warp_specialization_available() else GATE_UP_SILU_MAX_HIDDEN


def fused_gate_up_silu() -> bool:
    """Whether CUDA models use `gate_up_silu`: on unless ONDO_FUSED_GATE_UP_SILU=0; anything
    but 0 or 1 is refused."""
    return on_off(FUSED_GATE_UP_SILU_ENV, default=True)


def check_gate_up_tiles() -> None:
    """Read ONDO_GATE_UP_TILES (`triton_gate_up_silu.configured_tiles`) and
    ONDO_GATE_UP_PERSISTENT once, so that a bad value fails the engine at start on any
    device, not at the first prefill on a GPU."""
    from ondo.kernels.triton_gate_up_silu import configured_tiles

    configured_tiles()
    gate_up_persistent()


@torch.library.custom_op("ondo::gate_up_silu", mutates_args=())
def gate_up_silu(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """silu(x @ gate^T) * (x @ up^T), [T, I], from x [T, H] and weight [2 I, H] (gate's
    rows, then up's)."""
    from ondo.kernels.triton_gate_up_silu import gate_up_silu_triton, silu_and_mul_triton, tma_ready

    # Small steps; float32 on a GPU, whose tensor-core dots would round to tf32 where cuBLAS
    # does not; operands tensor descriptors cannot read: cuBLAS, then SiLU-and-mul.
    if (x.shape[0] < GATE_UP_SILU_MIN_TOKENS or (x.is_cuda and x.dtype == torch.float32)
            or not tma_ready(x, weight)):
        return silu_and_mul_triton(F.linear(x, weight))
    return gate_up_silu_triton(x, weight)


@gate_up_silu.register_fake
def _(x, weight):
    return x.new_empty((x.shape[0], weight.shape[0] // 2))
