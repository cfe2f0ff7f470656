"""Who imports what, and at what cost: runs a snippet under `python -X importtime` in a fresh
process and prints the modules with the most cumulative import time, and for each module
named by --why, the chain of imports that brought it in (outermost first).

    python3 bench/import_chain.py --setup "import torch" \
        --code "from ondo.model.tokenizer import load_tokenizer; load_tokenizer(None)" \
        --why sklearn transformers.generation.utils
"""

from __future__ import annotations

import argparse
import subprocess
import sys


def parse(log: str) -> list[tuple[int, int, int, str]]:
    """(self µs, cumulative µs, depth, module) per line of an importtime log, in its order
    (children come before their parent, one level deeper)."""
    rows = []
    for line in log.splitlines():
        if not line.startswith("import time:") or "self [us]" in line:
            continue
        head, cum_us, name = line.split("|", 2)
        self_us = head.split(":")[1]
        depth = (len(name) - len(name.lstrip())) // 2
        rows.append((int(self_us), int(cum_us), depth, name.strip()))
    return rows


def chain(rows: list[tuple[int, int, int, str]], module: str) -> list[tuple[str, int]]:
    """The first import of `module` and each enclosing import above it, outermost first."""
    for i, (_, cum, depth, name) in enumerate(rows):
        if name == module:
            found = [(name, cum)]
            for _, c, d, n in rows[i + 1:]:
                if d < depth:
                    found.append((n, c))
                    depth = d
            return found[::-1]
    return []


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--setup", default="", help="run first, not timed (e.g. import torch)")
    ap.add_argument("--code", required=True)
    ap.add_argument("--why", nargs="*", default=[])
    ap.add_argument("--top", type=int, default=25)
    args = ap.parse_args()
    # The setup's imports are logged too; mark where the code starts.
    program = f"{args.setup}\nimport sys; print('---', file=sys.stderr, flush=True)\n{args.code}"
    out = subprocess.run([sys.executable, "-X", "importtime", "-c", program],
                         capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"the code failed:\n{out.stderr[-3000:]}")
    log = out.stderr.split("---\n", 1)[-1]
    rows = parse(log)
    print(f"{len(rows)} modules imported by the code, "
          f"{sum(r[0] for r in rows) / 1e6:.2f} s of import time")
    for _, cum, depth, name in sorted(rows, key=lambda r: -r[1])[:args.top]:
        print(f"{cum / 1e6:8.3f} s  {'  ' * depth}{name}")
    for module in args.why:
        links = chain(rows, module)
        print(f"\nwhy {module}:" if links else f"\n{module}: not imported")
        for name, cum in links:
            print(f"  {cum / 1e6:8.3f} s  {name}")


if __name__ == "__main__":
    main()
