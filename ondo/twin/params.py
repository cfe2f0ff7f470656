"""`TwinParams`: every constant of the GPU plant model, with its unit, and its JSON file."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

H100_PARAMS_PATH = Path(__file__).with_name("h100_params.json")
# Keys a params file may leave out: the engine load map came after the first fits (the
# packaged h100_params.json has none), whose loads are already in the plant's units, so the
# identity map the defaults give is theirs; notes are free text.
OPTIONAL_KEYS = frozenset(
    {"engine_compute_gain", "engine_compute_inv_max", "engine_memory_gain", "notes"}
)


@dataclass(frozen=True)
class TwinParams:
    # DVFS: clocks and the voltage-frequency curve (V linear in f between the two ends).
    sm_max_mhz: float = 1980.0
    sm_min_mhz: float = 345.0
    sm_step_mhz: float = 15.0
    mem_mhz: float = 2619.0
    volt_min_frac: float = 0.65  # V(sm_min) / V(sm_max)
    # Power: idle + compute * a_c * (V/Vmax)^2 (f/fmax) + memory * a_m + leakage.
    idle_power_w: float = 120.0
    leak_w_per_c: float = 0.8
    leak_ref_c: float = 40.0
    compute_power_w: float = 1000.0
    memory_power_w: float = 380.0
    hbm_idle_power_w: float = 20.0  # part of idle power dissipated in the HBM stacks
    hbm_share_of_memory: float = 0.5  # part of memory power dissipated in the HBM stacks
    load_delay_s: float = 0.15  # host-side phase labels lead the GPU's power draw
    # The engine's load descriptor (achieved rate over spec peak) onto the activities above
    # (1.0 = what a full matmul / a full device copy drew); ondo/twin/engine_load.py. Identity
    # by default: the shared traces' phase loads are already in these units.
    engine_compute_gain: float = 1.0  # plant compute activity per unit of the engine's, near 0
    engine_compute_inv_max: float = 0.0  # 1 / the plant compute activity it saturates at; 0: linear
    engine_memory_gain: float = 1.0
    # Thermal RC network: die -> sink <- HBM, sink -> board -> ambient (inlet air).
    die_c_j_per_c: float = 4.0
    hbm_c_j_per_c: float = 4.0
    sink_c_j_per_c: float = 300.0
    board_c_j_per_c: float = 3000.0
    die_sink_c_per_w: float = 0.017
    hbm_sink_c_per_w: float = 0.07
    sink_board_c_per_w: float = 0.015
    board_amb_c_per_w: float = 0.02
    ambient_c: float = 25.0
    # Sensors.
    temp_sensor_tau_s: float = 0.1
    mem_temp_sensor_tau_s: float = 0.1
    power_window_s: float = 1.0
    power_update_s: float = 0.1
    # Power-limit controller (SW power cap, 0x4): integral on a filtered power, rate-limited.
    power_limit_w: float = 700.0
    cap_filter_tau_s: float = 0.05
    cap_gain_mhz_per_w_s: float = 20.0
    cap_slew_down_mhz_per_s: float = 4000.0
    cap_slew_up_mhz_per_s: float = 1500.0
    # Thermal-safety controllers (from NVML facts; the traces never reach them).
    sw_thermal_c: float = 87.0  # NVML max operating temperature: SW thermal slowdown (0x20)
    hw_slowdown_c: float = 89.0  # NVML slowdown threshold: HW thermal slowdown (0x40 | 0x8)
    mem_max_c: float = 95.0  # NVML HBM max: HW thermal slowdown as well
    sw_thermal_gain_mhz_per_c_s: float = 400.0
    sw_thermal_slew_mhz_per_s: float = 4000.0
    hw_slowdown_frac: float = 0.5  # clock multiplier while HW slowdown holds
    hw_hysteresis_c: float = 2.0
    notes: dict = field(default_factory=dict, compare=False)

    def replace(self, **changes) -> TwinParams:
        return dataclasses.replace(self, **changes)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=1, sort_keys=False) + "\n"

    @classmethod
    def from_dict(cls, data: dict) -> TwinParams:
        """The params `data` holds: every constant, each a finite number; ValueError naming
        the keys that are not constants, the constants missing, or a value that is no number
        (a params file cut short, or another JSON file, must not run on the defaults)."""
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = [k for k in data if k not in names]
        if unknown:
            raise ValueError(f"not twin params: unknown keys {_listed(unknown)}")
        missing = [n for n in names if n not in data and n not in OPTIONAL_KEYS]
        if missing:
            raise ValueError(f"not twin params: missing {_listed(missing)}")
        values = {k: v if k == "notes" else _constant(k, v) for k, v in data.items()}
        if not isinstance(values.get("notes", {}), dict):
            raise ValueError(f"notes must be a JSON object, got {json.dumps(values['notes'])}")
        return cls(**values)

    @classmethod
    def load(cls, path: str | Path) -> TwinParams:
        """The params saved at `path`; ValueError saying why where the file holds none."""
        try:
            data = json.loads(Path(path).read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"not a JSON file: {e}") from None
        if not isinstance(data, dict):
            raise ValueError("not twin params (a JSON object of the twin's constants)")
        return cls.from_dict(data)

    def save(self, path: str | Path) -> None:
        """Written only where `load` would take it back: ValueError naming the first
        constant that is not a finite number (a fit gone astray), and nothing written."""
        for f in dataclasses.fields(self):
            if f.name != "notes":
                _constant(f.name, getattr(self, f.name))
        Path(path).write_text(self.to_json())


def _constant(name: str, value: object) -> float:
    """A constant's JSON value as a float; ValueError unless a finite number (JSON's true and
    false are no numbers here, though Python takes them for 1 and 0)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {json.dumps(value)}")
    return float(value)


def _listed(names: list[str], shown: int = 6) -> str:
    """Names for a message: the first few, then how many more (a wrong file lacks them all)."""
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more


def params_from(flag: str, path: str | None) -> TwinParams:
    """The params a command's `flag` names, the packaged H100 fit where it names none;
    ValueError "FLAG PATH: why" where the file cannot be read or holds none."""
    if path is None:
        return h100_params()
    try:
        return TwinParams.load(path)
    except (OSError, ValueError) as e:
        raise ValueError(f"{flag} {path}: {e}") from None


def h100_params() -> TwinParams:
    """The parameters fitted to the shared H100 traces (packaged with ondo)."""
    return TwinParams.load(H100_PARAMS_PATH)
