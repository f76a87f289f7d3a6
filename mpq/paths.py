"""Where mpq keeps what outlives a process: the profile cache and built kernels (``$MPQ_CACHE_DIR``, else
``$XDG_CACHE_HOME/mpq``, else ``~/.cache/mpq``)."""

from __future__ import annotations

import os
from pathlib import Path


def default_cache_dir() -> Path:
    """mpq's cache directory (not created here)."""
    if os.environ.get("MPQ_CACHE_DIR"):
        return Path(os.environ["MPQ_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "mpq"
