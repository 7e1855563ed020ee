"""The examples' shared helpers: command lines, plain-text tables, JSON output and loss-curve figures.

Not part of the library (``hiermeta`` holds no argparse or table code); every script under
``examples/`` imports it as ``_common`` (each puts its own folder on ``sys.path`` first, so this
works also when a test loads the script from elsewhere).  matplotlib is imported only when a
figure is drawn (:func:`pyplot`).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any, Mapping, Optional

import numpy as np

from hiermeta.printing import format_table, save_figure, to_jsonable  # noqa: F401  (re-exported for the examples)

__all__ = ["format_table", "write_json", "plot_loss_curves", "to_jsonable", "pyplot", "save_figure",
           "study_parser", "count", "count_list", "positive_float", "probability", "prng_seed", "MAX_COUNT",
           "MAX_CHAINS"]


class StudyHelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """``--help``: the study's docstring as written, and each option's default after its help.

    Options whose default is None (it depends on ``--quick``; their help says how) or False (flags)
    show no "(default: ...)".
    """

    def _get_help_string(self, action):
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


def study_parser(description: str) -> argparse.ArgumentParser:
    """The argument parser every study under ``examples/`` uses (see :class:`StudyHelpFormatter`)."""
    return argparse.ArgumentParser(description=description, formatter_class=StudyHelpFormatter)


MAX_COUNT = 10**7  # steps, tasks, draws, chains: past this a study would not fit in memory or finish
MAX_SEED = 2**32 - 1  # seeds of JAX's and NumPy's generators (PRNGKey takes at most 64 bits)


def _integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def count(minimum: int = 1, maximum: int = MAX_COUNT):
    """An argparse ``type``: an integer in ``[minimum, maximum]``; anything else is refused with a message.

    The upper bound keeps a typo (``--meta-steps 100000000000000000000000``, ``--batch-size
    100000000000``) from running for ever, hanging in an allocation, or being silently cut.
    """

    def parse(text: str) -> int:
        value = _integer(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        if value > maximum:
            raise argparse.ArgumentTypeError(f"must be <= {maximum} (more would not fit in memory or finish), "
                                             f"got {value}")
        return value

    parse.__name__ = f"integer in [{minimum}, {maximum}]"
    return parse


MAX_CHAINS = 1024  # NumPyro chains: each holds its own state and draws


def probability(text: str) -> float:
    """An argparse ``type``: a number strictly between 0 and 1 (e.g. NUTS's target acceptance)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"must be in (0, 1), got {text}")
    return value


def prng_seed(text: str) -> int:
    """An argparse ``type``: a seed, an integer in ``[0, 2**32 - 1]``."""
    value = _integer(text)
    if not 0 <= value <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"must be an integer in [0, {MAX_SEED}], got {value}")
    return value


def count_list(minimum: int = 1):
    """An argparse ``type``: comma-separated integers, each >= ``minimum`` (e.g. ``8,32,128``)."""
    one = count(minimum)

    def parse(text: str) -> list[int]:
        return [one(part.strip()) for part in text.split(",")]

    parse.__name__ = f"comma-separated integers >= {minimum}"
    return parse


def positive_float(text: str) -> float:
    """An argparse ``type``: a finite number > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def write_json(path: Path | str, payload: Mapping[str, Any]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(to_jsonable(payload), indent=1) + "\n")
    return path


def pyplot():
    """``matplotlib.pyplot`` on the non-interactive Agg backend (the studies write figures to files)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_loss_curves(
    ax,
    curves: Mapping[str, "hiermeta.LossCurve"],
    references: Mapping[str, float] = (),
    band: Optional[str] = "sem",
):
    """Mean loss against adaptation steps, with a 68% band.

    ``band="sem"``: mean +- one standard error (a 68% confidence band for the mean);
    ``band="tasks"``: the 16th-84th percentile of the per-task losses; None: no band.  Each curve has its own
    colour, line style and marker, so curves that coincide stay distinguishable.
    """
    styles = ["-", "--", "-.", ":"]
    markers = ["o", "s", "^", "D", "v", "x", "P", "*"]
    for i, (name, curve) in enumerate(curves.items()):
        every = max(1, len(curve.steps) // 8)
        (line,) = ax.plot(curve.steps, curve.mean, label=name, linestyle=styles[i % len(styles)],
                          marker=markers[i % len(markers)], markevery=(i * every // max(len(curves), 1), every),
                          markersize=4, markerfacecolor="none")
        if band is not None:
            lo, hi = (curve.mean - curve.sem, curve.mean + curve.sem) if band == "sem" else (curve.lower, curve.upper)
            ax.fill_between(curve.steps, lo, hi, color=line.get_color(), alpha=0.25, linewidth=0)
    for i, (name, value) in enumerate(dict(references).items()):
        ax.axhline(value, color="k", linestyle=["--", ":", "-."][i % 3], linewidth=1, label=name)
    ax.set_xlabel("adaptation steps")
    ax.set_ylabel("generalisation loss (NLL per observation + const)")
    ax.legend(fontsize=8)
    return ax
