"""The sampler's one-pass summary of a step's parameters, and its reuse across steps."""

from __future__ import annotations

import numpy as np

from ondo.engine.sampler import _summarize, batch_params
from ondo.engine.sampling_params import SamplingParams


def _mix() -> list[SamplingParams]:
    return [SamplingParams(temperature=0), SamplingParams(temperature=0.5, seed=3),
            SamplingParams(temperature=1.2, top_p=0.9), SamplingParams(temperature=0, seed=9),
            SamplingParams(temperature=0.7, logprobs=2), SamplingParams(temperature=1.0, presence_penalty=0.5),
            SamplingParams(temperature=1.0, logit_bias={3: 1.0})]


def test_the_summary_reads_every_row():
    params = _mix()
    s = _summarize(params)
    assert (s.want_logprobs, s.penalties, s.bias, s.greedy, s.filtered) == (True, True, True, False, True)
    assert s.temperatures.tolist() == [1.0, 0.5, 1.2, 1.0, 0.7, 1.0, 1.0]
    assert s.noisy.tolist() == [0, 1, 1, 0, 1, 1, 1]
    assert s.seeded_rows == (1,)  # a greedy row's seed draws nothing
    plain = _summarize([SamplingParams(temperature=0), SamplingParams(temperature=0)])
    assert (plain.want_logprobs, plain.penalties, plain.bias, plain.greedy, plain.filtered) == (
        False, False, False, True, False)
    assert plain.noisy.dtype == np.int32 and plain.temperatures.dtype == np.float64


def test_a_step_with_the_same_objects_reuses_the_summary_and_any_change_makes_a_new_one():
    params = _mix()
    first = batch_params(params)
    assert batch_params(list(params)) is first  # the same objects in the same order
    swapped = [params[1], params[0], *params[2:]]
    assert batch_params(swapped).temperatures.tolist()[:2] == [0.5, 1.0]
    equal_but_new = [SamplingParams(temperature=0), *params[1:]]
    again = batch_params(equal_but_new)
    assert again is not first and again.temperatures.tolist() == first.temperatures.tolist()
    assert batch_params(params[:3]).bias is False  # fewer rows
