"""Read a trace CSV, compressed or not.

Long serving traces (minutes at 20 Hz with one engine row per step) are kept as `.csv.xz`;
`.xz`, `.gz` and `.bz2` files are decompressed on the fly, anything else is read as it is.
"""

from __future__ import annotations

import bz2
import gzip
import lzma
from collections.abc import Iterator
from pathlib import Path
from typing import IO

_OPENERS = {".xz": lzma.open, ".gz": gzip.open, ".bz2": bz2.open}
TRACE_SUFFIXES = (".csv", ".csv.xz", ".csv.gz", ".csv.bz2")


def open_trace(path: str | Path) -> IO[str]:
    """The file as text with universal newlines off (for the csv module)."""
    opener = _OPENERS.get(Path(path).suffix)
    if opener is None:
        return open(path, newline="")
    return opener(path, "rt", newline="")


def trace_lines(path: str | Path) -> Iterator[str]:
    """The file's lines for a csv reader. A file that cannot be opened raises OSError; one
    damaged on the way (a cut-off or corrupt archive, a bad gzip header) raises ValueError
    naming it, so that no reader takes the part before the damage for the whole trace."""
    with open_trace(path) as f:
        try:
            yield from f
        except (EOFError, lzma.LZMAError, OSError) as e:
            raise ValueError(f"{path}: cannot read it: {e}") from None
