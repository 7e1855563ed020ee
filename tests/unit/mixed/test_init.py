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
