"""Kalman filter over the thermal network: true die/HBM/heatsink/board temperatures and the
inlet temperature, from fast signals (power, load) and slow, lagging, integer sensors."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from ondo.twin.fit import N_THERMAL, thermal_matrices
from ondo.twin.params import TwinParams

N_STATE = N_THERMAL + 1  # thermal nodes and sensors, then the inlet temperature
SENSOR_VAR_C2 = 1 / 12 + 0.25  # integer quantisation plus sensor noise
# Process noise densities [C^2/s]: the fast nodes carry the power model's error, the inlet drifts.
Q_DENSITY_C2_PER_S = np.array([4.0, 4.0, 0.05, 0.01, 0.0, 0.0, 0.02])


@dataclass(frozen=True)
class Estimate:
    die_c: float
    hbm_c: float
    sink_c: float
    board_c: float
    die_sensor_c: float
    hbm_sensor_c: float
    ambient_c: float
    die_std_c: float
    hbm_std_c: float
    heading_temp_c: float  # where the die settles if the present power holds
    heading_mem_temp_c: float


@lru_cache(maxsize=256)
def _augmented(params: TwinParams, dt_ms: int):
    _, _, phi, gam = thermal_matrices(params, dt_ms / 1000.0)
    f = np.eye(N_STATE)
    f[:N_THERMAL, :N_THERMAL] = phi
    f[:N_THERMAL, N_THERMAL] = gam[:, 2]
    g = np.zeros((N_STATE, 2))
    g[:N_THERMAL] = gam[:, :2]
    return f, g


class ThermalEstimator:
    """Call `update` once per NVML poll; read `estimate` (or `x`, `p`) at any time."""

    def __init__(
        self,
        params: TwinParams,
        temp_c: float,
        mem_temp_c: float,
        power_w: float,
        hbm_power_w: float,
    ):
        self.params = params
        p = params
        amb = p.ambient_c
        # Start at rest for the present power, shifted so the sensors agree with the readings.
        total = power_w
        board = amb + p.board_amb_c_per_w * total
        sink = board + p.sink_board_c_per_w * total
        die = sink + p.die_sink_c_per_w * (total - hbm_power_w)
        hbm = sink + p.hbm_sink_c_per_w * hbm_power_w
        shift = temp_c - die
        self.x = np.array(
            [temp_c, hbm + shift, sink + shift, board + shift, temp_c, hbm + shift, amb + shift]
        )
        self.x[1] = self.x[5] = mem_temp_c
        self.p = np.diag([1.0, 1.0, 4.0, 9.0, 1.0, 1.0, 16.0])
        self._h = np.zeros((2, N_STATE))
        self._h[0, 4] = self._h[1, 5] = 1.0

    def update(
        self,
        dt_s: float,
        power_w: float,
        hbm_power_w: float,
        temp_c: float | None,
        mem_temp_c: float | None,
    ) -> None:
        """Advance by dt_s under power_w (of which hbm_power_w in the HBM), then fuse readings."""
        dt_ms = max(1, int(round(dt_s * 1000)))
        f, g = _augmented(self.params, dt_ms)
        self.x = f @ self.x + g @ np.array([power_w - hbm_power_w, hbm_power_w])
        self.p = f @ self.p @ f.T + np.diag(Q_DENSITY_C2_PER_S * dt_ms / 1000.0)
        if temp_c is None or mem_temp_c is None:
            return
        y = np.array([temp_c, mem_temp_c]) - self._h @ self.x
        s = self._h @ self.p @ self._h.T + np.eye(2) * SENSOR_VAR_C2
        k = self.p @ self._h.T @ np.linalg.inv(s)
        self.x = self.x + k @ y
        self.p = (np.eye(N_STATE) - k @ self._h) @ self.p

    def estimate(self, power_w: float, hbm_power_w: float) -> Estimate:
        p, x = self.params, self.x
        board = x[6] + p.board_amb_c_per_w * power_w
        sink = board + p.sink_board_c_per_w * power_w
        return Estimate(
            die_c=float(x[0]),
            hbm_c=float(x[1]),
            sink_c=float(x[2]),
            board_c=float(x[3]),
            die_sensor_c=float(x[4]),
            hbm_sensor_c=float(x[5]),
            ambient_c=float(x[6]),
            die_std_c=float(np.sqrt(self.p[0, 0])),
            hbm_std_c=float(np.sqrt(self.p[1, 1])),
            heading_temp_c=float(sink + p.die_sink_c_per_w * (power_w - hbm_power_w)),
            heading_mem_temp_c=float(sink + p.hbm_sink_c_per_w * hbm_power_w),
        )
