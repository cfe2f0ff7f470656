"""How much of a prefill-heavy step's decode rows could hide behind its prompts: the bound
on running a step's two kinds of rows as two independent batches, a stream each.

In W3's steady state a step holds four 2,048-token prompts and ~60 decode rows of ~2,050
tokens of context. The prompts' layers are bound by their FLOPs (matmuls, causal
attention), the decode rows' by bytes (their K/V, ~0.5 GB a layer, and the weights).
Within a layer ondo runs both kinds of rows through the same kernels, one after another,
so the decode rows' K/V reads overlap little. Yet the two kinds never meet before the
logits: a row's norms, projections and MLP are its own, and a decode row's attention reads
only its own context. So the whole forward could run as two batches on two streams.

A layer here: RMS norm, QKV projection, attention (ondo's kernels: the prefill kernel
reading the prompts' new keys from the projections, the decode kernel over the cache),
output projection with the residual, RMS norm, gate/up with SiLU-and-mul
(`ondo::gate_up_silu`: the fused kernel from 1,024 rows), down projection with the
residual. Random bf16 weights of the model shape, one set per layer (no layer finds the
last one's weights in L2); no rotary embedding, q/k norm or KV write (the same kernels
left out of every variant). Each variant is captured in a CUDA graph, replayed and timed
by CUDA events (`ondo.bench.graph_timing`):

- `one_batch`: prompts and decode rows as one batch, the prefill kernel taking the decode
  rows beside the prompts (what ondo runs now, less the kernels left out);
- `prompts_only` / `decodes_only`: each batch's layers alone; the larger is what a
  perfect overlap would leave;
- `in_turn`: both batches, one stream, a layer of the prompts then a layer of the decode
  rows;
- `two_streams`: the prompts on the step's stream, the decode rows' layers on a second,
  higher-priority stream forked at the start and joined at the end.

`two_streams` must equal `in_turn` bit for bit (the same kernels on the same inputs per
batch); `one_batch` is timed only (its decode rows read their new key from the step's
projection, the split batches' from the cache).

    python3 bench/mixed_overlap.py [--out FILE]       # the 0.6B shape's W3 step (and --model-shape)
    python3 bench/mixed_overlap.py --smoke --out F    # CPU (Triton's interpreter), tiny shape
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.nn.functional as F

if "--smoke" in sys.argv:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels are decorated

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))
from decode_overlap import SMOKE_SHAPE, Weights, make_layers  # noqa: E402  (one layer's weights, as there)

from ondo.bench.graph_timing import graph_time_us  # noqa: E402
from ondo.bench.shapes import SHAPES  # noqa: E402
from ondo.kernels import gate_up_silu as _registers_the_operator  # noqa: E402, F401
from ondo.kernels.metadata import AttentionMetadata  # noqa: E402
from ondo.kernels.testing import PagedBatch, make_paged_batch  # noqa: E402
from ondo.kernels.triton_attention import (  # noqa: E402
    paged_decode_attention_triton,
    paged_prefill_attention_triton,
)
from ondo.kernels.triton_kv_write import write_kv_cache_triton  # noqa: E402


def sequences_of(meta: AttentionMetadata, lo: int, hi: int) -> AttentionMetadata:
    """The metadata of sequences lo..hi-1 of `meta`, over the same cache."""
    starts = meta.query_start_loc.tolist()
    q_lens, ctx = meta.query_lens_cpu[lo:hi], meta.context_lens_cpu[lo:hi]
    return AttentionMetadata(
        slot_mapping=meta.slot_mapping[starts[lo]: starts[hi]], block_tables=meta.block_tables[lo:hi],
        context_lens=meta.context_lens[lo:hi],
        query_start_loc=meta.query_start_loc[lo: hi + 1] - starts[lo],
        max_query_len=max(q_lens), max_context_len=max(ctx), block_size=meta.block_size,
        query_lens_cpu=q_lens, context_lens_cpu=ctx)


class Rows:
    """A batch of rows through the layers: its hidden state, the cache, its metadata and
    which attention kernel it takes (the decode kernel where every row is a decode row)."""

    def __init__(self, shape: dict, batch: PagedBatch, meta: AttentionMetadata, start: torch.Tensor):
        self.hq, self.hkv, self.d = shape["num_attention_heads"], shape["num_key_value_heads"], shape["head_dim"]
        self.k_cache, self.v_cache, self.meta = batch.k_cache, batch.v_cache, meta
        self.decode = meta.max_query_len == 1
        self.start = start
        self.x = start.clone()
        self.scale = self.d ** -0.5

    def layer(self, w: Weights) -> None:
        n, hq, hkv, d = self.x.shape[0], self.hq, self.hkv, self.d
        qkv = F.linear(F.rms_norm(self.x, (self.x.shape[1],)), w.qkv)
        q = qkv[:, : hq * d].view(n, hq, d)
        k = qkv[:, hq * d: (hq + hkv) * d].view(n, hkv, d)
        v = qkv[:, (hq + hkv) * d:].view(n, hkv, d)
        write_kv_cache_triton(k, v, self.k_cache, self.v_cache, self.meta.slot_mapping)
        if self.decode:
            attn = paged_decode_attention_triton(q, self.k_cache, self.v_cache, self.meta, self.scale)
        else:
            attn = paged_prefill_attention_triton(q, self.k_cache, self.v_cache, self.meta, self.scale,
                                                  key=k, value=v)
        h = self.x + F.linear(attn.reshape(n, hq * d), w.o)
        act = torch.ops.ondo.gate_up_silu(F.rms_norm(h, (h.shape[1],)), w.gate_up)
        self.x = h + F.linear(act, w.down)

    def reset(self) -> None:
        self.x = self.start.clone()


def make_rows(shape: dict, prompts: list[int], decode_rows: int, context: int, dtype: torch.dtype,
              device: str) -> tuple[Rows, Rows, Rows]:
    """(one batch of both, the prompts alone, the decode rows alone: slices of the first's
    metadata and starting state over one cache); decode rows' contexts `context` plus 0 to
    15 tokens."""
    contexts = [context + r % 16 for r in range(decode_rows)]
    b = make_paged_batch(prompts + [1] * decode_rows, prompts + contexts, num_q_heads=shape["num_attention_heads"],
                         num_kv_heads=shape["num_key_value_heads"], head_dim=shape["head_dim"], block_size=16,
                         dtype=dtype, device=device)
    gen = torch.Generator(device=device).manual_seed(2)
    start = torch.randn(b.query.shape[0], shape["hidden_size"], generator=gen, device=device).to(dtype)
    p, t = len(prompts), sum(prompts)
    return (Rows(shape, b, b.meta, start), Rows(shape, b, sequences_of(b.meta, 0, p), start[:t]),
            Rows(shape, b, sequences_of(b.meta, p, p + decode_rows), start[t:]))


def in_turn(prompts: Rows, decodes: Rows, layers: list[Weights]) -> None:
    for w in layers:
        prompts.layer(w)
        decodes.layer(w)


def two_streams(prompts: Rows, decodes: Rows, layers: list[Weights], side: torch.cuda.Stream | None) -> None:
    """The prompts on the current stream, the decode rows on `side` (forked here, joined at
    the end). Without `side` (the CPU) `in_turn`."""
    if side is None:
        return in_turn(prompts, decodes, layers)
    main = torch.cuda.current_stream()
    side.wait_stream(main)
    with torch.cuda.stream(side):
        for w in layers:
            decodes.layer(w)
    for w in layers:
        prompts.layer(w)
    main.wait_stream(side)


def measure(name: str, shape: dict, prompts: list[int], decode_rows: int, context: int, num_layers: int,
            cuda: bool) -> dict:
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    layers = make_layers(shape, num_layers, dtype, device)
    both, alone, decodes = make_rows(shape, prompts, decode_rows, context, dtype, device)
    side = torch.cuda.Stream(priority=-1) if cuda else None
    row: dict = {"shape": name, "prompts": prompts, "decode_rows": decode_rows, "context": context,
                 "layers": num_layers}
    variants = (("one_batch", lambda: [both.layer(w) for w in layers]),
                ("prompts_only", lambda: [alone.layer(w) for w in layers]),
                ("decodes_only", lambda: [decodes.layer(w) for w in layers]),
                ("in_turn", lambda: in_turn(alone, decodes, layers)),
                ("two_streams", lambda: two_streams(alone, decodes, layers, side)))
    for key, fn in variants:
        def from_the_start(fn=fn) -> None:
            for r in (both, alone, decodes):  # every call (and each replay) starts from the same state
                r.reset()
            fn()

        row[f"{key}_ms"] = graph_time_us(from_the_start, cuda, calls=2, repeat=10) / 1e3
        if key == "one_batch":
            whole = both.x.clone()
        elif key == "in_turn":
            row["split_max_abs_diff_vs_one_batch"] = (torch.cat([alone.x, decodes.x]) - whole).abs().max().item()
            row["one_batch_max_abs"] = whole.abs().max().item()
            expect = (alone.x.clone(), decodes.x.clone())
        elif key == "two_streams":
            row["two_streams_equals_in_turn"] = bool(torch.equal(alone.x, expect[0])
                                                     and torch.equal(decodes.x, expect[1]))
    row["perfect_overlap_ms"] = max(row["prompts_only_ms"], row["decodes_only_ms"])
    row["two_streams_saves_ms"] = row["one_batch_ms"] - row["two_streams_ms"]
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--out")
    ap.add_argument("--model-shape", default="qwen3-0.6b", choices=sorted(SHAPES))
    ap.add_argument("--decode-rows", type=int, nargs="+", default=[60, 120])
    args = ap.parse_args(argv)
    cuda = torch.cuda.is_available() and not args.smoke
    if args.smoke:
        runs = [("smoke", SMOKE_SHAPE, [20, 7], 3, 40, 2)]
    else:
        shape = SHAPES[args.model_shape]
        runs = [(args.model_shape, shape, [2048] * 4, rows, 2048, shape["num_hidden_layers"])
                for rows in args.decode_rows]
    results = []
    for run in runs:
        row = measure(*run, cuda)
        results.append(row)
        print({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}, flush=True)
    line = json.dumps({"bench": "mixed_overlap", "device": torch.cuda.get_device_name() if cuda else "cpu",
                       "torch": torch.__version__, "results": results})
    print(line)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(line + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
