"""Files ondo derives from a model file once and keeps for the next start (a GGUF's
converted tokenizer, its dequantized weights), in the user's cache folder.

Each derived set is one folder, named by a hash of the source's absolute path, size and
modification time and of the versions that shaped the conversion: a changed file or
library misses and is converted again. A folder is written beside its final place and
moved there whole, so a reader never sees half of one, and two processes converting the
same file at once both keep working. Writing is best effort: a folder that cannot be
written only costs the conversion at the next start, with a warning. Each folder names its
source (`SOURCE_FILE`); keeping a new one removes the folders of the same kind whose source
is the same path (an older version of the file) or is gone, so a changed or deleted model
leaves nothing behind.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
from collections.abc import Callable

from ondo.model.user_cache import user_cache_dir

log = logging.getLogger(__name__)

SOURCE_FILE = ".source"  # the absolute path a folder was derived from


def kept_folder(kind: str, source_path: str, *versions: str) -> str:
    """Where what is derived from `source_path` is kept under `kind` (whether or not it is
    there yet)."""
    stat = os.stat(source_path)
    key = "|".join([os.path.abspath(source_path), str(stat.st_size), str(stat.st_mtime_ns), *versions])
    name = os.path.splitext(os.path.basename(source_path))[0]
    return os.path.join(user_cache_dir(kind), f"{name}-{hashlib.sha256(key.encode()).hexdigest()[:16]}")


def is_whole(folder: str, marker: str) -> bool:
    """Whether `folder` holds a kept set (`marker` is one of its files)."""
    return os.path.isfile(os.path.join(folder, marker))


def keep_folder(folder: str, marker: str, write: Callable[[str], None], what: str, source_path: str) -> None:
    """`write` fills a staging folder (`marker` among its files), which then becomes
    `folder`, derived from `source_path`; a warning where that cannot be done."""
    try:
        os.makedirs(os.path.dirname(folder), exist_ok=True)
        staging = tempfile.mkdtemp(prefix=".staging-", dir=os.path.dirname(folder))
        try:
            write(staging)
            with open(os.path.join(staging, SOURCE_FILE), "w") as f:
                f.write(os.path.abspath(source_path))
            if os.path.isdir(folder) and not is_whole(folder, marker):
                shutil.rmtree(folder, ignore_errors=True)  # not one of ours whole
            os.rename(staging, folder)
        except OSError:
            if not is_whole(folder, marker):
                raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)  # another process's folder won
    except Exception as e:  # a full or read-only disk: convert again next time
        log.warning("cannot keep %s in %s: %s", what, folder, e)
        return
    remove_stale(os.path.dirname(folder), source_path, folder)


def remove_stale(root: str, source_path: str, current: str) -> None:
    """Remove the folders under `root`, other than `current`, derived from `source_path` or
    from a file that is gone."""
    source = os.path.abspath(source_path)
    for entry in os.scandir(root):
        if not entry.is_dir() or entry.name.startswith(".staging-") or entry.path == current:
            continue
        try:
            with open(os.path.join(entry.path, SOURCE_FILE)) as f:
                derived_from = f.read()
        except OSError:
            continue  # not one of ours whole, or another process's: leave it
        if derived_from == source or not os.path.exists(derived_from):
            shutil.rmtree(entry.path, ignore_errors=True)
