"""Which GPUs the telemetry reads: those the engine uses, in `CUDA_VISIBLE_DEVICES` order.

`CUDA_VISIBLE_DEVICES` names devices by index or by UUID (a `GPU-...` prefix is enough, as
CUDA accepts); unset, every GPU NVML sees is read. The index kept in each sample is NVML's
(`GpuSample.gpu_index`), which is also the one `nvidia-smi` shows. NVML orders devices by PCI
bus; CUDA does the same only with `CUDA_DEVICE_ORDER=PCI_BUS_ID` (the default on a host whose
GPUs are all of one model is the same order in practice, and the UUID form is exact)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence


def visible_gpu_indices(env: Mapping[str, str], uuids: Sequence[str]) -> list[int] | None:
    """NVML indices of the devices `CUDA_VISIBLE_DEVICES` in `env` names, in its order;
    None where it is unset (every GPU). `uuids[i]`: NVML's UUID of device i. CUDA stops at
    the first entry it cannot resolve; so does this (ValueError if that is the first)."""
    value = env.get("CUDA_VISIBLE_DEVICES")
    if value is None:
        return None
    chosen: list[int] = []
    for raw in value.split(","):
        entry = raw.strip()
        index = _resolve(entry, uuids)
        if index is None or index in chosen:
            break
        chosen.append(index)
    if not chosen and value.strip():
        raise ValueError(f"CUDA_VISIBLE_DEVICES={value!r} names no GPU of the "
                         f"{len(uuids)} NVML sees")
    return chosen


def _resolve(entry: str, uuids: Sequence[str]) -> int | None:
    if entry.isdigit():
        i = int(entry)
        return i if i < len(uuids) else None
    if entry.startswith(("GPU-", "MIG-")):
        hits = [i for i, u in enumerate(uuids) if u.startswith(entry)]
        return hits[0] if len(hits) == 1 else None
    return None


def source_gpu_indices(source: object) -> list[int]:
    """The GPU indices a telemetry source publishes samples for ([0] if it does not say)."""
    indices = getattr(source, "gpu_indices", None)
    if indices is not None:
        return list(indices)
    devices = getattr(source, "devices", None)
    if devices is not None:
        return [d.index for d in devices]
    return [int(getattr(source, "gpu_index", 0))]
