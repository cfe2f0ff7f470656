"""Draw docs/img/governor_<scenario>.png (temperatures, power and budget, the load level over
time, for off, reactive and predictive in the closed-loop simulator) and
docs/img/governor_tuning.png (every reactive tuning tried against predictive), and print the
figures as JSON lines for docs/governor.md.

Needs matplotlib (not an ondo dependency): pip install matplotlib;
PYTHONPATH=. python3 scripts/governor_plots.py [--tuning]   (a few minutes on one core)"""

import argparse
import itertools
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from ondo.control.reactive import ReactiveTuning  # noqa: E402
from ondo.control.sim.scenarios import (  # noqa: E402
    SCENARIOS,
    WARMUP_S,
    run_policy,
    run_scenario,
)

ROOT = Path(__file__).resolve().parents[1]
COLORS = {"off": "tab:gray", "reactive": "tab:orange", "predictive": "tab:blue"}
TUNING_SEEDS = (1,)  # not the benchmark's trace (seed 0)


def plot_scenario(name: str) -> dict:
    sc = SCENARIOS[name]
    report, results = run_scenario(sc)
    obj = sc.objectives()
    fig, axes = plt.subplots(4, 1, figsize=(10, 10), sharex=True)
    for policy, r in results.items():
        s, c = r.series, COLORS[policy]
        axes[0].plot(s["t_s"], s["temp_c"], color=c, lw=0.6, label=policy)
        axes[1].plot(s["t_s"], s["mem_temp_c"], color=c, lw=0.6, label=policy)
        axes[2].plot(s["t_s"], s["power_w"], color=c, lw=0.8, label=policy)
        axes[3].plot(s["t_s"], s["duty_cycle"], color=c, lw=0.9, label=policy)
    axes[0].axhline(obj.temp_target_c, color="red", ls="--", lw=0.8, label="target")
    axes[0].axhline(sc.params().sw_thermal_c, color="black", ls=":", lw=0.8,
                    label="SW thermal slowdown")
    axes[1].axhline(obj.hbm_temp_target_c, color="red", ls="--", lw=0.8, label="target")
    if obj.power_budget_w is not None:
        axes[2].axhline(obj.power_budget_w, color="red", ls="--", lw=0.8, label="budget")
    axes[0].set_ylabel("die sensor [°C]")
    axes[1].set_ylabel("HBM sensor [°C]")
    axes[2].set_ylabel("NVML 1 s power [W]")
    axes[3].set_ylabel("load level (duty)")
    axes[3].set_xlabel("time [s]")
    for ax in axes:
        ax.axvspan(0, WARMUP_S, color="0.92")
        ax.legend(loc="lower right", fontsize=7, ncol=5)
    fig.suptitle(f"{name}: {sc.description} (grey: before scoring)")
    fig.tight_layout()
    out = ROOT / "docs" / "img" / f"governor_{name.replace('-', '_')}.png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return report


def tuning_sweep() -> dict:
    """Every reactive tuning of a small grid against predictive, on traces the defaults were
    not chosen on: seconds over an objective against throughput."""
    grid = list(itertools.product((0.9, 0.8, 0.7), (0.05,), (1.0, 2.0, 3.0)))
    points: dict = {}
    for name in ("hot-inlet", "power-budget-450w"):
        sc = SCENARIOS[name]
        points[name] = {"reactive": [], "predictive": []}
        for seed in TUNING_SEEDS:
            p = run_policy(sc, "predictive", seed=seed).summary(WARMUP_S)
            points[name]["predictive"].append(
                {"seed": seed, "over_s": p["over_target_s"] + p["over_budget_s"],
                 "output_tokens_per_s": p["output_tokens_per_s"]})
            for beta, alpha, band in grid:
                t = ReactiveTuning(decrease_factor=beta, increase_step=alpha,
                                   temp_hysteresis_c=band, power_hysteresis_w=10.0 * band)
                s = run_policy(sc, "reactive", seed=seed, reactive=t).summary(WARMUP_S)
                points[name]["reactive"].append(
                    {"seed": seed, "beta": beta, "alpha": alpha, "band": band,
                     "over_s": s["over_target_s"] + s["over_budget_s"],
                     "output_tokens_per_s": s["output_tokens_per_s"]})
            print(json.dumps({"tuning": name, "seed": seed}), file=sys.stderr, flush=True)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for ax, (name, pts) in zip(axes, points.items()):
        for seed, marker in zip(TUNING_SEEDS, ("o", "s")):
            r = [q for q in pts["reactive"] if q["seed"] == seed]
            ax.scatter([q["output_tokens_per_s"] for q in r], [q["over_s"] for q in r],
                       color=COLORS["reactive"], marker=marker, s=14,
                       label=f"reactive, {len(r)} tunings, trace {seed}")
            p = [q for q in pts["predictive"] if q["seed"] == seed]
            ax.scatter([q["output_tokens_per_s"] for q in p], [q["over_s"] for q in p],
                       color=COLORS["predictive"], marker=marker, s=60,
                       label=f"predictive (defaults), trace {seed}")
        ax.set_title(name)
        ax.set_xlabel("output tokens/s")
        ax.set_ylabel("seconds over target or budget")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(ROOT / "docs" / "img" / "governor_tuning.png", dpi=110)
    plt.close(fig)
    return points


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tuning", action="store_true", help="also the reactive tuning sweep")
    ap.add_argument("--scenario", nargs="*", default=list(SCENARIOS),
                    help="the scenarios to plot (none: only the sweep)")
    args = ap.parse_args()
    for name in args.scenario:
        print(json.dumps(plot_scenario(name)), flush=True)
    if args.tuning:
        print(json.dumps({"tuning": tuning_sweep()}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
