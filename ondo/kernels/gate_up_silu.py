"""The MLP's gate/up projection and SiLU-and-mul as one operator of the compiled regions
(`ondo::gate_up_silu`), run by `triton_gate_up_silu` on a GPU with tensor descriptors.
On by default since it was measured (docs/benchmarks.md; ONDO_FUSED_GATE_UP_SILU=0 turns it
off): a CUDA model whose hidden size is at most
`GATE_UP_SILU_MAX_HIDDEN` calls it, for steps of `GATE_UP_SILU_MIN_TOKENS` tokens or more,
in place of cuBLAS's matmul and the SiLU-and-mul kernel Inductor would generate. Smaller
steps (decode) keep those: there the weight is read once whichever runs it, and cuBLAS
spreads a few rows over every SM. Wider models keep them too: the SiLU-and-mul's pass over
the [T, 2I] projection costs a share of the matmul that falls as the hidden size (the
matmul's depth) grows, and on the H100 the Triton matmul's deficit against cuBLAS outweighs
it from 2,048 tokens on the 8B shape (hidden 4,096), while it wins at every step of 1,024
tokens or more on the 0.6B shape (hidden 1,024): docs/benchmarks.md.

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
# The model's threshold: with a 128-row tile a program, from here each weight tile serves
# eight row tiles or more.
GATE_UP_SILU_MIN_TOKENS = 1024
# The widest hidden size it serves (see above).
GATE_UP_SILU_MAX_HIDDEN = 2048


def fused_gate_up_silu(unbacked_tokens: bool) -> bool:
    """Whether CUDA models use `gate_up_silu`: on unless ONDO_FUSED_GATE_UP_SILU=0, or unless
    `unbacked_tokens` (ONDO_UNBACKED_TOKENS=1), under which a compiled region cannot branch
    on the step's token count. Anything but 0 or 1 is refused, and so is the switch set to 1
    with `unbacked_tokens`."""
    if unbacked_tokens:
        if on_off(FUSED_GATE_UP_SILU_ENV, default=False):
            raise ValueError(f"{FUSED_GATE_UP_SILU_ENV}=1 takes its kernel by the step's token count; "
                             "ONDO_UNBACKED_TOKENS=1 hides it from the compiled regions: set one of them to 0")
        return False
    return on_off(FUSED_GATE_UP_SILU_ENV, default=True)


@torch.library.custom_op("ondo::gate_up_silu", mutates_args=())
def gate_up_silu(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """silu(x @ gate^T) * (x @ up^T), [T, I], from x [T, H] and weight [2 I, H] (gate's
    rows, then up's)."""
    from ondo.kernels.triton_gate_up_silu import gate_up_silu_triton, tma_ready

    # Not float32 on a GPU: its tensor-core dots would round to tf32 where cuBLAS does not.
    if (x.is_cuda and x.dtype == torch.float32) or not tma_ready(x, weight):
        gate, up = F.linear(x, weight).chunk(2, dim=-1)
        return F.silu(gate) * up
    return gate_up_silu_triton(x, weight)


@gate_up_silu.register_fake
def _(x, weight):
    return x.new_empty((x.shape[0], weight.shape[0] // 2))
