"""ondo.control: the governor, which turns the twin's state and forecasts and the engine's
planned load into limits on the scheduler (docs/governor.md).

- `governor.py`: `Governor`: a policy (off, reactive, predictive), objectives, the limits in
  force; `tick(inputs)` returns a `GovernorDecision` when they change.
- `reactive.py`, `predictive.py`: the two control laws; `policy.py` what they share;
  `thermal_model.py` the predictive one's model; `inputs.py` what a policy sees.
- `objectives.py`: power budget, temperature targets, TPOT SLO, checked against the GPU.
- `decision.py`: `GovernorDecision` and its table in the telemetry database.
- `service.py`, `serve.py`, `flags.py`, `metrics.py`: the governor in `ondo serve`.
- `sim/`: the closed-loop simulator (Vidur-style) and `ondo bench governor`.
"""
