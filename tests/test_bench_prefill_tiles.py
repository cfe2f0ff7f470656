"""bench/prefill_tiles.py in Triton's interpreter: every configuration it sweeps gives the
default configuration's output, and the default is among them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_smoke_sweep_agrees_with_the_default_configuration(tmp_path):
    out = tmp_path / "tiles.json"
    env = {**os.environ, "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": ""}
    subprocess.run([sys.executable, str(ROOT / "bench" / "prefill_tiles.py"), "--smoke", "--out", str(out)],
                   check=True, cwd=ROOT, env=env, capture_output=True, timeout=300)
    shape = json.loads(out.read_text())["shapes"][0]
    rows = shape["rows"]
    assert [r["default"] for r in rows].count(True) == 1
    assert all("error" not in r and r["max_abs_diff"] < 1e-4 for r in rows)
    assert {r["block_m"] for r in rows} == {16, 32}
    assert shape["best"]["ms"] == min(r["ms"] for r in rows)
