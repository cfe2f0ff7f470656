"""Record a serving trace under mixed load: request rates that change over minutes, bursts and
idle stretches, NVML and engine columns on one clock (the format of
data/traces/ondo_serving_steps_w1_qwen3-0.6b_h200.csv, which `ondo twin adapt` reads).

Requests arrive open-loop (Poisson, at the phase's rate) whether or not the engine keeps up,
each a W1 request (prompt and output lengths uniform in [100, 1024], random tokens, ignore_eos)
on dummy weights; the engine runs continuous batching as `ondo serve` would. Phases:

    idle:S          no new requests for S seconds (the ones in flight finish)
    rate:S@R        R requests per second for S seconds
    ramp:S@R0-R1    the rate moving linearly from R0 to R1 over S seconds
    burst:S@N       N requests at once, then none for the rest of the S seconds

At the schedule's end what is still running is aborted. The default schedule (DEFAULT_SCHEDULE,
480 s) takes about 8.5 minutes with engine start-up and a warm-up; it needs a CUDA GPU and
NVML and prints a table of the phases and one JSON line:

    PYTHONPATH=. python3 bench/record_mixed_serving_trace.py \\
        --out data/traces/ondo_serving_mixed_w1_qwen3-0.6b_h200_b.csv

`--smoke` runs a 6 s schedule of a few requests on CPU with the simulated GPU as the source
(the recorder's own check; its trace is not a measurement).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import random
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from ondo.bench.workloads import Request

DEFAULT_SCHEDULE = ("idle:20,rate:60@2,ramp:90@2-24,burst:20@256,idle:40,rate:60@12,"
                    "burst:15@128,ramp:60@24-1,idle:45,rate:40@30,idle:30")
SMOKE_SCHEDULE = "idle:1,rate:2@3,burst:1@4,idle:2"
KINDS = ("idle", "rate", "ramp", "burst")


@dataclass(frozen=True)
class MixedPhase:
    kind: str
    duration_s: float
    rate0_per_s: float = 0.0  # rate and ramp
    rate1_per_s: float = 0.0  # ramp's end rate (rate: the same as rate0)
    burst: int = 0


@dataclass
class MixedRecord:
    """What one phase did, on the host monotonic clock."""

    kind: str
    start_monotonic_s: float
    end_monotonic_s: float
    arrivals: int = 0
    finished_requests: int = 0


def parse_mixed(text: str) -> list[MixedPhase]:
    phases = []
    for item in text.split(","):
        kind, _, rest = item.strip().partition(":")
        seconds, _, arg = rest.partition("@")
        try:
            duration_s = float(seconds)
            if kind == "idle" and not arg:
                phases.append(MixedPhase("idle", duration_s))
            elif kind == "rate":
                phases.append(MixedPhase("rate", duration_s, float(arg), float(arg)))
            elif kind == "ramp":
                r0, _, r1 = arg.partition("-")
                phases.append(MixedPhase("ramp", duration_s, float(r0), float(r1)))
            elif kind == "burst":
                phases.append(MixedPhase("burst", duration_s, burst=int(arg)))
            else:
                raise ValueError(kind)
        except ValueError:
            phases.append(MixedPhase("bad", math.nan))
        p = phases[-1]
        if (p.kind not in KINDS or not p.duration_s > 0 or p.rate0_per_s < 0
                or p.rate1_per_s < 0 or p.burst < 0):
            raise argparse.ArgumentTypeError(
                f"{item!r}: expected idle:S, rate:S@R, ramp:S@R0-R1 or burst:S@N "
                "(seconds, requests per second, requests; none negative)")
    return phases


def arrival_offsets(phases: list[MixedPhase], rng: random.Random) -> list[float]:
    """Arrival times (seconds from the schedule's start), sorted: Poisson at each phase's
    rate (a ramp by thinning at its higher rate), a burst all at its phase's start."""
    out: list[float] = []
    t0 = 0.0
    for p in phases:
        if p.kind == "burst":
            out += [t0] * p.burst
        elif p.kind in ("rate", "ramp"):
            peak = max(p.rate0_per_s, p.rate1_per_s)
            t = t0
            while peak > 0:
                t += rng.expovariate(peak)
                if t >= t0 + p.duration_s:
                    break
                frac = (t - t0) / p.duration_s
                rate = p.rate0_per_s + (p.rate1_per_s - p.rate0_per_s) * frac
                if rng.random() * peak < rate:
                    out.append(t)
        t0 += p.duration_s
    return out


def random_request(rng: random.Random, vocab: int) -> Request:
    """One W1 request (ondo.bench.workloads: input and output uniform in [100, 1024])."""
    n = rng.randint(100, 1024)
    return Request([rng.randrange(100, vocab - 100) for _ in range(n)], rng.randint(100, 1024))


def run_mixed(phases: list[MixedPhase], engine: Any, next_request: Callable[[], Request],
              arrivals: list[float], clock: Callable[[], float] = time.monotonic,
              sleep: Callable[[float], None] = time.sleep) -> list[MixedRecord]:
    """Feed the arrivals open-loop and step the engine while it has work; idle otherwise."""
    from ondo.engine.sampling_params import SamplingParams

    start = clock()
    bounds = list(itertools.accumulate(p.duration_s for p in phases))
    records = [MixedRecord(p.kind, start + b - p.duration_s, start + b)
               for p, b in zip(phases, bounds)]
    end = start + bounds[-1]
    ids = itertools.count()
    phase_of: dict[str, MixedRecord] = {}
    i = 0
    while (now := clock()) < end:
        while i < len(arrivals) and start + arrivals[i] <= now:
            rec = records[min(_phase_index(bounds, arrivals[i]), len(records) - 1)]
            req = next_request()
            rid = f"mixed-{next(ids)}"
            engine.add_request(rid, params=SamplingParams(temperature=0.6,
                                                          max_tokens=req.max_tokens,
                                                          ignore_eos=True),
                               prompt_token_ids=req.prompt_token_ids, stream=False)
            phase_of[rid] = rec
            rec.arrivals += 1
            i += 1
        if engine.has_unfinished_requests():
            _count(engine.step(), phase_of)
            continue
        next_s = start + arrivals[i] if i < len(arrivals) else end
        sleep(max(0.0, min(next_s, end) - clock()))
    for rid in engine.unfinished_request_ids():
        engine.abort_request(rid)
    while engine.has_unfinished_requests():
        _count(engine.step(), phase_of)
    records[-1].end_monotonic_s = clock()
    return records


def _phase_index(bounds: list[float], offset_s: float) -> int:
    return next((k for k, b in enumerate(bounds) if offset_s < b), len(bounds) - 1)


def _count(outputs: list[Any], phase_of: dict[str, MixedRecord]) -> None:
    for out in outputs:
        if out.finished and out.outputs[0].finish_reason != "abort":
            rec = phase_of.get(out.request_id)
            if rec is not None:
                rec.finished_requests += 1


def summarize(records: list[MixedRecord], columns: list[str], rows: list[dict[str, Any]],
              args: argparse.Namespace) -> dict[str, Any]:
    from bench.record_serving_trace import phase_power

    gpu_rows = [r for r in rows if r["kind"] == "gpu"]
    t0 = rows[0]["t_monotonic_s"] if rows else 0.0
    phases = []
    for rec in records:
        item = asdict(rec)
        item["start_s"] = rec.start_monotonic_s - t0
        item["end_s"] = rec.end_monotonic_s - t0
        item.update(phase_power(rec, gpu_rows))  # type: ignore[arg-type]
        phases.append(item)
    temps = [r["temp_c"] for r in gpu_rows if r.get("temp_c") is not None]
    return {
        "bench": "record_mixed_serving_trace",
        "out": args.out,
        "model_shape": args.model_shape,
        "schedule": args.schedule_text,
        "telemetry_hz": args.hz,
        "rows": len(rows),
        "gpu_rows": len(gpu_rows),
        "engine_rows": len(rows) - len(gpu_rows),
        "duration_s": rows[-1]["t"] if rows else 0.0,
        "temp_c_min": min(temps) if temps else None,
        "temp_c_max": max(temps) if temps else None,
        "columns": len(columns),
        "phases": phases,
    }


def print_table(summary: dict[str, Any]) -> None:
    cols = ("kind", "start_s", "end_s", "arrivals", "finished_requests", "mean_power_w")
    print(" ".join(f"{c:>18}" for c in cols))
    for p in summary["phases"]:
        print(" ".join(f"{p[c]:>18.1f}" if isinstance(p[c], float) else f"{p[c]!s:>18}"
                       for c in cols))
    print(f"die {summary['temp_c_min']} .. {summary['temp_c_max']} °C over "
          f"{summary['duration_s']:.0f} s, {summary['gpu_rows']} GPU rows, "
          f"{summary['engine_rows']} engine rows -> {summary['out']}")


def record(args: argparse.Namespace) -> dict[str, Any]:
    from bench.record_serving_trace import record_with_telemetry
    from ondo.bench.shapes import SHAPES, shape_folder
    from ondo.bench.throughput import dummy_llm, run_ondo
    from ondo.bench.workloads import make_workload
    from ondo.telemetry.export import write_csv

    if not args.smoke:
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("record_mixed_serving_trace needs a CUDA GPU (--smoke: CPU check)")
    vocab = SHAPES[args.model_shape]["vocab_size"]
    llm = dummy_llm(shape_folder(args.model_shape), args)
    if not args.smoke:  # first shapes compile here, not in the trace
        run_ondo(llm, make_workload("W1", vocab, seed=999, scale=0.125), None)
    rng = random.Random(args.seed)
    arrivals = arrival_offsets(args.schedule, rng)

    def drive(engine: Any) -> list[MixedRecord]:
        return run_mixed(args.schedule, engine, lambda: random_request(rng, vocab), arrivals)

    records, columns, rows = record_with_telemetry(llm, args, drive,
                                                   source="sim" if args.smoke else "nvml")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    write_csv(columns, rows, args.out)
    return summarize(records, columns, rows, args)


def main(argv: list[str] | None = None) -> int:
    from ondo.bench.shapes import SHAPES
    from ondo.bench.throughput import add_engine_flags

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="CSV to write")
    parser.add_argument("--schedule", default=None,
                        help=f"comma-separated phases (default {DEFAULT_SCHEDULE})")
    parser.add_argument("--hz", type=float, default=20.0, help="NVML sample rate")
    parser.add_argument("--model-shape", default="qwen3-0.6b", choices=sorted(SHAPES))
    parser.add_argument("--seed", type=int, default=300, help="seed of arrivals and prompts")
    parser.add_argument("--gpu-index", type=int, default=0,
                        help="NVML index of the GPU the engine runs on (rows of others dropped)")
    parser.add_argument("--smoke", action="store_true",
                        help="a 6 s schedule on CPU against the simulated GPU (a check of the "
                        "recorder, not a measurement)")
    add_engine_flags(parser)
    args = parser.parse_args(argv)
    args.schedule_text = args.schedule or (SMOKE_SCHEDULE if args.smoke else DEFAULT_SCHEDULE)
    try:
        args.schedule = parse_mixed(args.schedule_text)
    except argparse.ArgumentTypeError as e:
        parser.error(f"--schedule: {e}")
    if args.smoke:
        args.max_model_len, args.max_num_seqs, args.max_num_batched_tokens = 2048, 8, 2048
        args.enforce_eager = True
    summary = record(args)
    print_table(summary)
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    sys.exit(main())
