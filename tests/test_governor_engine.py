"""A governor's limits in a real engine (tiny Llama on the CPU): they bound every step, leave
what is generated unchanged, and reach the engine through one command whether it runs on a
thread or in a process of its own, where the duty cycle paces its steps."""

from __future__ import annotations

import asyncio
import functools
import tempfile

import pytest

from ondo import LLM, SamplingParams
from ondo.engine.async_llm import AsyncLLM
from ondo.engine.config import EngineArgs
from ondo.engine.scheduler_limits import UNLIMITED, SchedulerLimits
from tests.server_harness import wait_for
from tests.tiny_checkpoints import TINY_SHAPE, tiny_hf_model

GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)


@functools.cache
def tiny_path() -> str:
    path = tempfile.mkdtemp(prefix="ondo_tiny_governor_")
    tiny_hf_model("LlamaConfig", {}).save_pretrained(path)
    return path


def prompts(n: int = 6) -> list[list[int]]:
    return [[(7 * i + 3 * k) % TINY_SHAPE["vocab_size"] for k in range(5 + 4 * i)]
            for i in range(n)]


def engine_args(**kw) -> EngineArgs:
    return EngineArgs(model=tiny_path(), block_size=4, max_model_len=96, num_kv_blocks=128,
                      max_num_seqs=8, max_num_batched_tokens=64, device="cpu", **kw)


def test_limits_bound_every_step_and_leave_the_tokens_unchanged():
    llm = LLM(tiny_path(), block_size=4, max_model_len=96, num_kv_blocks=128, max_num_seqs=8,
              max_num_batched_tokens=64)
    ids = [{"prompt_token_ids": p} for p in prompts()]
    free = [o.outputs[0].token_ids for o in llm.generate(ids, GREEDY)]
    steps = []
    llm.engine.add_step_listener(
        lambda s: steps.append((s.batch_size, s.num_prefill_tokens + s.num_decode_tokens)))
    llm.engine.set_scheduler_limits(SchedulerLimits(max_num_seqs=2, max_num_batched_tokens=16,
                                                    max_prefill_tokens=8))
    limited = [o.outputs[0].token_ids for o in llm.generate(ids, GREEDY)]
    assert limited == free
    assert max(b for b, _ in steps) == 2 and max(t for _, t in steps) <= 16
    assert len(steps) > 2 * len(free[0])  # the work spread over more steps
    llm.engine.set_scheduler_limits(UNLIMITED)
    assert [o.outputs[0].token_ids for o in llm.generate(ids, GREEDY)] == free


LONG = SamplingParams(temperature=0.0, max_tokens=60, ignore_eos=True)  # > a slice of steps


def _generate(llm: AsyncLLM) -> list[list[int]]:
    async def one(i: int, p: list[int]) -> list[int]:
        out = [o async for o in llm.generate(f"r{i}", p, LONG)]
        return out[-1].outputs[0].token_ids

    async def main():
        return await asyncio.gather(*[one(i, p) for i, p in enumerate(prompts())])

    return asyncio.run(main())


@pytest.mark.parametrize("engine_process", [False, True])
def test_the_duty_cycle_paces_the_engine_loop_on_a_thread_and_in_a_process(engine_process):
    llm = AsyncLLM.from_engine_args(engine_args(async_scheduling=True),
                                    engine_process=engine_process)
    try:
        free = _generate(llm)
        assert llm.stats()["paced_s"] == 0.0
        llm.set_scheduler_limits(SchedulerLimits(duty_cycle=0.5))
        assert wait_for(lambda: llm.stats()["duty_cycle"] == 0.5, 30.0)
        paced = _generate(llm)
        stats = llm.stats()
    finally:
        llm.close()
    assert paced == free  # a paced step drains the one scheduled ahead: nothing is lost
    assert stats["paced_s"] > 0.0
