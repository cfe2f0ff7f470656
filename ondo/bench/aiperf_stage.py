"""A stage run by NVIDIA's AIPerf (`aiperf profile`, PyPI `aiperf`), an established load
generator ondo did not write, and its results read back in `outside_load.summarize`'s form.

AIPerf runs as an executable from a virtual environment of its own (it pulls in about 140
packages: transformers, pandas, matplotlib... none of them ondo's). Its load: streaming
/v1/completions with `ignore_eos`, prompts of random token ids from the tokenizer's
vocabulary (`--prompt-corpus random`, decoded to text with the shape's word tokenizer, so
the server counts the same tokens), lengths uniform in a window around a mean
(`--random-range-ratio`, vllm style: [floor(mean·(1−r)), ceil(mean·(1+r))]), all requests
at once at a fixed concurrency. Its token counts are the server's usage counts
(`--use-server-token-count`); its TPOT is its inter-token latency, per request (latency −
TTFT) / (output tokens − 1), the same definition as ours.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import tempfile


def window_args(lo: int, hi: int) -> tuple[int, float]:
    """The mean and range ratio whose vllm-style window is [lo, hi] (to within one token
    at either end: AIPerf floors the low end and ceils the high one)."""
    mean = (lo + hi) // 2
    ratio = (hi - lo) / (2 * mean) if mean else 0.0
    return mean, ratio


def aiperf_command(aiperf: str, base_url: str, model: str, tokenizer_folder: str,
                   num_requests: int, concurrency: int, input_len: tuple[int, int],
                   output_len: tuple[int, int], seed: int, artifact_dir: str) -> list[str]:
    isl, isl_ratio = window_args(*input_len)
    osl, osl_ratio = window_args(*output_len)
    ratio = json.dumps({"input": isl_ratio, "output": osl_ratio})
    return [aiperf, "profile", "--model", model, "--url", base_url,
            "--endpoint-type", "completions", "--streaming", "--tokenizer", tokenizer_folder,
            "--prompt-corpus", "random", "--isl", str(isl), "--osl", str(osl),
            "--random-range-ratio", ratio, "--extra-inputs", "ignore_eos:true",
            "--concurrency", str(concurrency), "--request-count", str(num_requests),
            "--random-seed", str(seed), "--use-server-token-count", "--no-server-metrics",
            "--no-gpu-telemetry", "--ui-type", "none", "--artifact-dir", artifact_dir]


def parse_artifacts(artifact_dir: str) -> dict:
    """The run's summary from AIPerf's exports: the aggregate JSON for throughput and
    percentiles, the per-request records against the sent payloads for completeness (every
    record's usage count against its request's max_tokens)."""
    with open(os.path.join(artifact_dir, "profile_export_aiperf.json")) as f:
        agg = json.load(f)
    with open(os.path.join(artifact_dir, "inputs.json")) as f:
        max_tokens = {s["session_id"]: s["payloads"][0]["max_tokens"]
                      for s in json.load(f)["data"]}
    records = []
    with open(os.path.join(artifact_dir, "profile_export.jsonl")) as f:
        records = [json.loads(line) for line in f if line.strip()]
    ok = [r for r in records if not r.get("error")]
    short = sum(r["metrics"]["usage_completion_tokens"]["value"]
                != max_tokens[r["metadata"]["conversation_id"]] for r in ok)
    ttft_after_end = sum(r["metrics"]["time_to_first_output_token"]["value"]
                         > r["metrics"]["request_latency"]["value"] for r in ok)

    def pct(name: str) -> dict[str, float]:
        m = agg.get(name) or {}
        return {"p50": float(m.get("p50", math.nan)), "p99": float(m.get("p99", math.nan)),
                "max": float(m.get("max", math.nan))}

    return {
        "requests": len(max_tokens), "completed": len(ok), "failed": len(max_tokens) - len(ok),
        "short": short, "duration_s": float(agg["benchmark_duration"]["avg"]),
        "output_tokens": int(agg["total_output_tokens"]["avg"]),
        "output_tokens_per_s": float(agg["output_token_throughput"]["avg"]),
        "ttft_ms": pct("time_to_first_token"), "tpot_ms": pct("inter_token_latency"),
        "ttft_after_end": ttft_after_end,
        "errors": [str(e)[:200] for e in agg.get("error_summary", [])][:5],
        "aiperf_version": agg.get("aiperf_version"),
    }


def run_aiperf(aiperf: str, base_url: str, model: str, tokenizer_folder: str,
               num_requests: int, concurrency: int, input_len: tuple[int, int],
               output_len: tuple[int, int], seed: int, timeout_s: float = 1800.0) -> dict:
    """Runs `aiperf profile` (its log beside its artifacts) and parses what it wrote."""
    artifact_dir = tempfile.mkdtemp(prefix="ondo-aiperf-")
    cmd = aiperf_command(aiperf, base_url, model, tokenizer_folder, num_requests, concurrency,
                         input_len, output_len, seed, artifact_dir)
    log_path = os.path.join(artifact_dir, "aiperf-console.log")
    with open(log_path, "w") as log:
        proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, timeout=timeout_s)
    if proc.returncode != 0:
        with open(log_path) as f:
            tail = f.read()[-2000:]
        raise RuntimeError(f"aiperf exited with status {proc.returncode}; its log {log_path}:\n{tail}")
    summary = parse_artifacts(artifact_dir)
    summary["artifact_dir"] = artifact_dir
    summary["max_concurrency"] = concurrency
    return summary
