"""Open a trace CSV as text, compressed or not.

Long serving traces (minutes at 20 Hz with one engine row per step) are kept as `.csv.xz`;
`.xz`, `.gz` and `.bz2` files are decompressed on the fly, anything else is read as it is.
"""

from __future__ import annotations

import bz2
import gzip
import lzma
from pathlib import Path
from typing import IO

_OPENERS = {".xz": lzma.open, ".gz": gzip.open, ".bz2": bz2.open}
TRACE_SUFFIXES = (".csv", ".csv.xz", ".csv.gz", ".csv.bz2")
# What reading a damaged file raises, beside OSError (a bad gzip header is one): a cut-off
# stream, corrupt xz data.
DECOMPRESSION_ERRORS: tuple[type[Exception], ...] = (EOFError, lzma.LZMAError)


def open_trace(path: str | Path) -> IO[str]:
    """The file as text with universal newlines off (for the csv module)."""
    opener = _OPENERS.get(Path(path).suffix)
    if opener is None:
        return open(path, newline="")
    return opener(path, "rt", newline="")
