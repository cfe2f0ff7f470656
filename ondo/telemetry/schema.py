"""The telemetry sample schema: one typed record per GPU poll and per engine step.

Every figure carries its unit in its name, its source (`source`) and its sampling
period (`period_s`). A value the source did not refresh since the previous poll is
named in `stale`; a value whose read failed is None and named in `failed`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntFlag

from ondo.engine.step_stats import StepStats
from ondo.twin.plant import Load


class ThrottleReason(IntFlag):
    """NVML clock-event (throttle) reason bits, as `nvmlDeviceGetCurrentClocksEventReasons`."""

    GPU_IDLE = 0x1
    APPLICATIONS_CLOCKS_SETTING = 0x2
    SW_POWER_CAP = 0x4
    HW_SLOWDOWN = 0x8
    SYNC_BOOST = 0x10
    SW_THERMAL_SLOWDOWN = 0x20
    HW_THERMAL_SLOWDOWN = 0x40
    HW_POWER_BRAKE_SLOWDOWN = 0x80
    DISPLAY_CLOCK_SETTING = 0x100


def throttle_reason_names(mask: int) -> tuple[str, ...]:
    """Decode an NVML clock-event bit mask into lower-case reason names (unknown bits dropped)."""
    return tuple(r.name.lower() for r in ThrottleReason if r.value & mask)  # type: ignore[union-attr]


THROTTLE_REASON_NAMES: tuple[str, ...] = tuple(r.name.lower() for r in ThrottleReason)  # type: ignore[union-attr]

# The measured columns of a GPU sample, in storage and export order.
GPU_VALUE_COLUMNS: tuple[str, ...] = (
    "temp_c",
    "mem_temp_c",
    "power_w",
    "power_instant_w",
    "energy_j",
    "sm_mhz",
    "sm_max_mhz",
    "mem_mhz",
    "throttle_reasons",
    "util_pct",
    "mem_util_pct",
    "mem_used_bytes",
)


@dataclass(frozen=True)
class GpuSample:
    """One poll of one GPU, from NVML, the simulated GPU or a replayed trace."""

    gpu_index: int
    source: str  # "nvml", "sim" or "replay"
    t_monotonic_s: float  # host monotonic clock: the clock every series is aligned on
    t_wall_s: float  # Unix time
    period_s: float  # nominal sampling period of the source
    read_latency_s: float | None  # time spent reading this sample; None where unknown (replay)
    temp_c: float | None = None
    mem_temp_c: float | None = None  # HBM
    power_w: float | None = None  # NVML's ~1 s moving average
    power_instant_w: float | None = None
    energy_j: float | None = None  # monotonic counter since driver load
    sm_mhz: float | None = None
    sm_max_mhz: float | None = None
    mem_mhz: float | None = None
    throttle_reasons: int | None = None  # ThrottleReason bit mask
    util_pct: float | None = None
    mem_util_pct: float | None = None
    mem_used_bytes: int | None = None
    stale: frozenset[str] = field(default_factory=frozenset)
    failed: frozenset[str] = field(default_factory=frozenset)

    @property
    def throttle_names(self) -> tuple[str, ...]:
        return throttle_reason_names(self.throttle_reasons or 0)

    @property
    def sm_clock_ratio(self) -> float | None:
        """SM clock relative to its maximum, None where either is unknown."""
        if self.sm_mhz is None or not self.sm_max_mhz:
            return None
        return self.sm_mhz / self.sm_max_mhz


# Counters and averages that a source refreshes on its own schedule (~100 ms on an
# H100): an unchanged value means "not refreshed", not "the same power again".
REFRESHED_COLUMNS: tuple[str, ...] = ("power_w", "power_instant_w", "energy_j")


def stale_columns(previous: GpuSample | None, current: GpuSample) -> frozenset[str]:
    """Columns of `current` whose value the source did not refresh since `previous`."""
    if previous is None:
        return frozenset()
    return frozenset(
        name
        for name in REFRESHED_COLUMNS
        if getattr(current, name) is not None and getattr(current, name) == getattr(previous, name)
    )


# The engine's load descriptor is the twin's plant input: one type for both.
LoadDescriptor = Load


IDLE_LOAD = LoadDescriptor(0.0, 0.0)

H100_PEAK_FLOPS = 989e12  # dense bf16, SXM
H100_PEAK_BYTES_PER_S = 3.35e12  # HBM3


@dataclass(frozen=True)
class EngineSample:
    """One engine step, with the load it put on the GPU."""

    step_index: int
    start_monotonic_s: float
    end_monotonic_s: float
    t_wall_s: float  # Unix time at end of step
    num_prefill_tokens: int
    num_decode_tokens: int
    num_output_tokens: int
    batch_size: int
    num_kv_blocks_used: int
    num_kv_blocks_total: int
    num_swapped_blocks: int
    num_preemptions: int
    num_waiting: int
    num_running: int
    num_swapped: int
    flops: float
    bytes_moved: float
    compute_activity: float  # FLOP/s over peak FLOP/s, clipped to [0, 1]
    memory_activity: float  # B/s over peak bandwidth, clipped to [0, 1]
    source: str = "engine"
    num_waiting_tokens: int = 0  # tokens of the waiting requests: prefill work ahead (not stored)

    @property
    def duration_s(self) -> float:
        return self.end_monotonic_s - self.start_monotonic_s

    @property
    def load(self) -> LoadDescriptor:
        return LoadDescriptor(self.compute_activity, self.memory_activity)


ENGINE_COLUMNS: tuple[str, ...] = (
    "step_index",
    "start_monotonic_s",
    "end_monotonic_s",
    "t_wall_s",
    "num_prefill_tokens",
    "num_decode_tokens",
    "num_output_tokens",
    "batch_size",
    "num_kv_blocks_used",
    "num_kv_blocks_total",
    "num_swapped_blocks",
    "num_preemptions",
    "num_waiting",
    "num_running",
    "num_swapped",
    "flops",
    "bytes_moved",
    "compute_activity",
    "memory_activity",
)


def _activity(amount: float, duration_s: float, peak_per_s: float) -> float:
    if duration_s <= 0 or peak_per_s <= 0:
        return 0.0
    return min(1.0, max(0.0, amount / duration_s / peak_per_s))


def engine_sample_from_step(
    stats: StepStats,
    t_wall_s: float,
    peak_flops: float = H100_PEAK_FLOPS,
    peak_bytes_per_s: float = H100_PEAK_BYTES_PER_S,
) -> EngineSample:
    """The engine sample of one step; the load descriptor is achieved rate over peak."""
    return EngineSample(
        step_index=stats.step_index,
        start_monotonic_s=stats.start_monotonic_s,
        end_monotonic_s=stats.end_monotonic_s,
        t_wall_s=t_wall_s,
        num_prefill_tokens=stats.num_prefill_tokens,
        num_decode_tokens=stats.num_decode_tokens,
        num_output_tokens=stats.num_output_tokens,
        batch_size=stats.batch_size,
        num_kv_blocks_used=stats.num_kv_blocks_used,
        num_kv_blocks_total=stats.num_kv_blocks_total,
        num_swapped_blocks=stats.num_swapped_blocks,
        num_preemptions=stats.num_preemptions,
        num_waiting=stats.num_waiting,
        num_running=stats.num_running,
        num_swapped=stats.num_swapped,
        flops=stats.flops,
        bytes_moved=stats.bytes_moved,
        compute_activity=_activity(stats.flops, stats.duration_s, peak_flops),
        memory_activity=_activity(stats.bytes_moved, stats.duration_s, peak_bytes_per_s),
        num_waiting_tokens=stats.num_waiting_tokens,
    )


@dataclass(frozen=True)
class RequestSample:
    """One finished request's latencies, on the monotonic clock the engine stamps requests
    with (published where the server sees the request finish)."""

    request_id: str
    arrival_monotonic_s: float
    first_scheduled_monotonic_s: float | None
    first_token_monotonic_s: float | None
    finish_monotonic_s: float
    t_wall_s: float  # Unix time at finish
    num_prompt_tokens: int
    num_output_tokens: int  # of its longest sequence (n > 1: the one that sets TPOT)
    finish_reason: str
    source: str = "server"

    @property
    def ttft_s(self) -> float | None:
        """Arrival to first output token."""
        if self.first_token_monotonic_s is None:
            return None
        return max(self.first_token_monotonic_s - self.arrival_monotonic_s, 0.0)

    @property
    def tpot_s(self) -> float | None:
        """Mean time per output token after the first (None with fewer than two tokens)."""
        if self.first_token_monotonic_s is None or self.num_output_tokens < 2:
            return None
        span_s = self.finish_monotonic_s - self.first_token_monotonic_s
        return max(span_s, 0.0) / (self.num_output_tokens - 1)


def request_sample_from_output(out, finish_monotonic_s: float, t_wall_s: float) -> RequestSample:
    """The RequestSample of a finished `RequestOutput` (ondo.engine.outputs)."""
    m = out.metrics
    return RequestSample(
        request_id=out.request_id,
        arrival_monotonic_s=m.get("arrival_time_s", finish_monotonic_s),
        first_scheduled_monotonic_s=m.get("first_scheduled_s"),
        first_token_monotonic_s=m.get("first_token_s"),
        finish_monotonic_s=finish_monotonic_s,
        t_wall_s=t_wall_s,
        num_prompt_tokens=len(out.prompt_token_ids or ()),
        num_output_tokens=max((len(c.token_ids) for c in out.outputs), default=0),
        finish_reason=(out.outputs[0].finish_reason if out.outputs else None) or "unknown",
    )
