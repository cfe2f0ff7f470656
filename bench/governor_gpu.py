"""The governor on a real GPU: W1-like load held under a power budget by load shaping alone.

The engine runs in a process of its own (as `ondo serve` runs it on a GPU), on dummy weights of
the Qwen3-0.6B shape; this process holds the telemetry (NVML), the live twin and the governor,
as the server's does, and keeps `--concurrency` W1 requests in flight (a finished request is
replaced by a fresh one: input and output lengths uniform in [100, 1024]). Nothing here
changes a GPU setting: clocks and the power limit are read, never set.

Settings, each run for its own span after a short settling time:
  1. `--budget-w` (500 W) held by the policies off, reactive, predictive: the share of NVML's
     1 s average power readings over the budget, output tokens/s, GPU joules per output token;
  2. W1 at three fixed per-step token budgets (governor off): tokens per joule, the
     energy-efficient operating point;
  3. the governor's own cost: off against predictive with no objective binding (no budget,
     default temperature targets), output tokens/s, two pairs alternated.

The twin the governor forecasts with should be the GPU's own: `--fit-twin-on TRACE` fits it
first (`ondo twin fit --engine-load --refit-thermal` on the part before `--fit-until-s`),
e.g. on the H200 serving trace in data/traces; `--twin-params` takes a fitted one; without
either, the packaged H100 fit, whose errors the predictive policy's power calibration absorbs.

    PYTHONPATH=. python3 bench/governor_gpu.py \
        --fit-twin-on data/traces/ondo_serving_steps_w1_qwen3-0.6b_h200.csv   # GPU, ~7 min
    PYTHONPATH=. python3 bench/governor_gpu.py --smoke         # CPU, tiny model, simulated GPU

Prints a table and one JSON line ({"governor_gpu": {...}}).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import random
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

TINY = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 512,
        "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
        "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "max_position_embeddings": 2048,
        "tie_word_embeddings": True, "hidden_act": "silu", "torch_dtype": "float32"}


@dataclass
class Window:
    """What one setting did between `start_s` and `end_s` (monotonic clock)."""

    start_s: float
    end_s: float = 0.0
    tokens: list[tuple[float, int]] = field(default_factory=list)  # (time, new tokens)


def model_folder(args: argparse.Namespace) -> str:
    from ondo.bench.shapes import shape_folder, write_word_tokenizer

    if not args.smoke:
        return shape_folder(args.model_shape)
    folder = os.path.join(tempfile.mkdtemp(prefix="ondo-governor-gpu-"), "tiny")
    os.makedirs(folder)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(TINY, f)
    write_word_tokenizer(folder, TINY["vocab_size"])
    return folder


class Load:
    """Keeps `concurrency` W1-shaped requests in flight on an AsyncLLM; counts tokens."""

    def __init__(self, llm, vocab: int, concurrency: int, scale_len: float, seed: int) -> None:
        self.llm = llm
        self.vocab = vocab
        self.concurrency = concurrency
        self.scale_len = scale_len
        self.rng = random.Random(seed)
        self.ids = itertools.count()
        self.window: Window | None = None
        self.stop = False

    def _request(self):
        from ondo.engine.sampling_params import SamplingParams

        n_in = max(1, int(self.rng.randint(100, 1024) * self.scale_len))
        n_out = max(1, int(self.rng.randint(100, 1024) * self.scale_len))
        prompt = [self.rng.randrange(100, self.vocab - 100) for _ in range(n_in)]
        return prompt, SamplingParams(temperature=0.6, max_tokens=n_out, ignore_eos=True)

    async def _client(self) -> None:
        while not self.stop:
            prompt, params = self._request()
            async for out in self.llm.generate(f"g{next(self.ids)}", prompt, params):
                n = sum(len(c.new_token_ids) for c in out.outputs)
                w = self.window
                if w is not None and n:
                    w.tokens.append((time.monotonic(), n))
                if self.stop:
                    break

    async def run(self, settings, run_setting) -> list[dict[str, Any]]:
        clients = [asyncio.create_task(self._client()) for _ in range(self.concurrency)]
        results = []
        try:
            for setting in settings:
                results.append(await run_setting(self, setting))
        finally:
            self.stop = True
            for c in clients:
                c.cancel()
            await asyncio.gather(*clients, return_exceptions=True)
        return results


def summarize(setting: dict, window: Window, gpu: list[tuple[float, float | None, float | None]],
              budget_w: float) -> dict[str, Any]:
    inside = [(t, p, e) for t, p, e in gpu if window.start_s <= t <= window.end_s]
    powers = [p for _, p, _ in inside if p is not None]
    energy = [(t, e) for t, _, e in inside if e is not None]
    tokens = sum(n for t, n in window.tokens if window.start_s <= t <= window.end_s)
    span = window.end_s - window.start_s
    joules = energy[-1][1] - energy[0][1] if len(energy) > 1 else float("nan")
    covered = energy[-1][0] - energy[0][0] if len(energy) > 1 else float("nan")
    joules_run = joules * span / covered if covered and covered > 0 else float("nan")
    powers_sorted = sorted(powers)
    return {
        **setting,
        "seconds": round(span, 2),
        "output_tokens": tokens,
        "output_tokens_per_s": tokens / span if span > 0 else float("nan"),
        "over_budget_fraction": (sum(p > budget_w for p in powers) / len(powers)
                                 if powers else float("nan")),
        "mean_power_w": sum(powers) / len(powers) if powers else float("nan"),
        "p99_power_w": powers_sorted[int(0.99 * (len(powers) - 1))] if powers else float("nan"),
        "joules_per_output_token": joules_run / tokens if tokens else float("nan"),
        "output_tokens_per_joule": tokens / joules_run if joules_run and joules_run > 0
        else float("nan"),
        "gpu_samples": len(inside),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true",
                    help="CPU, tiny model, simulated GPU, a few seconds per setting")
    ap.add_argument("--model-shape", default="qwen3-0.6b")
    ap.add_argument("--budget-w", type=float, default=500.0)
    ap.add_argument("--seconds", type=float, default=40.0, help="per budget setting")
    ap.add_argument("--short-seconds", type=float, default=25.0,
                    help="per token-budget and overhead setting")
    ap.add_argument("--settle-s", type=float, default=5.0, help="before each setting's window")
    ap.add_argument("--token-budgets", type=int, nargs=3, default=[1024, 2048, 8192])
    ap.add_argument("--concurrency", type=int, default=256)
    ap.add_argument("--telemetry", choices=("nvml", "sim"), default="nvml",
                    help="nvml (falls back to the simulated GPU where there is none) or sim")
    ap.add_argument("--telemetry-hz", type=float, default=20.0)
    ap.add_argument("--twin-params", default=None, help="default: the packaged H100 fit")
    ap.add_argument("--fit-twin-on", default=None,
                    help="fit the twin on this serving trace first (thermal refit + load map)")
    ap.add_argument("--fit-until-s", type=float, default=60.0)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.smoke:
        args.seconds, args.short_seconds, args.settle_s = 3.0, 2.0, 1.0
        args.concurrency, args.token_budgets = 8, [32, 64, 128]
        args.telemetry = "sim"

    import torch

    from ondo.control.decision import DECISION_TABLE
    from ondo.control.objectives import GpuFacts, Objectives, resolve_objectives
    from ondo.control.serve import GovernorSetup, ServerGovernor
    from ondo.engine.async_llm import AsyncLLM
    from ondo.engine.config import EngineArgs
    from ondo.engine.scheduler_limits import UNLIMITED, SchedulerLimits
    from ondo.telemetry.pipeline import Telemetry
    from ondo.telemetry.schema import GpuSample
    from ondo.twin.params import TwinParams, h100_params

    cuda = torch.cuda.is_available() and not args.smoke
    folder = model_folder(args)
    if cuda:
        engine = EngineArgs(model=folder, load_format="dummy", dtype="bfloat16",
                            max_model_len=4096, max_num_seqs=256, max_num_batched_tokens=8192,
                            gpu_memory_utilization=0.9, seed=args.seed)
    else:
        engine = EngineArgs(model=folder, load_format="dummy", dtype="float32", device="cpu",
                            max_model_len=512, max_num_seqs=16, max_num_batched_tokens=128,
                            num_kv_blocks=256, seed=args.seed)
    vocab = 151936 if not args.smoke else TINY["vocab_size"]
    params = TwinParams.load(args.twin_params) if args.twin_params else h100_params()
    if args.fit_twin_on:
        from ondo.twin.engine_load import fit_engine_load, refit_thermal
        from ondo.twin.traces import read_trace

        trace = read_trace(args.fit_twin_on).window(float("-inf"), args.fit_until_s)
        params, _ = refit_thermal(params, [trace])
        params, _ = fit_engine_load(params, [trace])
        print(json.dumps({"twin_fitted_on": args.fit_twin_on, "until_s": args.fit_until_s,
                          "power_limit_w": params.power_limit_w,
                          "engine_compute_gain": params.engine_compute_gain}), flush=True)
    t_start = time.monotonic()
    llm = AsyncLLM.from_engine_args(engine, max_waiting_requests=100_000, engine_process=True)
    tel = Telemetry.start(None, source=args.telemetry, hz=args.telemetry_hz,
                          tables=(DECISION_TABLE,))
    llm.add_step_listener(tel.engine.on_step)
    gpu: list[tuple[float, float | None, float | None]] = []
    tel.hub.subscribe(lambda s: gpu.append((s.t_monotonic_s, s.power_w, s.energy_j)),
                      kinds=(GpuSample,))
    facts = GpuFacts.from_params(params)
    budget = resolve_objectives(facts, power_budget_w=args.budget_w) if args.budget_w > \
        facts.idle_power_w else Objectives()
    free = resolve_objectives(facts)
    gov = ServerGovernor(GovernorSetup("off", params, budget), tel, llm)
    decisions: list[Any] = []
    from ondo.control.decision import GovernorDecision

    tel.hub.subscribe(decisions.append, kinds=(GovernorDecision,))

    settings = [
        {"group": "budget", "policy": p, "seconds": args.seconds} for p in
        ("off", "reactive", "predictive")
    ] + [
        {"group": "token_budget", "policy": "off", "token_budget": b, "seconds": args.short_seconds}
        for b in args.token_budgets
    ] + [
        {"group": "overhead", "policy": p, "seconds": args.short_seconds, "pair": k}
        for k in (0, 1) for p in ("off", "predictive")
    ]

    async def run_setting(load: Load, setting: dict) -> dict[str, Any]:
        gov.set_objectives(budget if setting["group"] == "budget" else free)
        gov.set_policy(setting["policy"])
        llm.set_scheduler_limits(SchedulerLimits(max_num_batched_tokens=setting["token_budget"])
                                 if "token_budget" in setting else UNLIMITED)
        await asyncio.sleep(args.settle_s)
        n_decisions = len(decisions)
        window = Window(time.monotonic())
        load.window = window
        await asyncio.sleep(setting["seconds"])
        window.end_s = time.monotonic()
        load.window = None
        row = summarize(setting, window, gpu, args.budget_w)
        row["decisions"] = len(decisions) - n_decisions
        print(json.dumps({k: v for k, v in row.items()}), flush=True)
        return row

    load = Load(llm, vocab, args.concurrency, 1.0 if not args.smoke else 0.05, args.seed)
    try:
        rows = asyncio.run(load.run(settings, run_setting))
    finally:
        gov.close()
        llm.close()
        tel.close()
    device = torch.cuda.get_device_name() if cuda else "cpu (simulated GPU)"
    by = {(r["group"], r["policy"], r.get("token_budget")): r for r in rows
          if r["group"] != "overhead"}
    pairs = [r for r in rows if r["group"] == "overhead"]
    off_tps = sum(r["output_tokens_per_s"] for r in pairs if r["policy"] == "off")
    on_tps = sum(r["output_tokens_per_s"] for r in pairs if r["policy"] == "predictive")
    summary = {
        "device": device, "model_shape": args.model_shape if not args.smoke else "tiny",
        "telemetry": tel.gpu.source_name if tel.gpu is not None else None,
        "budget_w": args.budget_w, "concurrency": args.concurrency,
        "budget": {p: by[("budget", p, None)] for p in ("off", "reactive", "predictive")},
        "token_budgets": {str(b): by[("token_budget", "off", b)] for b in args.token_budgets},
        "overhead_fraction": 1.0 - on_tps / off_tps if off_tps else float("nan"),
        "overhead_runs": pairs,
        "elapsed_s": time.monotonic() - t_start,
    }
    cols = ("group", "policy", "token_budget", "output_tokens_per_s", "over_budget_fraction",
            "mean_power_w", "p99_power_w", "joules_per_output_token", "output_tokens_per_joule",
            "decisions")
    print(" | ".join(cols))
    for r in rows:
        print(" | ".join(f"{r.get(c):.4g}" if isinstance(r.get(c), float) else str(r.get(c))
                         for c in cols))
    print(f"governor overhead (off vs predictive, nothing binding): "
          f"{100 * summary['overhead_fraction']:.2f} % of output tokens/s")
    print(json.dumps({"governor_gpu": summary}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
