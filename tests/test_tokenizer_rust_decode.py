"""`Tokenizer.decode` through the Rust tokenizer gives transformers' text, and steps aside
where transformers would change it."""

from __future__ import annotations

import random

import pytest

from ondo.model.tokenizer import Tokenizer, load_tokenizer, rust_decoder
from tests.tokenizer_families import FAMILIES, MULTILINGUAL, write_tokenizer


@pytest.fixture(scope="module", params=FAMILIES)
def family_tokenizer(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    write_tokenizer(request.param, str(folder))
    return load_tokenizer(str(folder))


def _id_lists(tok: Tokenizer, count: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    special = list(tok.hf_tokenizer.all_special_ids)
    lists = [tok.encode(MULTILINGUAL), tok.encode(MULTILINGUAL)[1:7], []]
    for _ in range(count):
        ids = [rng.randrange(tok.vocab_size) for _ in range(rng.randrange(1, 24))]
        if special and rng.random() < 0.5:
            ids.insert(rng.randrange(len(ids) + 1), rng.choice(special))
        lists.append(ids)
    return lists


def test_the_fast_path_is_taken_and_equals_transformers(family_tokenizer):
    tok = family_tokenizer
    assert rust_decoder(tok.hf_tokenizer) is not None
    for skip in (True, False):
        for ids in _id_lists(tok, 300, seed=7):
            assert tok.decode(ids, skip_special_tokens=skip) == \
                tok.hf_tokenizer.decode(ids, skip_special_tokens=skip)


def test_a_tokenizer_that_cleans_up_spaces_keeps_transformers_decode():
    from tokenizers import Tokenizer as RustTokenizer
    from tokenizers import decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "hello", ",", "world", "!", "it", "'s", "fine", "."]
    rust = RustTokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    rust.pre_tokenizer = pre_tokenizers.Whitespace()
    rust.decoder = decoders.WordPiece(cleanup=False)  # words joined by spaces, punctuation too
    hf = PreTrainedTokenizerFast(tokenizer_object=rust, unk_token="<unk>",
                                 clean_up_tokenization_spaces=True)
    tok = Tokenizer(hf, "word-level", [])
    assert rust_decoder(hf) is None
    ids = [1, 2, 3, 4, 5, 6, 7, 8]
    assert tok.decode(ids) == hf.decode(ids, skip_special_tokens=True) == "hello, world! it's fine."
    assert rust.decode(ids) == "hello , world ! it 's fine ."


def test_a_tokenizer_with_its_own_decode_keeps_it(tmp_path):
    write_tokenizer("byte_level_bpe", str(tmp_path))
    base = load_tokenizer(str(tmp_path)).hf_tokenizer

    class Shouting(type(base)):
        def _decode(self, token_ids, **kwargs):
            return super()._decode(token_ids, **kwargs).upper()

    base.__class__ = Shouting
    tok = Tokenizer(base, str(tmp_path), [])
    assert rust_decoder(base) is None
    assert tok.decode(tok.encode("quiet words")) == "QUIET WORDS"
