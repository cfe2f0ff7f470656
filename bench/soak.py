"""Soak and chaos: mixed load against `ondo serve` for a fixed time, checked as it goes.

Starts `ondo serve` on a model shape with dummy weights (or uses --base-url), measures
the server's saturation (a burst of W1-like requests: input and output uniform in
[100, 1024] tokens), then runs the soak (`ondo.bench.soak`) at --fraction of it: a
warm-up, then --duration-s of steady mixed load (streams, plain requests, cancellations,
slow readers, bad inputs, bursts above the queue limit), optionally a chaos phase that
kills the engine process with SIGKILL (--chaos). It checks that no request is lost, that
every accepted one ends exactly once, that no 5xx comes outside the engine-restart window,
that the ledger balances and no KV block is held after each phase, and, over the steady
phase, that server and engine RSS and GPU memory stay within 5 %, throughput of the first
and last --window-s within 5 %, and p99 TTFT of the last quarter within 25 % of the
first's. Prints the checks as a table and one JSON line; exits 1 if a check failed.

    python3 bench/soak.py --model-shape qwen3-0.6b --duration-s 1200   # a GPU: ~25 min
    python3 bench/soak.py --model-shape qwen3-0.6b --duration-s 240 --warmup-s 30 \
        --window-s 90 --saturation-requests 200                       # a GPU: ~6 min
    python3 bench/soak.py --smoke                                      # a CPU: ~1 min, with a kill

The server runs as `python3 -m ondo serve` in a subprocess with this process's environment
(PYTHONPATH included, so packages installed to a folder on it are found there too).
    python3 bench/soak.py --base-url http://127.0.0.1:8000 --request-rate 5 --duration-s 300
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import shlex
import subprocess
import sys
import tempfile
import time

from ondo.bench.serve import make_requests, run_benchmark
from ondo.bench.server_process import start_dummy_server
from ondo.bench.shapes import SHAPES, shape_folder
from ondo.bench.soak import Phase, SoakConfig, run_soak
from ondo.bench.soak_checks import format_checks

W1_LEN = (100, 1024)


def start_server(args: argparse.Namespace, log_path: str) -> tuple[subprocess.Popen, str]:
    flags = ["--max-model-len", str(args.max_model_len), "--max-num-seqs", str(args.max_num_seqs),
             "--max-waiting-requests", str(args.max_waiting_requests),
             "--engine-process", "--engine-restarts", "3", "--telemetry", "off"]
    if args.smoke:
        flags += ["--device", "cpu", "--num-kv-blocks", "256", "--max-num-batched-tokens", "256"]
    else:
        flags += ["--dtype", "bfloat16"]
    flags += shlex.split(args.server_args)  # last: they override the above
    return start_dummy_server(shape_folder(args.model_shape), args.port, flags, log_path)


def measure_saturation(base: str, args: argparse.Namespace) -> float:
    """Requests per second the server completes when W1-like requests come all at once."""
    lo, hi = args.input_len
    mean = (lo + hi) // 2
    ratio = (hi - lo) / (hi + lo)
    requests = make_requests(None, "random", args.saturation_requests, mean, (args.output_len[0]
                             + args.output_len[1]) // 2, ratio, 12345, args.token_id_vocab)
    summary = asyncio.run(run_benchmark(base, requests, float("inf")))
    if summary["failed"]:
        print(f"warning: {summary['failed']} of the {args.saturation_requests} saturation requests "
              "failed (shed above --max-waiting-requests?): the saturation is a lower bound",
              file=sys.stderr)
    print(json.dumps({"saturation": {k: summary[k] for k in (
        "completed", "failed", "duration_s", "request_throughput", "output_throughput")}}),
        flush=True)
    return summary["request_throughput"]


def phases(args: argparse.Namespace) -> list[Phase]:
    out = [Phase("warmup", args.warmup_s), Phase("steady", args.duration_s, timed=True)]
    if args.chaos:
        out += [Phase("chaos", args.chaos_s, kill_engine_at_s=min(5.0, args.chaos_s / 4)),
                Phase("after", max(args.chaos_s / 2, 10.0))]
    return out


def raise_open_files_limit() -> int:
    """Thousands of connections at once (this client's and the server's, which inherits it)
    need more descriptors than the usual soft limit of 1024."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    for want in (hard, 1 << 20, 65536):  # an unlimited hard limit is not a valid soft one
        if soft >= want or (hard != resource.RLIM_INFINITY and want > hard):
            continue
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
            break
        except (ValueError, OSError):
            continue
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-shape", default="qwen3-0.6b", choices=sorted(SHAPES))
    ap.add_argument("--base-url", default=None, help="soak this server instead of starting one")
    ap.add_argument("--server-pid", type=int, default=None,
                    help="with --base-url: its pid, for RSS and --chaos")
    ap.add_argument("--duration-s", type=float, default=1200.0, help="the steady phase")
    ap.add_argument("--warmup-s", type=float, default=60.0)
    ap.add_argument("--window-s", type=float, default=300.0,
                    help="throughput: first vs last window of the steady phase")
    ap.add_argument("--fraction", type=float, default=0.8,
                    help="the soak's request rate as a fraction of the measured saturation")
    ap.add_argument("--request-rate", type=float, default=None, help="requests/s (no measuring)")
    ap.add_argument("--saturation-requests", type=int, default=400)
    ap.add_argument("--chaos", action="store_true", help="then kill the engine process once")
    ap.add_argument("--chaos-s", type=float, default=60.0)
    ap.add_argument("--burst-every-s", type=float, default=120.0)
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--max-waiting-requests", type=int, default=256,
                    help="the server's queue limit; bursts go 25 %% above it")
    ap.add_argument("--max-model-len", type=int, default=4096)
    ap.add_argument("--port", type=int, default=8331)
    ap.add_argument("--input-len", type=int, nargs=2, default=list(W1_LEN), metavar=("LO", "HI"),
                    help="prompt tokens, uniform in [LO, HI] (default W1's)")
    ap.add_argument("--output-len", type=int, nargs=2, default=list(W1_LEN), metavar=("LO", "HI"),
                    help="output tokens, uniform in [LO, HI] (default W1's)")
    ap.add_argument("--server-args", default="",
                    help="more flags for the started `ondo serve`, e.g. \"--device cpu\"")
    ap.add_argument("--smoke", action="store_true",
                    help="a CPU run in about a minute: the tiny-llama shape, short requests, "
                         "a 20 s steady phase and a kill of the engine")
    ap.add_argument("--progress-every-s", type=float, default=60.0,
                    help="a JSON progress line this often while the load runs (0: none)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="also write the JSON here")
    ap.add_argument("--server-log", default=None,
                    help="the started server's output (default: a file in the temp folder)")
    args = ap.parse_args(argv)
    for flag in ("duration_s", "warmup_s", "window_s", "fraction", "chaos_s", "burst_every_s"):
        if not getattr(args, flag) > 0:
            ap.error(f"--{flag.replace('_', '-')} must be > 0, got {getattr(args, flag)}")
    if args.request_rate is not None and not args.request_rate > 0:
        ap.error(f"--request-rate must be > 0, got {args.request_rate}")
    for flag in ("input_len", "output_len"):
        lo, hi = getattr(args, flag)
        if not 1 <= lo <= hi:
            ap.error(f"--{flag.replace('_', '-')} {lo} {hi}: want 1 <= LO <= HI")
        setattr(args, flag, (lo, hi))
    if args.smoke:
        args.model_shape = "tiny-llama"
        args.duration_s = min(args.duration_s, 20.0)
        args.warmup_s, args.window_s, args.chaos, args.chaos_s = 3.0, 5.0, True, 20.0
        args.burst_every_s, args.max_num_seqs, args.max_waiting_requests = 5.0, 4, 4
        args.max_model_len = 512
        args.input_len, args.output_len = (4, 48), (4, 32)
        args.request_rate = args.request_rate or 6.0
    args.token_id_vocab = SHAPES[args.model_shape]["vocab_size"]
    open_files = raise_open_files_limit()

    proc = None
    log_path = args.server_log or os.path.join(tempfile.gettempdir(),
                                               f"ondo-soak-server-{os.getpid()}.log")
    try:
        if args.base_url:
            base, server_pid = args.base_url.rstrip("/"), args.server_pid
        else:
            proc, base = start_server(args, log_path)
            server_pid = proc.pid
        saturation = None if args.request_rate else measure_saturation(base, args)
        rate = args.request_rate or args.fraction * saturation
        config = SoakConfig(
            base_url=base, phases=phases(args), request_rate=rate, input_len=args.input_len,
            output_len=args.output_len, burst_every_s=args.burst_every_s,
            burst_size=int(args.max_waiting_requests * 1.25) + 1, max_model_len=args.max_model_len,
            token_id_vocab=args.token_id_vocab, server_pid=server_pid, warmup_s=0.0,
            window_s=args.window_s, seed=args.seed,
            progress_every_s=min(args.progress_every_s, 10.0) if args.smoke else args.progress_every_s,
            sample_every_s=1.0 if args.smoke else 5.0, judge_timed=not args.smoke,
            # On a shared CPU: memory must stay flat, TTFT must not run away (its p99 over
            # a few dozen streams jitters by several times; a queue that grows does not).
            judge_memory_and_ttft=args.smoke, ttft_tolerance=1.0 if args.smoke else 0.25,
            ttft_floor_s=1.0 if args.smoke else 0.010)
        report = asyncio.run(run_soak(config, on_progress=lambda p: print(
            json.dumps({"progress": p}), flush=True)))
        # The verdict is out before the server stops (a stop can take a while).
        summary = report.summary() | {
            "saturation_request_rate": saturation, "fraction": args.fraction,
            "request_rate": rate, "model_shape": args.model_shape, "smoke": args.smoke,
            "duration_s": args.duration_s, "window_s": args.window_s,
            "date": time.strftime("%Y-%m-%d"), "open_files_limit": open_files}
        print(format_checks(report.checks), flush=True)
        print(json.dumps(summary), flush=True)
        if args.out:
            with open(args.out, "w") as f:
                json.dump(summary, f, indent=1)
    finally:
        if proc is not None:
            proc.terminate()
            try:
                status = proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                proc.kill()
                status = proc.wait()
            print(f"server exited with status {status}; its log: {log_path}", file=sys.stderr)
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
