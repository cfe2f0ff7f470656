"""Record a trace of ondo serving with load steps, NVML and engine columns on one clock.

The CSV has the format of data/traces/ondo_serving_w1_qwen3-0.6b_h100.csv (`kind` gpu / engine
rows), which `ondo.twin.traces.read_trace` reads.

Schedule (default): idle 10 s, load 40 s, idle 30 s, load 30 s, idle 20 s. A load phase runs
W1 batches back-to-back on dummy weights (fresh prompts every batch, so no batch reuses another's
cached prefixes) and aborts what is still running when the phase ends, so the load stops on
time; an idle phase leaves the engine alone. Phase ends are fixed from the schedule's start.
Needs a CUDA GPU and NVML; takes the schedule's 130 s plus engine start-up and a short warm-up
(about 30 s together on an H100); prints a table of the phases and one JSON line.

    PYTHONPATH=. python3 bench/record_serving_trace.py \\
        --out data/traces/ondo_serving_steps_w1_qwen3-0.6b_h100.csv
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Any, Protocol

from ondo.bench.workloads import Workload

DEFAULT_SCHEDULE = "idle:10,load:40,idle:30,load:30,idle:20"
PHASE_KINDS = ("idle", "load")


@dataclass(frozen=True)
class Phase:
    kind: str  # "idle" or "load"
    duration_s: float


@dataclass
class PhaseRecord:
    """What one phase did, on the host monotonic clock (the clock telemetry aligns on)."""

    kind: str
    start_monotonic_s: float
    end_monotonic_s: float = float("nan")
    batches: int = 0
    engine_steps: int = 0
    finished_requests: int = 0
    aborted_requests: int = 0


class Engine(Protocol):
    """The parts of ondo's LLMEngine a load phase drives."""

    def add_request(
        self, request_id: str, prompt: str | None = None, params: Any = None,
        prompt_token_ids: list[int] | None = None, arrival_time_s: float | None = None,
        stream: bool = True,
    ) -> Any: ...
    def step(self) -> list[Any]: ...
    def abort_request(self, request_id: str) -> bool: ...
    def unfinished_request_ids(self) -> list[str]: ...
    def has_unfinished_requests(self) -> bool: ...


def parse_schedule(text: str) -> list[Phase]:
    """"idle:10,load:40,..." as phases (seconds)."""
    phases = []
    for item in text.split(","):
        kind, _, seconds = item.strip().partition(":")
        try:
            duration_s = float(seconds)
        except ValueError:
            duration_s = float("nan")
        if kind not in PHASE_KINDS or not duration_s > 0:
            raise argparse.ArgumentTypeError(f"{item!r}: expected idle:SECONDS or load:SECONDS")
        phases.append(Phase(kind, duration_s))
    return phases


def _count_finished(outputs: list[Any], record: PhaseRecord) -> None:
    for out in outputs:
        if out.finished and out.outputs[0].finish_reason != "abort":
            record.finished_requests += 1


def serve_until(
    engine: Engine,
    deadline_s: float,
    next_batch: Callable[[], Workload],
    request_ids: Iterator[int],
    record: PhaseRecord,
    clock: Callable[[], float],
) -> None:
    """Batches back-to-back until deadline_s; then abort what is unfinished and drain it."""
    while clock() < deadline_s:
        batch = next_batch()
        for req, params in zip(batch.requests, batch.params()):
            engine.add_request(f"trace-{next(request_ids)}", params=params,
                               prompt_token_ids=req.prompt_token_ids, stream=False)
        record.batches += 1
        while engine.has_unfinished_requests() and clock() < deadline_s:
            _count_finished(engine.step(), record)
            record.engine_steps += 1
    for request_id in engine.unfinished_request_ids():
        if engine.abort_request(request_id):
            record.aborted_requests += 1
    while engine.has_unfinished_requests():  # the aborts' outputs, and a step still in flight
        _count_finished(engine.step(), record)
        record.engine_steps += 1


def run_schedule(
    phases: list[Phase],
    engine: Engine,
    next_batch: Callable[[], Workload],
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> list[PhaseRecord]:
    """Run the phases in order; each ends at the schedule's start plus the durations so far."""
    request_ids = itertools.count()
    end_s = clock()
    records = []
    for phase in phases:
        end_s += phase.duration_s
        record = PhaseRecord(phase.kind, clock())
        if phase.kind == "load":
            serve_until(engine, end_s, next_batch, request_ids, record, clock)
        else:
            while (left_s := end_s - clock()) > 0:
                sleep(min(left_s, 0.5))
        record.end_monotonic_s = clock()
        records.append(record)
    return records


def phase_power(record: PhaseRecord, gpu_rows: list[dict[str, Any]]) -> dict[str, float | None]:
    """Mean of NVML's power readings in the phase, and the energy counter's mean power [W]."""
    inside = [r for r in gpu_rows
              if record.start_monotonic_s <= r["t_monotonic_s"] < record.end_monotonic_s]
    power = [r["power_w"] for r in inside if r.get("power_w") is not None]
    energy = [(r["t_monotonic_s"], r["energy_j"]) for r in inside if r.get("energy_j") is not None]
    (t0, e0), (t1, e1) = (energy[0], energy[-1]) if energy else ((0.0, 0.0), (0.0, 0.0))
    return {
        "mean_power_w": sum(power) / len(power) if power else None,
        "energy_mean_power_w": (e1 - e0) / (t1 - t0) if t1 > t0 else None,
        "gpu_rows": len(inside),
    }


def summarize(records: list[PhaseRecord], columns: list[str], rows: list[dict[str, Any]],
              args: argparse.Namespace) -> dict[str, Any]:
    gpu_rows = [r for r in rows if r["kind"] == "gpu"]
    t0 = rows[0]["t_monotonic_s"] if rows else 0.0
    phases = []
    for rec in records:
        item = asdict(rec)
        item["start_s"] = rec.start_monotonic_s - t0  # on the trace's `t` clock
        item["end_s"] = rec.end_monotonic_s - t0
        item.update(phase_power(rec, gpu_rows))
        phases.append(item)
    return {
        "bench": "record_serving_trace",
        "out": args.out,
        "model_shape": args.model_shape,
        "workload": "W1",
        "telemetry_hz": args.hz,
        "rows": len(rows),
        "gpu_rows": len(gpu_rows),
        "engine_rows": len(rows) - len(gpu_rows),
        "duration_s": rows[-1]["t"] if rows else 0.0,
        "columns": len(columns),
        "phases": phases,
    }


def print_table(summary: dict[str, Any]) -> None:
    cols = ("kind", "start_s", "end_s", "batches", "finished_requests", "aborted_requests",
            "mean_power_w", "energy_mean_power_w")
    print(" ".join(f"{c:>19}" for c in cols))
    for p in summary["phases"]:
        print(" ".join(f"{p[c]:>19.1f}" if isinstance(p[c], float) else f"{p[c]!s:>19}"
                       for c in cols))


def record_schedule(llm: Any, args: argparse.Namespace, vocab: int, source: str = "nvml"
                    ) -> tuple[list[PhaseRecord], list[str], list[dict[str, Any]]]:
    """Run the schedule on `llm` with telemetry on: (phases, export columns, export rows)."""
    from ondo.bench.workloads import make_workload

    seeds = itertools.count(args.seed)

    def next_batch() -> Workload:
        return make_workload("W1", vocab, seed=next(seeds), scale=args.scale)

    return record_with_telemetry(llm, args, lambda engine: run_schedule(
        args.schedule, engine, next_batch), source)


def record_with_telemetry(llm: Any, args: argparse.Namespace, drive: Callable[[Any], Any],
                          source: str = "nvml") -> tuple[Any, list[str], list[dict[str, Any]]]:
    """`drive(engine)` with telemetry on (NVML at args.hz into a scratch database, the
    engine's steps too): (what drive returned, export columns, export rows of args.gpu_index
    and the engine, `t` from the first row kept)."""
    from ondo.telemetry.export import read_rows
    from ondo.telemetry.pipeline import Telemetry

    with tempfile.TemporaryDirectory(prefix="ondo-trace-") as tmp:
        db = os.path.join(tmp, "telemetry.db")
        tel = Telemetry.start(db, source=source, hz=args.hz, fallback=None)
        if tel.gpu is None:  # never record a simulated GPU in place of the real one
            tel.close()
            raise SystemExit(f"{source} telemetry is unavailable: no GPU columns to record")
        llm.engine.add_step_listener(tel.engine.on_step)
        try:
            result = drive(llm.engine)
        finally:
            llm.engine.remove_step_listener(tel.engine.on_step)
            tel.close()
        columns, rows = read_rows(db)
    rows = [r for r in rows if r["kind"] == "engine" or r.get("gpu_index") == args.gpu_index]
    for r in rows:  # `t` from the first row kept
        r["t"] = r["t_monotonic_s"] - rows[0]["t_monotonic_s"]
    return result, columns, rows


def record_trace(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from ondo.bench.shapes import SHAPES, shape_folder
    from ondo.bench.throughput import dummy_llm, run_ondo
    from ondo.bench.workloads import make_workload
    from ondo.telemetry.export import write_csv

    if not torch.cuda.is_available():
        raise SystemExit("record_serving_trace needs a CUDA GPU")
    vocab = SHAPES[args.model_shape]["vocab_size"]
    llm = dummy_llm(shape_folder(args.model_shape), args)
    # Warm-up, as the throughput bench does: first shapes compile here, not in the trace.
    run_ondo(llm, make_workload("W1", vocab, seed=999, scale=0.125), None)
    records, columns, rows = record_schedule(llm, args, vocab)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    write_csv(columns, rows, args.out)
    return summarize(records, columns, rows, args)


def main(argv: list[str] | None = None) -> int:
    from ondo.bench.shapes import SHAPES
    from ondo.bench.throughput import add_engine_flags

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="CSV to write")
    parser.add_argument("--schedule", type=parse_schedule, default=DEFAULT_SCHEDULE,
                        help=f"comma-separated idle:SECONDS / load:SECONDS (default {DEFAULT_SCHEDULE})")
    parser.add_argument("--hz", type=float, default=20.0, help="NVML sample rate")
    parser.add_argument("--model-shape", default="qwen3-0.6b", choices=sorted(SHAPES))
    parser.add_argument("--scale", type=float, default=1.0, help="fraction of W1's 256 requests")
    parser.add_argument("--seed", type=int, default=200, help="seed of the first batch's prompts")
    parser.add_argument("--gpu-index", type=int, default=0,
                        help="NVML index of the GPU the engine runs on (rows of others dropped)")
    add_engine_flags(parser)
    args = parser.parse_args(argv)
    summary = record_trace(args)
    print_table(summary)
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
