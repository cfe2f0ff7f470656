"""Small host arrays onto the device in one copy: each array is written into one pinned
staging buffer, the buffer goes over in one non-blocking copy, and each array comes back as
a typed view of the device copy, at a 16-byte aligned offset (Triton specializes a kernel on
whether each pointer is a multiple of 16: a view off that would compile the kernel again,
in the middle of serving). A step's batch is some ten arrays of a few kilobytes; copied one
by one, each paid a pinned allocation, a staging copy and a launch. The caching host
allocator keeps a pinned block from reuse until the copy that read it has run, so nothing
here waits for the device.
"""

from __future__ import annotations

import numpy as np
import torch

_ALIGN = 16


def to_device(arrays: list[np.ndarray], device: torch.device, packed: bool | None = None) -> list[torch.Tensor]:
    """`arrays` on `device`, in order, shapes and dtypes kept. On a CPU device the arrays'
    own memory (no copy), unless `packed` asks for the staging path (pageable there)."""
    if packed is None:
        packed = device.type == "cuda"
    if not packed:
        return [torch.from_numpy(np.ascontiguousarray(a)) for a in arrays]
    offsets = []
    total = 0
    for a in arrays:
        offsets.append(total)
        total += -(-a.nbytes // _ALIGN) * _ALIGN
    staging = torch.empty(max(total, _ALIGN), dtype=torch.uint8, pin_memory=device.type == "cuda")
    host = staging.numpy()
    for a, off in zip(arrays, offsets, strict=True):
        host[off : off + a.nbytes] = np.ascontiguousarray(a).view(np.uint8).reshape(-1)
    on_device = staging.to(device, non_blocking=True)
    return [on_device[off : off + a.nbytes].view(_torch_dtype(a.dtype)).view(a.shape)
            for a, off in zip(arrays, offsets, strict=True)]


_DTYPES: dict[np.dtype, torch.dtype] = {}


def _torch_dtype(dtype: np.dtype) -> torch.dtype:
    if dtype not in _DTYPES:
        _DTYPES[dtype] = torch.from_numpy(np.empty(0, dtype=dtype)).dtype
    return _DTYPES[dtype]
