"""Which GPU the twin runs beside (NVML name and UUID), and the packaged fit it starts from."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ondo.twin.params import H100_PARAMS_PATH, TwinParams

H200_PARAMS_PATH = Path(__file__).with_name("h200_params.json")
# NVML name fragment -> packaged params, the more specific first.
PACKAGED: tuple[tuple[str, Path], ...] = (("H200", H200_PARAMS_PATH), ("H100", H100_PARAMS_PATH))


@dataclass(frozen=True)
class GpuIdentity:
    """One GPU as NVML names it; the UUID is what its adapted constants are saved under."""

    index: int
    name: str
    uuid: str


def packaged_params_for(gpu_name: str | None) -> tuple[TwinParams, str]:
    """(the packaged fit of the closest GPU model, its file name): by NVML name, the H100
    fit when no model matches."""
    for fragment, path in PACKAGED:
        if gpu_name and fragment in gpu_name.upper() and path.exists():
            return TwinParams.load(path), path.name
    return TwinParams.load(H100_PARAMS_PATH), H100_PARAMS_PATH.name
