"""Host cost of the engine process's wire format, per step of 256 streamed outputs: the
engine side (strip + pickle) and the server side (unpickle + rebuild). CPU only.

    python3 bench/wire_format.py
"""

from __future__ import annotations

import json
import pickle
import random
import time

from ondo.engine.engine_loop import Published
from ondo.engine.engine_process import WireDecoder, WireEncoder
from ondo.engine.outputs import CompletionOutput, RequestOutput

NUM_OUTPUTS, NUM_STEPS, PROMPT_LEN = 256, 50, 512
STATS = {f"counter_{i}": 1.0 for i in range(20)}


def step_outputs(step: int, rng: random.Random) -> list[RequestOutput]:
    """What one decode step of 256 streamed requests hands over (as the engine makes it)."""
    outs = []
    for i in range(NUM_OUTPUTS):
        c = CompletionOutput(0, "w" * (3 * step), [], new_text=" w123",
                             new_token_ids=[rng.randrange(150_000)])
        outs.append(RequestOutput(f"cmpl-{i:032x}-0", None, list(range(PROMPT_LEN)), [c], False,
                                  metrics={"arrival_time_s": 1.0, "first_scheduled_s": 2.0,
                                           "first_token_s": 3.0}))
    return outs


def main() -> None:
    rng = random.Random(0)
    encoder, decoder = WireEncoder(), WireDecoder()
    first = encoder.encode(Published(step_outputs(0, rng), [], 0, STATS))  # prompts go once
    for o in pickle.loads(pickle.dumps(first)).outputs:
        decoder.decode(o)
    engine_s = server_s = 0.0
    size = 0
    for step in range(1, NUM_STEPS + 1):
        outs = step_outputs(step, rng)
        t0 = time.perf_counter()
        data = pickle.dumps(encoder.encode(Published(outs, [], 0, STATS)), protocol=pickle.HIGHEST_PROTOCOL)
        t1 = time.perf_counter()
        for o in pickle.loads(data).outputs:
            decoder.decode(o)
        t2 = time.perf_counter()
        engine_s += t1 - t0
        server_s += t2 - t1
        size = len(data)
    print(json.dumps({"bench": "wire_format", "outputs_per_step": NUM_OUTPUTS,
                      "engine_ms_per_step": round(engine_s / NUM_STEPS * 1e3, 3),
                      "server_ms_per_step": round(server_s / NUM_STEPS * 1e3, 3),
                      "bytes_per_step": size}))


if __name__ == "__main__":
    main()
