"""Streamed text equals final text, whatever the ids and however they are grouped, for each
tokenizer family (byte-level BPE, WordPiece-style, SentencePiece-style).

Random prompt and output ids go through the two places text is made:
- the engine's way (the engine on a thread, and stop-string requests of an engine
  process): one id per step into the sequence's detokenizer, the tail flushed at the
  end; and, for a request that is not streamed, `detokenize` once at the end;
- an engine process's way: the engine's outputs for random groups of ids (the first
  whole, the middle ones as wire deltas, the last finished) through the wire encoder,
  pickling, the wire decoder, the coalescing a slow reader gets, and `_StreamText`.
Concatenated deltas must equal the final text in both, both must be the same text, and
where the ids decode cleanly it must be the prompt-and-output text minus the prompt's.
"""

from __future__ import annotations

import pickle

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ondo.engine.async_llm import _StreamText
from ondo.engine.engine_loop import Published
from ondo.engine.engine_process import WireDecoder, WireEncoder
from ondo.engine.outputs import CompletionOutput, RequestOutput, coalesce
from ondo.model.detokenizer import IncrementalDetokenizer, detokenize
from tests.tokenizer_families import FAMILIES, MULTILINGUAL, load_family

EXAMPLES = 500
CONTEXT_IDS = 5  # the detokenizer's first window: the prompt's last ids


@pytest.fixture(scope="module", params=FAMILIES)
def family(request, tmp_path_factory):
    tokenizer = load_family(request.param, str(tmp_path_factory.mktemp(request.param)))
    vocab = len(tokenizer.hf_tokenizer)
    sample = MULTILINGUAL if request.param != "wordpiece" else "w1 w22 w333 w4444"
    interesting = sorted(set(tokenizer.encode(sample, add_special_tokens=False))
                         | set(tokenizer.hf_tokenizer.all_special_ids))
    return request.param, tokenizer, vocab, interesting


def _ids(vocab: int, interesting: list[int], min_size: int, max_size: int):
    token = st.one_of(st.integers(0, vocab - 1), st.sampled_from(interesting))
    return st.lists(token, min_size=min_size, max_size=max_size)


def _groups(draw, n: int) -> list[list[int]]:
    """Cut range(n) into consecutive groups of random sizes (at least one group)."""
    sizes, left = [], n
    while left > 0:
        size = draw(st.integers(1, min(left, 6)))
        sizes.append(size)
        left -= size
    return sizes or [0]


def engine_text(tokenizer, prompt: list[int], output: list[int], skip: bool) -> tuple[list[str], str]:
    """As the engine makes a streamed sequence's text: one id per step, the tail at the end."""
    det = IncrementalDetokenizer(tokenizer, prompt, skip)
    deltas = [det.append(t) for t in output]
    deltas.append(det.flush())
    return deltas, det.output_text


def engine_process_text(tokenizer, prompt: list[int], output: list[int], skip: bool,
                        sizes: list[int], coalesce_mask: list[bool]) -> tuple[list[str], str]:
    """As a request of an engine process gets its text: token-only outputs in groups,
    across the wire, coalesced where the reader fell behind, decoded by `_StreamText`."""
    outputs: list[RequestOutput | tuple] = []
    start = 0
    for i, size in enumerate(sizes):
        group = output[start:start + size]
        start += size
        last = i == len(sizes) - 1
        outputs.append(RequestOutput("r", None, prompt, [CompletionOutput(
            0, "", list(output) if last else [], finish_reason="length" if last else None,
            new_token_ids=group)], last, metrics={"arrival_time_s": 1.0}))
    encoder, decoder = WireEncoder(), WireDecoder()
    wire = pickle.loads(pickle.dumps(encoder.encode(Published(outputs, [], 0, {})).outputs))
    received = [decoder.decode(o) for o in wire]
    merged: list[RequestOutput] = []
    for out, join in zip(received, coalesce_mask + [False] * len(received)):
        if merged and join and not merged[-1].finished and not out.finished:
            merged[-1] = coalesce(merged[-1], out)
        else:
            merged.append(out)
    text = _StreamText(tokenizer, skip)
    deltas = []
    for out in merged:
        text.fill(out)
        deltas.append(out.outputs[0].new_text)
        if not out.finished:
            assert out.outputs[0].text == "".join(deltas)  # every output carries the text so far
    return deltas, merged[-1].outputs[0].text


@st.composite
def _case(draw, vocab: int, interesting: list[int]):
    prompt = draw(_ids(vocab, interesting, 1, 10))
    output = draw(_ids(vocab, interesting, 1, 40))
    sizes = _groups(draw, len(output))
    mask = draw(st.lists(st.booleans(), min_size=len(sizes), max_size=len(sizes)))
    return prompt, output, draw(st.booleans()), sizes, mask


@settings(max_examples=EXAMPLES, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data())
def test_streamed_text_equals_final_text(family, data):
    name, tokenizer, vocab, interesting = family
    prompt, output, skip, sizes, mask = data.draw(_case(vocab, interesting))

    deltas, final = engine_text(tokenizer, prompt, output, skip)
    assert "".join(deltas) == final
    assert detokenize(tokenizer, prompt, output, skip) == final  # a request that is not streamed

    process_deltas, process_final = engine_process_text(tokenizer, prompt, output, skip, sizes, mask)
    assert "".join(process_deltas) == process_final == final

    context = prompt[-CONTEXT_IDS:]
    before = tokenizer.decode(context, skip_special_tokens=skip)
    whole = tokenizer.decode(context + output, skip_special_tokens=skip)
    if "\ufffd" not in whole and whole.startswith(before):
        assert final == whole[len(before):], name


@pytest.mark.parametrize("name", FAMILIES)
def test_words_after_a_prompt_keep_their_spaces(name, tmp_path):
    """The reported case: a word-joining decoder, text streamed one id at a time and the
    final text decoded at once, each with the prompt as context."""
    tokenizer = load_family(name, str(tmp_path))
    if name == "wordpiece":
        prompt, output = tokenizer.encode("w5 w6 w7"), [115640, 115640, 9]
        want = " w115640 w115640 w9"  # what follows "w5 w6 w7" in "w5 w6 w7 w115640 w115640 w9"
    else:
        prompt = tokenizer.encode("Hello")
        output = tokenizer.encode(" world, naïve café 😀 ok", add_special_tokens=False)
        before = tokenizer.decode(prompt)
        want = tokenizer.decode(prompt + output)[len(before):]
        assert want.endswith("world, naïve café 😀 ok")
    deltas, final = engine_text(tokenizer, prompt, output, True)
    assert final == want
    assert detokenize(tokenizer, prompt, output) == final
    for sizes in ([len(output)], [1] * len(output), [2, len(output) - 2]):
        assert engine_process_text(tokenizer, prompt, output, True, sizes, [True] * len(sizes))[1] == final


def test_a_character_split_across_ids_is_held_back_until_whole(tmp_path):
    tokenizer = load_family("sentencepiece", str(tmp_path))
    output = tokenizer.encode("a 😀", add_special_tokens=False)
    pieces = tokenizer.convert_ids_to_tokens(output)
    assert pieces[-4:] == ["<0xF0>", "<0x9F>", "<0x98>", "<0x80>"]
    det = IncrementalDetokenizer(tokenizer, tokenizer.encode("Say"))
    deltas = [det.append(t) for t in output]
    assert deltas[-4:-1] == ["", "", ""] and deltas[-1] == "😀"
    assert "".join(deltas) == " a 😀"
    # Ended while partial: the flush gives what there is, as replacement characters.
    det = IncrementalDetokenizer(tokenizer, [1])
    assert det.extend(output[:-2]) == "a " and det.flush() == "\ufffd\ufffd"
