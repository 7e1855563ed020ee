"""Small runtime helpers."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import jax
import numpy as np

__all__ = ["enable_compilation_cache", "check_count"]


def enable_compilation_cache(path: Optional[str] = None) -> str:
    """Turn on JAX's persistent compilation cache, so a second run skips XLA compilation.

    The directory is ``path``, else ``$JAX_COMPILATION_CACHE_DIR``, else ``~/.cache/hiermeta/jax``.
    Every compiled program is cached (minimum compile time 0 s).  Returns the directory.
    """
    directory = path or os.environ.get("JAX_COMPILATION_CACHE_DIR") or str(
        Path.home() / ".cache" / "hiermeta" / "jax"
    )
    Path(directory).mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", directory)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return directory


def check_count(value, name: str, minimum: int = 0) -> int:
    """``value`` as a Python int if it is an integer >= ``minimum``; else a ``ValueError`` naming it.

    Counts (steps, tasks, chains, tree depths) take integers only (Python, NumPy, or a 0-d integer
    array): ``2.7``, ``3.0``, ``"3"`` and ``True`` are refused rather than truncated or parsed.
    """
    integer_array = hasattr(value, "dtype") and np.ndim(value) == 0 and np.issubdtype(value.dtype, np.integer)
    if isinstance(value, (bool, np.bool_)) or not (isinstance(value, (int, np.integer)) or integer_array):
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r} ({type(value).__name__})")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)
