"""An output file that is one of a command's own inputs: refused before anything is
written, since opening it for writing would destroy the input first."""

from __future__ import annotations

import os
from pathlib import Path

PathLike = str | os.PathLike[str]


def same_file(a: PathLike, b: PathLike) -> bool:
    """Whether two paths name one file: the same inode where both exist (links, `./x`,
    another spelling of the folder), else the same absolute path once resolved."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return Path(a).resolve() == Path(b).resolve()


def refuse_overwriting_inputs(output_flag: str, output: PathLike,
                              inputs: dict[str, PathLike | None]) -> None:
    """ValueError if `output` is the file of any input (by flag; None: not given). "-"
    (stdout) is never a file."""
    if str(output) == "-":
        return
    for flag, path in inputs.items():
        if path is not None and str(path) != "-" and same_file(output, path):
            raise ValueError(f"{output_flag} {output} is also {flag}: writing it would destroy "
                             "that input; choose another file")
