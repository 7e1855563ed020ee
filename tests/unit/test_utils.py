"""hiermeta/utils.py: the default compilation cache, counts, tables, JSON-able values."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from hiermeta.utils import CACHE_ENV, check_count, default_compilation_cache

ROOT = Path(__file__).resolve().parents[2]

PROBE = f"""
import json, sys
sys.path.insert(0, {str(ROOT)!r})
import hiermeta as hm
jax_at_import = "jax" in sys.modules
import hiermeta.errors  # needs no JAX: leaves the cache alone
jax_after_errors = "jax" in sys.modules
hm.HierarchicalModel  # the first name that needs JAX
import jax, jax.numpy as jnp
jax.jit(lambda x: x * 2.0 + 1.0)(jnp.arange(3.0)).block_until_ready()
print(json.dumps({{"jax_at_import": jax_at_import, "jax_after_errors": jax_after_errors,
                  "dir": jax.config.jax_compilation_cache_dir,
                  "min_time": jax.config.jax_persistent_cache_min_compile_time_secs}}))
"""


def probe(tmp_path, **env):
    environ = {k: v for k, v in os.environ.items() if k not in ("JAX_COMPILATION_CACHE_DIR", CACHE_ENV)}
    environ.update(XDG_CACHE_HOME=str(tmp_path / "xdg"), **env)
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=environ, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def cached_files(directory) -> int:
    return sum(1 for p in Path(directory).rglob("*") if p.is_file()) if Path(directory).exists() else 0


def test_the_cache_is_on_by_default_from_the_first_jax_module_in_the_user_cache_dir(tmp_path):
    got = probe(tmp_path)
    default = tmp_path / "xdg" / "hiermeta" / "jax"
    assert got == {"jax_at_import": False, "jax_after_errors": False, "dir": str(default), "min_time": 0.0}
    assert cached_files(default) > 0  # the jitted program was written


@pytest.fixture
def no_cache_configured(monkeypatch):
    """This process's cache settings cleared for default_compilation_cache to decide, then restored."""
    import jax

    names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
             "jax_persistent_cache_min_entry_size_bytes")
    saved = {name: getattr(jax.config, name) for name in names}
    monkeypatch.delenv(CACHE_ENV, raising=False)
    jax.config.update("jax_compilation_cache_dir", None)
    yield jax.config
    for name, value in saved.items():
        jax.config.update(name, value)


def test_the_environment_variable_moves_or_turns_off_the_cache(tmp_path, monkeypatch, no_cache_configured):
    moved = tmp_path / "elsewhere"
    monkeypatch.setenv(CACHE_ENV, str(moved))
    assert default_compilation_cache() == str(moved) and moved.is_dir()
    assert no_cache_configured.jax_compilation_cache_dir == str(moved)
    assert no_cache_configured.jax_persistent_cache_min_compile_time_secs == 0.0
    for off in ("off", "0", "False", " no "):
        no_cache_configured.update("jax_compilation_cache_dir", None)
        monkeypatch.setenv(CACHE_ENV, off)
        assert default_compilation_cache() is None and no_cache_configured.jax_compilation_cache_dir is None


def test_a_cache_dir_the_user_configured_is_left_alone(tmp_path, monkeypatch, no_cache_configured):
    mine = str(tmp_path / "mine")
    no_cache_configured.update("jax_compilation_cache_dir", mine)  # in code, or by $JAX_COMPILATION_CACHE_DIR
    no_cache_configured.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_compilation_cache() is None
    assert no_cache_configured.jax_compilation_cache_dir == mine
    assert no_cache_configured.jax_persistent_cache_min_compile_time_secs == 1.0  # JAX's settings untouched
    assert not (tmp_path / "xdg").exists()


def test_an_unwritable_cache_dir_warns_and_leaves_the_cache_off(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    code = (f"import sys, warnings, json; sys.path.insert(0, {str(ROOT)!r})\n"
            "warnings.simplefilter('always')\n"
            "with warnings.catch_warnings(record=True) as w:\n"
            "    import hiermeta.hierarchy\n"
            "import jax\n"
            "print(json.dumps([jax.config.jax_compilation_cache_dir, [str(x.message) for x in w]]))\n")
    environ = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    environ[CACHE_ENV] = str(blocker / "jax")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=environ, timeout=600)
    directory, messages = json.loads(out.stdout.strip().splitlines()[-1])
    assert directory is None
    assert any("no persistent compilation cache" in m and CACHE_ENV in m for m in messages)


@pytest.mark.parametrize("value", [3, np.int64(3), np.asarray(3)])
def test_check_count_accepts_integers(value):
    assert check_count(value, "n", 3) == 3 and type(check_count(value, "n")) is int


@pytest.mark.parametrize("value, kind", [(2.7, "float"), (3.0, "float"), ("3", "str"), (True, "bool"),
                                         (np.bool_(True), "bool"), (np.asarray([3]), "ndarray")])
def test_check_count_refuses_what_is_not_an_integer(value, kind):
    with pytest.raises(ValueError, match=rf"n must be an integer >= 0, got .* \({kind}\)"):
        check_count(value, "n")


def test_check_count_refuses_a_count_below_the_minimum():
    with pytest.raises(ValueError, match=r"n must be >= 2, got 1"):
        check_count(1, "n", 2)
    assert check_count(2, "n", 2) == 2
