"""The governor on a real GPU: W1 held under a power budget by load shaping alone.

Laid out as a deployment runs it. This process is the server: the engine's front end
(`AsyncLLM`, the engine in a process of its own), the NVML poller, the live twin and the
governor, as in `ondo serve`, with a minimal front end in place of HTTP (a Unix socket, one
JSON line per request and per completion: `ondo.bench.governor_load`). The load is a client
in a process of its own that keeps `--concurrency` W1 requests in flight (a finished one
replaced at once: input and output lengths uniform in [100, 1024]), so that its work never
takes this process's interpreter lock. Dummy weights of the Qwen3-0.6B shape. Nothing here
changes a GPU setting: clocks and the power limit are read, never set.

Settings, each run for its own span after a settling time:
  1. `--budget-w` (500 W) held by the policies off, reactive, predictive: the share of NVML's
     1 s average power readings over the budget, output tokens/s, GPU joules per output token;
  2. W1 at three fixed per-step token budgets (governor off): tokens per joule;
  3. the governor's own cost: off against predictive with no objective binding, in
     `--overhead-rounds` ABBA rounds (off, predictive, predictive, off) of `--short-seconds`
     each: each round's estimate cancels a drift linear over the round (the GPU warming), the
     rounds give its standard error, and a round's two off runs show the run-to-run noise.

Every run also says how late the telemetry was: the poller's lateness against its 20 Hz
schedule (p99, max) and the age of the newest GPU reading at the governor's ticks (p99,
max): a starved server process shows there first. `--series-out PATH` writes each run's
time series as JSON lines as soon as the run ends (NVML's fast and 1 s average power, the
poller's lateness and read time per reading, the limits in force, every decision with its
reason, forecast and the age of the inputs it was made on).

The twin the governor forecasts with should be the GPU's own: `--fit-twin-on TRACE` fits it
first (thermal refit and engine load map on the part before `--fit-until-s`); `--twin-params`
takes a fitted one; without either, the packaged H100 fit.

    PYTHONPATH=. python3 bench/governor_gpu.py --groups budget overhead --seconds 35 \\
        --short-seconds 12 --overhead-rounds 4 --series-out $OUT/governor_series.jsonl \\
        --fit-twin-on data/traces/ondo_serving_steps_w1_qwen3-0.6b_h200.csv  # GPU, ~7 min
    PYTHONPATH=. python3 bench/governor_gpu.py --smoke   # CPU, tiny model, simulated GPU

Prints the planned duration first, a line per run, a table, the governor's overhead with its
noise, and one JSON line ({"governor_gpu": {...}}).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from typing import Any

TINY = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 512,
        "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
        "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "max_position_embeddings": 2048,
        "tie_word_embeddings": True, "hidden_act": "silu", "torch_dtype": "float32"}
GROUPS = ("budget", "token_budget", "overhead")
ABBA = ("off", "predictive", "predictive", "off")
STARTUP_S = 60.0  # the engine's start and the twin's fit, for the planned duration


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


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true",
                    help="CPU, tiny model, simulated GPU, a few seconds per setting")
    ap.add_argument("--model-shape", default="qwen3-0.6b")
    ap.add_argument("--budget-w", type=float, default=500.0)
    ap.add_argument("--seconds", type=float, default=35.0, help="per budget setting")
    ap.add_argument("--short-seconds", type=float, default=12.0,
                    help="per token-budget and overhead setting")
    ap.add_argument("--settle-s", type=float, default=5.0,
                    help="before each budget and token-budget setting's window")
    ap.add_argument("--overhead-settle-s", type=float, default=2.0,
                    help="before each overhead run's window (nothing binds: only the policy "
                         "changes)")
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
    ap.add_argument("--groups", nargs="+", choices=GROUPS, default=list(GROUPS),
                    help="run only these groups of settings")
    ap.add_argument("--overhead-rounds", type=int, default=4,
                    help="ABBA rounds (off, predictive, predictive, off) in the overhead group")
    ap.add_argument("--series-out", default=None,
                    help="write each run's time series (power, lateness, limits, decisions) "
                         "as JSON lines")
    args = ap.parse_args(argv)
    if args.overhead_rounds < 1:
        ap.error("--overhead-rounds must be >= 1")
    if args.concurrency < 1:
        ap.error("--concurrency must be >= 1")
    for name in ("seconds", "short_seconds"):
        if getattr(args, name) <= 0:
            ap.error(f"--{name.replace('_', '-')} must be > 0")
    for name in ("settle_s", "overhead_settle_s"):
        if getattr(args, name) < 0:
            ap.error(f"--{name.replace('_', '-')} must be >= 0")
    if args.smoke:
        args.seconds, args.short_seconds, args.settle_s, args.overhead_settle_s = 3.0, 2.0, 1.0, 0.5
        args.concurrency, args.token_budgets = 8, [32, 64, 128]
        args.overhead_rounds = min(args.overhead_rounds, 2)
        args.telemetry = "sim"
    return args


def settings_for(args: argparse.Namespace) -> list[dict[str, Any]]:
    groups = set(args.groups)
    return [
        {"group": "budget", "policy": p, "seconds": args.seconds, "settle_s": args.settle_s}
        for p in ("off", "reactive", "predictive") if "budget" in groups
    ] + [
        {"group": "token_budget", "policy": "off", "token_budget": b,
         "seconds": args.short_seconds, "settle_s": args.settle_s}
        for b in args.token_budgets if "token_budget" in groups
    ] + [
        {"group": "overhead", "policy": p, "seconds": args.short_seconds,
         "settle_s": args.overhead_settle_s, "round": k}
        for k in range(args.overhead_rounds) for p in ABBA if "overhead" in groups
    ]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    settings = settings_for(args)
    planned_s = sum(s["seconds"] + s["settle_s"] for s in settings)
    print(json.dumps({"planned_s": round(planned_s + STARTUP_S), "runs": len(settings)}),
          flush=True)

    import torch

    from ondo.bench.governor_figures import (
        GpuPoint,
        TickAges,
        overhead_estimate,
        series_rows,
        summarize,
    )
    from ondo.bench.governor_load import RequestRelay, start_load_process
    from ondo.control.decision import DECISION_TABLE, GovernorDecision, plain_json
    from ondo.control.objectives import GpuFacts, Objectives, resolve_objectives
    from ondo.control.serve import GovernorSetup, ServerGovernor
    from ondo.engine.async_llm import AsyncLLM
    from ondo.engine.config import EngineArgs
    from ondo.engine.scheduler_limits import UNLIMITED, SchedulerLimits
    from ondo.telemetry.pipeline import Telemetry
    from ondo.telemetry.schema import GpuSample
    from ondo.twin.params import TwinParams, h100_params

    t_start = time.monotonic()
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
    llm = AsyncLLM.from_engine_args(engine, max_waiting_requests=100_000, engine_process=True)
    tel = Telemetry.start(None, source=args.telemetry, hz=args.telemetry_hz,
                          tables=(DECISION_TABLE,))
    llm.add_step_listener(tel.engine.on_step)
    facts = GpuFacts.from_params(params)
    budget = resolve_objectives(facts, power_budget_w=args.budget_w) if args.budget_w > \
        facts.idle_power_w else Objectives()
    free = resolve_objectives(facts)
    applied: list[tuple[float, dict]] = []  # (time, limits) as sent to the engine

    def send_limits(limits: SchedulerLimits) -> None:
        applied.append((time.monotonic(), limits.as_dict()))
        llm.set_scheduler_limits(limits)

    gov = ServerGovernor(GovernorSetup("off", params, budget), tel, llm,
                         apply_limits=send_limits)
    governed = gov.governor.gpu_index
    gpu: list[GpuPoint] = []
    tel.hub.subscribe(lambda s: gpu.append(GpuPoint(
        s.t_monotonic_s, s.power_w, s.energy_j, s.power_instant_w, s.read_latency_s))
        if s.gpu_index == governed else None, kinds=(GpuSample,))
    decisions: list[GovernorDecision] = []
    tel.hub.subscribe(decisions.append, kinds=(GovernorDecision,))
    ticks: list[TickAges] = []
    tick = gov.governor.tick

    def observed_tick(inputs):  # the ages of what the governor decides on, every tick
        ticks.append(TickAges(inputs.t_monotonic_s, inputs.gpu_sample_age_s,
                              inputs.engine_sample_age_s))
        return tick(inputs)

    gov.governor.tick = observed_tick  # type: ignore[method-assign]
    period_s = 1.0 / args.telemetry_hz
    series_file = open(args.series_out, "w") if args.series_out else None  # noqa: SIM115
    socket_path = os.path.join(tempfile.mkdtemp(prefix="ondo-governor-load-"), "load.sock")
    relay = RequestRelay(llm, socket_path)

    async def run_setting(setting: dict[str, Any]) -> dict[str, Any]:
        gov.set_objectives(budget if setting["group"] == "budget" else free)
        gov.set_policy(setting["policy"])
        # A token budget is an operator's cap: it holds under every policy, and the limits
        # the governor sends again every few seconds keep it.
        gov.set_caps(SchedulerLimits(max_num_batched_tokens=setting["token_budget"])
                     if "token_budget" in setting else UNLIMITED)
        await asyncio.sleep(setting["settle_s"])
        n_decisions = len(decisions)
        start, tokens0 = time.monotonic(), relay.tokens
        await asyncio.sleep(setting["seconds"])
        end, tokens = time.monotonic(), relay.tokens - tokens0
        row = summarize({k: v for k, v in setting.items() if k != "settle_s"}, start, end,
                        tokens, gpu, ticks, args.budget_w, period_s)
        row["decisions"] = len(decisions) - n_decisions
        if series_file is not None:
            for r in series_rows(setting, gpu, applied, decisions[n_decisions:], start, end,
                                 period_s):
                series_file.write(json.dumps(r, default=plain_json) + "\n")
            series_file.flush()
        print(json.dumps(row), flush=True)
        return row

    async def run_all() -> list[dict[str, Any]]:
        await relay.start()
        client = start_load_process(socket_path, args.concurrency, vocab,
                                    1.0 if not args.smoke else 0.05, args.seed)
        try:
            return [await run_setting(s) for s in settings]
        finally:
            await relay.close()  # the client sees the socket close and exits
            try:
                _, err = await asyncio.to_thread(client.communicate, timeout=30)
            except Exception:
                client.kill()
                _, err = client.communicate()
            if client.returncode != 0:
                print(f"load process exited {client.returncode}: {err[-2000:]}",
                      file=sys.stderr)

    try:
        rows = asyncio.run(run_all())
    finally:
        gov.close()
        llm.close()
        tel.close()
        if series_file is not None:
            series_file.close()
    report(args, rows, tel, cuda, relay, time.monotonic() - t_start, overhead_estimate)
    return 0


def report(args: argparse.Namespace, rows: list[dict[str, Any]], tel: Any, cuda: bool,
           relay: Any, elapsed_s: float, overhead_estimate: Any) -> None:
    import torch

    by = {(r["group"], r["policy"], r.get("token_budget")): r for r in rows
          if r["group"] != "overhead"}
    runs = [r for r in rows if r["group"] == "overhead"]
    overhead = overhead_estimate(runs)
    summary = {
        "device": torch.cuda.get_device_name() if cuda else "cpu (simulated GPU)",
        "model_shape": args.model_shape if not args.smoke else "tiny",
        "telemetry": tel.gpu.source_name if tel.gpu is not None else None,
        "layout": "load in its own process; front end, telemetry, twin and governor in this one",
        "budget_w": args.budget_w, "concurrency": args.concurrency,
        "groups": [g for g in GROUPS if g in set(args.groups)],
        "budget": {p: by[("budget", p, None)] for p in ("off", "reactive", "predictive")
                   if ("budget", p, None) in by},
        "token_budgets": {str(b): by[("token_budget", "off", b)] for b in args.token_budgets
                          if ("token_budget", "off", b) in by},
        **overhead,
        "overhead_runs": runs,
        "requests_completed": relay.completed, "requests_failed": relay.failed,
        "elapsed_s": elapsed_s,
    }
    cols = ("group", "policy", "token_budget", "output_tokens_per_s", "over_budget_fraction",
            "mean_power_w", "p99_power_w", "joules_per_output_token", "decisions",
            "gpu_samples", "poll_lag_p99_s", "poll_lag_max_s", "sample_age_p99_s",
            "sample_age_max_s")
    print(" | ".join(cols))
    for r in rows:
        print(" | ".join(f"{r.get(c):.4g}" if isinstance(r.get(c), float) else str(r.get(c))
                         for c in cols))
    o = overhead
    if o["rounds"]:
        print(f"governor overhead (off vs predictive, nothing binding): "
              f"{100 * o['overhead_fraction']:.2f} % of output tokens/s "
              f"± {100 * o['overhead_se']:.2f} % (standard error over {o['rounds']} ABBA "
              f"rounds); a round's two off runs differ by "
              f"{100 * o['off_to_off_fraction']:.2f} %")
    print(f"elapsed {elapsed_s:.0f} s")
    print(json.dumps({"governor_gpu": summary}))


if __name__ == "__main__":
    sys.exit(main())
