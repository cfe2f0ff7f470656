"""Where the simulator's H100 comes from, and how well it matches what ondo measured.

- The plant: the packaged H100 twin (`ondo/twin/h100_params.json`) with its engine load map
  fitted on ondo's own H100 serving trace (`data/traces/ondo_serving_w1_qwen3-0.6b_h100.csv`,
  the whole trace), as `ondo twin fit --engine-load` does: `h100_serving_params.json`.
- The step time: `fit_step_time` on the same trace's engine rows (1,024 steps of W1 on the
  Qwen3-0.6B shape, synchronous steps), with the copy and matmul ceilings of the H100
  throughput results of the build that trace ran, 2026-11-24
  (`bench/results/throughput-h100-qwen3-0.6b-2026-11-24.json`): `h100_step_time.json`.
- The check (`check_throughput`): W1, W2 and W3 replayed offline in the simulator (all
  requests at t = 0, the engine settings of those results) against their measured step
  counts and mean step times.

    python3 -m ondo.control.sim.calibration            # refit both files and print the check
    python3 -m ondo.control.sim.calibration --check    # the check only, from the packaged files

Needs the repository's `data/` and `bench/results/` (not part of the installed package).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ondo.control.sim.arrivals import SimRequest
from ondo.control.sim.step_time import (
    H100_STEP_TIME_PATH,
    StepTimeModel,
    fit_step_time,
    read_trace_steps,
    step_time_errors,
)
from ondo.twin.params import TwinParams

REPO = Path(__file__).resolve().parents[3]
H100_TRACE = REPO / "data/traces/ondo_serving_w1_qwen3-0.6b_h100.csv"
H100_THROUGHPUT = REPO / "bench/results/throughput-h100-qwen3-0.6b-2026-11-24.json"
H100_SERVING_PARAMS_PATH = Path(__file__).with_name("h100_serving_params.json")


def h100_serving_params() -> TwinParams:
    """The simulator's GPU: the H100 twin with the engine load map of ondo's serving trace."""
    return TwinParams.load(H100_SERVING_PARAMS_PATH)


def h100_step_time() -> StepTimeModel:
    return StepTimeModel.load(H100_STEP_TIME_PATH)


def _throughput_rows(path: Path = H100_THROUGHPUT) -> dict[str, dict]:
    return {r["workload"]: r for r in json.loads(path.read_text()) if "steps" in r}


def fit_h100_step_time(trace: Path = H100_TRACE,
                       throughput: Path = H100_THROUGHPUT) -> tuple[StepTimeModel, dict]:
    row = _throughput_rows(throughput)["W1"]
    notes = {"fitted_on": f"{trace.name} (engine rows)",
             "ceilings_from": f"{throughput.name} W1 row ({row['device']}, {row['date']})"}
    model, residuals = fit_step_time(read_trace_steps(trace), row["copy_gb_per_s"] * 1e9,
                                     row["matmul_tflop_per_s"] * 1e12, notes)
    notes["residuals_on_fit_trace"] = {k: round(v, 3) for k, v in residuals.items()}
    return model, residuals


def fit_h100_plant(trace: Path = H100_TRACE) -> TwinParams:
    from ondo.twin.engine_load import fit_engine_load
    from ondo.twin.params import h100_params
    from ondo.twin.traces import read_trace

    params, _ = fit_engine_load(h100_params(), [read_trace(trace)])
    return params


def check_throughput(model: StepTimeModel | None = None, params: TwinParams | None = None,
                     throughput: Path = H100_THROUGHPUT,
                     workloads: tuple[str, ...] = ("W1", "W2", "W3")) -> dict[str, dict]:
    """Each workload replayed offline in the simulator vs the committed measurement."""
    from ondo.bench.shapes import SHAPES
    from ondo.bench.workloads import make_workload
    from ondo.control.sim.scenarios import qwen3_06b_cost_shape
    from ondo.control.sim.simulator import ClosedLoopSimulator, SimConfig

    model = model or h100_step_time()
    params = params or h100_serving_params()
    rows = _throughput_rows(throughput)
    vocab = SHAPES["qwen3-0.6b"]["vocab_size"]
    out = {}
    for name in workloads:
        row = rows[name]
        wl = make_workload(name, vocab, seed=0)
        reqs = [SimRequest(0.0, len(r.prompt_token_ids), r.max_tokens) for r in wl.requests]
        config = SimConfig(qwen3_06b_cost_shape(), model, params, num_kv_blocks=row["kv_blocks"])
        result = ClosedLoopSimulator(config, reqs).run(10 * row["elapsed_s"] + 60)
        mean_ms = result.step_time_s / result.steps * 1e3
        out[name] = {
            "steps": result.steps, "measured_steps": row["steps"],
            "mean_step_ms": round(mean_ms, 3), "measured_mean_step_ms": round(row["mean_step_ms"], 3),
            "mean_step_error_pct": round((mean_ms / row["mean_step_ms"] - 1) * 100, 2),
            "output_tokens_per_s": round(int(result.output_tokens.sum()) / result.step_time_s, 1),
            "measured_output_tokens_per_s": round(row["output_tokens_per_s"], 1),
        }
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="check the packaged files only")
    args = ap.parse_args(argv)
    if not H100_TRACE.exists():
        print(f"error: {H100_TRACE} not found: run this from a checkout of the repository",
              file=sys.stderr)
        return 2
    if args.check:
        model, params = h100_step_time(), h100_serving_params()
    else:
        model, residuals = fit_h100_step_time()
        params = fit_h100_plant()
        model.save(H100_STEP_TIME_PATH)
        params.save(H100_SERVING_PARAMS_PATH)
        print(f"wrote {H100_STEP_TIME_PATH.name} and {H100_SERVING_PARAMS_PATH.name}")
    print(json.dumps({"per_step_on_trace": step_time_errors(model, read_trace_steps(H100_TRACE)),
                      "offline_replay": check_throughput(model, params)}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
