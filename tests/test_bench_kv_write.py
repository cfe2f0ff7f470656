"""bench/kv_write_bench.py in Triton's interpreter: every configuration it sweeps writes
the reference writer's caches, and the default is among them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_smoke_sweep_writes_the_reference_caches(tmp_path):
    out = tmp_path / "kv_write.json"
    env = {**os.environ, "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": ""}
    subprocess.run([sys.executable, str(ROOT / "bench" / "kv_write_bench.py"), "--smoke", "--out", str(out)],
                   check=True, cwd=ROOT, env=env, capture_output=True, timeout=300)
    shape = json.loads(out.read_text())["shapes"][0]
    rows = shape["rows"]
    assert [r["default"] for r in rows].count(True) == 1
    assert all("error" not in r and r["equal"] for r in rows)
    assert {r["tokens"] for r in rows} == {0, 1, 4}
    assert shape["best"]["us"] == min(r["us"] for r in rows)
