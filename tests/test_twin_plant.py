"""The plant model behaves like the H100 traces and reports NVML's throttle bits."""

import numpy as np

from ondo.twin.params import h100_params
from ondo.twin.plant import (
    THROTTLE_GPU_IDLE,
    THROTTLE_HW_SLOWDOWN,
    THROTTLE_HW_THERMAL,
    THROTTLE_SW_POWER_CAP,
    THROTTLE_SW_THERMAL,
    GpuPlant,
    Load,
    steady_state,
)
from ondo.twin.traces import load_from_phase

P = h100_params()
MATMUL = Load(compute_activity=1.0)


def run(plant, load, seconds, ambient_c=None, dt_s=0.01):
    return [plant.step(dt_s, load, ambient_c) for _ in range(int(seconds / dt_s))]


def test_idle_plant_reports_no_throttle_and_full_clock():
    r = run(GpuPlant(P), Load(), 2.0)[-1]
    assert r.throttle_reasons == THROTTLE_GPU_IDLE  # idle, and no clock-limiting reason
    assert r.sm_mhz == P.sm_max_mhz
    assert 100 < r.power_w < 160


def test_matmul_hits_power_cap_with_clock_near_measured_1365_mhz():
    r = run(GpuPlant(P), MATMUL, 20.0)[-1]
    assert r.throttle_reasons == THROTTLE_SW_POWER_CAP
    assert abs(r.power_w - 700) < 10
    assert 1300 <= r.sm_mhz <= 1450


def test_power_sensor_lags_instant_power_by_its_one_second_window():
    readings = run(GpuPlant(P), MATMUL, 1.5)
    at_half_s = readings[49]
    assert at_half_s.power_instant_w > 650
    assert at_half_s.power_w < 500  # the 1 s average is only half way up
    assert readings[-1].power_w > 650


def test_memory_copy_heats_hbm_more_than_die_without_power_cap():
    r = run(GpuPlant(P), Load(memory_activity=1.0), 8.0)[-1]
    assert r.throttle_reasons == 0
    assert r.mem_temp_c > r.temp_c
    assert 420 < r.power_w < 580


def test_temperatures_are_whole_degrees():
    r = run(GpuPlant(P), MATMUL, 0.5)[-1]
    assert isinstance(r.temp_c, int) and isinstance(r.mem_temp_c, int)


def test_hot_inlet_triggers_sw_thermal_slowdown_holding_die_near_max_operating_temp():
    amb = P.ambient_c + 25
    plant = GpuPlant(P, state=steady_state(P, Load(), amb))
    readings = run(plant, MATMUL, 90.0, ambient_c=amb)
    assert readings[-1].throttle_reasons & THROTTLE_SW_THERMAL
    assert abs(readings[-1].temp_c - P.sw_thermal_c) <= 1
    assert readings[-1].sm_mhz < 1300


def test_hw_slowdown_is_a_hard_step_with_hw_bits():
    plant = GpuPlant(P)
    hot = np.array(P.hw_slowdown_c + 1.0)
    for name in ("die_c", "sink_c", "board_c", "die_sensor_c"):
        setattr(plant.state, name, hot.copy())
    r = plant.step(0.01, Load(), P.hw_slowdown_c)
    r = plant.step(0.01, Load(), P.hw_slowdown_c)
    assert r.throttle_reasons & THROTTLE_HW_THERMAL and r.throttle_reasons & THROTTLE_HW_SLOWDOWN
    assert r.sm_mhz == P.hw_slowdown_frac * P.sm_max_mhz


def test_phase_labels_map_to_loads():
    assert load_from_phase("idle1") == (0.0, 0.0)
    assert load_from_phase("mm") == (1.0, 0.0)
    assert load_from_phase("copy") == (0.0, 1.0)
    assert load_from_phase("mm@0.25") == (0.25, 0.0)
