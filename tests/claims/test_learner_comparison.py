"""examples/compare.py, the comparison study (Experiments 1 and 2): every method end to end, and the
full studies whose numbers docs/comparison.md reports (slow)."""

import json

import numpy as np
import pytest
from _examples import load_example


def run_compare(argv, out):
    """Run examples/compare.py with ``argv`` writing to ``out``; return its JSON."""
    compare = load_example("compare")
    compare.main([*argv, "--no-plot", "--no-progress", "--out", str(out)])
    return json.loads((out / "compare.json").read_text())


@pytest.mark.slow  # the compare study end to end (every learner, tiny)
def test_compare_quick_runs_every_learner_end_to_end(tmp_path):
    """examples/compare.py --quick on the linear domain: every method is searched, meta-trained,
    evaluated on validation and held-out tasks, and written to JSON."""
    result = run_compare(["--quick", "--domain", "linear", "--meta-steps", "40", "--eval-steps", "30",
                          "--val-tasks", "50", "--test-tasks", "50"], tmp_path)
    assert result["schema"] == "hiermeta/compare/v1"
    methods = result["domains"]["linear"]["methods"]
    expected = {"Shrinkage", "M-Shrinkage", "MAML", "M-MAML", "FOMAML", "FO-M-MAML", "Reptile", "M-Shrinkage MAP"}
    assert expected <= set(methods)
    for name, entry in methods.items():
        mean = np.asarray(entry["curve"]["mean"], dtype=float)
        assert mean.shape == (31,) and np.all(np.isfinite(mean)), name
        assert mean[10] < mean[0], name  # adaptation helps
        assert entry["status"] == "ok" and entry["num_skipped"] == 0, name
        assert entry["summary"]["best"] == pytest.approx(mean.min())
        assert len(result["domains"]["linear"]["search"][name]) == 1
    refs = result["domains"]["linear"]["references"]
    assert refs["MLE"]["expected"] == pytest.approx(5.5)


def _claims(domain):
    methods, refs = domain["methods"], domain["references"]
    s = {m: e["summary"] for m, e in methods.items()}
    return methods, refs, s


@pytest.mark.slow
def test_full_comparison_linear(tmp_path):
    """The full linear study (about 8 minutes): what docs/comparison.md reports."""
    methods, refs, s = _claims(run_compare(["--domain", "linear"], tmp_path)["domains"]["linear"])
    oracle = refs["Bayes oracle (posterior mean = MAP)"]["held_out"]
    # M-Shrinkage reaches the oracle and does not overfit
    assert s["M-Shrinkage"]["best_step"] >= 195 and s["M-Shrinkage"]["last"] - oracle < 0.01
    assert abs(methods["M-Shrinkage"]["paired_vs_oracle_at_val_step"]["mean"]) < 0.005
    # the modular MAML variants tie it at their early-stopped best, then rise
    for m in ("M-MAML", "FO-M-MAML"):
        assert abs(methods[m]["paired_vs_M-Shrinkage"]["at_val_step"]["mean"]) < 0.01, m
        assert s[m]["last"] > s[m]["best"] + 0.02, m
    assert s["MAML"]["last"] > s["MAML"]["best"] + 0.02
    # non-modular methods are clearly worse; the joint-MAP variant is worse than the MLE
    for m in ("Shrinkage", "MAML", "FOMAML", "Reptile"):
        assert methods[m]["paired_vs_M-Shrinkage"]["at_val_step"]["mean"] > 0.15, m
    assert s["M-Shrinkage MAP"]["best"] > refs["MLE"]["held_out"]


@pytest.mark.slow
def test_full_comparison_swirl(tmp_path):
    """The full swirl study (about 16 minutes): what docs/comparison.md reports."""
    methods, refs, s = _claims(run_compare(["--domain", "swirl"], tmp_path)["domains"]["swirl"])
    oracle = refs["Bayes oracle (global MAP)"]["held_out"]
    assert s["M-Shrinkage"]["best_step"] >= 990  # no overfitting
    for m in ("MAML", "M-MAML", "FO-M-MAML"):
        assert s[m]["last"] > s[m]["best"] + 0.015, m  # a minimum, then a rise
    for m, e in methods.items():
        if m != "M-Shrinkage MAP":
            assert 0.0 < e["paired_vs_oracle_at_val_step"]["mean"] < 0.06, m  # all close to the global MAP
    # not reproduced: M-Shrinkage is not the lowest (MAML is below it at its validation-chosen step)
    assert methods["MAML"]["paired_vs_M-Shrinkage"]["at_val_step"]["mean"] < 0
    assert s["M-Shrinkage MAP"]["best"] > refs["MLE"]["held_out"]
