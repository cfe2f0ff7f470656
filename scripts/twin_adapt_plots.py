"""Draw docs/img/twin_adapt_*.png: the online twin on a trace, starting from the packaged H100
constants: readings vs the forecast made 10 s earlier with its band, the power, and the
adapted constants converging (docs/twin.md, "Online adaptation").

Needs matplotlib (not an ondo dependency): PYTHONPATH=. python3 scripts/twin_adapt_plots.py
"""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from ondo.events.trace_input import read_trace_records  # noqa: E402
from ondo.twin.adapt_params import BOUNDS  # noqa: E402
from ondo.twin.adapt_replay import forecast_rows, run_trace, score  # noqa: E402
from ondo.twin.gpu_models import H200_PARAMS_PATH  # noqa: E402
from ondo.twin.params import TwinParams, h100_params  # noqa: E402
from ondo.twin.state_filter import N_X  # noqa: E402
from ondo.twin.synthetic_serving import serving_records  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
HORIZON_S = 10.0
SHOWN = (("die_sink_c_per_w", "R die-sink [C/W]"), ("board_amb_c_per_w", "R board-inlet [C/W]"),
         ("board_c_j_per_c", "C board [J/C]"), ("compute_w", "compute power [W]"),
         ("memory_w", "memory power [W]"), ("hbm_share_of_memory", "HBM share of memory"))
SYNTHETIC = [(20, 0.0), (40, 0.95), (30, 0.0), (60, 0.5), (20, 1.0), (30, 0.0), (40, 0.7),
             (20, 0.0)]


def values(run, name):
    j = [b.name for b in BOUNDS].index(name)
    v = run.z[:, N_X + j]
    return np.exp(v) if BOUNDS[j].log else v


def draw(run, fc, title, path, truth: TwinParams | None = None, inlet_c=None, from_s=30.0):
    t = run.t_s - run.t0_s
    s = score(run, fc, from_s)
    fig, ax = plt.subplots(2 + len(SHOWN) // 2, 2, figsize=(13, 11), sharex=True)
    panels = [(ax[0, 0], run.temp_c, fc.temp_c_pred, fc.temp_c_band, "die temp [C]"),
              (ax[0, 1], run.mem_temp_c, fc.mem_temp_c_pred, fc.mem_temp_c_band, "HBM temp [C]")]
    for a, meas, pred, band, label in panels:
        a.fill_between(t, pred - band, pred + band, color="C1", alpha=0.25, lw=0,
                       label="band (nominal 90 %)")
        a.plot(t, meas, "C0", lw=1, label="measured")
        a.plot(t, pred, "C1", lw=1, label=f"forecast made {HORIZON_S:g} s earlier")
        a.set_ylabel(label)
        a.axvspan(0, from_s, color="0.92", zorder=0)
    ax[0, 0].legend(loc="upper left", fontsize=8)
    ax[1, 0].plot(t, run.power_fast_w, lw=0.5, label="fast power (measured)")
    ax[1, 0].plot(t, fc.power_w_pred, lw=1, label="NVML 1 s power, forecast")
    ax[1, 0].set_ylabel("power [W]")
    ax[1, 0].legend(loc="upper left", fontsize=8)
    ax[1, 1].plot(t, run.z[:, 6], label="inlet (estimated)")
    if inlet_c is not None:
        ax[1, 1].axhline(inlet_c, color="k", ls=":", label="plant's inlet (truth)")
    ax[1, 1].plot(t, run.excited * 2 + np.nanmin(run.z[:, 6]) - 3, lw=1,
                  label="thermal constants free (raised)")
    ax[1, 1].set_ylabel("inlet [C]")
    ax[1, 1].legend(loc="upper left", fontsize=8)
    for k, (name, label) in enumerate(SHOWN):
        a = ax[2 + k // 2, k % 2]
        a.plot(t, values(run, name), "C2")
        if truth is not None:
            ref = {"compute_w": None, "memory_w": None}.get(name, getattr(truth, name, None))
            if ref is not None:
                a.axhline(ref, color="k", ls=":", label="plant (truth)")
                a.legend(loc="upper right", fontsize=8)
        a.set_ylabel(label)
    for a in ax[-1]:
        a.set_xlabel("t [s]")
    fig.suptitle(f"{title}\nfrom {from_s:g} s (unshaded): die {s.temp_rmse_c:.2f} C, "
                 f"HBM {s.mem_temp_rmse_c:.2f} C RMSE; band covers {s.temp_band_coverage:.0%}"
                 f" / {s.mem_temp_band_coverage:.0%}; persistence {s.temp_persistence_rmse_c:.1f}"
                 f" / {s.mem_temp_persistence_rmse_c:.1f} C")
    fig.tight_layout()
    fig.savefig(path, dpi=75)
    plt.close(fig)
    print(path.name, s)


def main():
    out = ROOT / "docs" / "img"
    out.mkdir(parents=True, exist_ok=True)
    traces = ROOT / "data" / "traces"
    for file, label, png in (
            ("ondo_serving_steps_w1_qwen3-0.6b_h200.csv", "H200 serving trace", "h200"),
            ("ondo_serving_mixed_w1_qwen3-0.6b_h200_b.csv.xz",
             "H200 mixed serving (another GPU, never fitted)", "h200_mixed_b"),
            ("ondo_serving_mixed_w1_qwen3-0.6b_h200_c.csv.xz",
             "H200 mixed serving (a third GPU, never fitted)", "h200_mixed_c"),
            ("h100_step.csv", "H100 step trace", "h100_step"),
            ("h100_prbs.csv", "H100 PRBS trace", "h100_prbs")):
        run = run_trace(read_trace_records(traces / file), h100_params())
        draw(run, forecast_rows(run, HORIZON_S),
             f"{label}: the online twin, starting from the packaged H100 constants",
             out / f"twin_adapt_{png}.png")
    truth = TwinParams.load(H200_PARAMS_PATH)
    truth = truth.replace(board_amb_c_per_w=truth.board_amb_c_per_w * 1.6)
    run = run_trace(serving_records(truth, SYNTHETIC, 33.0, seed=3), h100_params())
    draw(run, forecast_rows(run, HORIZON_S),
         "The plant as an unseen GPU (H200 fit, board path x1.6, inlet 33 C): dotted, its "
         "constants", out / "twin_adapt_synthetic.png", truth=truth, inlet_c=33.0)


if __name__ == "__main__":
    main()
