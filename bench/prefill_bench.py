"""Prefill attention: ondo's paged Triton kernel against PyTorch SDPA (flash) on contiguous
q/k/v, for whole prompts and for chunks over a cached prefix. Where this torch has it, also
its variable-length flash attention (`torch.nn.attention.varlen.varlen_attn`) on the same
packed step: on the step's own contiguous K/V (whole prompts only: nothing cached before
them) and through ondo's block tables (paged, every row), each with its largest
difference from the Triton kernel's output; a form the build refuses is recorded with its
error instead. The padded SDPA runs again with each backend forced (cuDNN, flash,
memory-efficient: which one its time is), and whole prompts also go through SDPA as
jagged nested tensors, each backend forced, as a ragged step of unequal prompts would.
Then steps with a prefill beside decode rows (W3's, a light load's, W1's first ones; both
shapes' heads): the Triton kernel with the decode rows handed to the decode kernel, and
with the prefill kernel taking them in its own tiles. Prints a table and a JSON line.

    python3 bench/prefill_bench.py
"""

from __future__ import annotations

import json

import torch
import torch.nn.functional as F
import triton.testing

from ondo.kernels.attention import splits_decode_rows
from ondo.kernels.testing import make_paged_batch
from ondo.kernels.triton_attention import paged_prefill_attention_triton


def flops(query_lens: list[int], context_lens: list[int], heads: int, head_dim: int) -> float:
    pairs = sum(q * c - q * (q - 1) / 2 for q, c in zip(query_lens, context_lens))
    return 4.0 * heads * head_dim * pairs


def varlen_variants(b, scale: float, ref: torch.Tensor) -> dict[str, object]:
    """torch's varlen flash attention on the packed step `b`, contiguous (whole prompts
    only) and paged: ms and the largest difference from the Triton kernel's `ref`, or the
    error."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError as e:
        return {"varlen_error": f"ImportError: {e}"}
    import inspect

    params = inspect.signature(varlen_attn).parameters
    # Older builds (2.11) have no enable_gqa (they take fewer K/V heads as they are: the
    # same output within bf16 rounding on an H200) and no paged form.
    gqa = {"enable_gqa": True} if "enable_gqa" in params else {}
    if "scale" in params:
        gqa["scale"] = scale  # without it, the build's own 1/sqrt(head_dim), the same here
    causal = {"window_size": (-1, 0)} if "window_size" in params else {"is_causal": True}
    m = b.meta
    out: dict[str, object] = {"varlen_signature": list(params)}
    forms = {}
    if "block_table" in params:
        forms["varlen_paged"] = lambda: varlen_attn(
            b.query, b.k_cache, b.v_cache, m.query_start_loc, None, m.max_query_len,
            m.max_context_len, window_size=(-1, 0), **gqa,
            seqused_k=m.context_lens, block_table=m.block_tables)
    else:
        out["varlen_paged_error"] = "this torch's varlen_attn has no block_table"
    if m.query_lens_cpu == m.context_lens_cpu:
        forms["varlen_contiguous"] = lambda: varlen_attn(
            b.query, b.key, b.value, m.query_start_loc, m.query_start_loc, m.max_query_len,
            m.max_query_len, **causal, **gqa)
    for name, fn in forms.items():
        out.update(_timed_or_error(name, fn, ref))
    return out


BACKENDS = ("CUDNN_ATTENTION", "FLASH_ATTENTION", "EFFICIENT_ATTENTION")


def _timed_or_error(prefix: str, fn, ref: torch.Tensor | None = None) -> dict[str, object]:
    """`{prefix}_ms` (and `{prefix}_max_abs_diff` from `ref`), or `{prefix}_error`: what a
    build refuses is a finding, not a failure."""
    try:
        got = fn()
        out: dict[str, object] = {f"{prefix}_ms": triton.testing.do_bench(fn)}
        if ref is not None:
            out[f"{prefix}_max_abs_diff"] = (got.float() - ref.float()).abs().max().item()
        return out
    except Exception as e:  # noqa: BLE001 — what the build refuses is the finding
        return {f"{prefix}_error": f"{type(e).__name__}: {str(e)[:300]}"}


def sdpa_backends(qq: torch.Tensor, kk: torch.Tensor, vv: torch.Tensor, causal: bool) -> dict[str, object]:
    """The padded SDPA of the table with each backend forced: which one gives its time."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    out: dict[str, object] = {}
    for name in BACKENDS:
        def run(name=name):
            with sdpa_kernel(getattr(SDPBackend, name)):
                return F.scaled_dot_product_attention(qq, kk, vv, is_causal=causal, enable_gqa=True)
        out.update(_timed_or_error(f"sdpa_{name.split('_')[0].lower()}", run))
    return out


def jagged_variants(b, ref: torch.Tensor) -> dict[str, object]:
    """SDPA on the packed step's own contiguous q/k/v as jagged nested tensors (whole
    prompts only), each backend forced: a ragged batch of unequal prompts, as a step packs
    them. Jagged SDPA takes no fewer K/V heads than query heads, so K/V are repeated per
    group first; `jagged_*_ms` times the attention alone, `jagged_repeat_ms` the repeat."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    m = b.meta
    if m.query_lens_cpu != m.context_lens_cpu:
        return {}
    group = b.query.shape[1] // b.key.shape[1]
    offsets = m.query_start_loc.to(torch.int64)

    def jagged(x: torch.Tensor) -> torch.Tensor:
        return torch.nested.nested_tensor_from_jagged(x, offsets).transpose(1, 2)

    def repeat() -> tuple[torch.Tensor, torch.Tensor]:
        return b.key.repeat_interleave(group, dim=1), b.value.repeat_interleave(group, dim=1)

    k, v = repeat()
    q, kj, vj = jagged(b.query), jagged(k), jagged(v)
    out: dict[str, object] = {"jagged_repeat_ms": triton.testing.do_bench(repeat)}
    for name in BACKENDS:
        def run(name=name):
            with sdpa_kernel(getattr(SDPBackend, name)):
                return F.scaled_dot_product_attention(q, kj, vj, is_causal=True).transpose(1, 2).values()
        out.update(_timed_or_error(f"jagged_{name.split('_')[0].lower()}", run, ref))
    return out


# (prompts, prompt tokens, decode rows, decode rows' context): W3's steps (whole 2,048-token
# prompts beside rows a few tokens into their 16 outputs), a light load's (one prompt beside
# a few long decodes), then full batches: W1's first steps (prompts of ~1,000 tokens beside
# rows of ~600) and a chunk beside 255 rows.
MIXED_CASES = ((4, 2048, 0, 2048), (4, 2048, 60, 2048), (3, 2048, 120, 2048), (1, 2048, 200, 2048),
               (1, 512, 2, 2048), (1, 512, 8, 2048), (1, 2048, 16, 2048), (1, 2048, 32, 2048),
               (6, 1024, 128, 600), (2, 1024, 240, 600), (1, 512, 255, 1024), (1, 128, 255, 1024),
               (1, 2048, 255, 2048))


def mixed_steps(hq: int, hkv: int, d: int) -> list[dict[str, object]]:
    """The MIXED_CASES steps with the decode rows split off to the decode kernel and not,
    and as the engine chooses (`splits_mixed_step`: by work unless
    ONDO_MIXED_SPLIT_BY_WORK=0); and which of the two each rule picks: the SM-waves rule
    (`rule_splits`) and the rule by work (`by_work_splits`)."""
    rows = []
    scale = d ** -0.5
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    for prompts, prompt_len, decode, decode_ctx in MIXED_CASES:
        ctx = [decode_ctx + 1 + i % 16 for i in range(decode)]
        query_lens = [prompt_len] * prompts + [1] * decode
        context_lens = [prompt_len] * prompts + ctx
        b = make_paged_batch(query_lens, context_lens, num_q_heads=hq, num_kv_heads=hkv,
                             head_dim=d, block_size=16, dtype=torch.bfloat16, device="cuda")
        split = paged_prefill_attention_triton(b.query, b.k_cache, b.v_cache, b.meta, scale, split_decode_rows=True)
        whole = paged_prefill_attention_triton(b.query, b.k_cache, b.v_cache, b.meta, scale,
                                               split_decode_rows=False)
        times = {name: triton.testing.do_bench(
            lambda b=b, s=flag: paged_prefill_attention_triton(b.query, b.k_cache, b.v_cache, b.meta, d ** -0.5,
                                                               split_decode_rows=s))
            for name, flag in (("split_ms", True), ("one_kernel_ms", False), ("chosen_ms", None))}
        # What each rule picks (timed above as split or one kernel): the SM-waves rule, and
        # the one that weighs the prompts' pairs against the decode rows' tokens.
        by_work = splits_decode_rows(decode, hkv, sms, b.meta.prompt_pairs_and_decode_tokens)
        rows.append({"q_heads": hq, "kv_heads": hkv, "prompts": prompts, "prompt_len": prompt_len,
                     "decode_rows": decode, "decode_context": decode_ctx, **times,
                     "rule_splits": splits_decode_rows(decode, hkv, sms), "by_work_splits": by_work,
                     "by_work_ms": times["split_ms"] if by_work else times["one_kernel_ms"],
                     "max_abs_diff": (split.float() - whole.float()).abs().max().item()})
        r = rows[-1]
        print(f"mixed {hq}/{hkv} heads {prompts} x {prompt_len} + {decode:3d} decode rows of {decode_ctx}: "
              f"split {r['split_ms']:.3f} ms, one kernel {r['one_kernel_ms']:.3f} ms, "
              f"as chosen {r['chosen_ms']:.3f} ms, by work {r['by_work_ms']:.3f} ms "
              f"(max diff {r['max_abs_diff']:.4f})")
    return rows


def main() -> None:
    rows = []
    hq, hkv, d = 16, 8, 128
    for seqs, q, c in ((4, 2048, 2048), (1, 8192, 8192), (8, 1024, 1024), (4, 512, 2048), (16, 512, 512)):
        b = make_paged_batch([q] * seqs, [c] * seqs, num_q_heads=hq, num_kv_heads=hkv, head_dim=d,
                             block_size=16, dtype=torch.bfloat16, device="cuda")
        scale = d ** -0.5
        # The new tokens' K/V in their cache slots, as the forward pass writes them before
        # attention: the paged and the contiguous forms then see the same keys.
        b.cache_new_kv()
        t_triton = triton.testing.do_bench(
            lambda b=b, scale=scale: paged_prefill_attention_triton(b.query, b.k_cache, b.v_cache, b.meta, scale))
        qq = torch.randn(seqs, hq, q, d, dtype=torch.bfloat16, device="cuda")
        kk = torch.randn(seqs, hkv, c, d, dtype=torch.bfloat16, device="cuda")
        vv = torch.randn_like(kk)
        causal = q == c
        t_sdpa = triton.testing.do_bench(lambda qq=qq, kk=kk, vv=vv, causal=causal: F.scaled_dot_product_attention(
            qq, kk, vv, is_causal=causal, enable_gqa=True))
        f = flops([q] * seqs, [c] * seqs, hq, d)
        ref = paged_prefill_attention_triton(b.query, b.k_cache, b.v_cache, b.meta, scale)
        rows.append({"seqs": seqs, "query_len": q, "context_len": c, "triton_ms": t_triton,
                     "triton_tflops": f / t_triton / 1e9, "sdpa_ms": t_sdpa,
                     "sdpa_tflops": (f if causal else 4.0 * hq * d * seqs * q * c) / t_sdpa / 1e9,
                     **sdpa_backends(qq, kk, vv, causal), **varlen_variants(b, scale, ref),
                     **jagged_variants(b, ref)})
        r = rows[-1]
        varlen = "".join(f"  {k[:-3]} {v:.3f} ms" for k, v in r.items()
                         if k.startswith(("varlen", "sdpa_", "jagged")) and k.endswith("_ms"))
        print(f"{seqs:3d} x q{q:5d} c{c:5d}: triton {r['triton_ms']:.3f} ms ({r['triton_tflops']:.0f} TFLOP/s)"
              f"  sdpa {r['sdpa_ms']:.3f} ms ({r['sdpa_tflops']:.0f} TFLOP/s){varlen}")
        for k, v in r.items():
            if k.endswith("_error"):
                print(f"    {k}: {v}")
    mixed = mixed_steps(hq, hkv, d) + mixed_steps(32, 8, d)  # the 0.6B shape's heads, then the 8B's
    print(json.dumps({"benchmark": "prefill_attention", "device": torch.cuda.get_device_name(), "rows": rows,
                      "mixed_rows": mixed}))


if __name__ == "__main__":
    main()
