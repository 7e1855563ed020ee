"""Load a script of examples/ as a module (``load_example("cbpp").main([...])``); tests/ is on
pytest's ``pythonpath`` (pyproject.toml), so every test imports this as ``_examples``."""

import importlib.util
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def load_example(name: str):
    """``examples/NAME.py`` as a fresh module named ``NAME_example`` (its ``main`` not run)."""
    spec = importlib.util.spec_from_file_location(f"{name}_example", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
