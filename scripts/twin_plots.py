"""Draw docs/img/twin_*.png (measured vs twin, 10 s ahead) and print the step-response times.

Needs matplotlib (not an ondo dependency): pip install matplotlib; python3 scripts/twin_plots.py"""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from ondo.twin.fit import thermal_matrices  # noqa: E402
from ondo.twin.params import h100_params  # noqa: E402
from ondo.twin.replay import replay, score  # noqa: E402
from ondo.twin.traces import read_trace  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
HORIZON_S = 10.0


def step_response_times(p):
    a, _, _, _ = thermal_matrices(p, 0.01)
    taus = sorted(-1 / np.linalg.eigvals(a).real)
    _, _, phi, gam = thermal_matrices(p, 0.01)
    x = np.zeros(6)
    u = np.array([600.0, 100.0, 0.0])
    die = []
    for _ in range(40000):
        x = phi @ x + gam @ u
        die.append(x[4])
    die = np.array(die)
    t = 0.01 * np.arange(1, len(die) + 1)
    final = die[-1]
    return taus, {f: float(t[np.argmax(die >= f * final)]) for f in (0.63, 0.86)}


def main():
    p = h100_params()
    taus, times = step_response_times(p)
    print("thermal time constants [s]:", ", ".join(f"{x:.3g}" for x in taus))
    print(f"die step response: 63% at {times[0.63]:.1f} s, 86% at {times[0.86]:.1f} s")
    out = ROOT / "docs" / "img"
    out.mkdir(parents=True, exist_ok=True)
    for name in ("h100_step", "h100_prbs"):
        tr = read_trace(ROOT / "data" / "traces" / f"{name}.csv")
        rep = replay(p, tr, HORIZON_S)
        sc = score(rep, tr, start_s=77.0 if name == "h100_prbs" else -np.inf)
        print(name, sc)
        fig, ax = plt.subplots(5, 1, figsize=(11, 12), sharex=True)
        ax[0].plot(tr.t_s, tr.temp_c, label="measured")
        ax[0].plot(tr.t_s, rep.temp_c_pred, label=f"twin, {HORIZON_S:g} s ahead")
        ax[0].set_ylabel("die temp [C]")
        ax[1].plot(tr.t_s, tr.mem_temp_c)
        ax[1].plot(tr.t_s, rep.mem_temp_c_pred)
        ax[1].set_ylabel("HBM temp [C]")
        ax[2].plot(tr.t_s, tr.power_w)
        ax[2].plot(tr.t_s, rep.power_w_pred)
        ax[2].set_ylabel("power (1 s avg) [W]")
        ax[3].plot(tr.t_s, tr.sm_mhz)
        ax[3].plot(tr.t_s, rep.sm_mhz_pred)
        ax[3].set_ylabel("SM clock [MHz]")
        ax[4].plot(tr.t_s, (tr.throttle_reasons & 4) > 0)
        ax[4].plot(tr.t_s, rep.power_cap_pred.astype(float) * 0.95)
        ax[4].plot(
            tr.t_s, rep.thermal_slowdown_pred.astype(float) * 0.9, label="twin thermal slowdown"
        )
        ax[4].set_ylabel("SW power cap")
        ax[4].set_xlabel("t [s]")
        ax[0].legend(loc="lower right")
        if name == "h100_prbs":
            for a_ in ax:
                a_.axvspan(0, 77, color="0.9", zorder=0)
            ax[0].text(2, tr.temp_c.max() - 2, "fit data (shaded)")
        fig.suptitle(f"{name}: measured vs twin forecast made {HORIZON_S:g} s earlier")
        fig.tight_layout()
        fig.savefig(out / f"twin_{name}.png", dpi=80)
        plt.close(fig)


if __name__ == "__main__":
    main()
