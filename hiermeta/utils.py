"""Small runtime helpers: the compilation cache, counts and tolerances checked, memory limits.

(Plain-text tables, JSON-able values and saved figures: :mod:`hiermeta.printing`.)"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Optional

import jax
import numpy as np
from jax.experimental.compilation_cache import compilation_cache

from .errors import HiermetaWarning

__all__ = ["enable_compilation_cache", "default_compilation_cache", "persistent_cache_off_for_cpu_collectives",
           "CACHE_ENV", "check_count", "check_positive", "check_memory", "memory_limit"]

# Turns the default persistent compilation cache off ("0", "off", "false", "no") or moves it (a directory).
CACHE_ENV = "HIERMETA_COMPILATION_CACHE"


def _user_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/hiermeta/jax``, else ``~/.cache/hiermeta/jax``."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "hiermeta" / "jax"


def enable_compilation_cache(path: Optional[str] = None) -> str:
    """Turn on JAX's persistent compilation cache, so a second run skips XLA compilation.

    The directory is ``path``, else ``$JAX_COMPILATION_CACHE_DIR``, else ``~/.cache/hiermeta/jax``
    (``$XDG_CACHE_HOME/hiermeta/jax`` where that is set).  Every compiled program is cached
    (minimum compile time 0 s).  Returns the directory.  hiermeta already does this by default
    (:func:`default_compilation_cache`); call it to choose the directory in code.
    """
    directory = path or os.environ.get("JAX_COMPILATION_CACHE_DIR") or str(_user_cache_dir())
    Path(directory).mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", directory)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return directory


def default_compilation_cache() -> Optional[str]:
    """The persistent compilation cache hiermeta turns on for its users; returns its directory or None.

    Called once, when hiermeta first imports a module that needs JAX (not at ``import hiermeta``):
    a second run of a script then loads its compiled programs instead of compiling them again.

    * ``HIERMETA_COMPILATION_CACHE=off`` (or ``0``, ``false``, ``no``) turns it off;
      ``HIERMETA_COMPILATION_CACHE=DIR`` moves it to ``DIR``.
    * A cache directory the user configured is left alone: ``$JAX_COMPILATION_CACHE_DIR``, or
      ``jax.config.update("jax_compilation_cache_dir", ...)`` before hiermeta's first JAX module.
    * Otherwise: ``~/.cache/hiermeta/jax`` (``$XDG_CACHE_HOME/hiermeta/jax``), every program cached.

    A directory that cannot be created leaves the cache off, with a :class:`~hiermeta.errors.HiermetaWarning`.
    JAX decides at its first compilation whether a cache is used: in a process that compiled
    something before hiermeta's first import, the default has no effect.
    """
    setting = os.environ.get(CACHE_ENV, "").strip()
    if setting.lower() in ("0", "off", "false", "no"):
        return None
    if jax.config.jax_compilation_cache_dir:  # the user's own (set in code or by $JAX_COMPILATION_CACHE_DIR)
        return None
    try:
        return enable_compilation_cache(setting or str(_user_cache_dir()))
    except OSError as err:
        warnings.warn(f"hiermeta: no persistent compilation cache ({err}); set {CACHE_ENV}=DIR to move it or "
                      f"{CACHE_ENV}=off to silence this", HiermetaWarning, stacklevel=2)
        return None


def persistent_cache_off_for_cpu_collectives() -> bool:
    """Turn JAX's persistent compilation cache off in a job of several CPU processes; True if it did.

    On JAX's CPU runtime (gloo collectives) a program over several processes that each process
    *loads* from the persistent cache, instead of compiling it in the run, can hang in its first
    collective: with jax 0.12.1, 9 of 10 warm-cache runs of the divergence worker in
    ``tests/unit/test_distributed.py`` hung, and both cold-cache runs finished in 11-13 s.
    Compiling in each run costs seconds; a hang costs the job, so hiermeta compiles afresh there
    (and says so once, with a :class:`~hiermeta.errors.HiermetaWarning`).  GPU and TPU jobs, and
    single processes, keep the cache.  Called by :func:`hiermeta.distributed.check_mesh` and before
    the first cross-process gather, i.e. before ``fit`` or ``evaluate`` compiles anything over the mesh.
    """
    if jax.process_count() == 1 or jax.default_backend() != "cpu" or not jax.config.jax_enable_compilation_cache:
        return False
    jax.config.update("jax_enable_compilation_cache", False)
    compilation_cache.reset_cache()  # JAX decides once whether its cache is used: ask it again
    warnings.warn("hiermeta: the persistent compilation cache is off in this job of several CPU processes "
                  "(programs loaded from it can hang in gloo's collectives); every process compiles afresh",
                  HiermetaWarning, stacklevel=3)
    return True


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
