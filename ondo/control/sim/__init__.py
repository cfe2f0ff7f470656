"""A Vidur-style closed-loop simulator: ondo's real scheduler and block manager in virtual
time, a step-time model of the GPU from each step's FLOPs and bytes, the twin's plant as the
GPU, the governor in the loop (`simulator.py`); its calibration on ondo's H100 measurements
(`step_time.py`, `calibration.py`), bursty arrivals (`arrivals.py`), and the scenarios of
`ondo bench governor` (`scenarios.py`, `bench.py`)."""
