"""ONDO_RESIDUAL_ADD_IN_NORM: a residual added after a projection leaves cuBLAS's addmm
(which first copies the residual into its output) for the next RMSNorm's kernel."""

from __future__ import annotations

import re
import shutil

import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx

from ondo.model import fusion
from ondo.model.llama import _regions, _RegionShape
from ondo.model.residual_add import RESIDUAL_ADD_IN_NORM_ENV, rewrite

aten = torch.ops.aten


def _targets(gm: torch.fx.GraphModule) -> list:
    return [n.target for n in gm.graph.nodes if n.op == "call_function"]


def test_a_full_addend_leaves_the_matmul_and_a_bias_stays():
    def project(residual, x, w, bias):
        return torch.addmm(residual, x, w), torch.addmm(bias, x, w), torch.addmm(residual, x, w, beta=2)

    args = (torch.randn(6, 5), torch.randn(6, 4), torch.randn(4, 5), torch.randn(5))
    gm = make_fx(project)(*args)
    assert _targets(gm).count(aten.addmm.default) == 3
    assert rewrite(gm.graph) == 1  # the bias vector and beta = 2 stay in the matmul
    gm.graph.lint()
    gm.recompile()
    targets = _targets(gm)
    assert targets.count(aten.addmm.default) == 2
    assert targets.count(aten.mm.default) == 1 and targets.count(aten.add.Tensor) == 1
    for got, expect in zip(gm(*args), project(*args), strict=True):
        torch.testing.assert_close(got, expect)


def _compiler() -> bool:
    return any(shutil.which(c) for c in ("g++", "c++", "clang++"))


@pytest.mark.skipif(not _compiler(), reason="Inductor's CPU code needs a C++ compiler")
def test_the_compiled_boundary_region_adds_the_residual_in_its_norm_kernels(tmp_path, monkeypatch):
    """The decoder's region between two attention calls through Inductor on the CPU: with
    the switch, four plain matmuls and the two residual adds inside the norms' kernels;
    without it, two addmm. The outputs equal the uncompiled function's either way."""
    from torch._inductor.utils import run_and_get_code

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    heads, kv_heads, head_dim, hidden, inter, tokens = 4, 2, 16, 64, 128, 8
    _, boundary, _ = _regions(_RegionShape(heads, kv_heads, head_dim, 1e-6))
    fn = boundary.__wrapped__
    g = torch.Generator().manual_seed(0)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g)

    args = (randn(tokens, heads * head_dim), randn(tokens, hidden), randn(hidden, heads * head_dim),
            randn(hidden), randn(2 * inter, hidden), randn(hidden, inter), randn(hidden),
            randn((heads + 2 * kv_heads) * head_dim, hidden), None, randn(head_dim), randn(head_dim),
            randn(tokens, head_dim), randn(tokens, head_dim))
    expect = fn(*args)
    codes = {}
    for on in ("0", "1"):
        monkeypatch.setenv(RESIDUAL_ADD_IN_NORM_ENV, on)
        torch._dynamo.reset()
        compiled = torch.compile(fn, backend="inductor", dynamic=True, fullgraph=True,
                                 options=fusion.inductor_options())
        try:
            out, code = run_and_get_code(compiled, *args)
        except Exception as e:  # a compiler without the headers Inductor's CPU code needs
            if "CppCompileError" in repr(e) or "C++ compile error" in str(e):
                pytest.skip(f"no working C++ toolchain for Inductor: {str(e).splitlines()[0][:200]}")
            raise
        for got, want in zip(out, expect, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        codes[on] = "\n".join(code)
    torch._dynamo.reset()
    assert codes["0"].count("extern_kernels.addmm(") == 2
    assert "addmm" not in codes["1"] and codes["1"].count("extern_kernels.mm(") == 4
    # Kernels that normalize and add: the two norms now take the residual adds.
    adding_norms = {on: {k for k in re.findall(r"(cpp_fused_\w+)\(", code) if "add" in k and "rsqrt" in k}
                    for on, code in codes.items()}
    assert len(adding_norms["1"]) >= len(adding_norms["0"]) + 2


def test_the_switch_is_on_by_default_and_read_strictly(monkeypatch):
    monkeypatch.delenv(RESIDUAL_ADD_IN_NORM_ENV, raising=False)
    options = fusion.inductor_options()
    assert options is not None and options["post_grad_custom_post_pass"].uuid()
    monkeypatch.setenv(RESIDUAL_ADD_IN_NORM_ENV, "0")
    assert fusion.inductor_options() is None
    monkeypatch.setenv(RESIDUAL_ADD_IN_NORM_ENV, "1")
    monkeypatch.setattr(fusion, "BACKEND", "aot_eager")  # takes no options
    assert fusion.inductor_options() is None
    monkeypatch.setattr(fusion, "BACKEND", "inductor")
    monkeypatch.setenv(RESIDUAL_ADD_IN_NORM_ENV, "yes")
    with pytest.raises(ValueError, match="ONDO_RESIDUAL_ADD_IN_NORM must be 0 or 1"):
        fusion.inductor_options()
