"""Prefill attention: ondo's paged Triton kernel against PyTorch SDPA (flash) on contiguous
q/k/v, for whole prompts and for chunks over a cached prefix. Prints a table and a JSON line.

    python3 bench/prefill_bench.py
"""

from __future__ import annotations

import json

import torch
import torch.nn.functional as F
import triton.testing

from ondo.kernels.testing import make_paged_batch
from ondo.kernels.triton_attention import paged_prefill_attention_triton


def flops(query_lens: list[int], context_lens: list[int], heads: int, head_dim: int) -> float:
    pairs = sum(q * c - q * (q - 1) / 2 for q, c in zip(query_lens, context_lens))
    return 4.0 * heads * head_dim * pairs


def main() -> None:
    rows = []
    hq, hkv, d = 16, 8, 128
    for seqs, q, c in ((4, 2048, 2048), (1, 8192, 8192), (8, 1024, 1024), (4, 512, 2048), (16, 512, 512)):
        b = make_paged_batch([q] * seqs, [c] * seqs, num_q_heads=hq, num_kv_heads=hkv, head_dim=d,
                             block_size=16, dtype=torch.bfloat16, device="cuda")
        scale = d ** -0.5
        t_triton = triton.testing.do_bench(
            lambda b=b, scale=scale: paged_prefill_attention_triton(b.query, b.k_cache, b.v_cache, b.meta, scale))
        qq = torch.randn(seqs, hq, q, d, dtype=torch.bfloat16, device="cuda")
        kk = torch.randn(seqs, hkv, c, d, dtype=torch.bfloat16, device="cuda")
        vv = torch.randn_like(kk)
        causal = q == c
        t_sdpa = triton.testing.do_bench(lambda qq=qq, kk=kk, vv=vv, causal=causal: F.scaled_dot_product_attention(
            qq, kk, vv, is_causal=causal, enable_gqa=True))
        f = flops([q] * seqs, [c] * seqs, hq, d)
        rows.append({"seqs": seqs, "query_len": q, "context_len": c, "triton_ms": t_triton,
                     "triton_tflops": f / t_triton / 1e9, "sdpa_ms": t_sdpa,
                     "sdpa_tflops": (f if causal else 4.0 * hq * d * seqs * q * c) / t_sdpa / 1e9})
        r = rows[-1]
        print(f"{seqs:3d} x q{q:5d} c{c:5d}: triton {r['triton_ms']:.3f} ms ({r['triton_tflops']:.0f} TFLOP/s)"
              f"  sdpa {r['sdpa_ms']:.3f} ms ({r['sdpa_tflops']:.0f} TFLOP/s)")
    print(json.dumps({"benchmark": "prefill_attention", "device": torch.cuda.get_device_name(), "rows": rows}))


if __name__ == "__main__":
    main()
