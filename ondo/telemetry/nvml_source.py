"""The NVML source: polls every GPU from its own thread and publishes `GpuSample(source="nvml")`.

The nvml module is injected (default: `pynvml` from nvidia-ml-py), so the polling logic runs
without a GPU. A read that fails is counted and its column named in `sample.failed`; a column the
GPU does not support is logged once and not read again; a counter NVML has not refreshed since
the previous poll is named in `sample.stale`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from types import ModuleType
from typing import Any

from ondo.telemetry.gpu_selection import visible_gpu_indices
from ondo.telemetry.hub import TelemetryHub
from ondo.telemetry.polling import PollingThread, period_from_hz
from ondo.telemetry.schema import GpuSample, stale_columns

log = logging.getLogger(__name__)

NVML_FI_DEV_MEMORY_TEMP = 82
NVML_FI_DEV_POWER_INSTANT = 186
_FIELD_COLUMNS = {NVML_FI_DEV_MEMORY_TEMP: "mem_temp_c", NVML_FI_DEV_POWER_INSTANT: "power_instant_w"}
_FIELD_SCALE = {NVML_FI_DEV_MEMORY_TEMP: 1.0, NVML_FI_DEV_POWER_INSTANT: 1e-3}  # °C; mW -> W
_VALUE_MEMBER = {0: "dVal", 1: "uiVal", 2: "ulVal", 3: "ullVal", 4: "sllVal", 5: "siVal", 6: "usVal"}


class NvmlUnavailable(RuntimeError):
    """NVML could not be loaded or initialised, or it sees no GPU."""


def open_nvml(nvml: Any | None = None) -> Any:
    """Import (unless given) and initialise NVML; raise NvmlUnavailable saying why not."""
    if nvml is None:
        try:
            import pynvml as nvml  # nvidia-ml-py
        except ImportError as e:
            raise NvmlUnavailable("the nvidia-ml-py package (module pynvml) is not installed") from e
    try:
        nvml.nvmlInit()
        count = nvml.nvmlDeviceGetCount()
    except Exception as e:  # NVMLError_LibraryNotFound, _DriverNotLoaded, ...
        raise NvmlUnavailable(f"NVML initialisation failed: {e}") from e
    if count == 0:
        nvml.nvmlShutdown()
        raise NvmlUnavailable("NVML sees no GPU")
    return nvml


@dataclass
class _Device:
    index: int
    handle: Any
    sm_max_mhz: float | None
    unsupported: set[str] = field(default_factory=set)
    name: str = ""
    uuid: str = ""
    previous: GpuSample | None = None


class NvmlSource:
    """Polls `gpu_indices` (default: the engine's, else all) at `hz` (default 20, at most 100)."""

    source_name = "nvml"

    def __init__(
        self,
        hub: TelemetryHub,
        hz: float = 20.0,
        nvml: ModuleType | Any | None = None,
        gpu_indices: Sequence[int] | None = None,
        env: Mapping[str, str] | None = None,
    ) -> None:
        """`gpu_indices`: the NVML indices to poll; None: those `CUDA_VISIBLE_DEVICES` in
        `env` names (gpu_selection.py), every GPU where `env` is None or does not set it."""
        self.hub = hub
        self.period_s = period_from_hz(hz)
        self.nvml = open_nvml(nvml)
        try:
            indices = self._select(gpu_indices, env)
        except NvmlUnavailable:
            self.nvml.nvmlShutdown()
            raise
        self.devices = [self._open_device(i) for i in indices]
        self.produced = 0
        self.failed_reads = 0
        self._thread = PollingThread(self.poll_once, self.period_s, name="ondo-telemetry-nvml")

    def _select(self, gpu_indices: Sequence[int] | None,
                env: Mapping[str, str] | None) -> Sequence[int]:
        n = self.nvml.nvmlDeviceGetCount()
        if gpu_indices is None and env is not None:
            uuids = [self._text("nvmlDeviceGetUUID", self.nvml.nvmlDeviceGetHandleByIndex(i))
                     for i in range(n)]
            try:
                gpu_indices = visible_gpu_indices(env, uuids)
            except ValueError as e:
                raise NvmlUnavailable(str(e)) from e
        indices = range(n) if gpu_indices is None else gpu_indices
        if len(indices) == 0:
            raise NvmlUnavailable("no GPU to read: CUDA_VISIBLE_DEVICES names none")
        unknown = [i for i in indices if not 0 <= i < n]
        if unknown:
            raise NvmlUnavailable(f"GPU index {unknown[0]} asked for, NVML sees {n} GPU(s)")
        return indices

    def _open_device(self, index: int) -> _Device:
        handle = self.nvml.nvmlDeviceGetHandleByIndex(index)
        try:
            sm_max_mhz: float | None = float(
                self.nvml.nvmlDeviceGetMaxClockInfo(handle, self.nvml.NVML_CLOCK_SM)
            )
        except Exception as e:
            log.warning("GPU %d: max SM clock unreadable (%s); clock ratio unavailable", index, e)
            sm_max_mhz = None
        return _Device(index, handle, sm_max_mhz, name=self._text(
            "nvmlDeviceGetName", handle), uuid=self._text("nvmlDeviceGetUUID", handle))

    def _text(self, fn: str, handle: Any) -> str:
        """A string NVML gives about a device ("" where it cannot)."""
        try:
            value = getattr(self.nvml, fn)(handle)
        except Exception as e:
            log.debug("%s: %s", fn, e)
            return ""
        return value.decode() if isinstance(value, bytes) else str(value)

    @property
    def gpu_indices(self) -> list[int]:
        """The NVML indices polled, in order."""
        return [d.index for d in self.devices]

    def identity(self, index: int) -> tuple[str, str] | None:
        """(NVML name, UUID) of the GPU at `index`, None if it is not polled."""
        for d in self.devices:
            if d.index == index:
                return d.name, d.uuid
        return None

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._thread.stop()
        try:
            self.nvml.nvmlShutdown()
        except Exception as e:
            log.debug("nvmlShutdown: %s", e)

    def poll_once(self) -> list[GpuSample]:
        samples = [self._read_device(d) for d in self.devices]
        for s in samples:
            self.hub.publish(s)
        return samples

    def _read_device(self, dev: _Device) -> GpuSample:
        nv = self.nvml
        h = dev.handle
        values: dict[str, Any] = {}
        failed: set[str] = set()

        def read(column: str, fn: Callable[[], Any]) -> None:
            if column in dev.unsupported:
                return
            try:
                values[column] = fn()
            except Exception as e:
                self._read_failed(dev, column, e, failed)

        t0 = time.monotonic()
        t_wall_s = time.time()
        read("temp_c", lambda: float(nv.nvmlDeviceGetTemperature(h, nv.NVML_TEMPERATURE_GPU)))
        read("power_w", lambda: nv.nvmlDeviceGetPowerUsage(h) * 1e-3)
        read("energy_j", lambda: nv.nvmlDeviceGetTotalEnergyConsumption(h) * 1e-3)
        read("sm_mhz", lambda: float(nv.nvmlDeviceGetClockInfo(h, nv.NVML_CLOCK_SM)))
        read("mem_mhz", lambda: float(nv.nvmlDeviceGetClockInfo(h, nv.NVML_CLOCK_MEM)))
        read("throttle_reasons", lambda: int(self._clock_event_reasons(h)))
        read("util", lambda: nv.nvmlDeviceGetUtilizationRates(h))
        read("mem_used_bytes", lambda: int(nv.nvmlDeviceGetMemoryInfo(h).used))
        self._read_fields(dev, values, failed)
        read_latency_s = time.monotonic() - t0

        util = values.pop("util", None)
        if util is not None:
            values["util_pct"] = float(util.gpu)
            values["mem_util_pct"] = float(util.memory)
        elif "util" in failed:
            failed.discard("util")
            failed |= {"util_pct", "mem_util_pct"}
        sample = GpuSample(
            gpu_index=dev.index,
            source=self.source_name,
            t_monotonic_s=t0,
            t_wall_s=t_wall_s,
            period_s=self.period_s,
            read_latency_s=read_latency_s,
            sm_max_mhz=dev.sm_max_mhz,
            failed=frozenset(failed),
            **values,
        )
        sample = replace(sample, stale=stale_columns(dev.previous, sample))
        dev.previous = sample
        self.produced += 1
        return sample

    def _clock_event_reasons(self, handle: Any) -> int:
        nv = self.nvml
        fn = getattr(nv, "nvmlDeviceGetCurrentClocksEventReasons", None)
        if fn is None:  # bindings before the 'throttle' -> 'event' rename
            fn = nv.nvmlDeviceGetCurrentClocksThrottleReasons
        return fn(handle)

    def _read_fields(self, dev: _Device, values: dict[str, Any], failed: set[str]) -> None:
        ids = [f for f, col in _FIELD_COLUMNS.items() if col not in dev.unsupported]
        if not ids:
            return
        try:
            results = self.nvml.nvmlDeviceGetFieldValues(dev.handle, ids)
        except Exception as e:
            for f in ids:
                self._read_failed(dev, _FIELD_COLUMNS[f], e, failed)
            return
        for f, fv in zip(ids, results, strict=True):
            column = _FIELD_COLUMNS[f]
            if fv.nvmlReturn != 0:
                self._read_failed(dev, column, fv.nvmlReturn, failed)
                continue
            member = _VALUE_MEMBER.get(int(fv.valueType), "uiVal")
            values[column] = float(getattr(fv.value, member)) * _FIELD_SCALE[f]

    def _read_failed(self, dev: _Device, column: str, error: Any, failed: set[str]) -> None:
        code = getattr(error, "value", error)
        if code == getattr(self.nvml, "NVML_ERROR_NOT_SUPPORTED", 3):
            dev.unsupported.add(column)
            log.info("GPU %d: NVML does not support %s; not reading it again", dev.index, column)
            return
        self.failed_reads += 1
        failed.add(column)
        log.debug("GPU %d: NVML read of %s failed: %s", dev.index, column, error)
