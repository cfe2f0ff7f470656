"""`ondo bench …`: one `bench` command; each benchmark adds a subcommand here."""

from __future__ import annotations

import argparse
import json
import logging
import sys

from ondo.bench.arg_types import writable_file


def _bench_serve(args: argparse.Namespace) -> int:
    from ondo.bench.serve import BenchServeArgs, bench_serve, format_table

    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request otherwise
    fields = BenchServeArgs.__dataclass_fields__
    summary = bench_serve(BenchServeArgs(**{k: getattr(args, k) for k in fields}))
    print(format_table(summary))
    line = json.dumps(summary)
    print(line)
    if args.result_file:
        with open(args.result_file, "w") as f:
            f.write(line + "\n")
    if summary["completed"] == 0:
        print("error: no request completed: " + "; ".join(summary["errors"]), file=sys.stderr)
        return 1
    return 0


def _add_serve(bench_sub: argparse._SubParsersAction) -> None:
    p = bench_sub.add_parser("serve", help="open-loop load against an OpenAI-compatible server")
    p.add_argument("--base-url", default="http://127.0.0.1:8000")
    p.add_argument("--model", default=None, help="model name (default: the server's first)")
    p.add_argument("--api-key", default=None)
    p.add_argument("--num-prompts", type=int, default=100)
    p.add_argument("--request-rate", type=float, default=float("inf"),
                   help="Poisson arrivals per second; inf sends all at once (default)")
    p.add_argument("--max-concurrency", type=int, default=None,
                   help="requests in flight at most (default: no limit)")
    p.add_argument("--dataset", choices=("random", "sharegpt-like"), default="random")
    p.add_argument("--input-len", type=int, default=256)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--range-ratio", type=float, default=0.0,
                   help="random lengths uniform in [len*(1-r), len*(1+r)]")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer to size prompts (default: the embedded model's; 'none': words)")
    p.add_argument("--token-id-vocab", type=int, default=None,
                   help="send random token-id prompts (for a server without a tokenizer)")
    p.add_argument("--result-file", type=writable_file, default=None, help="also write the JSON summary here")
    p.set_defaults(func=_bench_serve)


def register(sub: argparse._SubParsersAction) -> None:
    bench = sub.add_parser("bench", help="benchmarks")
    bench_sub = bench.add_subparsers(dest="bench_command", metavar="BENCHMARK")
    bench.set_defaults(func=lambda args: (bench.print_help(), 2)[1])
    _add_serve(bench_sub)
    from ondo.bench import throughput

    throughput.add_parser(bench_sub)
    _add_governor(bench_sub)


def _add_governor(bench_sub: argparse._SubParsersAction) -> None:
    from ondo.control.sim import bench

    bench.add_parser(bench_sub)
