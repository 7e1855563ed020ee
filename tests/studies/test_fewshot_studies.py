"""The few-shot studies' quick runs (slow set): examples/fewshot_factorial.py and
examples/fewshot_alphabets.py end to end, two seeds each, and what their JSON holds."""

import json

import numpy as np
import pytest
from _examples import load_example

pytestmark = pytest.mark.slow


def test_factorial_quick_run(tmp_path):
    load_example("fewshot_factorial").main(["--quick", "--seeds", "0", "1", "--out", str(tmp_path)])
    out = json.loads((tmp_path / "fewshot_factorial.json").read_text())
    assert out["schema"] == "hiermeta/fewshot_factorial/v1"
    cells = {"map / eq4", "map / exact", "map / fixed", "pll / eq4", "pll / exact", "pll / fixed", "untrained / fixed"}
    assert set(out["summary"]) == cells
    for cell, v in out["summary"].items():
        assert len(v["per_seed"]) == 2 and all(0.0 <= a <= 1.0 for a in v["per_seed"]), cell
        assert np.isclose(v["accuracy"], np.mean(v["per_seed"]))
        assert ("sigma_mean_over_seeds" in v) == (cell.split(" / ")[1] != "fixed" and not cell.startswith("untrained"))
    assert set(out["learned_minus_fixed"]) == {"map: eq4 - fixed", "map: exact - fixed", "pll: eq4 - fixed",
                                               "pll: exact - fixed"}


def test_alphabet_protocol_quick_run(tmp_path):
    load_example("fewshot_alphabets").main(["--quick", "--seeds", "0", "1", "--out", str(tmp_path)])
    out = json.loads((tmp_path / "fewshot_alphabets.json").read_text())
    assert set(out["summary"]) == {"M-sigma-Reptile", "Reptile", "M-sigma-iMAML", "iMAML"}
    assert set(out["learned_minus_fixed"]) == {"M-sigma-Reptile - Reptile", "M-sigma-iMAML - iMAML"}
    for name, runs in out["runs"].items():
        assert [r["seed"] for r in runs] == [0, 1]
        for r in runs:
            assert r["validation"] and r["best_step"] in [step for step, _ in r["validation"]]
            assert len(r["movement"]) == len(out["modules"])
            assert ("sigma" in r) == name.startswith("M-")
