"""hiermeta/__init__.py: the curated, lazy top-level namespace."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HEAVY = ("jax", "numpyro", "arviz", "matplotlib", "pandas", "scipy", "optax")


def run(code: str) -> dict:
    """Run ``code`` in a fresh interpreter with this checkout first on the path; its last line is JSON."""
    out = subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, {str(ROOT)!r})\n" + code],
                         capture_output=True, text=True, check=True, timeout=600)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_import_hiermeta_loads_no_heavy_package_and_every_name_resolves():
    got = run(f"""
import json, types
import hiermeta as hm
before = [m for m in {HEAVY!r} if m in sys.modules]
mixed = {{"mixed", "mixed_model", "MixedModel", "MixedFit", "anova"}}  # the formula path reads data frames
resolved = {{name: type(getattr(hm, name)).__name__ for name in hm.__all__ if name not in mixed}}
after = [m for m in ("arviz", "matplotlib", "pandas") if m in sys.modules]
resolved.update({{name: type(getattr(hm, name)).__name__ for name in hm.__all__ if name in mixed}})
after_mixed = [m for m in ("arviz", "matplotlib") if m in sys.modules]
print(json.dumps({{"before": before, "after": after, "after_mixed": after_mixed, "all": hm.__all__, "dir": dir(hm),
                  "resolved": resolved, "file": hm.__file__}}))
""")
    assert got["file"].startswith(str(ROOT))
    assert got["before"] == []  # nothing heavy until a name is used
    assert got["after"] == []  # ArviZ, matplotlib and pandas only when a function needs them
    assert got["after_mixed"] == []  # hiermeta.mixed adds pandas, never ArviZ or matplotlib
    assert len(got["all"]) == len(set(got["all"]))  # no name listed twice
    assert set(got["all"]) <= set(got["dir"])
    assert got["resolved"]["evaluate"] == "function" and got["resolved"]["errors"] == "module"
    assert got["resolved"]["HierarchicalModel"] == "type"


def test_a_submodule_does_not_shadow_the_function_of_its_name():
    got = run("""
import json
import hiermeta as hm
import hiermeta.evaluate, hiermeta.linear_gaussian, hiermeta.shrinkage_report  # load the modules first
from hiermeta.evaluate import LossCurve
print(json.dumps([type(hm.evaluate).__name__, type(hm.linear_gaussian).__name__,
                  type(hm.shrinkage_report).__name__, LossCurve.__name__]))
""")
    assert got == ["function", "function", "function", "LossCurve"]


def test_unknown_names_raise_attribute_error():
    import hiermeta as hm

    try:
        hm.no_such_name
    except AttributeError as err:
        assert "no_such_name" in str(err)
    else:  # pragma: no cover
        raise AssertionError("hm.no_such_name resolved")
    # names that moved to their modules are there, not at the top
    assert not hasattr(hm, "ConvergenceWarning") and hm.errors.ConvergenceWarning.__name__ == "ConvergenceWarning"
    assert not hasattr(hm, "run_inner") and callable(hm.inner.run_inner)


def test_models_install_as_hiermeta_models_and_not_as_a_top_level_package():
    import tomllib

    setup = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert "hiermeta.models" in setup["packages"] and not any(p.split(".")[0] == "models" for p in setup["packages"])
    assert setup["package-dir"] == {"hiermeta.models": "models"}
    # a source checkout gives hiermeta.models its own models/ folder (not another installed copy's)
    got = run("""
import json
from hiermeta.models import linear
print(json.dumps(linear.__file__))
""")
    assert got == str(ROOT / "models" / "linear.py")
