"""Grammar masks off the critical path: filled on other threads from the moment the
matchers' states are known, one grammar shard per fill thread, and under asynchronous
scheduling a constrained step left launched but unsampled while the host makes the
previous step's outputs and packs the next. Outputs must be exactly those of filling on
the engine's thread and of synchronous stepping; a step with no constrained row must do
no grammar work at all."""

from __future__ import annotations

import json
import re
import threading

import jsonschema
import numpy as np
import pytest

from ondo import LLM, SamplingParams, StructuredOutputsParams
from ondo.engine import token_masks
from ondo.engine.grammar import GrammarCompiler, SequenceGrammar
from ondo.engine.token_masks import (
    ENV_THREADS,
    MaskFiller,
    default_fill_threads,
    fill_threads_for,
)

SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 12},
                   "age": {"type": "integer", "minimum": 0, "maximum": 99}},
    "required": ["name", "age"],
}
PROMPTS = ["A person as JSON:", "Phone number:", "Is it raining?", "Tell me about Rome.",
           "Another person, as data:", "Count to five:", "Name a colour:"]
CHOICES = ["yes", "no", "maybe"]
PHONE = r"[0-9]{3}-[0-9]{4}"


def mixed_params() -> list[SamplingParams]:
    """Constrained and plain requests side by side: greedy or seeded (so that a batch's
    make-up cannot change a draw), a stop string, a max_tokens cut, n = 2."""
    json_spec = StructuredOutputsParams(json=SCHEMA)
    return [
        SamplingParams(temperature=0, max_tokens=48, structured_outputs=json_spec),
        SamplingParams(temperature=0.8, seed=3, max_tokens=16,
                       structured_outputs=StructuredOutputsParams(regex=PHONE)),
        SamplingParams(temperature=0.9, seed=5, max_tokens=8,
                       structured_outputs=StructuredOutputsParams(choice=CHOICES)),
        SamplingParams(temperature=0, max_tokens=24),
        SamplingParams(temperature=0.7, seed=9, max_tokens=6, structured_outputs=json_spec),
        SamplingParams(temperature=0, max_tokens=40, stop=[", "], structured_outputs=json_spec),
        SamplingParams(temperature=0.8, seed=2, n=2, max_tokens=4, structured_outputs=json_spec),
    ]


def token_ids(outs) -> list[list[list[int]]]:
    return [[c.token_ids for c in o.outputs] for o in outs]


@pytest.fixture(scope="module")
def sync_llm() -> LLM:
    return LLM(max_model_len=256, async_scheduling=False)


@pytest.fixture(scope="module")
def sync_outputs(sync_llm):
    return sync_llm.generate(PROMPTS, mixed_params())


@pytest.fixture(scope="module")
def ahead_llm() -> LLM:
    """Stepping ahead, each fill held until the step is sampled (`gate_fills`)."""
    llm = LLM(max_model_len=256, async_scheduling=True)
    gate_fills(llm.engine)
    return llm


def check_constraints(outs) -> None:
    params = mixed_params()
    for o, p in zip(outs, params):
        spec = p.structured_outputs
        for c in o.outputs:
            if spec is None or c.finish_reason == "length":
                continue
            if spec.choice:
                assert c.text in CHOICES
            elif spec.regex:
                assert re.fullmatch(PHONE, c.text), c.text
            elif p.stop:
                assert c.stop_reason in (None, ", "), c.stop_reason
                if c.stop_reason is None:
                    jsonschema.validate(json.loads(c.text), SCHEMA)
            else:
                jsonschema.validate(json.loads(c.text), SCHEMA)


def gate_fills(engine) -> None:
    """Hold each fill until the engine's thread asks for its result: a step whose masks are
    filled beside other work is then always seen launched and unsampled, whatever the
    machine's speed (a fill done early is sampled at once)."""
    engine._compiler()
    filler = engine._mask_filler
    turns = threading.Semaphore(0)
    library, result = filler._executor, filler.result

    class Gated:
        def consume_token_par(self, items):
            return library.consume_token_par(items)

        def unsafe_compute_mask_ptr(self, *args):
            if threading.current_thread() is not threading.main_thread():  # not a fill done inline
                assert turns.acquire(timeout=30)
            return library.unsafe_compute_mask_ptr(*args)

    def gated_result(pending):
        if not pending.future.done():
            turns.release()
        return result(pending)

    filler._executor = Gated()
    filler.result = gated_result


def test_a_mixed_batch_ahead_with_overlapped_masks_gives_the_synchronous_outputs(sync_outputs, ahead_llm):
    check_constraints(sync_outputs)
    reasons = {c.finish_reason for o in sync_outputs for c in o.outputs}
    assert reasons == {"stop", "length"}
    assert sync_outputs[5].outputs[0].stop_reason == ", "
    llm = ahead_llm
    engine = llm.engine
    steps_ahead = engine.num_steps_ahead
    for i, (prompt, params) in enumerate(zip(PROMPTS, mixed_params())):
        engine.add_request(str(i), prompt, params, stream=False)
    finals = {}
    left_unsampled = 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            finals[out.request_id] = out
        f = engine._in_flight
        if f is not None and f.draws is None:  # launched, its masks still being filled
            assert f.masks is not None
            left_unsampled += 1
    got = [finals[str(i)] for i in range(len(PROMPTS))]
    assert token_ids(got) == token_ids(sync_outputs)
    assert [c.text for o in got for c in o.outputs] == [c.text for o in sync_outputs for c in o.outputs]
    assert engine.num_steps_ahead > steps_ahead and left_unsampled > 0
    stats = llm.stats()
    assert stats["grammar_mask_steps"] > 0 and stats["grammar_mask_rows"] >= stats["grammar_mask_steps"]
    assert stats["num_free_blocks"] == stats["num_total_blocks"]


def test_filling_on_the_engine_thread_gives_the_same_outputs(sync_outputs, ahead_llm):
    ahead_llm.engine.mask_overlap = False
    try:
        outs = ahead_llm.generate(PROMPTS, mixed_params())
    finally:
        ahead_llm.engine.mask_overlap = True
    assert token_ids(outs) == token_ids(sync_outputs)


def test_steps_without_a_constrained_row_do_no_grammar_work():
    llm = LLM(max_model_len=256, async_scheduling=True)
    engine = llm.engine
    plain = [SamplingParams(temperature=0, max_tokens=12)] * 3
    llm.generate(PROMPTS[:3], plain)
    assert engine._mask_filler is None and engine._grammar_compiler is None
    llm.generate(PROMPTS[:1], mixed_params()[:1])  # makes the grammar machinery
    before = llm.stats()
    for i, p in enumerate(plain):
        engine.add_request(f"plain{i}", PROMPTS[i], p)
    while engine.has_unfinished_requests():
        engine.step()
        f = engine._in_flight
        assert f is None or (f.masks is None and f.draws is not None)  # sampled at once
    after = llm.stats()
    for key in ("grammar_mask_steps", "grammar_mask_rows", "grammar_mask_s", "grammar_mask_sync_s"):
        assert after[key] == before[key], key


def test_abort_while_a_constrained_step_waits_for_its_masks(sync_outputs, ahead_llm):
    engine = ahead_llm.engine
    params = mixed_params()
    for i in (0, 3, 4):
        engine.add_request(str(i), PROMPTS[i], params[i], stream=False)
    finals = {}
    for _ in range(20):
        for out in engine.step():
            finals[out.request_id] = out
        f = engine._in_flight
        if f is not None and f.draws is None and "0" not in finals:
            break
    assert engine._in_flight.draws is None
    assert engine.abort_request("0")
    while engine.has_unfinished_requests():
        for out in engine.step():
            finals[out.request_id] = out
    assert finals["0"].outputs[0].finish_reason == "abort"
    for i in ("3", "4"):
        assert finals[i].outputs[0].token_ids == sync_outputs[int(i)].outputs[0].token_ids
    bm = engine.block_manager
    assert bm.num_free_blocks == bm.num_total_blocks


def test_fill_threads_follow_the_cores_and_the_environment():
    assert [fill_threads_for(n) for n in (1, 2, 3, 16, 64)] == [1, 1, 1, 8, 8]
    assert default_fill_threads({ENV_THREADS: "3"}) == 3
    assert default_fill_threads({}) == fill_threads_for(len(__import__("os").sched_getaffinity(0)))
    for bad in ("0", "two", "-1"):
        with pytest.raises(ValueError, match=ENV_THREADS):
            default_fill_threads({ENV_THREADS: bad})


def test_sharded_matchers_fill_the_masks_one_matcher_would(sync_outputs, sync_llm):
    engine = sync_llm.engine
    vocab = engine.model_config.vocab_size
    compiler = GrammarCompiler(engine.tokenizer.hf_tokenizer, vocab, engine.eos_token_ids, num_shards=3)
    compiled = compiler.submit(StructuredOutputsParams(json=SCHEMA)).result()
    assert len(compiled.templates) == 3
    grammars = [SequenceGrammar(compiled) for _ in range(7)]
    assert [g.shard for g in grammars] == [0, 1, 2, 0, 1, 2, 0]
    doc = sync_outputs[0].outputs[0].token_ids  # a whole document of the schema
    for i, g in enumerate(grammars[:6]):
        g.sync(doc[: 2 * i], 0)
    grammars[6].sync(engine.tokenizer.encode("hello"), 0)  # cannot start a JSON object
    assert grammars[6].error is not None
    filler = MaskFiller(vocab, engine.device, engine.eos_token_ids[0], max_rows=2, num_threads=2)
    for _ in range(2):  # the buffers take turns; the second fill must not see the first's
        bitmask = filler.fill(grammars).numpy().copy()
    assert bitmask.shape == (7, (vocab + 31) // 32)
    import llguidance

    one = llguidance.LLMatcher(compiler.tokenizer(), _grammar_text())  # unsharded
    for i in range(6):
        one.reset()
        assert one.consume_tokens(doc[: 2 * i])
        want = np.frombuffer(one.compute_bitmask(), dtype=np.int32)[: bitmask.shape[1]]
        assert np.array_equal(bitmask[i], want), i
    eos = engine.eos_token_ids[0]
    allowed = np.flatnonzero(np.unpackbits(bitmask[6].view(np.uint8), bitorder="little"))
    assert allowed.tolist() == [eos]
    assert filler.timing.num_steps == 2 and filler.timing.num_rows == 14
    filler.close()
    compiler.close()


def _grammar_text() -> str:
    from ondo.engine.structured_outputs import check

    return check(StructuredOutputsParams(json=SCHEMA))


@pytest.mark.parametrize("parallel", [False, True])
def test_catching_up_a_batch_is_syncing_each_matcher(sync_outputs, sync_llm, parallel, monkeypatch):
    engine = sync_llm.engine
    engine._compiler()
    compiled = engine._grammar_compiler.submit(StructuredOutputsParams(json=SCHEMA)).result()
    filler = MaskFiller(engine.model_config.vocab_size, engine.device, engine.eos_token_ids[0],
                        num_threads=2 if parallel else 1)
    if parallel:  # the library's threads take even a handful of rows
        monkeypatch.setattr(token_masks, "PARALLEL_CATCH_UP_ROWS", 1)
    doc = sync_outputs[0].outputs[0].token_ids
    bad = engine.tokenizer.encode("hello")[0]
    prompt = [7, 8, 9]  # the output starts after it
    cases = [  # (tokens appended, pending draw): one new token, pending or appended; two; a
        # rollback (the sequence has fewer tokens than consumed); a token the grammar refuses
        (doc[:3], doc[3]), (doc[:4], None), (doc[:6], None), (doc[:1], None), (doc[:3], bad),
    ]
    batch = [SequenceGrammar(compiled) for _ in cases]
    alone = [SequenceGrammar(compiled) for _ in cases]
    for g in batch + alone:
        g.sync(prompt + doc[:3], len(prompt))
    filler.catch_up([(g, prompt + ids, len(prompt), p) for g, (ids, p) in zip(batch, cases)])
    for g, (ids, p) in zip(alone, cases):
        g.sync(prompt + ids, len(prompt), p)
    for a, b in zip(batch, alone):
        assert (a.num_consumed, a.is_complete, a.error is None) == (b.num_consumed, b.is_complete, b.error is None)
    assert [g.num_consumed for g in batch] == [4, 4, 6, 1, 4]
    assert batch[4].error is not None and all(g.error is None for g in batch[:4])
    masks = filler.fill(batch[:4]).numpy()
    assert np.array_equal(masks, filler.fill(alone[:4]).numpy())
    filler.close()
