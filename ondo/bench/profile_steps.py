"""Where a step's GPU time goes: torch.profiler over a few engine steps of a workload."""

from __future__ import annotations

import torch

from ondo.bench.workloads import Workload


def profile_steps(llm, workload: Workload, warmup_steps: int, steps: int, limit: int = 18) -> str:
    engine = llm.engine
    ids = []
    for i, (r, p) in enumerate(zip(workload.requests, workload.params())):
        rid = f"profile-{workload.name}-{i}"
        engine.add_request(rid, prompt_token_ids=r.prompt_token_ids, params=p, stream=False)
        ids.append(rid)
    for _ in range(warmup_steps):
        engine.step()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                            torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            engine.step()
        torch.cuda.synchronize()
    for rid in ids:
        engine.abort_request(rid)
    while engine.has_unfinished_requests():
        engine.step()
    return prof.key_averages().table(sort_by="cuda_time_total", row_limit=limit, max_name_column_width=60)
