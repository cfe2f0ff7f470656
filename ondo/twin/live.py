"""The twin beside a serving engine: estimator and predictor fed by the telemetry hub.

`TwinTracker` is the synchronous core (the closed-loop simulator runs it in virtual time):

- `on_engine_sample(EngineSample)`: the engine's load (`EngineLoadTracker`), the fastest
  sensor there is: what the GPU runs now and what waits to run.
- `on_gpu_sample(GpuSample)`: one Kalman update (`ThermalEstimator`): the fast power channel
  (`power_instant_w`, NVML's 1 s average where a source has no instant channel) drives it,
  its HBM share set by the engine's memory activity through the params' engine load map; the
  integer temperature readings correct it.
- `snapshot(now_s)`: a `TwinSnapshot`: the estimate, and a forecast over `horizon_s` with the
  engine's load held at its recent average (busy activity times the fraction of time busy).

`LiveTwin` runs a tracker on a thread of its own, fed by a bounded hub subscription (the
engine's path never waits on it), and publishes a snapshot on the hub every `period_s`.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from ondo.telemetry.hub import Subscription, TelemetryHub
from ondo.telemetry.schema import EngineSample, GpuSample
from ondo.twin.adaptive import AdaptiveTwin
from ondo.twin.confidence import ForecastScorer
from ondo.twin.engine_load import plant_activity
from ondo.twin.estimator import ThermalEstimator
from ondo.twin.params import TwinParams
from ondo.twin.plant import THROTTLE_SW_POWER_CAP
from ondo.twin.predictor import forecast_constant, state_from_estimate
from ondo.twin.replay import hbm_power_w

log = logging.getLogger(__name__)

DEFAULT_HORIZON_S = 10.0
DEFAULT_PERIOD_S = 0.25
FORECAST_STEP_S = 0.05
LOAD_TAU_S = 0.2  # the engine load's averaging time
IDLE_AFTER_S = 0.5  # no step ended for this long: the engine is idle
POWER_WINDOW_S = 1.0


@dataclass(frozen=True)
class TwinSnapshot:
    """The twin's view of one GPU at one time: estimated state and a short forecast."""

    gpu_index: int
    t_monotonic_s: float
    t_wall_s: float
    die_c: float  # estimated true die temperature
    hbm_c: float
    die_sensor_c: float  # estimated (unrounded) die sensor reading
    ambient_c: float  # estimated inlet temperature
    die_std_c: float
    forecast_horizon_s: float
    die_peak_c: float  # highest die sensor reading forecast within the horizon
    hbm_peak_c: float
    power_peak_w: float  # highest NVML 1 s average forecast within the horizon
    time_to_throttle_s: float | None  # first thermal slowdown bit forecast, None: none
    time_to_power_cap_s: float | None
    hbm_sensor_c: float = math.nan
    hbm_std_c: float = math.nan
    sink_c: float = math.nan
    board_c: float = math.nan
    power_w: float = math.nan  # latest NVML 1 s average
    power_instant_w: float = math.nan  # latest fast power reading
    sm_mhz: float = math.nan
    throttle_reasons: int = 0
    compute_activity: float = 0.0  # the load forecast with, in the plant's units
    memory_activity: float = 0.0
    gpu_samples: int = 0  # samples the estimator has taken
    die_band_c: float = math.nan  # the peaks' band: +- this (confidence.py)
    hbm_band_c: float = math.nan
    throttle_probability: float = math.nan  # of a thermal slowdown within the horizon
    adapted: bool = False  # the constants are adapted online (adaptive.py)


@dataclass(frozen=True)
class EngineLoad:
    """The engine's recent load: activities while stepping, how much of the time it stepped,
    and the work queued behind it. Activities are in the plant's units where the tracker has
    the params' engine load map (applied step by step, since the map is not linear), else in
    the engine's (achieved FLOP/s and bytes/s over peak)."""

    compute_activity: float  # while busy
    memory_activity: float
    busy_fraction: float  # of wall time covered by steps, over the last LOAD_TAU_S or so
    prefill_compute_activity: float  # of steps with prefill tokens (what queued prompts draw)
    prefill_memory_activity: float
    decode_compute_activity: float  # of steps without
    decode_memory_activity: float
    prefill_tokens_per_s: float  # prompt tokens per second of steps with prefill tokens
    prefill_share: float  # of the busy time, in steps with prefill tokens
    num_waiting: int
    num_waiting_tokens: int
    num_running: int
    last_step_end_s: float | None
    kv_usage: float = 0.0  # fraction of KV blocks in use after the latest step
    busy_fraction_1s: float = 0.0  # averaged over 1 s, as NVML averages power

    @property
    def mean_compute_activity(self) -> float:
        return self.compute_activity * self.busy_fraction

    @property
    def mean_memory_activity(self) -> float:
        return self.memory_activity * self.busy_fraction


IDLE_ENGINE = EngineLoad(0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0, 0, 0, None)


ActivityMap = Callable[[float, float], tuple[float, float]]


class EngineLoadTracker:
    """Time-weighted averages of the engine's step samples. With scheduling ahead a step's
    span overlaps the previous one's; only the time it adds to the covered span counts."""

    def __init__(self, tau_s: float = LOAD_TAU_S, idle_after_s: float = IDLE_AFTER_S,
                 activity_map: ActivityMap | None = None) -> None:
        self.tau_s = tau_s
        self.idle_after_s = idle_after_s
        self.activity_map = activity_map
        self._ec = self._em = 0.0
        self._pc = self._pm = 0.0
        self._dc = self._dm = 0.0
        self._pf_rate = 0.0
        self._pf_share = 0.0
        self._busy = 0.0  # EMA of covered time per wall time
        self._busy_1s = 0.0
        self._last_end: float | None = None
        self._latest: EngineSample | None = None

    def add(self, s: EngineSample) -> None:
        start, end = s.start_monotonic_s, s.end_monotonic_s
        last = self._last_end
        covered = end - max(start, last) if last is not None else end - start
        covered = max(0.0, covered)
        wall = end - last if last is not None else covered
        if wall > 0:
            # Busy fraction: an EMA over wall time of 1 while covered, 0 in the gaps.
            decay = math.exp(-wall / self.tau_s)
            self._busy = self._busy * decay + (1 - decay) * (covered / wall)
            decay = math.exp(-wall / POWER_WINDOW_S)
            self._busy_1s = self._busy_1s * decay + (1 - decay) * (covered / wall)

        if covered > 0:
            ec, em = s.compute_activity, s.memory_activity
            if self.activity_map is not None:
                ec, em = self.activity_map(ec, em)
            w = 1 - math.exp(-covered / self.tau_s)
            self._ec += w * (ec - self._ec)
            self._em += w * (em - self._em)
            self._pf_share += w * ((1.0 if s.num_prefill_tokens > 0 else 0.0) - self._pf_share)
            # What prefill draws is seen in bursts: averaged over longer.
            w_p = 1 - math.exp(-covered / (4 * self.tau_s))
            if s.num_prefill_tokens > 0:
                self._pc += w_p * (ec - self._pc)
                self._pm += w_p * (em - self._pm)
                self._pf_rate += w_p * (s.num_prefill_tokens / (end - start) - self._pf_rate)
            else:
                self._dc += w_p * (ec - self._dc)
                self._dm += w_p * (em - self._dm)
        self._last_end = end if last is None else max(last, end)
        self._latest = s

    def load(self, now_s: float) -> EngineLoad:
        s = self._latest
        if s is None or self._last_end is None:
            return IDLE_ENGINE
        gap = max(0.0, now_s - self._last_end)
        busy = self._busy * math.exp(-gap / self.tau_s) if gap > self.idle_after_s else self._busy
        if gap > self.idle_after_s and s.num_waiting == 0 and s.num_running == 0:
            busy = 0.0
        return EngineLoad(self._ec, self._em, busy, self._pc, self._pm, self._dc, self._dm,
                          self._pf_rate, self._pf_share, s.num_waiting,
                          s.num_waiting_tokens, s.num_running, self._last_end,
                          s.num_kv_blocks_used / max(s.num_kv_blocks_total, 1),
                          self._busy_1s * math.exp(-gap / POWER_WINDOW_S))


class TwinTracker:
    """Estimator and predictor for one GPU, fed sample by sample."""

    def __init__(self, params: TwinParams, gpu_index: int = 0,
                 horizon_s: float = DEFAULT_HORIZON_S,
                 adaptive: AdaptiveTwin | None = None) -> None:
        """`adaptive`: the online twin whose adapted constants and estimate to forecast with
        (None: `params` as they are, and the fixed-constant estimator)."""
        self.params = params
        self.gpu_index = gpu_index
        self.horizon_s = horizon_s
        self.adaptive = adaptive
        self.engine = EngineLoadTracker(activity_map=lambda c, m: _mapped(self._params(), c, m))
        self.scorer = ForecastScorer()
        self.estimator: ThermalEstimator | None = None
        self.latest: GpuSample | None = None
        self.gpu_samples = 0
        self._last_t: float | None = None
        self._fast_w: float | None = None  # power over the interval since the last sample

    def _params(self) -> TwinParams:
        return self.adaptive.params() if self.adaptive is not None else self.params

    def on_engine_sample(self, s: EngineSample) -> None:
        self.engine.add(s)
        if self.adaptive is not None:
            self.adaptive.on_engine_sample(s)

    def _hbm_w(self, now_s: float) -> float:
        return float(hbm_power_w(self._params(), self.engine.load(now_s).mean_memory_activity))

    def on_gpu_sample(self, s: GpuSample) -> None:
        if s.gpu_index != self.gpu_index or s.temp_c is None:
            return
        power = s.power_instant_w if s.power_instant_w is not None else s.power_w
        if power is None:
            return
        self.scorer.reading(s.t_monotonic_s, s.temp_c, s.mem_temp_c)
        hbm_w = self._hbm_w(s.t_monotonic_s)
        mem_temp = s.mem_temp_c if s.mem_temp_c is not None else s.temp_c
        if self.adaptive is not None:
            self.adaptive.on_gpu_sample(s)
        elif self.estimator is None:
            self.estimator = ThermalEstimator(self.params, s.temp_c, mem_temp, power, hbm_w)
        else:
            dt = s.t_monotonic_s - (self._last_t or s.t_monotonic_s)
            if dt > 0:
                # The power over (t_prev, t] is best known as the previous fast reading.
                prev = self._fast_w if self._fast_w is not None else power
                self.estimator.update(dt, prev, hbm_w, s.temp_c, mem_temp)
        self._last_t = s.t_monotonic_s
        self._fast_w = power
        self.latest = s
        self.gpu_samples += 1

    def snapshot(self, now_s: float, t_wall_s: float | None = None,
                 with_forecast: bool = True) -> TwinSnapshot | None:
        """None until the first GPU sample."""
        s = self.latest
        if s is None:
            return None
        adaptive = self.adaptive
        if adaptive is not None and not adaptive.ready:
            return None
        if adaptive is None and self.estimator is None:
            return None
        p = self._params()
        power_w = s.power_w if s.power_w is not None else self._fast_w or 0.0
        instant_w = self._fast_w if self._fast_w is not None else power_w
        hbm_w = self._hbm_w(now_s)
        if adaptive is not None:
            e = adaptive.estimate()
        else:
            assert self.estimator is not None
            e = self.estimator.estimate(instant_w, hbm_w)
        load = self.engine.load(now_s)
        a_c, a_m = load.mean_compute_activity, load.mean_memory_activity
        sm = s.sm_mhz if s.sm_mhz is not None else p.sm_max_mhz
        bits = s.throttle_reasons or 0
        die_peak, hbm_peak, power_peak = e.die_sensor_c, e.hbm_sensor_c, power_w
        ttt = ttc = None
        horizon = 0.0
        if with_forecast:
            state = state_from_estimate(p, e, sm, power_w, instant_w,
                                        bool(bits & THROTTLE_SW_POWER_CAP))
            fc = forecast_constant(p, state, self.horizon_s, float(a_c), float(a_m),
                                   e.ambient_c, dt_s=FORECAST_STEP_S)
            die_peak = max(die_peak, float(np.max(fc.temp_c)))
            hbm_peak = max(hbm_peak, float(np.max(fc.mem_temp_c)))
            power_peak = max(power_peak, float(np.max(fc.power_w)))
            ttt, ttc = fc.time_to_throttle_s, fc.time_to_power_cap_s
            horizon = self.horizon_s
            self.scorer.forecast(now_s + horizon, float(fc.temp_c[-1]), float(fc.mem_temp_c[-1]))
        band = self.scorer.bands(e.die_std_c, e.hbm_std_c, die_peak, p.sw_thermal_c, hbm_peak,
                                 p.mem_max_c)
        return TwinSnapshot(
            gpu_index=self.gpu_index, t_monotonic_s=now_s,
            t_wall_s=time.time() if t_wall_s is None else t_wall_s,
            die_c=e.die_c, hbm_c=e.hbm_c, die_sensor_c=e.die_sensor_c, ambient_c=e.ambient_c,
            die_std_c=e.die_std_c, forecast_horizon_s=horizon, die_peak_c=die_peak,
            hbm_peak_c=hbm_peak, power_peak_w=power_peak, time_to_throttle_s=ttt,
            time_to_power_cap_s=ttc, hbm_sensor_c=e.hbm_sensor_c, hbm_std_c=e.hbm_std_c,
            sink_c=e.sink_c, board_c=e.board_c, power_w=power_w, power_instant_w=instant_w,
            sm_mhz=sm, throttle_reasons=bits, compute_activity=float(a_c),
            memory_activity=float(a_m), gpu_samples=self.gpu_samples,
            die_band_c=band.die_band_c, hbm_band_c=band.hbm_band_c,
            throttle_probability=band.throttle_probability, adapted=adaptive is not None,
        )


def _mapped(params: TwinParams, compute: float, memory: float) -> tuple[float, float]:
    a_c, a_m = plant_activity(params, compute, memory)
    return float(a_c), float(a_m)


class LiveTwin:
    """A `TwinTracker` on its own thread, fed by the hub, publishing snapshots on it."""

    def __init__(self, hub: TelemetryHub, params: TwinParams, gpu_index: int = 0,
                 period_s: float = DEFAULT_PERIOD_S, horizon_s: float = DEFAULT_HORIZON_S,
                 maxsize: int = 2048, adaptive: AdaptiveTwin | None = None,
                 constants_record: Callable[[], Any] | None = None,
                 persist_period_s: float = 300.0) -> None:
        """`adaptive`: forecast with the online twin's constants (TwinTracker);
        `constants_record`: a record of them, published on the hub every `persist_period_s`
        and at `stop()` (the store keeps it: live_adapt.py)."""
        self.hub = hub
        self.period_s = period_s
        self.tracker = TwinTracker(params, gpu_index, horizon_s, adaptive)
        self.constants_record = constants_record
        self.persist_period_s = persist_period_s
        self._persisted_at = time.monotonic()
        self.published = 0
        self.errors = 0
        self.latest: TwinSnapshot | None = None
        self._recent_s: deque[float] = deque(maxlen=64)  # how long each snapshot took
        self._sub: Subscription = hub.subscribe(maxsize=maxsize, kinds=(GpuSample, EngineSample))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ondo-live-twin", daemon=True)

    def start(self) -> LiveTwin:
        self._thread.start()
        return self

    def stop(self, timeout_s: float = 5.0) -> None:
        self._stop.set()
        self._sub.close()
        if self._thread.is_alive():
            self._thread.join(timeout_s)
        self._persist()

    def _persist(self) -> None:
        if self.constants_record is None:
            return
        self._persisted_at = time.monotonic()
        try:
            record = self.constants_record()
        except Exception:  # the twin must never take the server down
            self.errors += 1
            log.exception("saving the twin's adapted constants failed")
            return
        if record is not None:
            self.hub.publish(record)

    @property
    def dropped(self) -> int:
        return self._sub.queue.dropped if self._sub.queue is not None else 0

    def _run(self) -> None:
        queue = self._sub.queue
        assert queue is not None
        next_t = time.monotonic() + self.period_s
        while not self._stop.is_set():
            for sample in queue.get_batch(512, timeout=max(0.0, next_t - time.monotonic())):
                if isinstance(sample, EngineSample):
                    self.tracker.on_engine_sample(sample)
                else:
                    self.tracker.on_gpu_sample(sample)
            now = time.monotonic()
            if now < next_t:
                continue
            next_t = max(next_t + self.period_s, now)
            try:
                snap = self.tracker.snapshot(now)
            except Exception:  # the twin must never take the server down
                self.errors += 1
                if self.errors == 1:
                    log.exception("live twin snapshot failed (logged once)")
                continue
            self._recent_s.append(time.monotonic() - now)
            if snap is not None:
                self.latest = snap
                self.published += 1
                self.hub.publish(snap)
            if now - self._persisted_at >= self.persist_period_s:
                self._persist()
