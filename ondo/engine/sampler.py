"""From logits to next tokens: penalties, logit bias, grammar masks, temperature,
top-k/top-p/min-p, seeded draws, logprobs.

Rows are sequences that sample this step. Work is vectorized over rows; only rows
with a per-request seed get their own generator, so a seeded request draws the same
tokens alone or inside any batch.
"""

from __future__ import annotations

import operator
import os
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import torch

from ondo.engine import staging
from ondo.engine.sampling_params import SamplingParams
from ondo.kernels.bitmask import apply_token_bitmask

# The least repetition_penalty and top_p the draws use. Smaller accepted values round to 0
# in float32 (a division by zero; a top_p that drops every token); 1e-30 acts as they would.
_MIN_REPETITION_PENALTY = 1e-30
_MIN_TOP_P = 1e-30


@dataclass
class SamplerOutput:
    token_ids: list[int]
    # Per row: {token_id: logprob} for the sampled token and the top-N, or None.
    logprobs: list[dict[int, float] | None]
    sampled_logprobs: list[float | None]


def to_device(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A small host list on `device` without waiting for the device: through pinned memory
    and a non-blocking copy (`torch.tensor(..., device=cuda)` waits for the whole stream)."""
    t = torch.tensor(values, dtype=dtype)
    if device.type != "cuda":
        return t
    return t.pin_memory().to(device, non_blocking=True)


def _seed_for(seed: int, output_index: int) -> int:
    # One stream of draws per (request seed, output position): independent of the
    # batch, and repeatable after a preemption.
    return (seed * 1_000_003 + output_index * 7_919 + 0x5EED) % (2**63 - 1)


def apply_penalties(
    logits: torch.Tensor,
    params: list[SamplingParams],
    prompt_ids: list[list[int]],
    output_ids: list[list[int]],
) -> None:
    """In place. Repetition penalty (HF's, over prompt and output); presence and
    frequency penalties (OpenAI's, over the output)."""
    vocab = logits.shape[1]
    for row, p in enumerate(params):
        if not p.has_penalties:
            continue
        out = torch.tensor(output_ids[row], dtype=torch.long, device=logits.device)
        if p.repetition_penalty != 1.0:
            seen = torch.tensor(prompt_ids[row] + output_ids[row], dtype=torch.long, device=logits.device)
            seen = seen.unique()
            vals = logits[row, seen]
            # A penalty below float32's range would divide by zero (inf, then NaN draws).
            penalty = max(p.repetition_penalty, _MIN_REPETITION_PENALTY)
            logits[row, seen] = torch.where(vals > 0, vals / penalty, vals * penalty)
        if (p.presence_penalty != 0.0 or p.frequency_penalty != 0.0) and out.numel():
            counts = torch.zeros(vocab, dtype=logits.dtype, device=logits.device)
            counts.scatter_add_(0, out, torch.ones_like(out, dtype=logits.dtype))
            logits[row] -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(logits.dtype)


def apply_min_tokens(logits: torch.Tensor, params: list[SamplingParams], output_lens: list[int],
                     stop_ids: Callable[[SamplingParams], Iterable[int]]) -> None:
    """In place: a row that has generated fewer than its min_tokens cannot draw a token that
    would end it (`stop_ids(p)`: EOS unless ignore_eos, and its stop_token_ids), so its first
    possible stop token is token min_tokens + 1, as vLLM's."""
    rows: list[int] = []
    cols: list[int] = []
    vocab = logits.shape[1]
    for row, p in enumerate(params):
        if output_lens[row] < p.min_tokens:
            for token in stop_ids(p):
                if token < vocab:
                    rows.append(row)
                    cols.append(token)
    if rows:
        device = logits.device
        logits.index_put_((to_device(rows, torch.int64, device), to_device(cols, torch.int64, device)),
                          torch.tensor(float("-inf"), dtype=logits.dtype, device=device))


def apply_logit_bias(logits: torch.Tensor, params: list[SamplingParams]) -> None:
    """In place, for the whole batch in one indexed add: each row's logit_bias."""
    rows: list[int] = []
    cols: list[int] = []
    vals: list[float] = []
    vocab = logits.shape[1]
    for row, p in enumerate(params):
        for token, bias in (p.logit_bias or {}).items():
            if token < vocab:
                rows.append(row)
                cols.append(token)
                vals.append(float(bias))
    if rows:
        device = logits.device
        logits.index_put_((to_device(rows, torch.int64, device), to_device(cols, torch.int64, device)),
                          to_device(vals, logits.dtype, device), accumulate=True)


@dataclass
class TokenMask:
    """Allowed tokens of the rows with a grammar: bit t of bitmask row i set means token t
    may follow in logits row rows[i] (rows None: bitmask row i is logits row i)."""

    bitmask: torch.Tensor  # [rows, ceil(vocab / 32)] int32, on the logits' device
    rows: torch.Tensor | None = None


def _filter(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """Mask what top-k, top-p and min-p exclude (per-row parameters; 0/1/0 mean off).
    Which filters run is decided from the host-side parameters: no device sync."""
    vocab = logits.shape[1]
    device = logits.device
    if any(p.top_k > 0 or p.top_p < 1.0 for p in params):
        # A top_k past the vocabulary cuts nothing (and may not fit an int64); a top_p that
        # rounds to 0 in float32 keeps the first token, as any top_p > 0 does.
        top_k = to_device([min(p.top_k, vocab) for p in params], torch.int64, device)
        top_p = to_device([max(p.top_p, _MIN_TOP_P) for p in params], logits.dtype, device)
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        ranks = torch.arange(vocab, device=logits.device)[None, :]
        k = torch.where(top_k > 0, top_k, torch.full_like(top_k, vocab))
        drop = ranks >= k[:, None]
        probs = sorted_logits.masked_fill(drop, float("-inf")).softmax(-1)
        # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
        mass_before = probs.cumsum(-1) - probs
        drop |= mass_before >= top_p[:, None]
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.empty_like(logits).scatter_(1, order, sorted_logits)
    if any(p.min_p > 0 for p in params):
        min_p = to_device([p.min_p for p in params], logits.dtype, device)
        probs = logits.softmax(-1)
        floor = probs.max(-1, keepdim=True).values * min_p[:, None]
        logits = logits.masked_fill(probs < floor, float("-inf"))
    return logits


@dataclass
class DeviceSample:
    """A step's draws still on the device; `to_host()` reads them back (waiting for the GPU).
    `start_copy()` starts that read-back early so the host can wait on it later."""

    tokens: torch.Tensor  # [N] int64
    params: list[SamplingParams]
    chosen_logprobs: torch.Tensor | None = None  # [N] logprob of the drawn token
    top_vals: torch.Tensor | None = None  # [N, max_top]
    top_ids: torch.Tensor | None = None
    _host: tuple[torch.Tensor | None, ...] | None = None
    _ready: torch.cuda.Event | None = None
    _result: SamplerOutput | None = None

    def start_copy(self) -> None:
        parts = (self.tokens, self.chosen_logprobs, self.top_vals, self.top_ids)
        if self.tokens.device.type != "cuda":
            self._host = parts
            return
        self._host = tuple(None if t is None else t.to("cpu", non_blocking=True) for t in parts)
        self._ready = torch.cuda.Event()
        self._ready.record()

    def to_host(self) -> SamplerOutput:
        if self._result is not None:
            return self._result
        if self._host is None:
            self.start_copy()
        if self._ready is not None:
            self._ready.synchronize()
        tokens, chosen, top_vals, top_ids = self._host
        token_list = tokens.tolist()
        n = len(token_list)
        logprob_dicts: list[dict[int, float] | None] = [None] * n
        sampled_lp: list[float | None] = [None] * n
        if chosen is not None:
            chosen_l = chosen.tolist()
            top_vals_l = top_vals.tolist() if top_vals is not None else None
            top_ids_l = top_ids.tolist() if top_ids is not None else None
            for row, p in enumerate(self.params):
                if p.logprobs is None:
                    if p.ranks_by_logprob:
                        sampled_lp[row] = chosen_l[row]
                    continue
                d = {token_list[row]: chosen_l[row]}
                if p.logprobs and top_ids_l is not None:
                    for tid, val in zip(top_ids_l[row][: p.logprobs], top_vals_l[row][: p.logprobs]):
                        d.setdefault(tid, val)
                logprob_dicts[row] = d
                sampled_lp[row] = chosen_l[row]
        self._result = SamplerOutput(token_list, logprob_dicts, sampled_lp)
        return self._result


@dataclass(frozen=True)
class BatchParams:
    """What a step's draws need from its rows' parameters, in one pass over them."""

    want_logprobs: bool
    penalties: bool
    bias: bool
    min_tokens: bool  # some row has a min_tokens
    greedy: bool  # every row
    filtered: bool  # some row has top-k, top-p or min-p
    temperatures: np.ndarray  # float64, 1.0 for greedy rows
    noisy: np.ndarray  # int32, 0 for greedy rows
    seeded_rows: tuple[int, ...]  # rows with a seed of their own (and a temperature)


def _summarize(params: list[SamplingParams]) -> BatchParams:
    want_logprobs = penalties = bias = filtered = min_tokens = False
    n = len(params)
    temps = np.ones(n, dtype=np.float64)
    noisy = np.zeros(n, dtype=np.int32)
    seeded: list[int] = []
    for row, p in enumerate(params):
        if p.logprobs is not None or p.ranks_by_logprob:
            want_logprobs = True
        if p.has_penalties:
            penalties = True
        if p.logit_bias:
            bias = True
        if p.min_tokens:
            min_tokens = True
        if p.top_k > 0 or p.top_p < 1.0 or p.min_p > 0:
            filtered = True
        if not p.greedy:
            temps[row] = p.temperature
            noisy[row] = 1
            if p.seed is not None:
                seeded.append(row)
    return BatchParams(want_logprobs, penalties, bias, min_tokens, not noisy.any(), filtered, temps,
                       noisy, tuple(seeded))


class _LastBatch:
    """The summary of the last step's rows, kept while the same parameter objects come in
    the same order (a decode step's batch, most steps): checking that is one C-level pass
    of identity tests. The list it holds keeps those objects alive, so no id is reused."""

    def __init__(self) -> None:
        self.params: list[SamplingParams] = []
        self.summary: BatchParams | None = None

    def summary_of(self, params: list[SamplingParams]) -> BatchParams:
        if (self.summary is None or len(params) != len(self.params)
                or not all(map(operator.is_, params, self.params))):
            self.params, self.summary = list(params), _summarize(params)
        return self.summary


_last_batch = threading.local()


def batch_params(params: list[SamplingParams]) -> BatchParams:
    """`_summarize(params)`, from this thread's last step where its rows are the same."""
    cache = getattr(_last_batch, "cache", None)
    if cache is None:
        cache = _last_batch.cache = _LastBatch()
    return cache.summary_of(params)


def fused_sampling(device: torch.device) -> bool:
    """On CUDA, the one-pass kernel (ONDO_FUSED_SAMPLING=0: the PyTorch operations). It reads
    the model's bf16 logits as they are: at 256 rows of a 151,936-token vocabulary it takes
    0.16 ms of the GPU where the float32 copy and the PyTorch path took 0.70 ms
    (docs/benchmarks.md)."""
    return device.type == "cuda" and os.environ.get("ONDO_FUSED_SAMPLING", "1") != "0"


def _sample_fused(logits: torch.Tensor, params: list[SamplingParams], output_lens: list[int],
                  host_generator: torch.Generator | None, summary: BatchParams) -> torch.Tensor:
    """Greedy and sampled rows in one pass (ondo/kernels/triton_sampling.py). A seeded
    request's row draws from its own (seed, output position) stream: the same tokens alone
    or inside any batch; the others from seeds drawn on the host (no device sync).
    `summary`: the rows' parameters in one (`batch_params`)."""
    from ondo.kernels.triton_sampling import gumbel_max_sample, mix_seed  # Triton where it runs

    device = logits.device
    n = len(params)
    seeds = torch.randint(0, 2**62, (n,), generator=host_generator, dtype=torch.int64).numpy()
    for row in summary.seeded_rows:
        seeds[row] = mix_seed(_seed_for(params[row].seed, output_lens[row]))
    temps = summary.temperatures
    if summary.filtered:  # the filters act on the scaled logits; the kernel then scales by 1
        logits = _filter(logits / to_device(temps.tolist(), torch.float32, device)[:, None], params)
        scale = np.ones(n, dtype=np.float32)
    else:
        scale = (1.0 / temps).astype(np.float32)
    seeds_d, scale_d, noisy_d = staging.to_device([seeds, scale, summary.noisy], device)  # one copy
    return gumbel_max_sample(logits, scale_d, noisy_d, seeds_d)


@torch.inference_mode()  # the logits are inference tensors: bias and masks apply in place
def sample_on_device(
    logits: torch.Tensor,  # [N, vocab], raw model output (float32, or the model's dtype)
    params: list[SamplingParams],
    output_lens: list[int],  # tokens each row has generated before this draw (for seeded draws)
    generator: torch.Generator | None = None,
    history: Callable[[], tuple[list[list[int]], list[list[int]]]] | None = None,
    mask: TokenMask | None = None,
    host_generator: torch.Generator | None = None,
    stop_ids: Callable[[SamplingParams], Iterable[int]] | None = None,
) -> DeviceSample:
    """The draws, queued on the logits' device without waiting for it. `history()` gives
    (prompt ids, output ids) per row; called only if a penalty needs it. Log-probabilities
    are the model's own (before penalties, bias and masks), as vLLM reports them.
    `stop_ids(p)`: the tokens that would end a row of parameters `p`, which it may not draw
    before its min_tokens (`apply_min_tokens`); None: min_tokens is not enforced here.

    With `fused_sampling` the draws are one kernel over the logits, its rows' seeds drawn
    from `host_generator` (a CPU generator; default torch's); otherwise the exponential
    race in PyTorch operations with `generator`. Logits in a narrower dtype (bf16) are read
    as they are by argmax and by the kernel (both widen each value exactly, so the draws
    are those of the float32 copy); every other path works on a float32 copy."""
    device = logits.device
    summary = batch_params(params)
    want_logprobs, penalties, bias = summary.want_logprobs, summary.penalties, summary.bias
    greedy, filtered = summary.greedy, summary.filtered
    min_tokens = summary.min_tokens and stop_ids is not None
    fused = fused_sampling(device)
    if (want_logprobs or penalties or bias or min_tokens or mask is not None
            or not (greedy or (fused and not filtered))):
        logits = logits.float()
    raw_logprobs = logits.log_softmax(-1) if want_logprobs else None

    if penalties:
        if history is None:
            raise ValueError("penalties need the token history")
        prompt_ids, output_ids = history()
        logits = logits.clone()
        apply_penalties(logits, params, prompt_ids, output_ids)
    if bias:
        apply_logit_bias(logits, params)
    if min_tokens:
        apply_min_tokens(logits, params, output_lens, stop_ids)
    if mask is not None:
        apply_token_bitmask(logits, mask.bitmask, mask.rows)

    if greedy:
        tokens = logits.argmax(-1)
    elif fused:
        tokens = _sample_fused(logits, params, output_lens, host_generator, summary)
    else:
        tokens = logits.argmax(-1)
        greedy_rows = to_device((summary.noisy == 0).tolist(), torch.bool, device)
        temps = to_device(summary.temperatures.tolist(), torch.float32, device)
        scaled = _filter(logits / temps[:, None], params)
        probs = scaled.softmax(-1)
        # Exponential race: argmax(p / E) with E ~ Exp(1) draws from p.
        noise = torch.empty_like(probs).exponential_(generator=generator)
        for row in summary.seeded_rows:
            g = torch.Generator(device=device)
            g.manual_seed(_seed_for(params[row].seed, output_lens[row]))
            noise[row].exponential_(generator=g)
        sampled = (probs / noise).argmax(-1)
        tokens = torch.where(greedy_rows, tokens, sampled)

    out = DeviceSample(tokens, params)
    if raw_logprobs is not None:
        max_top = max((p.logprobs or 0) for p in params)
        if max_top:
            out.top_vals, out.top_ids = raw_logprobs.topk(max_top, dim=-1)
        out.chosen_logprobs = raw_logprobs.gather(1, tokens[:, None]).squeeze(1)
    return out


def sample(
    logits: torch.Tensor,
    params: list[SamplingParams],
    output_lens: list[int],
    generator: torch.Generator | None = None,
    history: Callable[[], tuple[list[list[int]], list[list[int]]]] | None = None,
    mask: TokenMask | None = None,
) -> SamplerOutput:
    """`sample_on_device`, read back at once."""
    return sample_on_device(logits, params, output_lens, generator, history, mask).to_host()
