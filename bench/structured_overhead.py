"""What structured outputs cost: W1 with a JSON schema on every request against W1 without,
on dummy weights of a real shape, and the per-step mask cost at batch 1 and 256.

    python3 bench/structured_overhead.py [--model-shape qwen3-0.6b]
        [--schema bench/schemas/recommendation.json] [--scale 1.0] [--smoke]

1. Guided: W1's prompts and max_tokens, each request constrained to the schema (a random
   model stops when its grammar completes, so outputs are shorter than W1's).
2. Unconstrained: the same prompts with max_tokens set to the guided run's output length of
   each request and ignore_eos, so both runs generate exactly the same number of tokens
   in the same requests: the throughput ratio is the cost of the constraint alone.
3. Masks: the engine's own mask code (`BatchMasks.fill`, then `apply_bitmask` on the device)
   on 1 and 256 matchers of the schema, each walked along random allowed tokens, as a
   dummy model walks them; milliseconds per step.

The shape gets a byte-level tokenizer of its full vocabulary (`shape_folder(...,
tokenizer="bytes")`), since grammars need tokens' bytes. `--smoke` shrinks the model (2
layers, same vocabulary), the workload (4 requests, prompts of at most 64 tokens, outputs of
at most 48) and the mask batches (1 and 16) so that it runs on a CPU in a few minutes.
Prints a table and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ondo import LLM, SamplingParams, StructuredOutputsParams  # noqa: E402
from ondo.bench.shapes import SHAPES, shape_folder  # noqa: E402
from ondo.bench.workloads import Request, make_workload  # noqa: E402
from ondo.engine.grammar import BatchMasks, SequenceGrammar, apply_bitmask  # noqa: E402

SMOKE = {"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32}


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def run(llm: LLM, prompts: list[dict], params: list[SamplingParams]) -> tuple[list, float, dict]:
    before = dict(llm.engine.step_timing_s)
    stats_before = llm.stats()
    _sync()
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params)
    _sync()
    elapsed = time.perf_counter() - t0
    timing = {k: v - before[k] for k, v in llm.engine.step_timing_s.items()}
    steps = max(timing.pop("steps"), 1)
    stats = llm.stats()
    mask_steps = stats["grammar_mask_steps"] - stats_before["grammar_mask_steps"]
    extra = {"steps": steps, "host_ms_per_step": {k: round(1e3 * v / steps, 3) for k, v in timing.items()},
             "mask_fill_ms_per_step": round(1e3 * (stats["grammar_mask_s"] - stats_before["grammar_mask_s"])
                                            / max(mask_steps, 1), 3)}
    return outs, elapsed, extra


def _is_object(text: str) -> bool:
    try:
        return isinstance(json.loads(text), dict)
    except json.JSONDecodeError:
        return False


def mask_cost(llm: LLM, spec: StructuredOutputsParams, batch: int, steps: int,
              seed: int = 0) -> dict[str, float]:
    """Milliseconds per step to fill the batch's masks (host) and apply them (device)."""
    engine = llm.engine
    compiler = engine._compiler()
    compiled = compiler.submit(spec).result()
    masks: BatchMasks = engine._batch_masks
    vocab = engine.model_config.vocab_size
    eos = set(engine.eos_token_ids)
    rng = np.random.default_rng(seed)
    grammars = [SequenceGrammar(compiled) for _ in range(batch)]
    outputs: list[list[int]] = [[] for _ in range(batch)]
    logits = torch.zeros((batch, vocab), dtype=torch.float32, device=engine.device)
    fill_s, apply_s = [], []
    for _ in range(steps):
        t0 = time.perf_counter()
        bitmask = masks.fill(grammars)
        t1 = time.perf_counter()
        apply_bitmask(logits, None, bitmask)
        _sync()
        apply_s.append(time.perf_counter() - t1)
        fill_s.append(t1 - t0)
        bits = np.unpackbits(bitmask.cpu().numpy().view(np.uint8), axis=1, bitorder="little")[:, :vocab]
        for i, g in enumerate(grammars):
            allowed = np.flatnonzero(bits[i])
            token = int(rng.choice(allowed))
            if token in eos or g.is_complete:  # a finished document: start another
                grammars[i], outputs[i] = SequenceGrammar(compiled), []
                continue
            outputs[i].append(token)
            g.sync(outputs[i], 0)
        logits.zero_()
    skip = min(3, steps - 1)  # the first steps build the lexer's states
    return {"fill_ms": round(1e3 * statistics.median(fill_s[skip:]), 3),
            "apply_ms": round(1e3 * statistics.median(apply_s[skip:]), 3),
            "first_fill_ms": round(1e3 * fill_s[0], 3)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    here = os.path.dirname(os.path.abspath(__file__))
    p.add_argument("--model-shape", default="qwen3-0.6b", choices=sorted(SHAPES))
    p.add_argument("--schema", default=os.path.join(here, "schemas", "recommendation.json"))
    p.add_argument("--scale", type=float, default=1.0, help="fraction of W1's 256 requests")
    p.add_argument("--max-model-len", type=int, default=4096)
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-num-batched-tokens", type=int, default=8192)
    p.add_argument("--mask-batch-sizes", type=int, nargs="+", default=[1, 256])
    p.add_argument("--mask-steps", type=int, default=30)
    p.add_argument("--smoke", action="store_true", help="a 2-layer model and 4 requests (CPU)")
    args = p.parse_args()
    with open(args.schema) as f:
        spec = StructuredOutputsParams(json=json.load(f))
    cuda = torch.cuda.is_available()
    overrides = SMOKE if args.smoke else None
    scale = min(args.scale, 4 / 256) if args.smoke else args.scale
    t0 = time.perf_counter()
    folder = shape_folder(args.model_shape, tokenizer="bytes", overrides=overrides)
    llm = LLM(folder, load_format="dummy", dtype="bfloat16" if cuda else "float32",
              max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs,
              max_num_batched_tokens=args.max_num_batched_tokens, seed=0)
    startup_s = time.perf_counter() - t0
    workload = make_workload("W1", SHAPES[args.model_shape]["vocab_size"], seed=0, scale=scale)
    if args.smoke:
        workload.requests[:] = [Request(r.prompt_token_ids[:64], min(r.max_tokens, 48))
                                for r in workload.requests]
        args.mask_batch_sizes = [min(b, 16) for b in args.mask_batch_sizes]
        args.mask_steps = min(args.mask_steps, 8)
    prompts = [{"prompt_token_ids": r.prompt_token_ids} for r in workload.requests]
    # Warm-up: compiled kernels and graphs, the grammar library's view of the vocabulary,
    # the schema's grammar and the lexer's first states.
    warm = make_workload("W1", SHAPES[args.model_shape]["vocab_size"], seed=9,
                         scale=(16 if cuda else 1) / 256)
    llm.generate([{"prompt_token_ids": r.prompt_token_ids[:64 if args.smoke else None]}
                  for r in warm.requests],
                 [SamplingParams(temperature=0.6, max_tokens=64 if cuda else 8, structured_outputs=spec)
                  for _ in warm.requests])
    guided_params = [SamplingParams(temperature=0.6, max_tokens=r.max_tokens, structured_outputs=spec)
                     for r in workload.requests]
    guided, guided_s, guided_extra = run(llm, prompts, guided_params)
    lengths = [len(o.outputs[0].token_ids) for o in guided]
    finish = [o.outputs[0].finish_reason for o in guided]
    plain_params = [SamplingParams(temperature=0.6, max_tokens=max(n, 1), ignore_eos=True)
                    for n in lengths]
    plain, plain_s, plain_extra = run(llm, prompts, plain_params)
    tokens = sum(lengths)
    assert sum(len(o.outputs[0].token_ids) for o in plain) == sum(max(n, 1) for n in lengths)
    valid = sum(1 for o in guided if o.outputs[0].finish_reason == "stop" and _is_object(o.outputs[0].text))
    masks = {b: mask_cost(llm, spec, b, args.mask_steps) for b in args.mask_batch_sizes}
    row = {
        "bench": "structured_overhead", "model_shape": args.model_shape, "smoke": args.smoke,
        "device": torch.cuda.get_device_name() if cuda else "cpu", "requests": len(prompts),
        "startup_s": round(startup_s, 1),
        "output_tokens": tokens, "mean_output_tokens": round(tokens / len(prompts), 1),
        "finished_stop": finish.count("stop"), "finished_length": finish.count("length"),
        "valid_json_of_stopped": valid,
        "guided_tokens_per_s": round(tokens / guided_s, 1),
        "unconstrained_tokens_per_s": round(sum(max(n, 1) for n in lengths) / plain_s, 1),
        "guided_s": round(guided_s, 2), "unconstrained_s": round(plain_s, 2),
        "guided_steps": guided_extra["steps"], "unconstrained_steps": plain_extra["steps"],
        "guided_host_ms_per_step": guided_extra["host_ms_per_step"],
        "unconstrained_host_ms_per_step": plain_extra["host_ms_per_step"],
        "mask_fill_ms_per_step_in_run": guided_extra["mask_fill_ms_per_step"],
        "mask_cost_ms": {str(b): m for b, m in masks.items()},
        "cpus": os.cpu_count(),
    }
    row["ratio"] = round(row["guided_tokens_per_s"] / row["unconstrained_tokens_per_s"], 3)
    print(f"{'run':>14} {'tokens':>8} {'seconds':>8} {'tok/s':>10} {'steps':>6}")
    print(f"{'guided':>14} {tokens:>8} {guided_s:>8.2f} {row['guided_tokens_per_s']:>10.1f} "
          f"{guided_extra['steps']:>6}")
    print(f"{'unconstrained':>14} {tokens:>8} {plain_s:>8.2f} {row['unconstrained_tokens_per_s']:>10.1f} "
          f"{plain_extra['steps']:>6}")
    print(f"guided / unconstrained = {row['ratio']:.3f}; {valid} of {finish.count('stop')} stopped "
          f"outputs parse; {finish.count('length')} cut by max_tokens")
    for b, m in masks.items():
        print(f"masks at batch {b:>3}: fill {m['fill_ms']:.3f} ms (first {m['first_fill_ms']:.1f} ms), "
              f"apply {m['apply_ms']:.3f} ms per step")
    print(json.dumps(row))
    return 0


if __name__ == "__main__":
    sys.exit(main())
