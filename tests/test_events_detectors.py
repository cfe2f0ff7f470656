"""Detectors on synthetic streams whose right answer is known: hysteresis and dwell times,
flapping signals, engine and request conditions, sensors, gaps, and the twin's and the
governor's records read by field name (stand-ins of the same fields)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import pytest

from ondo.events.config import DetectorConfig
from ondo.events.detectors import DetectorSet
from ondo.events.hysteresis import Hysteresis, Transition
from ondo.events.log import EventLog
from ondo.events.schema import EventKind
from ondo.telemetry.schema import EngineSample, GpuSample, RequestSample


def gpu(t: float, bits: int = 0, temp_c: float = 50.0, mem_temp_c: float = 55.0,
        power_w: float | None = 300.0, **kw) -> GpuSample:
    return GpuSample(0, "sim", t, 1.8e9 + t, 0.02, 0.001, temp_c=temp_c, mem_temp_c=mem_temp_c,
                     power_w=power_w, sm_mhz=1500.0 if bits else 1980.0, sm_max_mhz=1980.0,
                     throttle_reasons=bits, **kw)


def step(i: int, t: float, *, used: int = 100, total: int = 1000, waiting: int = 0,
         preempt: int = 0, swapped_blocks: int = 0, prefill: int = 0) -> EngineSample:
    return EngineSample(i, t - 0.02, t, 1.8e9 + t, prefill, 64, 64, 64, used, total,
                        swapped_blocks, preempt, waiting, 64, 0, 1e12, 1e9, 0.05, 0.3)


def run(records, config: DetectorConfig | None = None) -> EventLog:
    detectors = DetectorSet(config or DetectorConfig.from_params())
    log = EventLog()
    for r in records:
        for d in detectors.feed(r):
            log.append(d)
    return log


def kinds(log: EventLog) -> list[str]:
    return [e.kind.value for e in log.recent()]


def test_hysteresis_needs_the_rise_time_and_ends_after_the_fall_time() -> None:
    h = Hysteresis(on=10.0, off=8.0, rise_s=1.0, fall_s=2.0)
    assert h.update(0.0, 11.0) is None  # pending
    assert h.update(0.5, 9.0) is None  # between the thresholds: still pending
    assert h.update(1.0, 12.0) is Transition.OPENED and h.onset_s == 0.0
    assert h.update(2.0, 7.0) is None  # releasing
    assert h.update(3.0, 11.0) is None  # back above on: the episode goes on
    assert h.update(4.0, 7.0) is None
    assert h.update(5.9, 7.5) is None
    assert h.update(6.0, 7.0) is Transition.CLOSED and h.since_s == 4.0
    # A spike shorter than the rise time, then quiet for the fall time: nothing.
    assert h.update(10.0, 11.0) is None
    assert h.update(10.5, 5.0) is None
    assert h.update(12.6, 5.0) is None and not h.active
    assert h.update(13.0, 11.0) is None  # pending again, from 13.0


def test_hysteresis_falling_signal_and_missing_values() -> None:
    h = Hysteresis(on=5.0, off=7.0, rise_s=0.0, fall_s=1.0, rising=False)
    assert h.update(0.0, None) is None
    assert h.update(0.0, 4.0) is Transition.OPENED
    assert h.update(0.5, None) is None
    assert h.update(1.0, 8.0) is None
    assert h.update(2.0, 8.0) is Transition.CLOSED
    with pytest.raises(ValueError):
        Hysteresis(on=5.0, off=7.0, rise_s=0.0, fall_s=1.0)  # off on the wrong side


def test_a_throttle_bit_flapping_at_5_hz_for_60_s_is_one_episode() -> None:
    # 50 Hz samples; the SW power cap bit on for 0.1 s, off for 0.1 s, for 60 s.
    samples = [gpu(t, 0x4 if (i // 5) % 2 == 0 else 0)
               for i in range(3000) for t in [100.0 + i * 0.02]]
    samples += [gpu(160.0 + i * 0.02) for i in range(100)]  # then 2 s clear
    log = run(samples)
    assert kinds(log) == ["throttle_started", "power_cap_sustained", "throttle_ended",
                          "condition_cleared"]
    ended = log.recent()[2].payload
    assert ended["started_s"] == pytest.approx(100.0)
    assert ended["ended_s"] == pytest.approx(159.9)  # the last set sample was at 159.88
    assert ended["onset_seq"] == 1 and ended["min_sm_mhz"] == 1500.0


def test_a_temperature_flapping_around_its_margin_at_5_hz_for_60_s_is_one_episode() -> None:
    # Die at 81.5 / 83.0 C (margin 5.5 / 4.0 against 87 C, threshold 5 C) flips every 0.1 s.
    samples = [gpu(10.0 + i * 0.02, temp_c=83.0 if (i // 5) % 2 == 0 else 81.5)
               for i in range(3000)]
    samples += [gpu(70.0 + i * 0.02, temp_c=70.0) for i in range(400)]
    log = run(samples)
    assert kinds(log) == ["thermal_margin_low", "condition_cleared"]
    low, clear = log.recent()
    assert low.subject == {"gpu": 0, "basis": "measured"}
    assert low.payload["margin_c"] == pytest.approx(4.0) and low.payload["since_s"] == 10.0
    assert low.t_monotonic_s == pytest.approx(11.0)  # held for the 1 s rise time
    assert clear.payload["summary"] == {"lowest": 4.0}
    assert clear.payload["ended_s"] == pytest.approx(70.0)


def test_each_throttle_reason_is_its_own_episode_and_thermal_ones_are_critical() -> None:
    samples = [gpu(i * 0.02, (0x4 if 50 <= i < 100 else 0) | (0x20 if 80 <= i < 120 else 0))
               for i in range(300)]
    log = run(samples)
    started = [e for e in log.recent() if e.kind is EventKind.THROTTLE_STARTED]
    assert [(e.payload["reason"], e.severity.value) for e in started] == [
        ("sw_power_cap", "warning"), ("sw_thermal_slowdown", "critical")]
    ended = {e.payload["reason"]: e.payload for e in log.recent()
             if e.kind is EventKind.THROTTLE_ENDED}
    assert ended["sw_power_cap"]["duration_s"] == pytest.approx(1.0)  # to the first clear sample
    assert ended["sw_thermal_slowdown"]["started_s"] == pytest.approx(1.6)


def test_power_budget_is_reported_once_set() -> None:
    samples = [gpu(i * 0.05, power_w=640.0 if 20 <= i < 100 else 400.0) for i in range(200)]
    assert kinds(run(samples)) == []  # no budget by default: the GPU's cap watches its limit
    log = run(samples, DetectorConfig.from_params(power_budget_w=600.0))
    assert kinds(log) == ["power_budget_exceeded", "condition_cleared"]
    opened = log.recent()[0]
    assert opened.payload == {"power_w": 640.0, "budget_w": 600.0, "since_s": 1.0}
    assert opened.t_monotonic_s == pytest.approx(2.0)


def test_hbm_margin_uses_the_hbm_limit() -> None:
    samples = [gpu(i * 0.1, mem_temp_c=91.0 if i < 50 else 60.0) for i in range(150)]
    log = run(samples)
    assert kinds(log) == ["hbm_margin_low", "condition_cleared"]
    assert log.recent()[0].payload["limit_c"] == 95.0


def test_stale_and_failed_sensors_and_their_recovery() -> None:
    samples = []
    for i in range(400):  # 50 Hz; power frozen from 1 s to 4 s; temperature read fails 2-2.1 s
        t = i * 0.02
        power = 300.0 if 1.0 <= t < 4.0 else 300.0 + i
        failed = frozenset({"temp_c"}) if 2.0 <= t < 2.1 else frozenset()
        stale = frozenset({"power_w"}) if 1.0 < t < 4.0 else frozenset()
        samples.append(gpu(t, power_w=power, stale=stale, failed=failed,
                           temp_c=None if failed else 50.0))
    log = run(samples)
    by_kind = {(e.kind.value, e.subject.get("field")): e for e in log.recent()}
    stale = by_kind[("sensor_stale", "power_w")]
    assert stale.payload["since_s"] == pytest.approx(1.0)
    assert stale.t_monotonic_s == pytest.approx(3.0)  # unchanged for stale_after_s = 2 s
    assert by_kind[("sensor_failed", "temp_c")].payload["since_s"] == pytest.approx(2.0)
    assert kinds(log).count("condition_cleared") == 2  # both recovered for 2 s


def test_gaps_in_a_gpu_series_are_reported_and_merged() -> None:
    times = [i * 0.02 for i in range(100)] + [3.0 + i * 0.02 for i in range(100)] \
        + [5.5 + i * 0.02 for i in range(100)] + [12.0 + i * 0.02 for i in range(50)]
    log = run([gpu(t) for t in times])
    gaps = [e.payload for e in log.recent()]
    assert [g["gap_s"] for g in gaps] == pytest.approx([1.02, 4.52])
    assert gaps[0]["dropped"] == 50  # a 1.02 s hole at 50 Hz
    assert gaps[1]["suppressed"] == 1  # the 0.52 s hole at 5.5 s came within 5 s of the first


def test_kv_pressure_and_backlog_open_after_their_rise_time_and_close_when_idle() -> None:
    steps = [step(i, 1.0 + i * 0.05, used=970 if i < 100 else 100, waiting=50 if i < 100 else 0)
             for i in range(200)]
    log = run(steps)
    assert kinds(log) == ["kv_cache_pressure", "queue_backlog", "condition_cleared",
                          "condition_cleared"]
    kv, backlog = log.recent()[:2]
    assert kv.t_monotonic_s == pytest.approx(2.0) and kv.payload["usage"] == pytest.approx(0.97)
    assert backlog.t_monotonic_s == pytest.approx(3.0) and backlog.payload["num_waiting"] == 50
    # An engine that stops under pressure: ticks from the GPU's samples close the episode.
    busy = [step(i, 1.0 + i * 0.05, used=990) for i in range(40)]
    quiet = [gpu(3.0 + i * 0.1) for i in range(60)]
    log = run(busy + quiet)
    assert kinds(log) == ["kv_cache_pressure", "condition_cleared"]
    assert log.recent()[1].payload["ended_s"] == pytest.approx(4.95, abs=0.06)


def test_a_preemption_burst_is_one_event_with_its_mode_and_totals() -> None:
    steps = []
    pool = 0
    for i in range(100):
        t = 10.0 + i * 0.05
        n = 1 if i in (10, 12, 20, 40) else 0
        if n and i != 20:
            pool += 16  # swapped out
        steps.append(step(i, t, preempt=n, swapped_blocks=pool))
    steps += [step(100 + i, 20.0 + i * 0.05, preempt=1 if i == 0 else 0, swapped_blocks=pool)
              for i in range(60)]
    log = run(steps)
    assert kinds(log) == ["preemption", "condition_cleared", "preemption", "condition_cleared"]
    first, cleared = log.recent()[:2]
    assert first.payload["mode"] == "swap" and first.payload["swapped_blocks_delta"] == 16
    assert cleared.payload["summary"] == {"preemptions": 4, "swap_steps": 3, "recompute_steps": 1,
                                          "swapped_blocks_out": 48}
    assert log.recent()[2].payload["mode"] == "recompute"


def test_swap_traffic_over_half_the_cache_in_10_s_is_a_storm() -> None:
    steps = []
    pool = 0
    for i in range(400):  # 20 Hz; 40 blocks in or out every step for 4 s, cache of 1000
        if 20 <= i < 100:
            pool = 40 if pool == 0 else 0
        steps.append(step(i, i * 0.05, swapped_blocks=pool))
    log = run(steps)
    assert kinds(log) == ["swap_storm", "condition_cleared"]
    storm = log.recent()[0].payload
    assert storm["fraction"] >= 0.5 and storm["kv_blocks_total"] == 1000
    assert storm["swapped_blocks_moved"] == 520  # 13 moves of 40 by the time it crossed 0.5


def request(i: int, finish_s: float, ttft_s: float, n_out: int = 11,
            span_s: float = 0.5) -> RequestSample:
    first = finish_s - span_s
    return RequestSample(f"r{i}", first - ttft_s, first - ttft_s + 0.001, first, finish_s,
                         1.8e9 + finish_s, 10, n_out, "length")


def test_slo_violations_over_a_window_are_one_event() -> None:
    reqs = [request(i, 10.0 + i * 0.5, 3.0 if 10 <= i < 20 else 0.2) for i in range(40)]
    ticks = [step(i, 30.0 + i * 0.5) for i in range(80)]  # engine steps let time pass
    log = run(reqs + ticks)
    assert kinds(log) == ["slo_violation", "condition_cleared"]
    v = log.recent()[0]
    assert v.subject == {"metric": "ttft"}
    assert (v.payload["violating"], v.payload["requests"]) == (3, 13)
    assert v.payload["worst_s"] == pytest.approx(3.0)
    assert v.evidence == ("request:r10", "request:r11", "request:r12")
    tpot = request(99, 100.0, 0.1, n_out=3, span_s=1.0)
    assert tpot.tpot_s == pytest.approx(0.5) and tpot.ttft_s == pytest.approx(0.1)


@dataclass(frozen=True)
class TwinSnapshot:  # the live twin's record, by its field names
    gpu_index: int
    t_monotonic_s: float
    t_wall_s: float
    die_c: float
    hbm_c: float
    die_sensor_c: float
    ambient_c: float
    die_std_c: float
    forecast_horizon_s: float
    die_peak_c: float
    hbm_peak_c: float
    power_peak_w: float
    time_to_throttle_s: float | None
    time_to_power_cap_s: float | None


@dataclass(frozen=True)
class GovernorDecision:  # the governor's record, by its field names
    t_monotonic_s: float
    t_wall_s: float
    policy: str
    reason: str
    limits: dict = field(default_factory=dict)
    inputs: dict = field(default_factory=dict)
    forecast: dict = field(default_factory=dict)


def snap(t: float, to_throttle: float | None, die_peak_c: float = 70.0) -> TwinSnapshot:
    return TwinSnapshot(0, t, 1.8e9 + t, 70.0, 72.0, 69.5, 25.0, 0.3, 10.0, die_peak_c, 75.0,
                        650.0, to_throttle, None)


def test_twin_forecasts_predict_a_throttle_once_and_margins_from_the_forecast_peak() -> None:
    snaps = [snap(100.0 + i * 0.25, 8.0 - i * 0.25 if i < 20 else None,
                  die_peak_c=84.0 if 8 <= i < 20 else 70.0) for i in range(60)]
    log = run(snaps)
    # Margin low from the 9th snapshot (peak 84 C); a throttle within 5 s from the 13th.
    assert kinds(log) == ["thermal_margin_low", "throttle_predicted", "condition_cleared",
                          "condition_cleared"]
    predicted = log.recent()[1]
    assert predicted.subject == {"gpu": 0, "reason": "thermal"}
    assert predicted.payload["time_to_throttle_s"] == 5.0
    assert predicted.payload["basis"] == "live twin"
    assert log.recent()[0].subject == {"gpu": 0, "basis": "forecast"}
    assert predicted.t_monotonic_s == 103.0
    assert log.recent()[2].payload["kind"] == "throttle_predicted"  # cleared 3 s after 105 s
    assert log.recent()[2].t_monotonic_s == 108.0


def test_a_prediction_is_not_raised_while_the_gpu_already_throttles_for_it() -> None:
    records = [gpu(99.0 + i * 0.02, 0x20) for i in range(50)]  # thermal slowdown on
    records += [snap(100.0, 2.0)]
    log = run(records)
    assert "throttle_predicted" not in kinds(log)


def test_a_governor_decision_becomes_an_event_with_its_fields() -> None:
    d = GovernorDecision(5.0, 1.8e9, "thermal", "die forecast 86 C in 4 s",
                         {"max_num_batched_tokens": 4096}, {"die_c": 80.5}, {"die_peak_c": 86.0})
    log = run([d])
    e = log.recent()[0]
    assert e.kind is EventKind.GOVERNOR_DECISION
    assert e.payload == {"policy": "thermal", "reason": "die forecast 86 C in 4 s",
                         "limits": {"max_num_batched_tokens": 4096}, "inputs": {"die_c": 80.5},
                         "forecast": {"die_peak_c": 86.0}}


def test_the_same_records_give_the_same_log() -> None:
    records = [gpu(i * 0.02, 0x4 if (i // 37) % 3 == 0 else 0, temp_c=80.0 + (i % 9))
               for i in range(2000)]
    records += [step(i, i * 0.05, used=960, preempt=int(i % 50 == 0)) for i in range(600)]
    records.sort(key=lambda r: getattr(r, "t_monotonic_s", getattr(r, "end_monotonic_s", 0)))
    a, b = run(records), run(list(records))
    assert a.head == b.head and a.head.count > 10
    changed = list(records)
    changed[500] = replace(changed[500], throttle_reasons=0x40)
    assert run(changed).head != a.head


@pytest.mark.parametrize("change, message", [
    ({"kv_pressure_off": 0.99}, "kv_pressure_off=0.99 must not exceed kv_pressure_on=0.95"),
    ({"throttle_release_s": -1.0}, "throttle_release_s=-1.0 must be >= 0"),
    ({"slo_window_s": 0.0}, "slo_window_s=0.0 must be > 0"),
    ({"backlog_waiting": float("nan")}, "backlog_waiting=nan is not a number"),
])
def test_detector_settings_that_make_no_sense_are_refused_by_name(change, message) -> None:
    with pytest.raises(ValueError, match=message):
        DetectorConfig.from_params(**change)
