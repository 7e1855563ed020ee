"""hiermeta.mixed's lazy names: each resolves to its object, also after every submodule is imported."""

import importlib
import pkgutil
import types

import hiermeta
import hiermeta.mixed as mixed


def test_every_name_resolves_to_an_object_not_a_module_after_all_submodules_are_imported():
    for info in pkgutil.iter_modules(mixed.__path__):
        importlib.import_module(f"hiermeta.mixed.{info.name}")  # binds each submodule on the package
    for name in mixed.__all__:
        value = getattr(mixed, name)
        assert not isinstance(value, types.ModuleType), f"hiermeta.mixed.{name} is a module"
    assert callable(hiermeta.compare) and callable(hiermeta.holdout_split) and callable(hiermeta.mixed_model)


def test_the_whole_mixed_engine_but_nuts_imports_no_jax_through_the_real_package():
    """Every hiermeta.mixed module except the NumPyro model, the command line and their helpers load
    without JAX, NumPyro, ArviZ or matplotlib, through the installed package's own __init__."""
    import subprocess
    import sys

    code = ("import sys, pkgutil, importlib, hiermeta, hiermeta.mixed as m\n"
            "for i in pkgutil.iter_modules(m.__path__):\n"
            "    if i.name != 'numpyro_model': importlib.import_module('hiermeta.mixed.' + i.name)\n"
            "import hiermeta.cli, hiermeta.cli_compare\n"
            "print(','.join(x for x in ('jax', 'numpyro', 'arviz', 'matplotlib') if x in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "", f"imported: {out.stdout}"
