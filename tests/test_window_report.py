"""The engine's windowed report: per-step host time by phase over each window, not since start."""

from __future__ import annotations

import logging

from ondo.engine.window_report import WindowReport


def test_window_report_gives_each_windows_own_per_step_time(caplog) -> None:
    timing = {"schedule": 0.0, "launch": 0.0, "steps": 0.0}
    report = WindowReport(timing, device=None, interval_s=10.0, _window_start=0.0)
    timing.update(schedule=0.2, launch=1.0, steps=100.0)  # 2 ms and 10 ms per step
    report.loop_time("publish", 0.05)
    assert report.maybe_log(now=5.0) is None  # the window is not over yet
    with caplog.at_level(logging.INFO, logger="ondo.engine.window_report"):
        first = report.maybe_log(now=10.0)
    assert first == {"window_s": 10.0, "steps": 100, "host_ms_per_step": {"schedule": 2.0, "launch": 10.0},
                     "loop_s": {"publish": 0.05}}
    assert "engine window" in caplog.text
    # The second window counts only its own steps: 50 more steps costing 1.5 s of launch.
    timing.update(launch=2.5, steps=150.0)
    second = report.maybe_log(now=25.0)
    assert second["steps"] == 50 and second["window_s"] == 15.0
    assert second["host_ms_per_step"] == {"schedule": 0.0, "launch": 30.0}
    assert second["loop_s"] == {"publish": 0.0}


def test_window_without_steps_logs_nothing() -> None:
    timing = {"schedule": 0.0, "steps": 0.0}
    report = WindowReport(timing, device=None, interval_s=1.0, _window_start=0.0)
    assert report.maybe_log(now=2.0) is None
    timing.update(schedule=0.01, steps=1.0)
    assert report.maybe_log(now=3.0)["host_ms_per_step"] == {"schedule": 10.0}
