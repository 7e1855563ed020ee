"""What results are printed and saved as: plain-text tables, JSON-able values, figures.

NumPy only (matplotlib imported where a figure is drawn), so both engines use it: the mixed-model
engine's reports never import JAX.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

__all__ = ["format_table", "format_cell", "to_jsonable", "save_figure"]


def save_figure(fig, path) -> Path:
    """Lay ``fig`` out, write it to ``path`` at 120 dpi, close it, and return the path.

    matplotlib is imported here, not at the top: it is needed only by those who draw figures.
    """
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def format_cell(value: Any, digits: int = 3) -> str:
    """One table cell: text as it is, ``-`` for None or NaN, integers whole, numbers to ``digits`` decimals."""
    if isinstance(value, str):
        return value
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    return f"{float(value):.{digits}f}"


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], digits: int = 3) -> str:
    """A right-aligned plain-text table (first column left-aligned)."""
    cells = [[format_cell(v, digits) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]

    def line(values):
        first = values[0].ljust(widths[0])
        return "  ".join([first] + [v.rjust(w) for v, w in zip(values[1:], widths[1:])])

    rule = "-" * (sum(widths) + 2 * (len(widths) - 1))
    return "\n".join([line(list(headers)), rule] + [line(r) for r in cells])


def to_jsonable(obj: Any) -> Any:
    """NumPy/JAX arrays and scalars to lists and floats, recursively (NaN and inf become None)."""
    if hasattr(obj, "to_dict"):  # hiermeta.LossCurve, hiermeta.ShrinkageReport
        return obj.to_dict()
    if isinstance(obj, Mapping):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if hasattr(obj, "shape") and hasattr(obj, "dtype"):
        return to_jsonable(np.asarray(obj).tolist())
    if isinstance(obj, float):  # NumPy scalars took the branch above (they have a shape and a dtype)
        return obj if math.isfinite(obj) else None
    return obj
