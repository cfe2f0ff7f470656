"""The launch-configuration sweeps in Triton's interpreter: every configuration
`bench/prefill_tiles.py` sweeps gives the default configuration's output, every one
`bench/kv_write_bench.py` sweeps writes the reference writer's caches, and in each the
default is among them and the fastest is the one named."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def smoke_sweep(script: str, tmp_path: Path, *flags: str) -> dict:
    """The script's --smoke run; its one step shape as written to --out."""
    out = tmp_path / "sweep.json"
    env = {**os.environ, "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": ""}
    subprocess.run([sys.executable, str(ROOT / "bench" / script), "--smoke", *flags, "--out", str(out)],
                   check=True, cwd=ROOT, env=env, capture_output=True, timeout=300)
    shape = json.loads(out.read_text())["shapes"][0]
    assert [r["default"] for r in shape["rows"]].count(True) == 1
    return shape


def test_prefill_tiles_sweep_agrees_with_the_default_configuration(tmp_path):
    shape = smoke_sweep("prefill_tiles.py", tmp_path)
    rows = shape["rows"]
    assert all("error" not in r and r["max_abs_diff"] < 1e-4 for r in rows)
    assert {r["block_m"] for r in rows} == {16, 32}
    # The default's tiles started from the grid's end too: the same output exactly.
    assert [(r["block_m"], r["longest_first"]) for r in rows] == [(16, False), (32, False), (16, True), (32, False)]
    assert rows[2]["max_abs_diff"] == 0.0
    # A register cap is a compiler option: the interpreter computes the same tile exactly.
    assert [r["label"] for r in rows[1::2]] == ["32x16x4x1", "32x16x4x1-r128"]
    assert rows[3]["max_registers"] == 128 and rows[1]["max_registers"] == 0
    assert shape["best"]["ms"] == min(r["ms"] for r in rows)


def test_prefill_tiles_sweep_takes_the_labels_it_is_given(tmp_path):
    out = tmp_path / "sweep.json"
    env = {**os.environ, "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": ""}
    run = [sys.executable, str(ROOT / "bench" / "prefill_tiles.py"), "--smoke", "--out", str(out), "--tiles"]
    subprocess.run([*run, "32x16x4x1-r64", "16x32x4x1"], check=True, cwd=ROOT, env=env, capture_output=True,
                   timeout=300)
    rows = json.loads(out.read_text())["shapes"][0]["rows"]
    assert [(r["label"], r["default"]) for r in rows] == [("32x16x4x1-r64", False), ("16x32x4x1", True)]
    assert rows[0]["max_abs_diff"] < 1e-4
    bad = subprocess.run([*run, "32x16x4"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "is not rows x kv_tokens x warps x stages" in bad.stderr


def test_prefill_tiles_mixed_sweep_agrees_as_the_engine_launches_it(tmp_path):
    # Decode rows first (the scheduler's order) beside a prompt, the step's own keys read
    # from its projections, every decode row in the prefill kernel.
    shape = smoke_sweep("prefill_tiles.py", tmp_path, "--mixed")
    assert shape["shape"] == "smoke mixed"
    rows = shape["rows"]
    assert len(rows) == 4 and all("error" not in r and r["max_abs_diff"] < 1e-4 for r in rows)


def test_kv_write_sweep_writes_the_reference_caches(tmp_path):
    shape = smoke_sweep("kv_write_bench.py", tmp_path)
    rows = shape["rows"]
    assert all("error" not in r and r["equal"] for r in rows)
    assert {r["tokens"] for r in rows} == {0, 1, 4}
    assert shape["best"]["us"] == min(r["us"] for r in rows)


def test_fresh_prompt_bench_agrees_with_ondos_kernel(tmp_path):
    """bench/prefill_fresh_kv.py: the stand-alone variants and ondo's kernel reading the
    step's own K/V, or with the mixed step's decode rows split off, overlapped or in tiles
    of their own, all give ondo's default output."""
    out = tmp_path / "fresh.json"
    env = {**os.environ, "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": ""}
    subprocess.run([sys.executable, str(ROOT / "bench" / "prefill_fresh_kv.py"), "--smoke", "--out", str(out)],
                   check=True, cwd=ROOT, env=env, capture_output=True, timeout=300)
    fresh, mixed = json.loads(out.read_text())["results"]
    for row in (fresh, mixed):
        diffs = [v for k, v in row.items() if k.endswith("max_abs_diff")]
        diffs += [r["max_abs_diff"] for r in row.get("variants", [])]
        assert diffs and all(d < 1e-4 for d in diffs)
    assert fresh["ondo_new_kv1_max_abs_diff"] == fresh["ondo_new_kv2_max_abs_diff"] == 0.0  # same tiles
    runs = ("split", "overlap", "beside", "in_prefill", "decode_tile")
    assert {f"ondo_{run}_max_abs_diff" for run in runs} <= mixed.keys()
    assert "ondo_split_ms" not in fresh  # no decode rows: nothing to split off


def test_decode_overlap_bench_halves_give_the_whole_batchs_output(tmp_path):
    """bench/decode_overlap.py: the two halves of a decode batch (slices of its metadata
    over the same cache) end where the whole batch does. (Their order on two streams is a
    GPU's to check: on a CPU it is the one-stream order.)"""
    out = tmp_path / "overlap.json"
    env = {**os.environ, "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": ""}
    subprocess.run([sys.executable, str(ROOT / "bench" / "decode_overlap.py"), "--smoke", "--out", str(out)],
                   check=True, cwd=ROOT, env=env, capture_output=True, timeout=300)
    (row,) = json.loads(out.read_text())["results"]
    assert row["halves_max_abs_diff_vs_whole"] < 1e-5
    assert all(row[f"{k}_ms_per_layer"] > 0 for k in
               ("whole", "attention_only", "matmuls_only", "halves_in_turn", "halves_overlapped"))


def test_mixed_overlap_bench_splits_a_step_into_prompts_and_decode_rows_that_end_where_the_step_does(tmp_path):
    """bench/mixed_overlap.py: the prompts and the decode rows of one step, run as two
    batches (slices of its metadata over one cache, the decode rows through the decode
    kernel), end where the one batch does; every variant is timed. (Their order on two
    streams is a GPU's to check: on a CPU it is the one-stream order.)"""
    out = tmp_path / "mixed.json"
    env = {**os.environ, "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": ""}
    subprocess.run([sys.executable, str(ROOT / "bench" / "mixed_overlap.py"), "--smoke", "--out", str(out)],
                   check=True, cwd=ROOT, env=env, capture_output=True, timeout=300)
    (row,) = json.loads(out.read_text())["results"]
    assert (row["prompts"], row["decode_rows"], row["layers"]) == ([20, 7], 3, 2)
    assert row["split_max_abs_diff_vs_one_batch"] < 1e-4 < row["one_batch_max_abs"]
    assert row["two_streams_equals_in_turn"]
    assert all(row[f"{k}_ms"] > 0 for k in ("one_batch", "prompts_only", "decodes_only", "in_turn", "two_streams"))
    assert row["perfect_overlap_ms"] == max(row["prompts_only_ms"], row["decodes_only_ms"])


def test_the_prefill_kernel_compiles_for_sm90_without_spills_either_decode_tile(tmp_path):
    """bench/prefill_sass.py (Triton's compiler, no GPU): every way of reading the step's
    own keys compiles for an H100 with no register spills, the prompts' tiles on Hopper's
    warpgroup matrix instructions; with 16-row decode tiles (ONDO_PREFILL_DECODE_TILE=1)
    those rows add matrix instructions of their own and no registers to speak of."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    rows = {}
    for decode_m in (0, 16):
        out = tmp_path / f"sass{decode_m}.json"
        subprocess.run([sys.executable, str(ROOT / "bench" / "prefill_sass.py"), "--quick", "--decode-m",
                        str(decode_m), "--out", str(out)], check=True, cwd=ROOT, env=env, capture_output=True,
                       timeout=600)
        rows[decode_m] = json.loads(out.read_text())["rows"]
    assert [r["new_kv"] for r in rows[0]] == [0, 1, 2]
    for plain, tiled in zip(rows[0], rows[16], strict=True):
        assert plain["spill_instructions"] == tiled["spill_instructions"] == 0
        assert plain["hgmma"] > 0 and plain["hmma"] == 0
        assert tiled["hgmma"] + tiled["hmma"] > plain["hgmma"]  # the decode rows' own products
        assert abs(tiled["registers"] - plain["registers"]) <= 4
        assert tiled["shared_bytes"] == plain["shared_bytes"]


def test_prefill_sass_counts_the_programs_an_sm_holds_for_the_tiles_named(tmp_path):
    """bench/prefill_sass.py --tiles: the default 64-row tiles hold two programs an SM
    (as the driver's occupancy query said on an H100), 128 rows on 8 warps one, and two
    with their registers capped at 128."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = tmp_path / "tiles.json"
    subprocess.run([sys.executable, str(ROOT / "bench" / "prefill_sass.py"), "--quick", "--decode-m", "16",
                    "--tiles", "64x64x4x3", "128x32x8x3", "128x32x8x3-r128", "--out", str(out)], check=True,
                   cwd=ROOT, env=env, capture_output=True, timeout=600)
    rows = {r["tiles"]: r for r in json.loads(out.read_text())["rows"]}
    assert {t: r["programs_per_sm"] for t, r in rows.items()} == {
        "64x64x4x3": 2, "128x32x8x3": 1, "128x32x8x3-r128": 2}
    assert rows["128x32x8x3-r128"]["registers"] <= 128 < rows["128x32x8x3"]["registers"]
    assert all(r["hgmma"] > 0 and r["group"] == 2 for r in rows.values())


def test_programs_an_sm_by_an_h100s_limits():
    spec = importlib.util.spec_from_file_location("prefill_sass", ROOT / "bench" / "prefill_sass.py")
    sass = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sass)
    assert sass.programs_per_sm(198, 115712, 4) == 2  # shared memory and registers both allow two
    assert sass.programs_per_sm(144, 81976, 8) == 1  # registers: 2 x 256 threads x 144 > 65,536
    assert sass.programs_per_sm(128, 81976, 8) == 2
    assert sass.programs_per_sm(167, 66560, 4) == 3  # 167 rounds up to 168
    assert sass.programs_per_sm(32, 0, 2) == 32  # the block limit
    assert sass.programs_per_sm(32, 0, 4) == 16  # the warp limit


def test_qk_norm_rope_bench_runs_the_operator_against_the_models_path(tmp_path):
    """bench/qk_norm_rope_bench.py: the operator and the model's norms and rotations, timed
    from one projection output; in fp32 most elements are the same bits (the norm's sum is
    taken in another order), none far off (tests/test_qk_norm_rope.py)."""
    out = tmp_path / "qk.json"
    env = {**os.environ, "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": ""}
    subprocess.run([sys.executable, str(ROOT / "bench" / "qk_norm_rope_bench.py"), "--smoke", "--out", str(out)],
                   check=True, cwd=ROOT, env=env, capture_output=True, timeout=300)
    rows = json.loads(out.read_text())["rows"]
    assert [r["tokens"] for r in rows] == [5, 16]
    assert all(0.5 < r["same_bits_fraction"] <= 1.0 and r["fused_us"] > 0 and r["inductor_us"] > 0 for r in rows)


def test_gate_up_silu_bench_times_the_operator_against_the_models_path(tmp_path):
    """bench/gate_up_silu_bench.py: the fused kernel at each swept tile, the operator as the
    model calls it and the model's matmul and SiLU-and-mul, from one input, each with its
    error against float64."""
    out = tmp_path / "gate_up.json"
    env = {**os.environ, "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": ""}
    subprocess.run([sys.executable, str(ROOT / "bench" / "gate_up_silu_bench.py"), "--smoke", "--out", str(out)],
                   check=True, cwd=ROOT, env=env, capture_output=True, timeout=300)
    (row,) = json.loads(out.read_text())["rows"]
    assert (row["tokens"], row["hidden"], row["intermediate"]) == (40, 64, 48)
    assert set(row["tiles"]) == {"16x16x32x2x4x2", "32x16x32x2x4x2", "16x16x32x2x4x2-p1", "16x16x32x2x4x2-p2-ws"}
    assert row["best_tiles"] in row["tiles"] and all(isinstance(us, float) for us in row["tiles"].values())
    assert row["fused_us"] == row["tiles"]["16x16x32x2x4x2"] and row["compiled_us"] > 0 and row["operator_us"] > 0
    errors = row["mean_abs_error_vs_float64"]
    # float32 against float64; the operator at 40 tokens: the matmul and its SiLU-and-mul kernel.
    assert all(0 < errors[name] < 1e-6 for name in ("fused", "compiled", "operator"))
