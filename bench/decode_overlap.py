"""How much of a decode step's attention could hide behind its matmuls: the bound on
splitting a step's rows into two halves whose layers run a stream each, one half's
attention (bound by reading its contexts' K/V) beside the other half's matmuls.

A layer here is the decode step's work for R rows of one context length: RMS norm, QKV
projection, paged decode attention over the cache (ondo's kernel), output projection with
the residual, RMS norm, gate/up projection, SiLU × up, down projection with the residual;
random bf16 weights of the model shape's sizes, one set per layer, so that no layer finds
the last one's weights in L2. Leaving out the rotary embedding and the KV write makes
both variants lighter by the same kernels. Each variant is captured in a CUDA graph,
replayed and timed by CUDA events (`ondo.bench.graph_timing`):

- `whole`: the R rows as one batch (what ondo runs now);
- `attention_only` / `matmuls_only`: the whole batch's attention alone, the rest alone;
  max(attention, matmuls) is what a perfect overlap would leave;
- `halves_in_turn`: two halves of R/2 rows, one stream, half A's layer then half B's
  (what halving the matmuls' M costs by itself);
- `halves_overlapped`: the same two halves on two streams, software-pipelined: while
  the attention stream (higher priority) attends for one half, the matmul stream runs
  the other half's output projection, MLP and next QKV projection.

The halves are slices of the whole batch (same cache, same starting state): the run
records how far `halves_in_turn` lands from `whole` (matmuls of half the rows may sum in
another order) and checks that `halves_overlapped` equals `halves_in_turn` bit for bit
(the same kernels on the same inputs in the same order per half).

    python3 bench/decode_overlap.py [--out FILE]      # both shapes, W1- and W2-like contexts
    python3 bench/decode_overlap.py --smoke --out F   # CPU (Triton's interpreter), tiny shape
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F

if "--smoke" in sys.argv:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels are decorated

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from ondo.bench.graph_timing import graph_time_us  # noqa: E402
from ondo.bench.shapes import SHAPES  # noqa: E402
from ondo.kernels.metadata import AttentionMetadata  # noqa: E402
from ondo.kernels.testing import make_paged_batch  # noqa: E402
from ondo.kernels.triton_attention import paged_decode_attention_triton  # noqa: E402

SMOKE_SHAPE = {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4,
               "num_key_value_heads": 2, "head_dim": 32}


@dataclass(frozen=True)
class Weights:
    qkv: torch.Tensor  # [(Hq + 2 Hkv) D, H]
    o: torch.Tensor  # [H, Hq D]
    gate_up: torch.Tensor  # [2 I, H]
    down: torch.Tensor  # [H, I]


def make_layers(shape: dict, num_layers: int, dtype: torch.dtype, device: str) -> list[Weights]:
    h, i, d = shape["hidden_size"], shape["intermediate_size"], shape["head_dim"]
    hq, hkv = shape["num_attention_heads"], shape["num_key_value_heads"]
    gen = torch.Generator(device=device).manual_seed(1)

    def w(rows: int, cols: int) -> torch.Tensor:
        return (torch.randn(rows, cols, generator=gen, device=device) * cols ** -0.5).to(dtype)

    return [Weights(w((hq + 2 * hkv) * d, h), w(h, hq * d), w(2 * i, h), w(h, i)) for _ in range(num_layers)]


def rows_of(meta: AttentionMetadata, lo: int, hi: int) -> AttentionMetadata:
    """The metadata of decode rows lo..hi-1 of `meta` (one new token each), over the same
    cache."""
    n = hi - lo
    ctx = meta.context_lens_cpu[lo:hi]
    return AttentionMetadata(
        slot_mapping=meta.slot_mapping[lo:hi], block_tables=meta.block_tables[lo:hi],
        context_lens=meta.context_lens[lo:hi],
        query_start_loc=torch.arange(n + 1, dtype=torch.int32, device=meta.context_lens.device),
        max_query_len=1, max_context_len=max(ctx), block_size=meta.block_size,
        query_lens_cpu=[1] * n, context_lens_cpu=ctx)


class Rows:
    """Decode rows through the layers: their hidden state, the cache and their metadata."""

    def __init__(self, shape: dict, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata,
                 start: torch.Tensor):
        self.hq, self.d = shape["num_attention_heads"], shape["head_dim"]
        self.k_cache, self.v_cache, self.meta = k_cache, v_cache, meta
        self.start = start
        self.x = start.clone()
        self.q = torch.empty(start.shape[0], self.hq, self.d, dtype=start.dtype, device=start.device)
        self.attn = torch.empty_like(self.q)
        self.scale = self.d ** -0.5

    def pre(self, w: Weights) -> None:
        qkv = F.linear(F.rms_norm(self.x, (self.x.shape[1],)), w.qkv)
        self.q = qkv[:, : self.hq * self.d].view(-1, self.hq, self.d)

    def attend(self) -> None:
        self.attn = paged_decode_attention_triton(self.q, self.k_cache, self.v_cache, self.meta, self.scale)

    def post(self, w: Weights) -> None:
        h = self.x + F.linear(self.attn.view(self.attn.shape[0], -1), w.o)
        gate, up = F.linear(F.rms_norm(h, (h.shape[1],)), w.gate_up).chunk(2, dim=-1)
        self.x = h + F.linear(F.silu(gate) * up, w.down)

    def reset(self) -> None:
        self.x = self.start.clone()


def make_rows(shape: dict, rows: int, context: int, dtype: torch.dtype, device: str) -> tuple[Rows, Rows, Rows]:
    """All the rows, and their first and second halves (slices of the same cache and
    starting state)."""
    b = make_paged_batch([1] * rows, [context + r % 16 for r in range(rows)],
                         num_q_heads=shape["num_attention_heads"], num_kv_heads=shape["num_key_value_heads"],
                         head_dim=shape["head_dim"], block_size=16, dtype=dtype, device=device)
    gen = torch.Generator(device=device).manual_seed(2)
    start = torch.randn(rows, shape["hidden_size"], generator=gen, device=device).to(dtype)
    half = rows // 2
    return (Rows(shape, b.k_cache, b.v_cache, b.meta, start),
            Rows(shape, b.k_cache, b.v_cache, rows_of(b.meta, 0, half), start[:half]),
            Rows(shape, b.k_cache, b.v_cache, rows_of(b.meta, half, rows), start[half:]))


def whole(rows: Rows, layers: list[Weights]) -> None:
    for w in layers:
        rows.pre(w)
        rows.attend()
        rows.post(w)


def attention_only(rows: Rows, layers: list[Weights]) -> None:
    """The layers' attention alone, on queries made before (`measure`)."""
    for _ in layers:
        rows.attend()


def matmuls_only(rows: Rows, layers: list[Weights]) -> None:
    """The layers without their attention, on an attention output made before."""
    for w in layers:
        rows.pre(w)
        rows.post(w)


def in_turn(a: Rows, b: Rows, layers: list[Weights]) -> None:
    for w in layers:
        for half in (a, b):
            half.pre(w)
            half.attend()
            half.post(w)


def overlapped(a: Rows, b: Rows, layers: list[Weights], side: torch.cuda.Stream | None) -> None:
    """Matmuls on the current stream, attention on `side` (software-pipelined): while the
    side stream attends for one half, the current one runs the other half's output
    projection, MLP and next QKV projection. Per half the same kernels in the same order as
    `in_turn`. Without `side` (the CPU) that order on one stream."""
    if side is None:
        return in_turn(a, b, layers)
    main = torch.cuda.current_stream()
    halves = (a, b)
    done: list[torch.cuda.Event | None] = [None, None]
    for li, w in enumerate(layers):
        for k, half in enumerate(halves):
            if done[k] is not None:
                main.wait_event(done[k])
                half.post(layers[li - 1])
            half.pre(w)
            ready = torch.cuda.Event()
            ready.record(main)
            side.wait_event(ready)
            with torch.cuda.stream(side):
                half.attend()
                done[k] = torch.cuda.Event()
                done[k].record(side)
    for k, half in enumerate(halves):
        main.wait_event(done[k])
        half.post(layers[-1])


def measure(name: str, shape: dict, rows: int, context: int, num_layers: int, cuda: bool) -> dict:
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    layers = make_layers(shape, num_layers, dtype, device)
    full, a, b = make_rows(shape, rows, context, dtype, device)
    side = torch.cuda.Stream(priority=-1) if cuda else None

    def reset_all() -> None:
        for r in (full, a, b):
            r.reset()

    full.pre(layers[0])  # the queries and attention output the "_only" variants start from
    full.attend()
    row: dict = {"shape": name, "rows": rows, "context": context, "layers": num_layers}
    for key, fn in (("whole", lambda: whole(full, layers)),
                    ("attention_only", lambda: attention_only(full, layers)),
                    ("matmuls_only", lambda: matmuls_only(full, layers)),
                    ("halves_in_turn", lambda: in_turn(a, b, layers)),
                    ("halves_overlapped", lambda: overlapped(a, b, layers, side))):
        def from_the_start(fn=fn) -> None:
            reset_all()  # every call (and each replay) starts from the same state
            fn()

        row[f"{key}_ms_per_layer"] = graph_time_us(from_the_start, cuda, calls=2, repeat=10) / 1e3 / num_layers
        if key == "whole":
            whole_x = full.x.clone()
        elif key == "halves_in_turn":
            expect = (a.x.clone(), b.x.clone())
            row["halves_max_abs_diff_vs_whole"] = (torch.cat(expect) - whole_x).abs().max().item()
        elif key == "halves_overlapped":
            row["overlapped_equals_in_turn"] = bool(torch.equal(a.x, expect[0]) and torch.equal(b.x, expect[1]))
    row["perfect_overlap_ms_per_layer"] = max(row["attention_only_ms_per_layer"], row["matmuls_only_ms_per_layer"])
    kv_bytes = 2 * full.k_cache.element_size() * shape["num_key_value_heads"] * shape["head_dim"] * sum(
        full.meta.context_lens_cpu)
    row["attention_gb_per_s"] = kv_bytes / row["attention_only_ms_per_layer"] / 1e6
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--out")
    ap.add_argument("--rows", type=int, nargs="+", default=[128, 256])
    ap.add_argument("--contexts", type=int, nargs="+", default=[640, 1024])
    args = ap.parse_args(argv)
    cuda = torch.cuda.is_available() and not args.smoke
    if args.smoke:
        runs = [("smoke", SMOKE_SHAPE, 6, 40, 2)]
    else:
        runs = [(name, SHAPES[name], rows, ctx, layers)
                for name, layers in (("qwen3-0.6b", 28), ("llama3.1-8b", 8))
                for rows in args.rows for ctx in args.contexts]
    results = []
    for run in runs:
        row = measure(*run, cuda)
        results.append(row)
        print({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}, flush=True)
    line = json.dumps({"bench": "decode_overlap", "device": torch.cuda.get_device_name() if cuda else "cpu",
                       "torch": torch.__version__, "results": results})
    print(line)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(line + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
