"""The MLP's gate/up matmul and SiLU-and-mul: cuBLAS plus Inductor's kernel against
`ondo::gate_up_silu` (ONDO_FUSED_GATE_UP_SILU=1), one Triton matmul with the SiLU-and-mul
in its epilogue.

For each model shape's hidden and intermediate sizes at a decode step's, a chunk's and a
full prefill step's token counts, from the same input:

- `compiled_us`: the model's own `silu_and_mul(F.linear(x, w))` under torch.compile
  (dynamic token counts), as the compiled regions run it today; `matmul_us`: cuBLAS's
  matmul alone, the part of it no fusion removes;
- `operator_us`: `ondo::gate_up_silu` as the model calls it: the fused kernel from 1,024
  tokens, cuBLAS's matmul and the operator's SiLU-and-mul kernel under that (decode);
- `fused_us`: the Triton kernel at its default tiles (the sweep's first); `tiles`: each
  configuration swept (block_m x block_n x block_k x group_m x warps x stages, then -pK
  for a persistent grid of K programs an SM and -ws where warp-specialized), its time, or
  why it has none (the compiler refused it, or its output differs from the default's);
  the fastest is what the default should be;
- `*_tflop_per_s`: the matmul's FLOPs over each time; `mean_abs_error_vs_float64`: each
  path's against the same product in float64.

Each is captured in a CUDA graph, replayed and timed by CUDA events
(`ondo.bench.graph_timing`).

    python3 bench/gate_up_silu_bench.py [--out FILE]   # = STAGES=gate_up_silu scripts/gpu_check.sh
    python3 bench/gate_up_silu_bench.py --smoke        # CPU, Triton's interpreter, float32
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

if "--smoke" in sys.argv:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels are decorated

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import torch.nn.functional as F  # noqa: E402

from ondo.bench.graph_timing import graph_time_us  # noqa: E402
from ondo.bench.shapes import SHAPES  # noqa: E402
from ondo.kernels import gate_up_silu as _registers_the_operator  # noqa: E402, F401
from ondo.kernels.triton_gate_up_silu import (  # noqa: E402
    DEFAULT_TILES,
    PERSISTENT_TILES,
    GateUpTiles,
    gate_up_silu_triton,
)
from ondo.model.layers import silu_and_mul  # noqa: E402

SWEEP = [
    DEFAULT_TILES,  # 128 x 64 x 64, 4 warps, 4 stages
    GateUpTiles(128, 128, 64, 8, 8, 3),  # the first default
    GateUpTiles(64, 128, 64, 8, 4, 4),
    GateUpTiles(128, 128, 64, 8, 8, 4),
    GateUpTiles(128, 128, 32, 8, 8, 5),
    GateUpTiles(128, 64, 128, 8, 8, 3),
    # Persistent grids (a program or two an SM walking the tiles), warp-specialized or not.
    GateUpTiles(128, 64, 64, 8, 4, 4, 1),
    GateUpTiles(128, 64, 64, 8, 4, 3, 2),
    GateUpTiles(128, 128, 64, 8, 8, 3, 1),
    GateUpTiles(128, 128, 64, 8, 8, 4, 1),
    PERSISTENT_TILES,  # 128 x 128 x 64, 8 warps, 3 stages, a program an SM, warp-specialized
    GateUpTiles(256, 64, 64, 8, 8, 3, 1),
    # Not swept: 128 x 64 x 64 on 4 warps warp-specialized (Triton 3.6 failed to compile it
    # for sm_90), 128 x 256 x 64 on 8 (311 KB of shared memory, 227 KB on an H100 or H200).
]


def time_tiles(x: torch.Tensor, weight: torch.Tensor, tiles: GateUpTiles, reference: torch.Tensor,
               cuda: bool) -> float | str:
    """µs a call at these tiles; where they fail to compile or disagree with the default
    tiles' output, why (a sweep goes on past a configuration the compiler refuses)."""
    try:
        out = gate_up_silu_triton(x, weight, tiles)
    except Exception as e:  # noqa: BLE001 (a compiler's refusal, recorded)
        return f"error: {type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
    diff = float((out.float() - reference.float()).abs().max())
    if diff > 1e-2 * float(reference.float().abs().max()):
        return f"wrong: max abs diff {diff:.3g} against the default tiles"
    return round(graph_time_us(lambda: gate_up_silu_triton(x, weight, tiles), cuda), 2)


def gate_up_act(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The model's path (`ondo.model.llama._gate_up_act` without the switch)."""
    return silu_and_mul(F.linear(x, weight))


def measure(tokens: int, hidden: int, intermediate: int, device: str, dtype: torch.dtype, compiled,
            sweep: list[GateUpTiles]) -> dict:
    """One token count; `sweep[0]` stands for the default tiles."""
    g = torch.Generator(device=device).manual_seed(tokens)
    x = torch.randn(tokens, hidden, device=device, generator=g).to(dtype)
    weight = (torch.randn(2 * intermediate, hidden, device=device, generator=g) / hidden**0.5).to(dtype)
    exact = gate_up_act(x.double(), weight.double())
    fused = gate_up_silu_triton(x, weight, sweep[0])
    today = compiled(x, weight)
    operator = torch.ops.ondo.gate_up_silu(x, weight)
    cuda = device == "cuda"
    flop = 2 * tokens * hidden * 2 * intermediate
    compiled_us = graph_time_us(lambda: compiled(x, weight), cuda)
    matmul_us = graph_time_us(lambda: F.linear(x, weight), cuda)
    operator_us = graph_time_us(lambda: torch.ops.ondo.gate_up_silu(x, weight), cuda)
    tiles = {t.label: time_tiles(x, weight, t, fused, cuda) for t in sweep}
    fused_us = tiles[sweep[0].label]
    timed = {name: us for name, us in tiles.items() if isinstance(us, float)}
    return {"tokens": tokens, "hidden": hidden, "intermediate": intermediate,
            "compiled_us": round(compiled_us, 2), "matmul_us": round(matmul_us, 2),
            "operator_us": round(operator_us, 2), "fused_us": fused_us,
            "compiled_tflop_per_s": round(flop / compiled_us / 1e6, 1),
            "matmul_tflop_per_s": round(flop / matmul_us / 1e6, 1),
            "fused_tflop_per_s": round(flop / fused_us / 1e6, 1),
            "best_tiles": min(timed, key=timed.get), "tiles": tiles,
            "mean_abs_error_vs_float64": {name: float(f"{float((out.double() - exact).abs().mean()):.4g}")
                                          for name, out in (("compiled", today), ("operator", operator),
                                                            ("fused", fused))}}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="CPU, Triton's interpreter, a few tokens")
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    if args.smoke:
        device, dtype, compiled = "cpu", torch.float32, gate_up_act
        cases = [(40, 64, 48)]
        sweep = [GateUpTiles(16, 16, 32, 2, 4, 2), GateUpTiles(32, 16, 32, 2, 4, 2),
                 GateUpTiles(16, 16, 32, 2, 4, 2, 1), GateUpTiles(16, 16, 32, 2, 4, 2, 2, True)]
    else:
        if not torch.cuda.is_available():
            ap.error("needs a CUDA GPU (or --smoke)")
        device, dtype, sweep = "cuda", torch.bfloat16, SWEEP
        compiled = torch.compile(gate_up_act, dynamic=True)
        cases = [(tokens, SHAPES[s]["hidden_size"], SHAPES[s]["intermediate_size"])
                 for s in ("qwen3-0.6b", "llama3.1-8b") for tokens in (64, 256, 1024, 2048, 8192)]
    rows = []
    for tokens, hidden, intermediate in cases:
        row = measure(tokens, hidden, intermediate, device, dtype, compiled, sweep)
        rows.append(row)
        print(json.dumps(row), flush=True)
    result = {"bench": "gate_up_silu", "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
              "torch": torch.__version__, "dtype": str(dtype).removeprefix("torch."), "rows": rows}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
