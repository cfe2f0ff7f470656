"""The slowly varying constants the twin adapts online, their physical bounds, and the map
between that parameter vector and `TwinParams`.

theta (in this order; R and C as natural logs, so a step moves them by a factor):

    0 ln die_sink_c_per_w     3 ln board_amb_c_per_w    6 hbm_idle_power_w     9 compute_w
    1 ln hbm_sink_c_per_w     4 ln sink_c_j_per_c       7 hbm_share_of_memory 10 memory_w
    2 ln sink_board_c_per_w   5 ln board_c_j_per_c      8 idle_power_w

and beside them, in the filter's state, the inlet temperature.

The load-to-power map is linear in theta:

    P = idle_power_w + leak_w_per_c (T_die - leak_ref_c) + compute_w f_c + memory_w m

with m the memory activity and f_c the compute feature. On a serving trace (`units`
"engine": achieved rate over spec peak) f_c = (1 - exp(-knee e_c)) v(f)^2 f/f_max: a decode
step keeps the SMs busy at a few percent of peak FLOP/s and a prefill step does not draw
proportionally more, so compute power saturates at `compute_w`; `knee` is fixed (it is the
fitted engine map's g_c * s where the base has one, else DEFAULT_ENGINE_KNEE). On the NVML
traces (`units` "plant": 1.0 = a full matmul) f_c = a_c v(f)^2 f/f_max, as in the plant.
Either way the result is an ordinary `TwinParams` the plant, the predictor and the governor
run unchanged (`params_from_theta`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from ondo.twin.params import TwinParams

Units = Literal["engine", "plant"]

# The fitted engine maps' knees (g_c * s): 27 on the H100 serving trace, 74 on the H200 one
# (docs/twin.md); the power fit's residual hardly moves across that range.
DEFAULT_ENGINE_KNEE = 45.0
INLET_BOUNDS_C = (-10.0, 70.0)


@dataclass(frozen=True)
class Bound:
    """One adapted constant: its `TwinParams` field (or the map's name), physical range,
    whether theta holds its log, the prior's standard deviation and the drift allowed
    (standard deviation per sqrt(second), in theta's units) while it is identifiable."""

    name: str
    lo: float
    hi: float
    log: bool
    prior_std: float
    drift_per_sqrt_s: float


BOUNDS: tuple[Bound, ...] = (
    Bound("die_sink_c_per_w", 0.002, 0.1, True, 0.7, 0.01),
    Bound("hbm_sink_c_per_w", 0.005, 0.3, True, 0.7, 0.01),
    Bound("sink_board_c_per_w", 0.002, 0.1, True, 0.7, 0.01),
    Bound("board_amb_c_per_w", 0.002, 0.1, True, 0.7, 0.01),
    Bound("sink_c_j_per_c", 1.0, 2000.0, True, 1.0, 0.01),
    Bound("board_c_j_per_c", 30.0, 20000.0, True, 1.0, 0.01),
    Bound("hbm_idle_power_w", 0.0, 200.0, False, 30.0, 0.5),
    Bound("hbm_share_of_memory", 0.0, 1.0, False, 0.3, 0.005),
    Bound("idle_power_w", 20.0, 500.0, False, 40.0, 1.0),
    Bound("compute_w", 0.0, 2000.0, False, 400.0, 3.0),
    Bound("memory_w", 0.0, 1500.0, False, 300.0, 3.0),
)
NAMES: tuple[str, ...] = tuple(b.name for b in BOUNDS)
N_THETA = len(BOUNDS)
THERMAL = np.arange(0, 8)  # identifiable only while the power moves: frozen otherwise
POWER = np.arange(8, 11)
I_HBM_IDLE, I_SHARE, I_IDLE, I_COMPUTE, I_MEMORY = 6, 7, 8, 9, 10
LO = np.array([np.log(b.lo) if b.log else b.lo for b in BOUNDS])
HI = np.array([np.log(b.hi) if b.log else b.hi for b in BOUNDS])
PRIOR_VAR = np.array([b.prior_std for b in BOUNDS]) ** 2
DRIFT_VAR_PER_S = np.array([b.drift_per_sqrt_s for b in BOUNDS]) ** 2


def clip_theta(theta: np.ndarray) -> np.ndarray:
    """theta inside its physical bounds; a non-finite entry goes to the middle of its range."""
    t = np.where(np.isfinite(theta), theta, 0.5 * (LO + HI))
    return np.clip(t, LO, HI)


def engine_knee(base: TwinParams) -> float:
    s = base.engine_compute_inv_max
    return base.engine_compute_gain * s if s > 0 else DEFAULT_ENGINE_KNEE


def theta_from_params(base: TwinParams, units: Units) -> np.ndarray:
    """The adapted constants of `base` (clipped to their bounds)."""
    if units == "engine":
        s = base.engine_compute_inv_max
        knee = engine_knee(base)
        # A linear map is matched at small activity: compute_w knee e_c = P_comp g_c e_c.
        compute_w = base.compute_power_w / s if s > 0 else (
            base.compute_power_w * base.engine_compute_gain / knee)
        memory_w = base.memory_power_w * base.engine_memory_gain
    else:
        compute_w, memory_w = base.compute_power_w, base.memory_power_w
    values = {f: getattr(base, f) for f in NAMES[:9]}
    values.update(compute_w=compute_w, memory_w=memory_w)
    raw = np.array([np.log(values[b.name]) if b.log else values[b.name] for b in BOUNDS])
    return clip_theta(raw)


def params_from_theta(base: TwinParams, theta: np.ndarray, units: Units,
                      knee: float) -> TwinParams:
    """`base` with the adapted constants of `theta` (clipped to their bounds first)."""
    t = clip_theta(np.asarray(theta, dtype=float))
    values = {b.name: float(np.exp(v) if b.log else v) for b, v in zip(BOUNDS, t)}
    compute_w, memory_w = values.pop("compute_w"), values.pop("memory_w")
    values.update(compute_power_w=compute_w, memory_power_w=memory_w)
    if units == "engine":
        # a_c = 1 - exp(-knee e_c), a_m = e_m: compute_w and memory_w are the plant's powers.
        values.update(engine_compute_gain=knee, engine_compute_inv_max=1.0,
                      engine_memory_gain=1.0)
    return base.replace(**values)


def compute_feature(units: Units, knee: float, compute_activity, sm_frac, volt_frac):
    """f_c of the power map for a compute activity at a clock (sm_frac = f/f_max, volt_frac
    = V(f)/V_max)."""
    a = np.asarray(compute_activity, dtype=float)
    shaped = -np.expm1(-knee * a) if units == "engine" else a
    return shaped * volt_frac * volt_frac * sm_frac
