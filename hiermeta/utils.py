"""Small runtime helpers."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import jax

__all__ = ["enable_compilation_cache"]


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
