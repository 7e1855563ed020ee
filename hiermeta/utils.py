"""Small runtime helpers."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import jax
import numpy as np

__all__ = ["enable_compilation_cache", "check_count", "check_positive", "check_memory", "memory_limit"]


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


def check_positive(value, name: str) -> float:
    """``value`` as a float if it is a finite real number > 0 (a tolerance, a scale); else a ``ValueError``.

    ``bool``, text, NaN, infinities, 0 and negative numbers are refused: a tolerance of -1 or NaN
    can never be met (a converged fit would be reported as not converged), one of +inf always is.
    """
    real = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))
    if not real or not (np.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


def memory_limit() -> float:
    """Bytes of memory a single array may use here: the host's RAM, or the device's limit if smaller."""
    try:
        limit = float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (AttributeError, ValueError, OSError):  # not POSIX
        limit = float("inf")
    stats = getattr(jax.local_devices()[0], "memory_stats", lambda: None)()
    if stats and stats.get("bytes_limit"):
        limit = min(limit, float(stats["bytes_limit"]))
    return limit


def check_memory(nbytes: float, what: str) -> None:
    """Refuse, before anything runs, an allocation (``nbytes``) that cannot fit in this machine's memory.

    A count that sizes an array (steps whose metrics are kept, draws, a loss curve's length) is
    otherwise only found to be absurd when XLA aborts or the machine swaps.
    """
    limit = memory_limit()
    if nbytes > limit:
        raise ValueError(f"{what} would need {nbytes / 2**30:.3g} GiB of memory, more than the "
                         f"{limit / 2**30:.3g} GiB here; ask for fewer")
