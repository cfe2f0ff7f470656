"""The engine's host time per decode step at a ladder of batch sizes, phase by phase, from
the engine's own step timing (`LLMEngine.step_timing_s`), with asynchronous scheduling as
on a GPU: what the host must do each step that the GPU's work has to hide.

    python3 bench/host_step_cost.py [--rows 32 128 256] [--steps 200] [--sampled]
    python3 bench/host_step_cost.py --device cuda --model-shape qwen3-0.6b   # dummy weights

On the CPU the model is a one-layer random Qwen3 (hidden 64, vocabulary 512), so the
forward pass (`launch`) and the draws (`sample` holds the CPU's greedy argmax, or with
--sampled the CPU's softmax and exponential race) cost little, and `host` = schedule +
prepare + sample + postprocess is the engine's bookkeeping: the Python that packs a step,
launches it, appends its tokens and checks stops. On CUDA it includes the launches' own
CPU time (graph replay, copies, the sampler's kernel launch).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import torch

PHASES = ("schedule", "prepare", "launch", "sample", "wait", "postprocess")
HOST_PHASES = ("schedule", "prepare", "sample", "postprocess")


def tiny_model(folder: str) -> str:
    """A one-layer random Qwen3 saved by transformers (no tokenizer: token ids in)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    cfg = Qwen3Config(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=1, head_dim=32, vocab_size=512, max_position_embeddings=4096)
    torch.manual_seed(0)
    Qwen3ForCausalLM(cfg).save_pretrained(folder)
    return folder


def host_ms_per_step(engine, rows: int, steps: int, sampled: bool, prompt_len: int = 64,
                     seed: int = 0) -> dict[str, float]:
    """Per-step milliseconds of each phase over `steps` steps in which all `rows` sequences
    decode (after their prompts and a few steps of warm-up); the requests are aborted after."""
    from ondo import SamplingParams

    gen = torch.Generator().manual_seed(seed)
    vocab = engine.model_config.vocab_size
    ids = [f"host-{rows}-{i}" for i in range(rows)]
    params = SamplingParams(temperature=0.8 if sampled else 0.0, max_tokens=steps + 64, ignore_eos=True)
    for rid in ids:
        engine.add_request(rid, None, params, prompt_token_ids=torch.randint(0, vocab, (prompt_len,),
                                                                             generator=gen).tolist(),
                           stream=False)
    while any(s.num_computed_tokens < s.num_prompt_tokens for s in engine.scheduler.running) \
            or engine.scheduler.waiting:
        engine.step()
    for _ in range(8):
        engine.step()
    before = dict(engine.step_timing_s)
    t0 = time.perf_counter()
    for _ in range(steps):
        engine.step()
    wall = time.perf_counter() - t0
    counted = engine.step_timing_s["steps"] - before["steps"]
    out = {p: (engine.step_timing_s[p] - before[p]) / counted * 1e3 for p in PHASES}
    out["host"] = sum(out[p] for p in HOST_PHASES)
    out["wall"] = wall / steps * 1e3
    for rid in ids:
        engine.abort_request(rid)
    engine.drain()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[32, 128, 256])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--sampled", action="store_true", help="temperature 0.8 (default: greedy)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--model-shape", default=None, help="a real shape with dummy weights (CUDA)")
    ap.add_argument("--repeats", type=int, default=3, help="runs per batch size; the median is kept")
    args = ap.parse_args()

    from ondo import LLM

    with tempfile.TemporaryDirectory() as tmp:
        if args.model_shape:
            from ondo.bench.shapes import shape_folder

            folder, extra = str(shape_folder(args.model_shape)), {"load_format": "dummy", "dtype": "bfloat16"}
        else:
            folder, extra = tiny_model(tmp), {"dtype": "float32"}
        llm = LLM(folder, device=args.device, max_num_seqs=max(args.rows), max_model_len=1024,
                  async_scheduling=True, **extra)
        engine = llm.engine
        results = []
        for rows in args.rows:
            runs = [host_ms_per_step(engine, rows, args.steps, args.sampled, seed=r) for r in range(args.repeats)]
            runs.sort(key=lambda r: r["host"])
            best = runs[len(runs) // 2]
            results.append({"rows": rows, **{k: round(v, 4) for k, v in best.items()}})
            print(f"{rows:4d} rows: host {best['host']:.3f} ms/step = " + " + ".join(
                f"{p} {best[p]:.3f}" for p in HOST_PHASES) + f"  (launch {best['launch']:.3f}, wall {best['wall']:.3f})",
                flush=True)
        print(json.dumps({"benchmark": "host_step_cost", "device": args.device,
                          "model": args.model_shape or "tiny-qwen3", "sampled": args.sampled,
                          "steps": args.steps, "rows": results}))


if __name__ == "__main__":
    main()
