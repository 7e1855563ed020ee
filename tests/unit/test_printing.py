"""Plain-text tables and JSON-able values (hiermeta.printing), cell by cell."""

import json
import math

import numpy as np

from hiermeta.printing import format_table, to_jsonable


def test_format_table_aligns_and_formats_each_kind_of_cell():
    text = format_table(["name", "count", "value"], [["a", 3, 1.23456], ["longer", np.int64(12), float("nan")],
                                                     ["b", None, np.float32(2.5)]], digits=2)
    assert text.split("\n") == [
        "name    count  value",
        "--------------------",
        "a           3   1.23",
        "longer     12      -",
        "b           -   2.50",
    ]
    assert format_table(["x", "y"], []) == "x  y\n----"
    assert format_table(["v"], [[1.23456]]).split("\n")[-1] == "1.235"  # 3 digits by default


def test_to_jsonable_converts_arrays_scalars_and_non_finite_values():
    class Curve:
        def to_dict(self):
            return {"mean": [1.0]}

    got = to_jsonable({1: np.array([1.0, np.inf]), "t": (np.int32(2), np.bool_(True)), "nan": math.nan,
                       "c": Curve(), "s": "text", "f": np.float64(0.5)})
    assert got == {"1": [1.0, None], "t": [2, True], "nan": None, "c": {"mean": [1.0]}, "s": "text", "f": 0.5}
    assert json.dumps(got)
    assert type(got["t"][0]) is int and type(got["t"][1]) is bool and type(got["f"]) is float

    class ShapeOnly:  # neither an array nor a scalar: passed through as it is
        shape = (2,)

    class DtypeOnly:
        dtype = np.float64

    for obj in (ShapeOnly(), DtypeOnly()):
        assert to_jsonable(obj) is obj
