"""The serving throughput-latency curve against the offline figure for the same requests.

Builds one request set (random token-id prompts, seeded), runs it offline through
`LLM.generate`, then starts `ondo serve` on the same model and sends requests of the same
kind with `ondo bench serve` at increasing Poisson rates up to a burst; the last rate
gets the very requests that ran offline. Prints a table and a
JSON line; writes the JSON to --out.

    python3 bench/serve_vs_offline.py --model-shape qwen3-0.6b --rates 4 8 16 inf --out curve.json
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time

import httpx
import torch

from ondo.bench.serve import BenchServeArgs, bench_serve, make_requests
from ondo.bench.shapes import SHAPES, shape_folder
from ondo.engine.sampling_params import SamplingParams


def offline(folder: str, requests, engine_flags: dict) -> float:
    from ondo import LLM

    llm = LLM(folder, load_format="dummy", dtype="bfloat16", **engine_flags)
    prompts = [{"prompt_token_ids": r.prompt} for r in requests]
    params = [SamplingParams(temperature=0.0, max_tokens=r.output_len, ignore_eos=True) for r in requests]
    # Warm-up on other prompts (the fused kernels compile here, and nothing is cached).
    llm.generate([{"prompt_token_ids": [t + 1 for t in r.prompt]} for r in requests[:32]], params[:32])
    torch.cuda.synchronize()
    start = time.perf_counter()
    outs = llm.generate(prompts, params)
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    timing = llm.engine.step_timing_s  # warm-up included; compare with the server's exit log
    print("offline engine host time per step, ms:",
          {k: round(v / timing["steps"] * 1e3, 3) for k, v in timing.items() if k != "steps"}, flush=True)
    del llm
    gc.collect()
    torch.cuda.empty_cache()
    return tokens / elapsed


def wait_healthy(url: str, proc: subprocess.Popen, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"ondo serve exited with {proc.returncode}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise TimeoutError("ondo serve did not become healthy")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model-shape", default="qwen3-0.6b", choices=sorted(SHAPES))
    ap.add_argument("--num-prompts", type=int, default=512)
    ap.add_argument("--input-len", type=int, default=512)
    ap.add_argument("--output-len", type=int, default=256)
    ap.add_argument("--range-ratio", type=float, default=0.5)
    ap.add_argument("--rates", nargs="+", default=["8", "16", "32", "inf"])
    ap.add_argument("--port", type=int, default=8321)
    ap.add_argument("--max-model-len", type=int, default=2048)
    ap.add_argument("--out", default="serve_curve.json")
    args = ap.parse_args()

    vocab = SHAPES[args.model_shape]["vocab_size"]
    folder = shape_folder(args.model_shape)
    engine_flags = {"max_model_len": args.max_model_len, "max_num_seqs": 256}
    # Each rate gets prompts of its own (seed = its index), so that no run finds the previous
    # runs' prompts in the server's prefix cache; offline runs the last rate's (the burst's).
    requests = make_requests(None, "random", args.num_prompts, args.input_len, args.output_len,
                             args.range_ratio, len(args.rates) - 1, vocab)
    offline_tps = offline(folder, requests, engine_flags)
    print(f"offline: {offline_tps:.0f} output tokens/s", flush=True)

    url = f"http://127.0.0.1:{args.port}"
    cmd = [sys.executable, "-m", "ondo", "serve", folder, "--load-format", "dummy", "--dtype", "bfloat16",
           "--port", str(args.port), "--max-model-len", str(args.max_model_len), "--max-num-seqs", "256",
           "--max-waiting-requests", str(4 * args.num_prompts)]
    proc = subprocess.Popen(cmd, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    rows = []
    try:
        wait_healthy(url, proc)
        for seed, rate in enumerate(args.rates):
            summary = bench_serve(BenchServeArgs(
                base_url=url, num_prompts=args.num_prompts, request_rate=float(rate),
                input_len=args.input_len, output_len=args.output_len, range_ratio=args.range_ratio,
                seed=seed, token_id_vocab=vocab))
            summary["request_rate"] = rate
            summary["fraction_of_offline"] = summary.get("output_throughput", 0.0) / offline_tps
            rows.append(summary)
            print(json.dumps({k: v for k, v in summary.items() if not isinstance(v, (list, dict))}),
                  flush=True)
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    result = {"model": args.model_shape, "device": torch.cuda.get_device_name(),
              "date": time.strftime("%Y-%m-%d"), "offline_output_tokens_per_s": offline_tps,
              "num_prompts": args.num_prompts, "input_len": args.input_len, "output_len": args.output_len,
              "range_ratio": args.range_ratio, "curve": rows}
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
