"""What the event detectors and the event log cost the engine: W1 with the telemetry pipeline
(NVML source, SQLite store) alone and with the detectors and the hash-chained log on the same
hub and in the same file, alternated in pairs on one engine with fresh prompts for every run,
so that drift and warm-up fall on both sides (every run the same lengths). Reports the medians, the throughput cost, and
the CPU time the detectors' thread itself used (a bound on their cost that run-to-run noise
does not blur)."""

from __future__ import annotations

import os
import statistics
from collections.abc import Callable
from typing import Any

from ondo.bench.workloads import Request, Workload


def fresh_prompts(workload: Workload, run: int, vocab: int) -> Workload:
    """The same lengths with other token ids, so that no run hits another's cached prefixes."""
    return Workload(workload.name, workload.description, [
        Request([(t + 7919 * run) % vocab for t in r.prompt_token_ids], r.max_tokens)
        for r in workload.requests])


def _remove(db: str) -> None:
    for suffix in ("", "-wal", "-shm"):
        if os.path.exists(db + suffix):
            os.remove(db + suffix)


def run_events_overhead(llm, workload: Callable[[int], Workload], limits, hz: float, pairs: int,
                        out_dir: str, run_ondo, keep_db: bool = False) -> dict[str, Any]:
    """`workload(run)`: the workload of run number `run` (same lengths, fresh prompts)."""
    from ondo.events.config import DetectorConfig
    from ondo.events.live import LiveEvents
    from ondo.events.table import EVENTS_TABLE
    from ondo.events.verify import verify
    from ondo.telemetry.pipeline import Telemetry

    runs: list[dict[str, Any]] = []
    for k in range(pairs):
        for with_events in (False, True):
            db = os.path.join(out_dir, f"events-overhead-{k}-{'on' if with_events else 'off'}.db")
            _remove(db)
            tel = Telemetry.start(db, source="nvml", hz=hz,
                                  tables=(EVENTS_TABLE,) if with_events else ())
            live = LiveEvents(tel.hub, DetectorConfig.from_params(), tel.store) \
                if with_events else None
            try:
                row = run_ondo(llm, workload(1 + 2 * k + with_events), limits,
                               extra_listeners=[tel.engine.on_step])
            finally:
                if live is not None:
                    live.close()
                tel.close()
            run = {"pair": k, "events": with_events,
                   "output_tokens_per_s": row["output_tokens_per_s"],
                   "elapsed_s": row["elapsed_s"], "engine_steps": row["steps"],
                   "gpu_samples": tel.gpu.produced if tel.gpu is not None else 0,
                   "store_dropped": tel.store.dropped if tel.store is not None else 0}
            if live is not None:
                check = verify(db)
                run.update({"detector_cpu_s": live.cpu_s,
                            "detector_cpu_fraction": live.cpu_s / row["elapsed_s"],
                            "records_dropped": live.dropped, "log_entries": live.log.head.count,
                            "by_kind": dict(live.log.counts), "log_verifies": check.ok})
            runs.append(run)
            if not keep_db:
                _remove(db)
    off = [r["output_tokens_per_s"] for r in runs if not r["events"]]
    on = [r["output_tokens_per_s"] for r in runs if r["events"]]
    with_events = [r for r in runs if r["events"]]
    result = {
        "workload": "W1", "telemetry_hz": hz, "pairs": pairs, "runs": runs,
        "telemetry_only_output_tokens_per_s": statistics.median(off),
        "with_events_output_tokens_per_s": statistics.median(on),
        "events_overhead_fraction": 1.0 - statistics.median(on) / statistics.median(off),
        "detector_cpu_fraction_max": max(r["detector_cpu_fraction"] for r in with_events),
        "records_dropped": sum(r["records_dropped"] for r in with_events),
        "logs_verify": all(r["log_verifies"] for r in with_events),
    }
    return result


def format_table(result: dict[str, Any]) -> str:
    lines = [f"event detectors + log vs telemetry alone (W1, NVML at {result['telemetry_hz']:g} Hz, "
             f"{result['pairs']} pairs)",
             f"{'pair':>4} {'telemetry tok/s':>16} {'+ events tok/s':>15} {'detector CPU':>13} "
             f"{'entries':>8}"]
    for k in range(result["pairs"]):
        off = next(r for r in result["runs"] if r["pair"] == k and not r["events"])
        on = next(r for r in result["runs"] if r["pair"] == k and r["events"])
        lines.append(f"{k:>4} {off['output_tokens_per_s']:>16,.0f} {on['output_tokens_per_s']:>15,.0f} "
                     f"{100 * on['detector_cpu_fraction']:>12.3f}% {on['log_entries']:>8}")
    lines.append(f"median: {result['telemetry_only_output_tokens_per_s']:,.0f} -> "
                 f"{result['with_events_output_tokens_per_s']:,.0f} tok/s, cost "
                 f"{100 * result['events_overhead_fraction']:+.2f} % (target <= 1 %); detector "
                 f"thread CPU <= {100 * result['detector_cpu_fraction_max']:.3f} % of the run; "
                 f"records dropped {result['records_dropped']}; logs verify: {result['logs_verify']}")
    return "\n".join(lines)
