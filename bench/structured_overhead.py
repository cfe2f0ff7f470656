"""What structured outputs cost: W1 with a JSON schema on every request against W1 without,
on dummy weights of a real shape, where the constrained steps' time goes, and the per-step
mask cost at batch 1, 64 and 256 for several fill thread counts.

    python3 bench/structured_overhead.py [--model-shape qwen3-0.6b]
        [--schema bench/schemas/recommendation.json] [--scale 1.0] [--smoke]
        [--fill-threads 1 2 4 8] [--mask-batch-sizes 1 64 256]

1. Guided: W1's prompts and max_tokens, each request constrained to the schema (a random
   model stops when its grammar completes, so outputs are shorter than W1's). The masks
   are filled off the critical path (the engine's default).
2. Guided, filled inline: the same, each step's masks filled on the engine's thread right
   after its forward pass is queued and sampled at once (`engine.mask_overlap = False`):
   what taking the fill off the critical path gained.
3. Unconstrained: the same prompts with max_tokens set to the guided run's output length of
   each request and ignore_eos, so both runs generate exactly the same number of tokens
   in the same requests: the throughput ratio is the cost of the constraint alone.
4. Masks: the engine's own mask code (`MaskFiller.fill`, then `apply_token_bitmask` on the
   device) on 1, 64 and 256 matchers of the schema, each walked along random allowed
   tokens as a dummy model walks them; milliseconds per step, for each fill thread count,
   with the grammar compiled once per thread (sharded, as the engine does) and once for
   all threads (shared), which shows what the library's lock on a shared lexer costs.

For each guided run: per step, the fill (on its threads), the part of it the engine's
thread waited for (not hidden), the part hidden beside other work, the matchers' catch-up
and the copy's queuing; and every run's step time and host phases.

The shape gets a byte-level tokenizer of its full vocabulary (`shape_folder(...,
tokenizer="bytes")`), since grammars need tokens' bytes. `--smoke` shrinks the model (2
layers, same vocabulary), the workload (4 requests, prompts of at most 64 tokens, outputs of
at most 48), the mask batches (at most 16) and the thread counts (1 and 2) so that it runs
on a CPU in a few minutes. Prints a table and one JSON line.
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
from ondo.bench.workloads import Request, Workload, make_workload  # noqa: E402
from ondo.engine.grammar import CompiledGrammar, SequenceGrammar  # noqa: E402
from ondo.engine.structured_outputs import check  # noqa: E402
from ondo.engine.token_masks import ENV_THREADS, MaskFiller, default_fill_threads  # noqa: E402
from ondo.kernels.bitmask import apply_token_bitmask  # noqa: E402

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
    delta = {k: stats[k] - stats_before[k] for k in stats if k.startswith("grammar_mask")}
    mask_steps = max(delta["grammar_mask_steps"], 1)

    def per_mask_step_ms(key: str) -> float:
        return round(1e3 * delta[key] / mask_steps, 3)

    masks = {"steps": delta["grammar_mask_steps"],
             "rows_per_step": round(delta["grammar_mask_rows"] / mask_steps, 1),
             "fill_ms": per_mask_step_ms("grammar_mask_s"),
             "wait_ms": per_mask_step_ms("grammar_mask_wait_s"),
             "hidden_ms": round(1e3 * max(delta["grammar_mask_s"] - delta["grammar_mask_wait_s"], 0.0)
                                / mask_steps, 3),
             "sync_ms": per_mask_step_ms("grammar_mask_sync_s"),
             "copy_ms": per_mask_step_ms("grammar_mask_copy_s")}
    extra = {"steps": steps, "step_ms": round(1e3 * elapsed / steps, 3),
             "host_ms_per_step": {k: round(1e3 * v / steps, 3) for k, v in timing.items()},
             "masks_per_mask_step": masks}
    return outs, elapsed, extra


def _is_object(text: str) -> bool:
    try:
        return isinstance(json.loads(text), dict)
    except json.JSONDecodeError:
        return False


def mask_cost(llm: LLM, spec: StructuredOutputsParams, batch: int, steps: int, threads: int,
              shards: int, seed: int = 0) -> dict[str, float]:
    """Milliseconds per step to fill the batch's masks (host, `threads` fill threads, the
    grammar compiled `shards` times) and apply them (device)."""
    import llguidance

    engine = llm.engine
    tokenizer = engine._compiler().tokenizer()
    text = check(spec)
    compiled = CompiledGrammar(spec.key(), [llguidance.LLMatcher(tokenizer, text) for _ in range(shards)])
    vocab = engine.model_config.vocab_size
    masks = MaskFiller(vocab, engine.device, engine.eos_token_ids[0], max_rows=batch, num_threads=threads)
    eos = set(engine.eos_token_ids)
    rng = np.random.default_rng(seed)
    grammars = [SequenceGrammar(compiled) for _ in range(batch)]
    outputs: list[list[int]] = [[] for _ in range(batch)]
    logits = torch.zeros((batch, vocab), dtype=torch.float32, device=engine.device)
    fill_s, apply_s = [], []
    for _ in range(steps):
        _sync()
        t0 = time.perf_counter()
        bitmask = masks.fill(grammars)
        t1 = time.perf_counter()
        apply_token_bitmask(logits, bitmask)
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
    masks.close()
    skip = min(3, steps - 1)  # the first steps build the lexer's states
    return {"fill_ms": round(1e3 * statistics.median(fill_s[skip:]), 3),
            "apply_ms": round(1e3 * statistics.median(apply_s[skip:]), 3),
            "first_fill_ms": round(1e3 * fill_s[0], 3)}


def workload_runs(llm: LLM, prompts: list[dict], workload: Workload, spec: StructuredOutputsParams,
                  args: argparse.Namespace) -> dict:
    """W1 guided, unconstrained with the guided run's lengths, guided with the masks filled
    inline; prints their tables and returns their part of the JSON line."""
    guided_params = [SamplingParams(temperature=0.6, max_tokens=r.max_tokens, structured_outputs=spec)
                     for r in workload.requests]
    runs: dict[str, dict] = {}
    guided, guided_s, runs["guided"] = run(llm, prompts, guided_params)
    lengths = [len(o.outputs[0].token_ids) for o in guided]
    finish = [o.outputs[0].finish_reason for o in guided]
    tokens = sum(lengths)
    runs["guided"].update(tokens=tokens, seconds=guided_s)
    plain_params = [SamplingParams(temperature=0.6, max_tokens=max(n, 1), ignore_eos=True)
                    for n in lengths]
    plain, plain_s, runs["unconstrained"] = run(llm, prompts, plain_params)
    plain_tokens = sum(len(o.outputs[0].token_ids) for o in plain)
    assert plain_tokens == sum(max(n, 1) for n in lengths)
    runs["unconstrained"].update(tokens=plain_tokens, seconds=plain_s)
    if not args.skip_inline:
        llm.engine.mask_overlap = False
        inline, inline_s, runs["guided_inline"] = run(llm, prompts, guided_params)
        llm.engine.mask_overlap = True
        runs["guided_inline"].update(tokens=sum(len(o.outputs[0].token_ids) for o in inline),
                                     seconds=inline_s)
    for r in runs.values():
        r["tokens_per_s"] = round(r["tokens"] / r["seconds"], 1)
        r["seconds"] = round(r["seconds"], 2)
    valid = sum(1 for o in guided if o.outputs[0].finish_reason == "stop" and _is_object(o.outputs[0].text))
    row = {
        "output_tokens": tokens, "mean_output_tokens": round(tokens / len(prompts), 1),
        "finished_stop": finish.count("stop"), "finished_length": finish.count("length"),
        "valid_json_of_stopped": valid,
        "guided_tokens_per_s": runs["guided"]["tokens_per_s"],
        "unconstrained_tokens_per_s": runs["unconstrained"]["tokens_per_s"],
        "runs": runs,
    }
    row["ratio"] = round(row["guided_tokens_per_s"] / row["unconstrained_tokens_per_s"], 3)
    if "guided_inline" in runs:
        row["ratio_inline"] = round(runs["guided_inline"]["tokens_per_s"] / row["unconstrained_tokens_per_s"], 3)
    print(f"{'run':>14} {'tokens':>8} {'seconds':>8} {'tok/s':>10} {'steps':>6} {'ms/step':>8}")
    for name, r in runs.items():
        print(f"{name:>14} {r['tokens']:>8} {r['seconds']:>8.2f} {r['tokens_per_s']:>10.1f} "
              f"{r['steps']:>6.0f} {r['step_ms']:>8.3f}")
    print(f"guided / unconstrained = {row['ratio']:.3f}"
          + (f" (filled inline: {row['ratio_inline']:.3f})" if "ratio_inline" in row else "")
          + f"; {valid} of {finish.count('stop')} stopped outputs parse; "
          f"{finish.count('length')} cut by max_tokens; engine fill threads {default_fill_threads()}")
    phases = list(runs["unconstrained"]["host_ms_per_step"])
    print(f"{'host ms/step':>14} " + " ".join(f"{k:>11}" for k in phases))
    for name, r in runs.items():
        print(f"{name:>14} " + " ".join(f"{r['host_ms_per_step'][k]:>11.3f}" for k in phases))
    print(f"{'masks ms/step':>14} {'rows':>6} {'fill':>7} {'waited':>7} {'hidden':>7} {'sync':>7} {'copy':>7}")
    for name in ("guided", "guided_inline"):
        if name in runs:
            m = runs[name]["masks_per_mask_step"]
            print(f"{name:>14} {m['rows_per_step']:>6.1f} {m['fill_ms']:>7.3f} {m['wait_ms']:>7.3f} "
                  f"{m['hidden_ms']:>7.3f} {m['sync_ms']:>7.3f} {m['copy_ms']:>7.3f}")
    return row


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    here = os.path.dirname(os.path.abspath(__file__))
    p.add_argument("--model-shape", default="qwen3-0.6b", choices=sorted(SHAPES))
    p.add_argument("--schema", default=os.path.join(here, "schemas", "recommendation.json"))
    p.add_argument("--scale", type=float, default=1.0, help="fraction of W1's 256 requests")
    p.add_argument("--max-model-len", type=int, default=4096)
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-num-batched-tokens", type=int, default=8192)
    p.add_argument("--mask-batch-sizes", type=int, nargs="+", default=None,
                   help="default 1 64 256 (smoke: 1 16)")
    p.add_argument("--mask-steps", type=int, default=None, help="default 30 (smoke: 8)")
    p.add_argument("--fill-threads", type=int, nargs="+", default=None,
                   help="fill thread counts the mask costs are measured with (default 1 2 4 8; "
                        "smoke: 1 2)")
    p.add_argument("--engine-fill-threads", type=int, default=None,
                   help=f"the engine's fill threads (default: {ENV_THREADS} or from the cores)")
    p.add_argument("--skip-inline", action="store_true", help="no run with the masks filled inline")
    p.add_argument("--masks-only", action="store_true", help="only the mask costs, no W1 runs")
    p.add_argument("--async-scheduling", choices=["auto", "on", "off"], default="auto",
                   help="auto: on with CUDA, off on CPU (the engine's default)")
    p.add_argument("--smoke", action="store_true", help="a 2-layer model and 4 requests (CPU)")
    p.add_argument("--smoke-requests", type=int, default=4, help="requests of a smoke run")
    args = p.parse_args()
    if args.engine_fill_threads is not None:
        os.environ[ENV_THREADS] = str(args.engine_fill_threads)
    engine_threads = default_fill_threads()
    with open(args.schema) as f:
        spec = StructuredOutputsParams(json=json.load(f))
    cuda = torch.cuda.is_available()
    overrides = SMOKE if args.smoke else None
    scale = args.smoke_requests / 256 if args.smoke else args.scale
    t0 = time.perf_counter()
    folder = shape_folder(args.model_shape, tokenizer="bytes", overrides=overrides)
    llm = LLM(folder, load_format="dummy", dtype="bfloat16" if cuda else "float32",
              max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs,
              max_num_batched_tokens=args.max_num_batched_tokens, seed=0,
              async_scheduling={"auto": None, "on": True, "off": False}[args.async_scheduling])
    startup_s = time.perf_counter() - t0
    workload = make_workload("W1", SHAPES[args.model_shape]["vocab_size"], seed=0, scale=scale)
    if args.smoke:
        workload.requests[:] = [Request(r.prompt_token_ids[:64], min(r.max_tokens, 48))
                                for r in workload.requests]
        args.mask_batch_sizes = args.mask_batch_sizes or [1, 16]
        args.fill_threads = args.fill_threads or [1, 2]
        args.mask_steps = args.mask_steps or 8
    args.mask_batch_sizes = args.mask_batch_sizes or [1, 64, 256]
    args.fill_threads = args.fill_threads or [1, 2, 4, 8]
    args.mask_steps = args.mask_steps or 30
    prompts = [{"prompt_token_ids": r.prompt_token_ids} for r in workload.requests]
    # Warm-up: compiled kernels and graphs, the grammar library's view of the vocabulary,
    # the schema's grammar and the lexer's first states.
    warm = make_workload("W1", SHAPES[args.model_shape]["vocab_size"], seed=9,
                         scale=(16 if cuda else 1) / 256)
    llm.generate([{"prompt_token_ids": r.prompt_token_ids[:64 if args.smoke else None]}
                  for r in warm.requests],
                 [SamplingParams(temperature=0.6, max_tokens=64 if cuda else 8, structured_outputs=spec)
                  for _ in warm.requests])
    row: dict = {
        "bench": "structured_overhead", "model_shape": args.model_shape, "smoke": args.smoke,
        "device": torch.cuda.get_device_name() if cuda else "cpu", "requests": len(prompts),
        "async_scheduling": llm.engine.async_scheduling,
        "cpus": os.cpu_count(), "engine_fill_threads": engine_threads,
        "startup_s": round(startup_s, 1),
    }
    if not args.masks_only:
        row.update(workload_runs(llm, prompts, workload, spec, args))
    sweep: dict[str, dict] = {}
    for threads in args.fill_threads:
        for shards in sorted({threads, 1}, reverse=True):
            for b in args.mask_batch_sizes:
                key = f"threads={threads} shards={shards} batch={b}"
                sweep[key] = mask_cost(llm, spec, b, args.mask_steps, threads, shards)
    row["mask_cost_ms"] = sweep
    for key, m in sweep.items():
        print(f"masks {key:<32}: fill {m['fill_ms']:7.3f} ms (first {m['first_fill_ms']:6.1f} ms), "
              f"apply {m['apply_ms']:.3f} ms per step")
    print(json.dumps(row))
    return 0


if __name__ == "__main__":
    sys.exit(main())
