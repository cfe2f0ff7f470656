"""The residual add after a projection, moved out of the matmul and into the next kernel.

Inductor turns `residual + x @ W` into cuBLAS's addmm when the sum feeds anything but
pointwise work (here the next RMSNorm, a reduction). addmm accumulates into its output,
so the residual is first copied there: on CUDA one extra copy kernel per add, two per
decoder layer (`memcpy128` in the profiles: 22 µs a layer on an H100 at 8,192 tokens).
As a plain matmul followed by the add, Inductor fuses the add into the RMSNorm kernel that
reads the sum anyway, which then also writes the residual stream out.

`rewrite` makes that change to a graph; `residual_add_pass` is the same as a post-grad
pass, given to Inductor for ondo's compiled regions unless ONDO_RESIDUAL_ADD_IN_NORM=0 (on
an H100, W1 and W3 on the 0.6B shape ran 1 % faster with it: docs/benchmarks.md). It
rewrites only a full [M, N] addend with unit alpha and beta: a bias vector stays in the
matmul's epilogue.
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path
from typing import Any

import torch

from ondo.kernels.switches import on_off

RESIDUAL_ADD_IN_NORM_ENV = "ONDO_RESIDUAL_ADD_IN_NORM"

_aten = torch.ops.aten


def residual_add_in_norm() -> bool:
    """Whether the compiled regions get `ResidualAddOutOfMatmul`: on unless
    ONDO_RESIDUAL_ADD_IN_NORM=0."""
    return on_off(RESIDUAL_ADD_IN_NORM_ENV, default=True)


def _full_addend(node: torch.fx.Node) -> bool:
    """Whether this addmm adds a whole [M, N] tensor (a residual), alpha and beta 1."""
    from torch.fx.experimental.symbolic_shapes import statically_known_true

    if node.kwargs.get("alpha", 1) != 1 or node.kwargs.get("beta", 1) != 1:
        return False
    addend, out = node.args[0], node.meta.get("val")
    if not isinstance(addend, torch.fx.Node) or out is None:
        return False
    val = addend.meta.get("val")
    return (isinstance(val, torch.Tensor) and val.dim() == 2
            and all(statically_known_true(a == b) for a, b in zip(val.shape, out.shape)))


def rewrite(graph: torch.fx.Graph) -> int:
    """addmm(residual, x, W) → add(residual, mm(x, W)), in place; how many it rewrote."""
    rewritten = 0
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target is not _aten.addmm.default:
            continue
        if not _full_addend(node):
            continue
        addend, x, w = node.args[:3]
        with graph.inserting_before(node):
            mm = graph.call_function(_aten.mm.default, (x, w))
            add = graph.call_function(_aten.add.Tensor, (addend, mm))
        mm.meta.update(node.meta)  # the same [M, N] and dtype
        add.meta.update(node.meta)
        node.replace_all_uses_with(add)
        graph.erase_node(node)
        rewritten += 1
    return rewritten


@functools.cache
def residual_add_pass() -> Any:
    """The pass as Inductor takes it (a `CustomGraphPass`: Inductor's modules are imported
    here, not when ondo is)."""
    from torch._inductor.custom_graph_pass import CustomGraphPass

    class ResidualAddOutOfMatmul(CustomGraphPass):
        def __call__(self, graph: torch.fx.Graph) -> None:
            rewrite(graph)

        def uuid(self) -> bytes:
            """Keyed on this file, so that Inductor's cache of compiled code is reused
            across starts and dropped when the pass changes."""
            return hashlib.sha256(Path(__file__).read_bytes()).digest()

    return ResidualAddOutOfMatmul()
