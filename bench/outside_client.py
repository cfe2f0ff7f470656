"""`ondo serve` measured by load generators ondo did not write.

Starts `ondo serve` on a model shape with dummy weights (or uses --base-url) and sends it
W1-like requests (prompt and output lengths uniform in [100, 1024] tokens, `ignore_eos`,
streaming) from the official `openai` client (`AsyncOpenAI`, `completions.create`) in
--processes worker processes (`ondo.bench.outside_load`): first all at once with at most
--max-concurrency in flight (saturation), then at two Poisson rates (--rates, or
--rate-fractions of the measured saturation). Optionally (--locust) Locust runs the same
three stages from a process of its own (`ondo.bench.locust_stage`, `bench/locustfile_sse.py`)
and (--aiperf PATH) NVIDIA's AIPerf,
installed in a virtual environment of its own, runs the same kind of load at the same
concurrency and its JSON export is read back (`ondo.bench.aiperf_stage`). Reports output
tok/s, TTFT and TPOT p50 / p99 per stage, with the ratio to --offline-tok-s where given,
as a table and one JSON line.

    python3 bench/outside_client.py --model-shape qwen3-0.6b --offline-tok-s X   # a GPU: ~3 min
    python3 bench/outside_client.py --smoke                                     # a CPU: ~1 min
    python3 bench/outside_client.py --base-url http://127.0.0.1:8000 --rates 4 8
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time

import httpx

from ondo.bench.outside_load import make_load, run_load
from ondo.bench.server_process import start_dummy_server
from ondo.bench.shapes import SHAPES, shape_folder

W1_LEN = (100, 1024)


def start_server(args: argparse.Namespace, folder: str, log_path: str
                 ) -> tuple[subprocess.Popen, str]:
    flags = ["--max-model-len", str(args.max_model_len), "--max-num-seqs", str(args.max_num_seqs),
             "--max-waiting-requests", str(4 * args.num_prompts), "--telemetry", "off"]
    if args.smoke:
        flags += ["--device", "cpu", "--num-kv-blocks", "512", "--max-num-batched-tokens", "256"]
    else:
        flags += ["--dtype", "bfloat16"]
    flags += shlex.split(args.server_args)  # last: they override the above
    return start_dummy_server(folder, args.port, flags, log_path)


def stage_row(name: str, summary: dict, offline_tok_s: float | None) -> dict:
    row = {"stage": name, **summary}
    row["fraction_of_offline"] = (summary["output_tokens_per_s"] / offline_tok_s
                                  if offline_tok_s else None)
    return row


def format_table(rows: list[dict]) -> str:
    head = (f"{'stage':<22}{'done':>7}{'fail':>6}{'out tok/s':>11}{'of offline':>11}"
            f"{'TTFT p50':>10}{'TTFT p99':>10}{'TPOT p50':>10}{'TPOT p99':>10}")
    lines = [head, "-" * len(head)]
    for r in rows:
        frac = f"{r['fraction_of_offline']:.2f}" if r["fraction_of_offline"] else "-"
        lines.append(
            f"{r['stage']:<22}{r['completed']:>7}{r['failed']:>6}"
            f"{r['output_tokens_per_s']:>11.1f}{frac:>11}"
            f"{r['ttft_ms']['p50']:>10.1f}{r['ttft_ms']['p99']:>10.1f}"
            f"{r['tpot_ms']['p50']:>10.2f}{r['tpot_ms']['p99']:>10.2f}")
    lines.append("(TTFT and TPOT in ms)")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-shape", default="qwen3-0.6b", choices=sorted(SHAPES))
    ap.add_argument("--base-url", default=None, help="measure this server instead of starting one")
    ap.add_argument("--model", default=None, help="the model name to send (default: /v1/models')")
    ap.add_argument("--processes", type=int, default=4, help="client worker processes")
    ap.add_argument("--num-prompts", type=int, default=256,
                    help="requests per stage (256: as in the offline W1 run)")
    ap.add_argument("--max-concurrency", type=int, default=256,
                    help="at most this many requests in flight at saturation (all workers)")
    ap.add_argument("--rates", type=float, nargs=2, default=None, metavar=("R1", "R2"),
                    help="Poisson request rates, requests/s (default: --rate-fractions of the "
                         "measured saturation)")
    ap.add_argument("--rate-fractions", type=float, nargs=2, default=[0.5, 0.8],
                    metavar=("F1", "F2"))
    ap.add_argument("--prompt-kind", choices=("token-ids", "text"), default="token-ids",
                    help="token-id prompts, or text of the shape's word tokenizer (one word a token)")
    ap.add_argument("--input-len", type=int, nargs=2, default=list(W1_LEN), metavar=("LO", "HI"))
    ap.add_argument("--output-len", type=int, nargs=2, default=list(W1_LEN), metavar=("LO", "HI"))
    ap.add_argument("--offline-tok-s", type=float, default=None,
                    help="the offline output tokens/s of the same load, for the ratio")
    ap.add_argument("--aiperf", default=None, metavar="PATH",
                    help="the `aiperf` executable (in a venv of its own): also run AIPerf")
    ap.add_argument("--locust", action="store_true",
                    help="also run Locust (`python -m locust`, bench/locustfile_sse.py) at "
                         "saturation and at the same two Poisson rates")
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--max-model-len", type=int, default=4096)
    ap.add_argument("--port", type=int, default=8341)
    ap.add_argument("--server-args", default="", help="more flags for the started `ondo serve`")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--smoke", action="store_true",
                    help="a CPU run in about a minute: tiny-llama, --device cpu, short requests")
    ap.add_argument("--out", default=None, help="also write the JSON here")
    ap.add_argument("--server-log", default=None)
    args = ap.parse_args(argv)
    for flag in ("processes", "num_prompts", "max_concurrency"):
        if getattr(args, flag) < 1:
            ap.error(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if args.max_concurrency < args.processes:
        ap.error(f"--max-concurrency {args.max_concurrency} is below --processes {args.processes}")
    for flag in ("rates", "rate_fractions"):
        if getattr(args, flag) is not None and not all(x > 0 for x in getattr(args, flag)):
            ap.error(f"--{flag.replace('_', '-')} must be > 0, got {getattr(args, flag)}")
    if args.offline_tok_s is not None and not args.offline_tok_s > 0:
        ap.error(f"--offline-tok-s must be > 0, got {args.offline_tok_s}")
    for flag in ("input_len", "output_len"):
        lo, hi = getattr(args, flag)
        if not 1 <= lo <= hi:
            ap.error(f"--{flag.replace('_', '-')} {lo} {hi}: want 1 <= LO <= HI")
        setattr(args, flag, (lo, hi))
    if args.locust and importlib.util.find_spec("locust") is None:
        ap.error("--locust: Locust is not installed in this Python (pip install locust)")
    if args.aiperf and not os.access(args.aiperf, os.X_OK):
        ap.error(f"--aiperf {args.aiperf}: not an executable file")
    if args.smoke:
        args.model_shape = "tiny-llama"
        args.num_prompts = min(args.num_prompts, 32)
        args.max_concurrency, args.max_num_seqs, args.max_model_len = 8, 8, 256
        args.processes = min(args.processes, 2)
        args.input_len, args.output_len = (4, 32), (4, 24)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    vocab = SHAPES[args.model_shape]["vocab_size"]
    folder = shape_folder(args.model_shape)
    proc = None
    log_path = args.server_log or os.path.join(tempfile.gettempdir(),
                                               f"ondo-outside-server-{os.getpid()}.log")
    try:
        if args.base_url:
            base = args.base_url.rstrip("/")
        else:
            proc, base = start_server(args, folder, log_path)
        model = args.model or httpx.get(base + "/v1/models", timeout=10).json()["data"][0]["id"]

        def load(rate: float, seed: int, concurrency: int | None) -> dict:
            requests = make_load(args.num_prompts, args.input_len, args.output_len, vocab,
                                 args.prompt_kind, rate, seed)
            return run_load(base, model, requests, args.processes, concurrency)

        # Each stage has prompts of its own (its seed), so none finds another's in the
        # server's prefix cache.
        rows = [stage_row("openai saturation", load(float("inf"), args.seed,
                                                     args.max_concurrency), args.offline_tok_s)]
        print(json.dumps({"stage": rows[0]}), flush=True)
        saturation_rps = rows[0]["completed"] / rows[0]["duration_s"]
        rates = args.rates or [f * saturation_rps for f in args.rate_fractions]
        for k, rate in enumerate(rates, start=1):
            row = stage_row(f"openai poisson {rate:.2f}/s", load(rate, args.seed + k, None),
                            args.offline_tok_s)
            row["request_rate"] = rate
            rows.append(row)
            print(json.dumps({"stage": row}), flush=True)
        if args.locust:
            from ondo.bench.locust_stage import run_locust

            for k, rate in enumerate([float("inf"), *rates]):
                requests = make_load(args.num_prompts, args.input_len, args.output_len, vocab,
                                     args.prompt_kind, rate, args.seed + 10 + k)
                users = args.max_concurrency if k == 0 else args.num_prompts
                name = "locust saturation" if k == 0 else f"locust poisson {rate:.2f}/s"
                row = stage_row(name, run_locust(base, model, requests, users),
                                args.offline_tok_s)
                if k:
                    row["request_rate"] = rate
                rows.append(row)
                print(json.dumps({"stage": row}), flush=True)
        if args.aiperf:
            from ondo.bench.aiperf_stage import run_aiperf

            row = stage_row("aiperf saturation", run_aiperf(
                args.aiperf, base, model, folder, args.num_prompts, args.max_concurrency,
                args.input_len, args.output_len, args.seed), args.offline_tok_s)
            rows.append(row)
            print(json.dumps({"stage": row}), flush=True)
    finally:
        if proc is not None:
            proc.terminate()
            try:
                status = proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                proc.kill()
                status = proc.wait()
            print(f"server exited with status {status}; its log: {log_path}", file=sys.stderr)
    result = {"outside_client": {
        "model_shape": args.model_shape, "smoke": args.smoke, "prompt_kind": args.prompt_kind,
        "num_prompts": args.num_prompts, "processes": args.processes,
        "input_len": args.input_len, "output_len": args.output_len,
        "offline_output_tokens_per_s": args.offline_tok_s, "date": time.strftime("%Y-%m-%d"),
        "stages": rows}}
    print(format_table(rows), flush=True)
    print(json.dumps(result), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return 0 if all(r["failed"] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
