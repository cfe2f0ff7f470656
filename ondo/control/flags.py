"""`ondo serve`'s governor flags (light to import: the CLI builds every parser)."""

from __future__ import annotations

import argparse

POLICIES = ("off", "reactive", "predictive")


def add_governor_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("governor (needs GPU telemetry)")
    g.add_argument("--governor", choices=POLICIES, default="off",
                   help="policy shaping the engine's load: reactive acts on sensor thresholds, "
                        "predictive on the twin's forecasts (default off)")
    g.add_argument("--power-budget-w", type=float, default=None,
                   help="hold NVML's 1 s average power at or under this many watts")
    g.add_argument("--temp-target-c", type=float, default=None,
                   help="die temperature target (default: --temp-margin-c under the SW thermal "
                        "slowdown)")
    g.add_argument("--temp-margin-c", type=float, default=None,
                   help="margin of the default temperature targets under the GPU's thresholds "
                        "(default 5)")
    g.add_argument("--hbm-temp-target-c", type=float, default=None,
                   help="HBM temperature target (default: --temp-margin-c under the HBM max)")
    g.add_argument("--tpot-slo-ms", type=float, default=None,
                   help="p99 time per output token to keep; within it, the largest batches")
    g.add_argument("--twin-params", default=None,
                   help="the GPU's twin params JSON (`ondo twin fit`; default: the packaged "
                        "H100 fit, and for the live twin the packaged fit of the closest GPU "
                        "model by NVML name)")
    g.add_argument("--twin-adapt", choices=("on", "off"), default="on",
                   help="adapt the live twin's constants to this GPU online, saved per GPU "
                        "in --telemetry-db and resumed at the next start (default on)")
