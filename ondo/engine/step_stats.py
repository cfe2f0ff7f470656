"""What one engine step did: the engine's own, zero-lag view of the GPU's load."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class StepStats:
    step_index: int
    start_monotonic_s: float
    end_monotonic_s: float
    num_prefill_tokens: int
    num_decode_tokens: int
    batch_size: int  # sequences in this step
    num_kv_blocks_used: int
    num_kv_blocks_total: int
    num_swapped_blocks: int  # blocks currently held in the CPU swap pool
    num_preemptions: int  # preemptions decided in this step
    num_waiting: int
    num_running: int
    num_swapped: int
    num_output_tokens: int  # tokens sampled in this step
    flops: float  # estimated floating-point operations of the forward pass
    bytes_moved: float  # estimated bytes read/written (weights + KV cache)
    num_waiting_tokens: int = 0  # tokens of the waiting requests: prefill work ahead

    @property
    def duration_s(self) -> float:
        return self.end_monotonic_s - self.start_monotonic_s
