"""Whatever the streams say (garbage included), the online twin's constants stay inside their
physical bounds and its state stays finite (property test)."""

import math

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ondo.telemetry.schema import EngineSample, GpuSample
from ondo.twin.adapt_params import BOUNDS, HI, INLET_BOUNDS_C, LO, params_from_theta
from ondo.twin.adapt_replay import run_trace
from ondo.twin.adaptive import AdaptiveTwin
from ondo.twin.params import h100_params
from ondo.twin.plant import largest_stable_step_s
from ondo.twin.synthetic_serving import serving_records

WILD = st.one_of(
    st.floats(-1e6, 1e6, allow_nan=False),
    st.sampled_from([math.nan, math.inf, -math.inf, 200.0, -40.0, 0.0, 5000.0]),
    st.none(),
)
TEMP = st.one_of(st.floats(20.0, 95.0), WILD)
POWER = st.one_of(st.floats(50.0, 900.0), WILD)

poll = st.tuples(
    st.floats(0.001, 3.0),  # time since the previous poll (may be long)
    TEMP, TEMP, POWER, POWER,
    st.one_of(st.floats(0.0, 50.0), st.none()),  # energy increment
    st.sampled_from([345.0, 1200.0, 1980.0, None]),
    st.booleans(),  # stale power
    st.one_of(st.none(), st.tuples(st.floats(0.0, 1.0), st.floats(0.0, 1.0),
                                   st.floats(0.001, 0.5))),  # an engine step before it
)


def feed(twin: AdaptiveTwin, polls) -> None:
    t, energy = 1000.0, 5e4
    for dt, temp, mem, power, instant, de, sm, stale, step in polls:
        if step is not None:
            c, m, dur = step
            twin.on_engine_sample(EngineSample(0, t, t + dur, t + dur, 0, 64, 64, 64, 10, 100,
                                               0, 0, 0, 64, 0, 1e12, 1e10, c, m))
        t += dt
        if de is not None and math.isfinite(energy):
            energy += de
        twin.on_gpu_sample(GpuSample(
            0, "nvml", t, t, 0.05, 0.0, temp, mem, power, instant,
            None if de is None else energy, sm, 1980.0, 2619.0, 0, 0.0,
            stale=frozenset({"power_instant_w", "power_w"}) if stale else frozenset()))
    twin.flush()


def assert_within_bounds(twin: AdaptiveTwin) -> None:
    theta = twin.theta
    assert np.all(np.isfinite(theta))
    assert np.all(theta >= LO - 1e-12) and np.all(theta <= HI + 1e-12)
    assert np.all(np.isfinite(twin.theta_var)) and np.all(twin.theta_var >= -1e-9)
    params = params_from_theta(twin.base, theta, twin.units, twin.knee)
    for b in BOUNDS:
        name = {"compute_w": "compute_power_w", "memory_w": "memory_power_w"}.get(b.name, b.name)
        assert b.lo - 1e-9 <= getattr(params, name) <= b.hi + 1e-9, b.name
    if twin.filter is not None:
        assert np.all(np.isfinite(twin.filter.x))
        assert INLET_BOUNDS_C[0] <= twin.filter.x[6] <= INLET_BOUNDS_C[1]
        assert np.all(np.isfinite(twin.filter.p))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(poll, min_size=1, max_size=120), st.sampled_from(["engine", "plant"]))
def test_the_constants_never_leave_their_physical_bounds(polls, units):
    twin = AdaptiveTwin(h100_params(), units)
    feed(twin, polls)
    assert_within_bounds(twin)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.floats(-50.0, 50.0), min_size=8, max_size=8))
def test_a_saved_vector_from_anywhere_is_projected_into_the_bounds(raw):
    """A resumed vector that is out of range (a corrupt row, other bounds) comes back inside,
    and the plant it makes can still be stepped."""
    theta = np.concatenate([np.array(raw), [1e9, -1e9, math.nan]])
    twin = AdaptiveTwin(h100_params(), "engine", theta=theta, theta_var=np.full(11, 1e12))
    assert_within_bounds(twin)
    assert largest_stable_step_s(twin.params()) > 0


@settings(max_examples=5, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.floats(0.0, 1.0), min_size=8, max_size=8), st.floats(15.0, 40.0),
       st.integers(0, 1000))
def test_bounds_hold_while_the_teacher_learns_a_random_gpu(draw, ambient_c, seed):
    """A plant with thermal constants drawn anywhere in their ranges (log-uniformly) as the
    GPU, serving for two minutes: the teacher runs on it, and the bounds hold."""
    values = {b.name: float(np.exp(LO[i] + u * (HI[i] - LO[i])) if b.log
                            else LO[i] + u * (HI[i] - LO[i]))
              for i, (b, u) in enumerate(zip(BOUNDS[:8], draw))}
    truth = h100_params().replace(**values)
    records = serving_records(truth, [(10, 0.0), (50, 0.9), (30, 0.0), (30, 0.6)], ambient_c,
                              seed=seed)
    run = run_trace(records, h100_params())
    assert run.twin.teacher.teachings >= 1  # it did learn (extreme plants read hot: fewer)
    assert_within_bounds(run.twin)
