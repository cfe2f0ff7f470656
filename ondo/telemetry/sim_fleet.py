"""Several simulated GPUs, one plant each, polled together: what a host with N GPUs shows,
for running the per-GPU twin and governor without one. Every GPU follows the engine's load
(as the GPUs of one tensor-parallel engine do); each has its own inlet temperature.

    ondo serve --telemetry sim --sim-gpus 2 --sim-inlet-c 25,38
"""

from __future__ import annotations

from collections.abc import Sequence

from ondo.telemetry.hub import TelemetryHub
from ondo.telemetry.polling import PollingThread, period_from_hz
from ondo.telemetry.schema import GpuSample
from ondo.telemetry.sim_source import EngineLoadFollower, SimulatedGpuSource
from ondo.twin.params import h100_params
from ondo.twin.plant import GpuPlant

DEFAULT_INLET_C = 25.0
MAX_SIM_GPUS = 64


def sim_inlets(num_gpus: int, inlet_c: Sequence[float] | None) -> list[float]:
    """One inlet temperature per GPU: `inlet_c` as given (one value: for all), else the
    default; ValueError naming the flag otherwise."""
    if not 1 <= num_gpus <= MAX_SIM_GPUS:
        raise ValueError(f"--sim-gpus {num_gpus}: give 1 to {MAX_SIM_GPUS}")
    if not inlet_c:
        return [DEFAULT_INLET_C] * num_gpus
    for c in inlet_c:
        if not -20.0 <= c <= 60.0:
            raise ValueError(f"--sim-inlet-c {c:g}: an inlet temperature is -20 to 60 °C")
    if len(inlet_c) == 1:
        return [float(inlet_c[0])] * num_gpus
    if len(inlet_c) != num_gpus:
        raise ValueError(f"--sim-inlet-c: {len(inlet_c)} temperatures for --sim-gpus "
                         f"{num_gpus}; give one, or one per GPU")
    return [float(c) for c in inlet_c]


def parse_inlets(text: str | None) -> list[float] | None:
    """`--sim-inlet-c 25,38` -> [25.0, 38.0]; ValueError naming the flag and the value."""
    if text is None:
        return None
    try:
        return [float(part) for part in text.split(",")]
    except ValueError:
        raise ValueError(f"--sim-inlet-c {text!r}: give °C values separated by commas, "
                         "e.g. 25,38") from None


class SimulatedGpuFleet:
    """`len(inlet_c)` simulated GPUs (indices 0..N-1), stepped by one polling thread."""

    source_name = "sim"

    def __init__(self, hub: TelemetryHub, hz: float = 20.0,
                 inlet_c: Sequence[float] = (DEFAULT_INLET_C,)) -> None:
        self.hub = hub
        self.period_s = period_from_hz(hz)
        self._follower = EngineLoadFollower(hub)
        params = h100_params()
        self.gpus = [
            SimulatedGpuSource(hub, hz, GpuPlant(params, ambient_c=c), self._follower,
                               ambient_c=c, gpu_index=i)
            for i, c in enumerate(inlet_c)
        ]
        self._thread = PollingThread(self.poll_once, self.period_s, name="ondo-telemetry-sim")

    @property
    def gpu_indices(self) -> list[int]:
        return [g.gpu_index for g in self.gpus]

    @property
    def produced(self) -> int:
        return sum(g.produced for g in self.gpus)

    def poll_once(self) -> list[GpuSample]:
        return [g.poll_once() for g in self.gpus]

    def identity(self, index: int) -> tuple[str, str] | None:
        for g in self.gpus:
            if g.gpu_index == index:
                return g.identity(index)
        return None

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._thread.stop()
        self._follower.close()
