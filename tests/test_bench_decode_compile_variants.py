"""`bench/decode_compile_variants.py --count-only`: the decode CUDA graphs' ladder needs two
decode kernels (with and without splits) and one reduction, whatever the batch size."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # Triton's own JIT
    return subprocess.run([sys.executable, str(ROOT / "bench" / "decode_compile_variants.py"), *args],
                          capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)


def test_the_decode_graphs_compile_two_decode_kernels_and_one_reduction(tmp_path):
    for shape in ("qwen3-0.6b", "llama3.1-8b"):
        out = tmp_path / f"{shape}.json"
        done = run("--count-only", "--model-shape", shape, "--out", str(out))
        assert done.returncode == 0, done.stderr[-2000:]
        r = json.loads(out.read_text())
        assert r["variants"] == {"split": 2, "reduce": 1}
        assert 1 not in r["graph_sizes"] and r["graph_sizes"][0] == 2 and r["graph_sizes"][-1] == 256
        # Split counts from 16 at two rows down to one from 48 rows up.
        assert sorted(row["num_splits"] for row in r["rows"] if row["kernel"] == "split") == [1, 16]


def test_the_interpreters_kernels_are_refused():
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "decode_compile_variants.py"), "--count-only"],
                          capture_output=True, text=True, timeout=300, cwd=ROOT,
                          env={**os.environ, "TRITON_INTERPRET": "1"})
    assert done.returncode == 2 and "TRITON_INTERPRET" in done.stderr


def test_the_old_rules_keyed_three_decode_kernels_and_four_reductions(tmp_path):
    out = tmp_path / "old.json"
    done = run("--count-only", "--old-rules", "--out", str(out))
    assert done.returncode == 0, done.stderr[-2000:]
    r = json.loads(out.read_text())
    assert r["variants"] == {"split": 3, "reduce": 4} and r["graph_sizes"][0] == 1
