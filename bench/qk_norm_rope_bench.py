"""Qwen3's q/k norm and rotary embedding: Inductor's kernels against `ondo::qk_norm_rope`.

For the Qwen3-0.6B shape's heads (16 / 8, head dim 128) at a decode step's, a chunk's
and a full prefill step's token counts, each from the same QKV projection output:

- `inductor_us`: the norms and rotations as the compiled regions run them today (the
  model's own functions under torch.compile, dynamic token counts);
- `fused_us`: the operator (ONDO_FUSED_QK_NORM_ROPE=1), one Triton kernel;
- `*_gb_per_s`: the bytes both must move (q and k read and written, cos and sin read)
  over the time; `same_bits_fraction` (`inductor_same_bits_fraction`): of the fused
  (compiled) output against eager's; `mean_abs_error_vs_float64`: each path's against
  the model's own path on the same values in float64 (its norm's statistics in float32).

Each is captured in a CUDA graph, replayed and timed by CUDA events
(`ondo.bench.graph_timing`).

    python3 bench/qk_norm_rope_bench.py [--out FILE]   # = STAGES=qk_norm_rope scripts/gpu_check.sh
    python3 bench/qk_norm_rope_bench.py --smoke        # CPU, Triton's interpreter, eager only
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
from ondo.bench.graph_timing import graph_time_us  # noqa: E402
from ondo.bench.shapes import SHAPES  # noqa: E402
from ondo.kernels.qk_norm_rope import qk_norm_rope  # noqa: E402
from ondo.model.layers import RotaryEmbedding  # noqa: E402
from ondo.model.llama import _norm_and_rotate, _RegionShape  # noqa: E402


def norm_and_rotate(qkv, q_w, k_w, cos, sin, hq: int, hkv: int, d: int, eps: float):
    """q and k as the model's eager path makes them (`ondo.model.llama._norm_and_rotate`)."""
    return _norm_and_rotate(_RegionShape(hq, hkv, d, eps), qkv, q_w, k_w, cos, sin)[:2]


def measure(tokens: int, cfg: dict, device: str, dtype: torch.dtype, compiled) -> dict:
    hq, hkv, d, eps = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"], cfg["rms_norm_eps"]
    g = torch.Generator(device=device).manual_seed(tokens)
    qkv = torch.randn(tokens, (hq + 2 * hkv) * d, device=device, generator=g).to(dtype)
    q_w = (1 + 0.3 * torch.randn(d, device=device, generator=g)).to(dtype)
    k_w = (1 + 0.3 * torch.randn(d, device=device, generator=g)).to(dtype)
    cos, sin = RotaryEmbedding(d, cfg["rope_theta"], None)(
        torch.randint(0, 8192, (tokens,), device=device, generator=g))
    args = (qkv, q_w, k_w, cos, sin, hq, hkv, d, eps)
    want = norm_and_rotate(*args)
    got = qk_norm_rope(*args)
    today = compiled(*args)
    exact = norm_and_rotate(*(a.double() for a in args[:5]), *args[5:])
    same = same_bits(got, want)
    cuda = device == "cuda"
    inductor_us = graph_time_us(lambda: compiled(*args), cuda)
    fused_us = graph_time_us(lambda: qk_norm_rope(*args), cuda)
    moved = 2 * tokens * (hq + hkv) * d * qkv.element_size() + 2 * tokens * d * 4
    return {"tokens": tokens, "inductor_us": round(inductor_us, 2), "fused_us": round(fused_us, 2),
            "inductor_gb_per_s": round(moved / inductor_us / 1e3, 1),
            "fused_gb_per_s": round(moved / fused_us / 1e3, 1), "same_bits_fraction": round(same, 5),
            "inductor_same_bits_fraction": round(same_bits(today, want), 5),
            "mean_abs_error_vs_float64": {name: float(f"{mean_error(out, exact):.4g}")
                                          for name, out in (("eager", want), ("inductor", today), ("fused", got))}}


def same_bits(got, want) -> float:
    """The fraction of elements of q and k equal bit for bit."""
    return sum(int((a == b).sum()) for a, b in zip(got, want)) / sum(b.numel() for b in want)


def mean_error(got, exact) -> float:
    return sum(float((a.double() - b).abs().sum()) for a, b in zip(got, exact)) / sum(b.numel() for b in exact)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="CPU, Triton's interpreter, a few tokens")
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    cfg = SHAPES["qwen3-0.6b"]
    if args.smoke:
        device, dtype, counts, compiled = "cpu", torch.float32, (5, 16), norm_and_rotate
    else:
        if not torch.cuda.is_available():
            ap.error("needs a CUDA GPU (or --smoke)")
        device, dtype, counts = "cuda", torch.bfloat16, (256, 2048, 8192)
        compiled = torch.compile(norm_and_rotate, dynamic=True)
    rows = []
    for tokens in counts:
        row = measure(tokens, cfg, device, dtype, compiled)
        rows.append(row)
        print(json.dumps(row), flush=True)
    result = {"bench": "qk_norm_rope", "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
              "torch": torch.__version__, "dtype": str(dtype).removeprefix("torch."), "rows": rows}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
