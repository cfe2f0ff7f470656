"""What the device can do at best, measured in the same run: copy bandwidth and matmul rate."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class DeviceLimits:
    device: str
    copy_bytes_per_s: float  # device-to-device copy, bytes read + written per second
    matmul_flops_per_s: float  # dense bf16 matmul

    def step_bound_s(self, flops: float, bytes_moved: float) -> float:
        return max(bytes_moved / self.copy_bytes_per_s, flops / self.matmul_flops_per_s)


def _time_cuda(fn, repeats: int) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start.record()
    for _ in range(repeats):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3 / repeats


def _copy_bytes_per_s(device: torch.device) -> float:
    src = torch.empty(1 << 30, dtype=torch.bfloat16, device=device)  # 2 GiB each way
    dst = torch.empty_like(src)
    seconds = _time_cuda(lambda: dst.copy_(src), 10)
    return 2 * src.numel() * src.element_size() / seconds


def _matmul_flops_per_s(device: torch.device, m: int = 8192) -> float:
    x = torch.randn(m, m, dtype=torch.bfloat16, device=device)
    y = torch.randn(m, m, dtype=torch.bfloat16, device=device)
    return 2 * m**3 / _time_cuda(lambda: x @ y, 10)


def measure_device_limits(device: torch.device) -> DeviceLimits:
    if device.type != "cuda":
        raise ValueError("the roofline is measured on a CUDA device")
    limits = DeviceLimits(torch.cuda.get_device_name(device), _copy_bytes_per_s(device),
                          _matmul_flops_per_s(device))
    torch.cuda.empty_cache()
    return limits
