"""`ondo bench ...`: each benchmark adds its own subcommand."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    from ondo.bench import throughput

    p = sub.add_parser("bench", help="benchmarks")
    bench_sub = p.add_subparsers(dest="bench_command", metavar="BENCH", required=True)
    throughput.add_parser(bench_sub)
