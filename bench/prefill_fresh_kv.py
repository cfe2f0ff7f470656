"""Prefill attention over prompts with nothing cached before them, reading K/V from the
step's own contiguous projections instead of through the block table: the same tiles as
ondo's prefill kernel, with K/V loaded by pointers (no block-table lookup) or by the
Hopper tensor-memory accelerator (TMA descriptors), and the softmax's scale folded into
one multiply-add or not. Each variant's time, TFLOP/s and largest difference from ondo's
kernel on W3's steps of both shapes and on W1's first step; SDPA (cuDNN) on the same
equal-length prompts where it applies. ondo's own kernel is also timed reading the new
keys from the step's K/V (`new_kv` 1 by pointers, 2 by descriptors) on every step shape,
chunks over a cached prefix and W3's mixed steps with decode rows included; on the mixed
steps also with the decode rows in the decode kernel, after the prefill kernel or beside
it on a second stream (ONDO_MIXED_DECODE_OVERLAP=1), in the persistent decode kernel there
beside a two-stage prefill kernel (ONDO_MIXED_DECODE_BESIDE=1), and kept in the prefill
kernel in a prompt's tile or in 16-row tiles of their own (ONDO_PREFILL_DECODE_TILE=1).

    python3 bench/prefill_fresh_kv.py [--out FILE]
    python3 bench/prefill_fresh_kv.py --quick   # W3 0.6B (fresh and mixed), W1's first step
    python3 bench/prefill_fresh_kv.py --smoke   # CPU (Triton's interpreter), tiny shapes
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from prefill_tiles import flops, shape_batch, step_shapes  # noqa: E402

if "--smoke" in sys.argv:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels are decorated
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from ondo.kernels.attention import (  # noqa: E402
    MIXED_DECODE_BESIDE_ENV,
    MIXED_DECODE_OVERLAP_ENV,
    PREFILL_DECODE_TILE_ENV,
)
from ondo.kernels.triton_attention import paged_prefill_attention_triton, program_tile  # noqa: E402


@triton.jit
def _tile(q, m_i, l_i, acc, k_ptr, v_ptr, desc_k, desc_v, row0, kv_head, start, kv_end, q_pos, d,
          scale_log2e, stride_k_t, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
          MASKED: tl.constexpr, TMA: tl.constexpr, FMA: tl.constexpr):
    n = start + tl.arange(0, BLOCK_N)
    if TMA:
        k = desc_k.load([row0 + start, kv_head * HEAD_DIM])
    else:
        offs = (row0 + n).to(tl.int64)[:, None] * stride_k_t + kv_head * HEAD_DIM + d[None, :]
        if MASKED:
            k = tl.load(k_ptr + offs, mask=(n < kv_end)[:, None], other=0.0)
        else:
            k = tl.load(k_ptr + offs)
    qk = tl.dot(q, tl.trans(k))
    if MASKED:
        visible = (n[None, :] < kv_end) & (n[None, :] <= q_pos[:, None])
        qk = tl.where(visible, qk, float("-inf"))
    if FMA:
        m_new = tl.maximum(m_i, tl.max(qk, 1) * scale_log2e)
        p = tl.exp2(qk * scale_log2e - m_new[:, None])
    else:
        qk = qk * scale_log2e
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        p = tl.exp2(qk - m_new[:, None])
    alpha = tl.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    if TMA:
        v = desc_v.load([row0 + start, kv_head * HEAD_DIM])
    else:
        if MASKED:
            v = tl.load(v_ptr + offs, mask=(n < kv_end)[:, None], other=0.0)
        else:
            v = tl.load(v_ptr + offs)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    return m_new, l_i, acc

@triton.jit
def fresh_prefill(q_ptr, k_ptr, v_ptr, desc_k, desc_v, query_start_loc_ptr, out_ptr, scale_log2e,
                  stride_q_t, stride_q_h, stride_k_t, num_seqs,
                  GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, TMA: tl.constexpr, FMA: tl.constexpr):
    TOKENS_PER_TILE: tl.constexpr = BLOCK_M // GROUP_PAD
    program = tl.program_id(0)
    kv_head = tl.program_id(1)
    _, q_start, q_len, tile = program_tile(query_start_loc_ptr, num_seqs, program, TOKENS_PER_TILE)
    tok0 = tile * TOKENS_PER_TILE
    if tok0 >= q_len:
        return
    rows = tl.arange(0, BLOCK_M)
    tok = tok0 + rows // GROUP_PAD
    g = rows % GROUP_PAD
    row_mask = (tok < q_len) & (g < GROUP)
    heads = kv_head * GROUP + g
    d = tl.arange(0, HEAD_DIM)
    token_index = (q_start + tok).to(tl.int64)
    q_offsets = token_index[:, None] * stride_q_t + heads[:, None] * stride_q_h + d[None, :]
    q = tl.load(q_ptr + q_offsets, mask=row_mask[:, None], other=0.0)
    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    kv_end = tl.minimum(q_len, tok0 + TOKENS_PER_TILE)
    full_end = (tok0 + 1) // BLOCK_N * BLOCK_N
    for start in range(0, full_end, BLOCK_N):
        m_i, l_i, acc = _tile(q, m_i, l_i, acc, k_ptr, v_ptr, desc_k, desc_v, q_start, kv_head, start,
                              kv_end, tok, d, scale_log2e, stride_k_t, HEAD_DIM, BLOCK_N, False, TMA, FMA)
    for start in range(full_end, kv_end, BLOCK_N):
        m_i, l_i, acc = _tile(q, m_i, l_i, acc, k_ptr, v_ptr, desc_k, desc_v, q_start, kv_head, start,
                              kv_end, tok, d, scale_log2e, stride_k_t, HEAD_DIM, BLOCK_N, True, TMA, FMA)
    acc = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(out_ptr + q_offsets, acc.to(out_ptr.dtype.element_ty), mask=row_mask[:, None])


def run_fresh(query, key, value, query_start_loc, scale, block_m, block_n, warps, stages, tma, fma):
    from triton.tools.tensor_descriptor import TensorDescriptor

    t, hq, d = query.shape
    hkv = key.shape[1]
    group = hq // hkv
    group_pad = triton.next_power_of_2(group)
    k2, v2 = key.view(t, hkv * d), value.view(t, hkv * d)
    if tma:
        desc_k = TensorDescriptor.from_tensor(k2, [block_n, d])
        desc_v = TensorDescriptor.from_tensor(v2, [block_n, d])
    else:
        desc_k = desc_v = k2  # unread
    out = torch.empty_like(query)
    num_seqs = query_start_loc.numel() - 1
    grid = (t // (block_m // group_pad) + num_seqs, hkv)
    fresh_prefill[grid](query, k2, v2, desc_k, desc_v, query_start_loc, out, scale * 1.4426950408889634,
                 query.stride(0), query.stride(1), k2.stride(0), num_seqs,
                 GROUP=group, GROUP_PAD=group_pad, HEAD_DIM=d, BLOCK_M=block_m, BLOCK_N=block_n,
                 TMA=tma, FMA=fma, num_warps=warps, num_stages=stages)
    return out


def variants(smoke: bool, quick: bool = False) -> list[tuple[int, int, int, int, bool, bool]]:
    """(rows, K/V tokens, warps, stages, TMA, FMA)."""
    if smoke:
        return [(16, 16, 4, 1, False, False), (16, 16, 4, 1, False, True), (16, 16, 4, 1, True, True)]
    if quick:
        return [(64, 64, 4, 3, False, False), (64, 64, 4, 3, True, True)]
    out = []
    for tma in (False, True):
        for fma in (False, True):
            out += [(64, 64, 4, 3, tma, fma), (128, 64, 8, 3, tma, fma), (128, 128, 8, 2, tma, fma)]
    return out + [(64, 128, 4, 2, True, True), (128, 128, 8, 3, True, True), (64, 64, 4, 4, True, True)]


def measure(shape: dict, cuda: bool, smoke: bool, quick: bool = False) -> dict[str, object]:
    """ondo's kernel, SDPA (cuDNN) where the prompts have one length, and every variant."""
    import torch.nn.functional as F

    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    bench = triton.testing.do_bench if cuda else (lambda fn: float("nan"))
    hq, hkv = shape["heads"]
    d = shape["head_dim"]
    b = shape_batch(shape, dtype, device)
    scale = d ** -0.5

    def ondo() -> torch.Tensor:
        return paged_prefill_attention_triton(b.query, b.k_cache, b.v_cache, b.meta, scale)

    expect = ondo().float()
    f = flops(shape["query_lens"], shape["context_lens"], hq, d)
    ondo_ms = bench(ondo)
    row: dict[str, object] = {"shape": shape["name"], "ondo_ms": ondo_ms, "ondo_tflops": f / ondo_ms / 1e9}
    for mode in (1, 2):  # ondo's kernel reading the new keys from the step's K/V
        def own(mode=mode) -> torch.Tensor:
            return paged_prefill_attention_triton(b.query, b.k_cache, b.v_cache, b.meta, scale,
                                                  key=b.key, value=b.value, new_kv=mode)
        try:
            row[f"ondo_new_kv{mode}_max_abs_diff"] = (own().float() - expect).abs().max().item()
            row[f"ondo_new_kv{mode}_ms"] = ms = bench(own)
            row[f"ondo_new_kv{mode}_tflops"] = f / ms / 1e9
        except Exception as e:  # noqa: BLE001 - e.g. no tensor descriptors in this Triton
            row[f"ondo_new_kv{mode}_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
    lens = shape["query_lens"]
    if 1 in lens and max(lens) > 1:  # decode rows beside prompts: split off, then overlapped
        row.update(decode_rows_split_off(b, scale, expect, bench))
    print(shape["name"], {k: v for k, v in row.items() if k.startswith("ondo")}, flush=True)
    if shape["query_lens"] != shape["context_lens"]:
        return row  # a cached prefix or decode rows: not the standalone kernel's case
    if cuda and len(set(lens)) == 1:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        n, s = len(lens), lens[0]
        qq = b.query.view(n, s, hq, d).transpose(1, 2)
        kk = b.key.view(n, s, hkv, d).transpose(1, 2)
        vv = b.value.view(n, s, hkv, d).transpose(1, 2)
        try:
            with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                row["sdpa_cudnn_strided_ms"] = bench(
                    lambda: F.scaled_dot_product_attention(qq, kk, vv, is_causal=True, enable_gqa=True))
        except RuntimeError as e:
            row["sdpa_cudnn_strided_error"] = str(e).splitlines()[0][:200]
    rows = []
    for bm, bn, warps, stages, tma, fma in variants(smoke, quick):
        r: dict[str, object] = {"block_m": bm, "block_n": bn, "warps": warps, "stages": stages,
                                "tma": tma, "fma": fma}

        def go(bm=bm, bn=bn, warps=warps, stages=stages, tma=tma, fma=fma) -> torch.Tensor:
            return run_fresh(b.query, b.key, b.value, b.meta.query_start_loc, scale, bm, bn, warps, stages, tma, fma)

        try:
            r["max_abs_diff"] = (go().float() - expect).abs().max().item()
            ms = bench(go)
            r.update(ms=ms, tflops=f / ms / 1e9)
        except Exception as e:  # noqa: BLE001 - a configuration the GPU cannot hold
            r["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
        rows.append(r)
        print(shape["name"], r, flush=True)
    row["variants"] = rows
    timed = [r for r in rows if "ms" in r]
    if timed:
        best = min(timed, key=lambda r: r["ms"])
        config = "/".join(str(best[k]) for k in ("block_m", "block_n", "warps", "stages"))
        print(f"{shape['name']}: ondo {ondo_ms:.3f} ms ({row['ondo_tflops']:.0f} TFLOP/s); stand-alone best "
              f"{config} tma={best['tma']} fma={best['fma']} {best['ms']:.3f} ms ({best['tflops']:.0f} TFLOP/s)"
              + (f"; cuDNN {row['sdpa_cudnn_strided_ms']:.3f} ms" if "sdpa_cudnn_strided_ms" in row else ""),
              flush=True)
    return row


def decode_rows_split_off(b, scale: float, expect: torch.Tensor, bench) -> dict[str, float]:
    """ondo's kernels on a mixed step, the step's own keys as the switch says: the decode
    rows in the decode kernel, one kernel after the other (`split`) or the decode kernel on
    a second stream beside the prefill kernel (`overlap`, ONDO_MIXED_DECODE_OVERLAP=1), or the
    persistent decode kernel there beside a two-stage prefill kernel (`beside`,
    ONDO_MIXED_DECODE_BESIDE=1); or
    kept in the prefill kernel in a prompt's tile (`in_prefill`) or in tiles of their own
    (`decode_tile`, ONDO_PREFILL_DECODE_TILE=1)."""
    row: dict[str, float] = {}
    runs = (("split", True, {MIXED_DECODE_OVERLAP_ENV: "0"}), ("overlap", True, {MIXED_DECODE_OVERLAP_ENV: "1"}),
            ("beside", None, {MIXED_DECODE_BESIDE_ENV: "1"}),
            ("in_prefill", False, {PREFILL_DECODE_TILE_ENV: "0"}),
            ("decode_tile", False, {PREFILL_DECODE_TILE_ENV: "1"}))
    names = (MIXED_DECODE_OVERLAP_ENV, MIXED_DECODE_BESIDE_ENV, PREFILL_DECODE_TILE_ENV)
    before = {name: os.environ.get(name) for name in names}
    try:
        for name, split, env in runs:
            os.environ.update(env)

            meta = dataclasses.replace(b.meta, split_choices={})  # the switch's choice, not a kept one

            def go(split=split, meta=meta) -> torch.Tensor:
                return paged_prefill_attention_triton(b.query, b.k_cache, b.v_cache, meta, scale,
                                                      split_decode_rows=split, key=b.key, value=b.value)

            row[f"ondo_{name}_max_abs_diff"] = (go().float() - expect).abs().max().item()
            row[f"ondo_{name}_ms"] = bench(go)
            for key in env:
                os.environ.pop(key)
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--out")
    ap.add_argument("--quick", action="store_true",
                    help="the 0.6B shape's W3 steps and W1's first step, two standalone variants")
    args = ap.parse_args(argv)
    cuda = torch.cuda.is_available() and not args.smoke
    if args.smoke:
        shapes = [{"name": "smoke", "query_lens": [20, 7, 33], "context_lens": [20, 7, 33], "heads": (4, 2),
                   "head_dim": 32},
                  {"name": "smoke mixed", "query_lens": [20, 1, 5], "context_lens": [20, 40, 37], "heads": (4, 2),
                   "head_dim": 32}]
    else:
        mixed = [{"name": f"{model} W3 mixed: 4 x 2048 + 60 decode rows", "query_lens": [2048] * 4 + [1] * 60,
                  "context_lens": [2048] * 4 + [2049 + i % 15 for i in range(60)], "heads": heads, "head_dim": 128}
                 for model, heads in (("qwen3-0.6b", (16, 8)), ("llama3.1-8b", (32, 8)))]
        # The engine's order: the scheduler puts the running sequences before the new ones.
        mixed.append({"name": "qwen3-0.6b W3 mixed, scheduler's order: 60 decode rows + 4 x 2048",
                      "query_lens": [1] * 60 + [2048] * 4,
                      "context_lens": [2049 + i % 15 for i in range(60)] + [2048] * 4, "heads": (16, 8),
                      "head_dim": 128})
        shapes = step_shapes(False) + mixed
        if args.quick:
            shapes = [sh for sh in shapes if sh["name"].startswith("qwen3") and "chunks" not in sh["name"]]
    results = [measure(shape, cuda, args.smoke, args.quick) for shape in shapes]
    line = json.dumps({"bench": "prefill_fresh_kv", "device": torch.cuda.get_device_name() if cuda else "cpu",
                       "results": results})
    print(line)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(line + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
