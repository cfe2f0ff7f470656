"""How long a simulated step takes on the GPU, from what it must move and compute.

    t = host_s + per_seq_s * n + memory_factor * bytes / copy_bytes_per_s
        + compute_factor * flops / matmul_flops_per_s * f_max / f

`copy_bytes_per_s` and `matmul_flops_per_s` are the device's measured ceilings (the copy
bandwidth and bf16 matmul rate `ondo bench throughput` records with each run); the factors
say how far a real step stays from them (kernels that do not reach the ceilings, launches,
attention's own efficiency), `host_s` and `per_seq_s` what the host spends per step and per
sequence in it. The compute term runs at the SM clock f the plant reports, so a throttled GPU
runs its steps slower; HBM runs on its own clock, which no throttle reason here lowers.

The constants are fitted by non-negative least squares on the per-step durations of a
recorded serving trace (engine rows: start, end, FLOPs, bytes, batch size) of the same GPU
and engine (`fit_step_time`); `h100_step_time.json` holds the H100's, with its provenance
and its residuals, and `calibration.py` checks it against the committed throughput results.
"""

from __future__ import annotations

import csv
import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy.optimize import nnls

H100_STEP_TIME_PATH = Path(__file__).with_name("h100_step_time.json")


@dataclass(frozen=True)
class StepTimeModel:
    copy_bytes_per_s: float
    matmul_flops_per_s: float
    host_s: float
    per_seq_s: float
    memory_factor: float
    compute_factor: float
    sm_max_mhz: float = 1980.0
    notes: dict = field(default_factory=dict, compare=False)

    def step_s(self, flops: float, bytes_moved: float, num_seqs: int,
               sm_mhz: float | None = None) -> float:
        slow = 1.0 if not sm_mhz else self.sm_max_mhz / max(sm_mhz, 1.0)
        return (self.host_s + self.per_seq_s * num_seqs
                + self.memory_factor * bytes_moved / self.copy_bytes_per_s
                + self.compute_factor * flops / self.matmul_flops_per_s * slow)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(dataclasses.asdict(self), indent=1) + "\n")

    @classmethod
    def load(cls, path: str | Path = H100_STEP_TIME_PATH) -> StepTimeModel:
        return cls(**json.loads(Path(path).read_text()))


@dataclass(frozen=True)
class TraceSteps:
    """The engine rows of a serving trace."""

    duration_s: np.ndarray
    flops: np.ndarray
    bytes_moved: np.ndarray
    batch_size: np.ndarray
    prefill_tokens: np.ndarray


def read_trace_steps(path: str | Path) -> TraceSteps:
    cols: dict[str, list[float]] = {k: [] for k in (
        "start_monotonic_s", "end_monotonic_s", "flops", "bytes_moved", "batch_size",
        "num_prefill_tokens")}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            if row.get("kind") != "engine":
                continue
            for k, values in cols.items():
                values.append(float(row[k]))
    a = {k: np.asarray(v) for k, v in cols.items()}
    return TraceSteps(a["end_monotonic_s"] - a["start_monotonic_s"], a["flops"],
                      a["bytes_moved"], a["batch_size"], a["num_prefill_tokens"])


def fit_step_time(steps: TraceSteps, copy_bytes_per_s: float, matmul_flops_per_s: float,
                  notes: dict | None = None) -> tuple[StepTimeModel, dict[str, float]]:
    """Fit on steps that ran back to back (each step's span is its own time on the GPU, as
    in a trace recorded with synchronous steps); residuals by name."""
    x = np.stack([np.ones_like(steps.flops), steps.batch_size,
                  steps.bytes_moved / copy_bytes_per_s, steps.flops / matmul_flops_per_s], 1)
    coef, _ = nnls(x, steps.duration_s)
    model = StepTimeModel(copy_bytes_per_s, matmul_flops_per_s, float(coef[0]), float(coef[1]),
                          float(coef[2]), float(coef[3]), notes=notes or {})
    return model, step_time_errors(model, steps)


def step_time_errors(model: StepTimeModel, steps: TraceSteps) -> dict[str, float]:
    pred = np.array([model.step_s(f, b, int(n)) for f, b, n in
                     zip(steps.flops, steps.bytes_moved, steps.batch_size)])
    err = pred - steps.duration_s
    prefill = steps.prefill_tokens > 0
    return {
        "steps": int(len(err)),
        "rms_ms": float(np.sqrt(np.mean(err**2)) * 1e3),
        "mean_abs_pct": float(np.mean(np.abs(err) / steps.duration_s) * 100),
        "total_pct": float((pred.sum() / steps.duration_s.sum() - 1) * 100),
        "decode_mean_abs_pct": float(np.mean(np.abs(err[~prefill]) / steps.duration_s[~prefill])
                                     * 100) if (~prefill).any() else float("nan"),
        "prefill_mean_abs_pct": float(np.mean(np.abs(err[prefill]) / steps.duration_s[prefill])
                                      * 100) if prefill.any() else float("nan"),
    }
