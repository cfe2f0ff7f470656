"""Test-only: a failure injected into the steps of chosen requests, to check that a step
that fails (as on a GPU out of memory, or a kernel error) ends only its own requests and
the engine goes on.

Set ONDO_INJECT_STEP_FAULT=<request id prefix>[;kind=oom|kernel][;after=N] in the
environment of the process that builds the engine (an engine process inherits it): every
step that schedules a sequence of a request whose id starts with the prefix, once that
sequence has N output tokens (default 0), raises before its forward pass:
`torch.OutOfMemoryError` (kind oom, the default) or a RuntimeError as a failed kernel
launch raises (kind kernel). Unset (always, outside tests), nothing is wrapped and no
step pays for it.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import torch

log = logging.getLogger(__name__)

ENV = "ONDO_INJECT_STEP_FAULT"
KINDS = ("oom", "kernel")


@dataclass(frozen=True)
class FaultSpec:
    prefix: str
    kind: str = "oom"
    after_tokens: int = 0

    @staticmethod
    def parse(value: str) -> FaultSpec:
        prefix, *fields = value.split(";")
        settings = dict(f.split("=", 1) for f in fields if "=" in f)
        kind = settings.get("kind", "oom")
        if kind not in KINDS or not prefix:
            raise ValueError(f"{ENV}={value!r}: want <prefix>[;kind={'|'.join(KINDS)}][;after=N]")
        return FaultSpec(prefix, kind, int(settings.get("after", "0")))

    def error(self) -> Exception:
        if self.kind == "kernel":
            return RuntimeError(f"CUDA error: an illegal instruction was encountered "
                                f"(injected for requests {self.prefix}*)")
        return torch.OutOfMemoryError(f"CUDA out of memory (injected for requests {self.prefix}*)")


def install_from_env(engine: Any) -> None:
    value = os.environ.get(ENV)
    if not value:
        return
    spec = FaultSpec.parse(value)
    log.warning("%s=%s: steps of requests %s* will fail (test only)", ENV, value, spec.prefix)
    execute = engine.runner.execute

    def failing_execute(sched, batch, prev_tokens=None):
        if any(item.seq.request_id.startswith(spec.prefix)
               and item.seq.num_output_tokens >= spec.after_tokens for item in sched.scheduled):
            raise spec.error()
        return execute(sched, batch, prev_tokens)

    engine.runner.execute = failing_execute
