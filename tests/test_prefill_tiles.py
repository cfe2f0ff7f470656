"""The prefill kernel's launch configuration: ONDO_PREFILL_TILES's labels, their compiler
options, and 128-row tiles with a register cap against the reference."""

import os

import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels are decorated

import pytest  # noqa: E402

from ondo.kernels.attention import check_switches  # noqa: E402
from ondo.kernels.prefill_tiles import (  # noqa: E402
    PREFILL_TILES_ENV,
    PrefillTiles,
    configured_prefill_tiles,
    parse_prefill_tiles,
)
from ondo.kernels.reference import paged_attention_ref, write_kv_cache_ref  # noqa: E402
from ondo.kernels.testing import make_paged_batch  # noqa: E402
from ondo.kernels.triton_attention import paged_prefill_attention_triton, prefill_tiles  # noqa: E402


@pytest.mark.parametrize("label, tiles", [
    ("64x64x4x3", PrefillTiles(64, 64, 4, 3)),
    ("128x32x8x3-r128", PrefillTiles(128, 32, 8, 3, max_registers=128)),
    ("16x256x1x1-r24", PrefillTiles(16, 256, 1, 1, max_registers=24)),
])
def test_a_label_names_its_tiles_and_back(label, tiles):
    assert parse_prefill_tiles(label) == tiles
    assert tiles.label == label


def test_a_register_cap_is_a_compiler_option_only_where_set():
    assert PrefillTiles(64, 64, 4, 3).launch_options() == {"num_warps": 4, "num_stages": 3}
    assert PrefillTiles(128, 32, 8, 4, max_registers=128).launch_options() == {
        "num_warps": 8, "num_stages": 4, "maxnreg": 128}


@pytest.mark.parametrize("label, says", [
    ("", "is not rows x kv_tokens x warps x stages"),
    ("64x64x4", "is not rows x kv_tokens x warps x stages"),
    ("64x64x4x3x1", "is not rows x kv_tokens x warps x stages"),
    ("64x64x4x3-w2", "is not rows x kv_tokens x warps x stages"),
    ("64x64x4x3-r", "is not rows x kv_tokens x warps x stages"),
    ("64x64x4x3-r128-r64", "is not rows x kv_tokens x warps x stages"),
    ("sixty-four", "is not rows x kv_tokens x warps x stages"),
    ("48x64x4x3", "powers of two from 16 to 256"),
    ("8x64x4x3", "powers of two from 16 to 256"),
    ("64x512x4x3", "powers of two from 16 to 256"),
    ("64x64x3x3", "warps must be a power of two up to 16"),
    ("64x64x32x3", "warps must be a power of two up to 16"),
    ("64x64x4x0", "stages 1 to 8"),
    ("64x64x4x3-r16", "register cap must be 24 to 255"),
    ("64x64x4x3-r256", "register cap must be 24 to 255"),
])
def test_a_bad_label_fails_the_engine_at_start_with_the_variables_name(monkeypatch, label, says):
    monkeypatch.setenv(PREFILL_TILES_ENV, label)
    with pytest.raises(ValueError, match=PREFILL_TILES_ENV) as err:
        check_switches()
    assert says in str(err.value) and repr(label) in str(err.value)


def test_unset_means_the_default_tiles(monkeypatch):
    monkeypatch.delenv(PREFILL_TILES_ENV, raising=False)
    assert configured_prefill_tiles() is None
    monkeypatch.setenv(PREFILL_TILES_ENV, "128x32x8x3-r128")
    assert configured_prefill_tiles() == PrefillTiles(128, 32, 8, 3, max_registers=128)


@pytest.mark.skipif(DEVICE != "cpu", reason="the CPU's tiles")
def test_the_interpreter_keeps_its_own_small_tiles(monkeypatch):
    # The variable tunes bf16 / fp16 steps on a GPU; the interpreter's tiles stay small.
    q, kc = torch.zeros(1, 4, 64), torch.zeros(1, 16, 2, 64)
    monkeypatch.delenv(PREFILL_TILES_ENV, raising=False)
    default = prefill_tiles(q, kc)
    monkeypatch.setenv(PREFILL_TILES_ENV, "128x32x8x3-r128")
    assert prefill_tiles(q, kc) == default


@pytest.mark.parametrize("new_kv", [0, 1])
@pytest.mark.parametrize("label", ["128x32x8x3-r128", "128x16x8x4-r128", "256x32x16x2-r128"])
def test_wide_tiles_with_a_register_cap_match_the_reference(label, new_kv):
    # A fresh prompt longer than one 64-token tile of 128 rows (2 query heads a kv head; 256
    # rows take 128 tokens), a chunk over a cached prefix, decode rows and an idle sequence, with the step's own keys read back
    # from the cache (0) or from its projections (1).
    b = make_paged_batch([150, 1, 23, 1, 0], [150, 40, 90, 17, 11], num_q_heads=4, num_kv_heads=2,
                         head_dim=32, block_size=8, device=DEVICE)
    write_kv_cache_ref(b.key, b.value, b.k_cache, b.v_cache, b.meta.slot_mapping)
    kwargs = {"key": b.key, "value": b.value, "new_kv": new_kv} if new_kv else {}
    out = paged_prefill_attention_triton(b.query, b.k_cache, b.v_cache, b.meta, 32 ** -0.5,
                                         tiles=parse_prefill_tiles(label), **kwargs)
    expect = paged_attention_ref(b.query, b.k_cache, b.v_cache, b.meta, 32 ** -0.5)
    torch.testing.assert_close(out, expect, atol=1e-4, rtol=1e-4)
