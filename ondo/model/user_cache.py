"""The user's cache folder for what ondo keeps between starts (compiled code, converted
tokenizers): `$XDG_CACHE_HOME/ondo/<name>`, else `~/.cache/ondo/<name>`."""

from __future__ import annotations

import os


def user_cache_dir(name: str) -> str:
    """The folder `name` under ondo's part of the user's cache (not created here)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "ondo", name)
