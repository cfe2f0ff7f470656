"""What loading a model folder's tokenizer costs a fresh process that has already imported
torch (as the engine's has): ondo's `load_tokenizer` against transformers' plain
`AutoTokenizer.from_pretrained`, alternating, each in a new process, with the seconds, the
modules each imported, whether the heavy ones came in (transformers' modeling stack,
scikit-learn), and a check that both give the same tokenizer class and the same ids.

    python3 bench/tokenizer_load.py --model-shape qwen3-0.6b --repeats 3
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

_HEAVY = ("sklearn", "transformers.generation.utils", "transformers.modeling_utils")
_SAMPLE = "Hello world, naïve café 😀 — 12345 <|im_end|>"

_CHILD = r"""
import json, sys, time
import torch  # the engine's process has it before the tokenizer thread starts
mode, folder, heavy, sample = sys.argv[1], sys.argv[2], sys.argv[3].split(","), sys.argv[4]
before = set(sys.modules)
t0 = time.perf_counter()
if mode == "ondo":
    from ondo.model.tokenizer import load_tokenizer
    hf = load_tokenizer(folder).hf_tokenizer
else:
    from transformers import AutoTokenizer
    hf = AutoTokenizer.from_pretrained(folder)
seconds = time.perf_counter() - t0
print(json.dumps({"mode": mode, "seconds": round(seconds, 3),
                  "modules_imported": len(set(sys.modules) - before),
                  "heavy_modules": [m for m in heavy if m in sys.modules],
                  "class": type(hf).__name__, "ids": list(hf.encode(sample))}))
"""


def run_once(mode: str, folder: str) -> dict:
    out = subprocess.run([sys.executable, "-c", _CHILD, mode, folder, ",".join(_HEAVY), _SAMPLE],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model-shape", default="qwen3-0.6b")
    ap.add_argument("--folder", help="a model folder with tokenizer files (default: the shape's)")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    if args.folder:
        folder = args.folder
    else:
        from ondo.bench.shapes import shape_folder

        folder = shape_folder(args.model_shape, tokenizer="bytes")
    runs = {"ondo": [], "auto": []}
    for _ in range(args.repeats):
        for mode in runs:
            r = run_once(mode, folder)
            runs[mode].append(r)
            print(f"{mode:5s} {r['seconds']:.2f} s  {r['modules_imported']} modules  "
                  f"heavy: {r['heavy_modules'] or 'none'}", flush=True)
    same = all(a["class"] == b["class"] and a["ids"] == b["ids"]
               for a, b in zip(runs["ondo"], runs["auto"]))
    print(json.dumps({"benchmark": "tokenizer_load", "folder": folder, "same_tokenizer": same,
                      **{f"{m}_seconds": sorted(r["seconds"] for r in rs) for m, rs in runs.items()},
                      **{f"{m}_heavy_modules": rs[-1]["heavy_modules"] for m, rs in runs.items()}}))


if __name__ == "__main__":
    main()
