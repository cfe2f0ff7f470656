"""bench/gemm_bench.py on the CPU: each shape's matmuls have the sizes its layers use, and a
smoke run writes a row per (matmul, row count) with a bound that follows from its sizes."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import gemm_bench  # noqa: E402

from ondo.bench.shapes import SHAPES  # noqa: E402


def test_the_layer_matmuls_of_real_shapes():
    assert gemm_bench.layer_gemms(SHAPES["qwen3-0.6b"]) == {
        "qkv": (1024, 4096), "o": (2048, 1024), "gate_up": (1024, 6144), "down": (3072, 1024),
        "logits": (1024, 151936)}
    llama = gemm_bench.layer_gemms(SHAPES["llama3.1-8b"])
    assert llama["qkv"] == (4096, 6144) and llama["gate_up"] == (4096, 28672) and llama["down"] == (14336, 4096)


def test_smoke_run_rows_and_bounds(tmp_path):
    out = tmp_path / "gemm.json"
    assert gemm_bench.main(["--smoke", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["model_shape"] == "tiny-llama" and result["device"] == "cpu"
    rows = result["rows"]
    assert sorted({(r["gemm"], r["m"]) for r in rows}) == sorted(
        (g, m) for g in ("qkv", "o", "gate_up", "down", "logits") for m in (1, 16))
    bytes_per_s = result["copy_gb_per_s"] * 1e9
    flops = result["matmul_tflop_per_s"] * 1e12
    for r in rows:
        assert r["us"] > 0
        need = max((r["n"] * r["k"] + r["m"] * r["k"] + r["m"] * r["n"]) * 4 / bytes_per_s,
                   2 * r["m"] * r["n"] * r["k"] / flops)
        assert r["bound_us"] == pytest.approx(need * 1e6)
    layer = result["per_layer"]["16"]
    four = [r["us"] for r in rows if r["m"] == 16 and r["gemm"] != "logits"]
    assert layer["us"] == pytest.approx(sum(four))
    assert layer["step_ms"] == pytest.approx(2 * sum(four) / 1e3)  # tiny-llama has 2 layers


def test_rows_must_be_positive():
    with pytest.raises(SystemExit):
        gemm_bench.main(["--rows", "0", "8"])
