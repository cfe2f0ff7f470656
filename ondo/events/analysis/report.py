"""`ondo analyze`: one report over a telemetry database.

- lagged cross-correlation of each engine load series (prefill and decode tokens, FLOPs,
  bytes, per second) with power, die temperature and SM clock (`correlate.py`);
- every throttle episode with the load that preceded it (`attribution.py`);
- time spent under each throttle reason (`ondo.telemetry.derive`);
- energy per output token over the whole record and over the windows in which tokens were
  generated (the energy counter's fresh readings, `ondo.telemetry.derive`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ondo.events.analysis.attribution import attribute, busy_flops_rate, throttle_episodes
from ondo.events.analysis.correlate import lagged_correlation
from ondo.events.analysis.series import LOAD_SERIES, RESPONSE_SERIES, on_grid, read_recording
from ondo.events.detectors.gpu import THROTTLE_REASONS
from ondo.telemetry.derive import efficiency_windows, energy_used_j, throttle_time_fractions


def _energy(rec, gpu_index: int | None) -> dict[str, Any]:
    tokens = int(sum(s.num_output_tokens for s in rec.steps))
    energy = np.array([s.energy_j for s in rec.gpus if s.energy_j is not None], dtype=float)
    whole = energy_used_j(energy) if len(energy) > 1 else None
    out: dict[str, Any] = {
        "energy_j": whole, "output_tokens": tokens,
        "energy_per_output_token_j": whole / tokens if whole is not None and tokens else None,
    }
    windows = [w for w in efficiency_windows(rec.gpus, rec.steps, gpu_index or 0, 1.0)
               if w.output_tokens > 0]
    gen_j = sum(w.energy_j for w in windows)
    gen_tokens = sum(w.output_tokens for w in windows)
    out["generating"] = {
        "windows": len(windows), "seconds": sum(w.t_end_s - w.t_start_s for w in windows),
        "energy_j": gen_j if windows else None, "output_tokens": gen_tokens,
        "energy_per_output_token_j": gen_j / gen_tokens if gen_tokens else None,
    }
    return out


def _throttled(rec) -> dict[str, Any]:
    if len(rec.gpus) < 2:
        return {"by_reason_s": {}, "fraction": {}}
    t = np.array([s.t_monotonic_s for s in rec.gpus])
    bits = np.array([s.throttle_reasons or 0 for s in rec.gpus], dtype=np.int64)
    fractions = throttle_time_fractions(t, bits)
    span = float(t[-1] - t[0])
    names = [str(r.name).lower() for r in THROTTLE_REASONS]
    return {"by_reason_s": {n: fractions[n] * span for n in names},
            "fraction": {n: fractions[n] for n in names}}


def analyze(db: str | Path, gpu_index: int | None = None, bin_s: float = 0.1,
            max_lag_s: float = 10.0, lookback_s: float = 2.0) -> dict[str, Any]:
    rec = read_recording(db, gpu_index)
    grid = on_grid(rec, bin_s)
    times = [s.t_monotonic_s for s in rec.gpus] + [s.end_monotonic_s for s in rec.steps]
    start, end = min(times), max(times)
    # Lags beyond a quarter of the record rest on too little overlap to mean anything.
    max_lag_s = min(max_lag_s, (end - start) / 4)
    correlations = []
    if rec.steps and rec.gpus:
        for load in LOAD_SERIES:
            for response in RESPONSE_SERIES:
                c = lagged_correlation(load, grid.series[load], response, grid.series[response],
                                       bin_s, max_lag_s)
                correlations.append(c.__dict__)
    step_end = np.array([s.end_monotonic_s for s in rec.steps])
    busy = busy_flops_rate(rec.steps)
    episodes = [attribute(ep, rec.steps, step_end, lookback_s, busy)
                for ep in throttle_episodes(rec.gpus)]
    return {
        "db": str(db), "gpu_index": rec.gpu_index,
        "window": {"start_s": start, "end_s": end, "duration_s": end - start,
                   "gpu_samples": len(rec.gpus), "engine_steps": len(rec.steps),
                   "aggregated_until_s": rec.aggregated_until_s},
        "bin_s": bin_s, "max_lag_s": max_lag_s, "lookback_s": lookback_s,
        "power_channel": grid.power_channel,
        "correlations": correlations,
        "episodes": episodes,
        "throttled": _throttled(rec),
        "energy": _energy(rec, rec.gpu_index),
    }


def _r(c: dict) -> str:
    if c["r"] is None:
        return "—"
    return f"r={c['r']:+.2f} @ {c['lag_s']:.1f} s"


def format_text(report: dict[str, Any]) -> str:
    w = report["window"]
    gpu = "no GPU" if report["gpu_index"] is None else f"GPU {report['gpu_index']}"
    lines = [f"ondo analyze: {report['db']}, {gpu}, "
             f"{w['duration_s']:.1f} s ({w['gpu_samples']} GPU samples, "
             f"{w['engine_steps']} engine steps)", ""]
    if report["correlations"]:
        lines.append(f"Load -> response: lagged cross-correlation (lags 0-{report['max_lag_s']:.3g} s "
                     f"on {report['bin_s']:g} s bins; power from {report['power_channel']})")
        lines.append(f"  {'load (per s)':<16}" + "".join(f"{r:<20}" for r in RESPONSE_SERIES))
        by = {(c["load"], c["response"]): c for c in report["correlations"]}
        for load in LOAD_SERIES:
            lines.append(f"  {load:<16}" + "".join(f"{_r(by[(load, r)]):<20}"
                                                   for r in RESPONSE_SERIES))
    else:
        lines.append("Load -> response: needs both GPU samples and engine steps")
    lines += ["", f"Throttle episodes and the load before them (lookback {report['lookback_s']:g} s)"]
    if not report["episodes"]:
        lines.append("  none")
    for i, ep in enumerate(report["episodes"], 1):
        end = "open" if ep["end_s"] is None else f"{ep['end_s']:.2f}"
        dur = "" if ep["duration_s"] is None else f"{ep['duration_s']:.2f} s, "
        clock = "" if ep["min_sm_mhz"] is None else f"min {ep['min_sm_mhz']:.0f} MHz"
        lines.append(f"  {i}. {ep['reason']} {ep['start_s']:.2f}-{end} s ({dur}{clock}): "
                     f"{ep['text']}")
    lines += ["", "Time throttled, by reason"]
    by_reason = report["throttled"]["by_reason_s"]
    if not by_reason:
        lines.append("  no GPU samples")
    for reason in (str(r.name).lower() for r in THROTTLE_REASONS):
        if reason not in by_reason:
            continue
        seconds, frac = by_reason[reason], report["throttled"]["fraction"][reason]
        lines.append(f"  {reason:<26} {seconds:9.2f} s  ({100 * frac:5.1f} %)")
    e = report["energy"]
    lines += ["", "Energy per output token"]
    if e["energy_j"] is None:
        lines.append("  no energy counter readings")
    else:
        per = e["energy_per_output_token_j"]
        lines.append(f"  whole record:     {e['energy_j']:,.0f} J / {e['output_tokens']:,} tokens"
                     + (f" = {per:.4f} J per token" if per is not None else ""))
        g = e["generating"]
        if g["energy_per_output_token_j"] is not None:
            lines.append(f"  while generating: {g['energy_j']:,.0f} J / {g['output_tokens']:,} "
                         f"tokens = {g['energy_per_output_token_j']:.4f} J per token "
                         f"({g['seconds']:.1f} s in {g['windows']} windows)")
    return "\n".join(lines)
