"""`bench/decode_kv_write_bench.py` on the CPU (Triton's interpreter): both ways of a decode
step's KV write leave the caches the same, and the JSON carries both timings."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_bench_compares_both_ways_on_the_same_caches(tmp_path):
    out = tmp_path / "decode_kv.json"
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "decode_kv_write_bench.py"), "--smoke",
                           "--out", str(out)], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    r = json.loads(out.read_text())
    assert r["device"] == "cpu" and len(r["rows"]) == 1
    row = r["rows"][0]
    assert row["same_caches"] is True and row["layers"] == 2
    assert row["write_then_decode_us"] > 0 and row["decode_writes_us"] > 0
    assert row["saved_us_per_step"] == row["write_then_decode_us"] - row["decode_writes_us"]
    assert "caches equal" in done.stdout
