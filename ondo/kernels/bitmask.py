"""Grammar masks on the logits: bit t of a bitmask row (32 tokens per int32 word, little
end first) set means token t may follow. The entry point picks the Triton kernel on a GPU
(one launch, stores only) and the PyTorch reference elsewhere."""

from __future__ import annotations

import torch

_SHIFTS: dict[torch.device, torch.Tensor] = {}


def apply_token_bitmask_ref(logits: torch.Tensor, bitmask: torch.Tensor,
                            rows: torch.Tensor | None) -> None:
    """In place: every token whose bit is 0 in its row's mask gets -inf. Bitmask row i
    belongs to logits row rows[i] (rows None: row i)."""
    shifts = _SHIFTS.get(logits.device)
    if shifts is None:
        shifts = _SHIFTS[logits.device] = torch.arange(32, dtype=torch.int32, device=logits.device)
    vocab = logits.shape[1]
    allowed = ((bitmask.unsqueeze(-1) >> shifts) & 1).view(bitmask.shape[0], -1)[:, :vocab].bool()
    if rows is None:
        logits.masked_fill_(~allowed, float("-inf"))
    else:
        logits[rows] = logits[rows].masked_fill(~allowed, float("-inf"))


def apply_token_bitmask(logits: torch.Tensor, bitmask: torch.Tensor,
                        rows: torch.Tensor | None = None) -> None:
    """`apply_token_bitmask_ref`'s contract, on the logits' device without waiting for it."""
    if logits.is_cuda:
        from ondo.kernels.triton_bitmask import apply_token_bitmask_triton

        apply_token_bitmask_triton(logits, bitmask, rows)
    else:
        apply_token_bitmask_ref(logits, bitmask, rows)
