"""Reporting helpers for studies: plain-text tables, JSON output and loss-curve figures."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from .evaluate import LossCurve

__all__ = ["format_table", "write_json", "plot_loss_curves", "to_jsonable", "pyplot", "save_figure"]


def _cell(value: Any, digits: int) -> str:
    if isinstance(value, str):
        return value
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    return f"{float(value):.{digits}f}"


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], digits: int = 3) -> str:
    """A right-aligned plain-text table (first column left-aligned)."""
    cells = [[_cell(v, digits) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]

    def line(values):
        first = values[0].ljust(widths[0])
        return "  ".join([first] + [v.rjust(w) for v, w in zip(values[1:], widths[1:])])

    rule = "-" * (sum(widths) + 2 * (len(widths) - 1))
    return "\n".join([line(list(headers)), rule] + [line(r) for r in cells])


def to_jsonable(obj: Any) -> Any:
    """NumPy/JAX arrays and scalars to lists and floats, recursively (NaN and inf become None)."""
    if isinstance(obj, LossCurve):
        return obj.to_dict()
    if isinstance(obj, Mapping):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if hasattr(obj, "shape") and hasattr(obj, "dtype"):
        return to_jsonable(np.asarray(obj).tolist())
    if isinstance(obj, (np.floating, float)):
        value = float(obj)
        return value if math.isfinite(value) else None
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, np.bool_):
        return bool(obj)
    return obj


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


def save_figure(fig, path: Path | str) -> Path:
    """Lay ``fig`` out, write it to ``path`` at 120 dpi, close it, and return the path."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_loss_curves(
    ax,
    curves: Mapping[str, LossCurve],
    references: Mapping[str, float] = (),
    band: str = "sem",
):
    """Mean loss against adaptation steps, with a 68% band.

    ``band="sem"``: mean +- one standard error (a 68% confidence band for the mean);
    ``band="tasks"``: the 16th-84th percentile of the per-task losses.
    """
    for name, curve in curves.items():
        (line,) = ax.plot(curve.steps, curve.mean, label=name)
        lo, hi = (curve.mean - curve.sem, curve.mean + curve.sem) if band == "sem" else (curve.lower, curve.upper)
        ax.fill_between(curve.steps, lo, hi, color=line.get_color(), alpha=0.25, linewidth=0)
    for i, (name, value) in enumerate(dict(references).items()):
        ax.axhline(value, color="k", linestyle=["--", ":", "-."][i % 3], linewidth=1, label=name)
    ax.set_xlabel("adaptation steps")
    ax.set_ylabel("generalisation loss (NLL per observation + const)")
    ax.legend(fontsize=8)
    return ax
