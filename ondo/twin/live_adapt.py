"""The online twin in `ondo serve`: which constants it starts from, and their saving.

On a start, for the GPU the telemetry reads (NVML name and UUID):
1. the base constants: `--twin-params` if given, else the packaged fit of the closest GPU
   model by NVML name (`gpu_models.py`);
2. with adaptation on (`--twin-adapt on`, the default), the constants last saved for that
   UUID in the telemetry database (`--telemetry-db`), if any, else the base's;
3. a `LiveTwin` forecasting with them, publishing its adapted constants every
   PERSIST_PERIOD_S and at shutdown (the store appends them to `twin_params`).

With several GPUs (`start_live_twins`) each gets all three of its own, by its UUID.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np

from ondo.telemetry.hub import TelemetryHub
from ondo.twin.adaptive import AdaptiveTwin
from ondo.twin.gpu_models import GpuIdentity, packaged_params_for
from ondo.twin.live import LiveTwin
from ondo.twin.params import TwinParams
from ondo.twin.state_filter import I_INLET
from ondo.twin.store_tables import (
    PERSIST_PERIOD_S,
    AdaptedConstants,
    latest_constants,
    params_record,
)

log = logging.getLogger(__name__)


def constants_record(twin: AdaptiveTwin, identity: GpuIdentity,
                     base_label: str) -> AdaptedConstants | None:
    """The twin's adapted constants now, None before its first sample."""
    if twin.filter is None:
        return None
    return AdaptedConstants(
        gpu_uuid=identity.uuid, gpu_name=identity.name, gpu_index=identity.index,
        t_wall_s=time.time(), t_monotonic_s=time.monotonic(), base=base_label,
        units=twin.units, theta=tuple(float(v) for v in twin.theta),
        theta_var=tuple(float(v) for v in twin.theta_var),
        inlet_c=float(twin.filter.x[I_INLET]), samples=twin.samples,
        excited_s=twin.excited_s, teachings=twin.teacher.teachings,
        rejected=twin.rejected(), params=params_record(twin.params()))


def start_live_twin(hub: TelemetryHub, identity: GpuIdentity | None,
                    params: TwinParams | None, adapt: bool = True,
                    db_path: str | Path | None = None) -> LiveTwin:
    """A started LiveTwin for `identity`'s GPU; `params`: the constants the operator gave
    (None: the packaged fit of the closest model)."""
    gpu_index = identity.index if identity is not None else 0
    if params is not None:
        base, label = params, "--twin-params"
    else:
        base, label = packaged_params_for(identity.name if identity else None)
    if not adapt:
        log.info("twin: constants %s, not adapted (--twin-adapt off)", label)
        return LiveTwin(hub, base, gpu_index).start()
    theta = var = None
    if db_path is not None and identity is not None and identity.uuid:
        saved = latest_constants(db_path, identity.uuid)
        if saved is not None:
            theta, var = np.array(saved.theta), np.array(saved.theta_var)
            log.info("twin: GPU %s (%s) resumes the constants saved %s (%d samples, %.0f s "
                     "identifiable)", identity.uuid, identity.name,
                     time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(saved.t_wall_s)),
                     saved.samples, saved.excited_s)
    if theta is None:
        log.info("twin: adapting from %s", label)
    twin = AdaptiveTwin(base, "engine", theta, var, gpu_index)
    ident = identity or GpuIdentity(gpu_index, "", "")
    record = (lambda: constants_record(twin, ident, label)) if ident.uuid else None
    return LiveTwin(hub, base, gpu_index, adaptive=twin, constants_record=record,
                    persist_period_s=PERSIST_PERIOD_S).start()


def start_live_twins(hub: TelemetryHub, identities: list[GpuIdentity | None],
                     params: TwinParams | None, adapt: bool = True,
                     db_path: str | Path | None = None) -> list[LiveTwin]:
    """One started LiveTwin per GPU (its own estimator, plant constants and saved record,
    by UUID); `identities`: the GPUs' in the source's order."""
    return [start_live_twin(hub, ident, params, adapt, db_path) for ident in identities]


def gpu_identity(gpu_source, index: int = 0) -> GpuIdentity | None:
    """The identity the telemetry's GPU source reports (None if it reports none)."""
    ident = getattr(gpu_source, "identity", None)
    got = ident(index) if callable(ident) else None
    return GpuIdentity(index, got[0], got[1]) if got else None


def gpu_identities(gpu_source, indices: list[int]) -> list[GpuIdentity | None]:
    """`gpu_identity` of each of `indices`; an index the source names no GPU for keeps its
    index (the twin for it is not resumed from a saved record)."""
    return [gpu_identity(gpu_source, i) or GpuIdentity(i, "", "") for i in indices]
