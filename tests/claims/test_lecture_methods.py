"""The lecture's families side by side (examples/lecture_methods.py, docs/lecture-methods.md), in the
slow set: short runs of the example on each domain, checked against the closed-form references
where there are some.

- linear: M-Shrinkage (exact MAP inner solves) reaches the Bayes posterior mean's loss (paired,
  within 0.01), deep sets come within 0.3 of it and beat the MLE's expected loss; the LSTM
  optimiser and M-MAML give finite scores.
- sinusoid, glyphs: every method of a small subset trains, scores and writes its entry.
"""

import json

import numpy as np
import pytest
from _examples import load_example

pytestmark = pytest.mark.slow


def run(tmp_path, *argv):
    load_example("lecture_methods").main([*argv, "--out", str(tmp_path)])
    return json.loads((tmp_path / "lecture_methods.json").read_text())


def test_linear_domain_against_the_bayes_posterior_mean(tmp_path):
    record = run(tmp_path, "--domain", "linear", "--meta-steps", "600",
                 "--methods", "M-Shrinkage,M-MAML,LSTM-opt MAML,DeepSets")
    linear = record["domains"]["linear"]
    results = linear["results"]
    assert set(results) == {"M-Shrinkage", "M-MAML", "LSTM-opt MAML", "DeepSets"}
    assert abs(results["M-Shrinkage"]["minus_bayes"]) < 0.01
    assert results["DeepSets"]["minus_bayes"] < 0.3
    assert results["DeepSets"]["loss"] < linear["references"]["MLE"]["expected"]
    for entry in results.values():
        assert np.isfinite(entry["loss"]) and entry["loss_ci95"] > 0
        assert entry["seconds_per_meta_step"] > 0
    assert len(results["M-Shrinkage"]["learned"]["sigma"]) == 8


def test_sinusoid_and_glyph_domains_run_every_family(tmp_path):
    run(tmp_path, "--domain", "sinusoid", "--quick", "--methods", "M-Shrinkage,LSTM-opt MAML,DeepSets")
    record = run(tmp_path, "--domain", "glyphs", "--quick",
                 "--methods", "ProtoNet,ClassWeightPredictor,ProtoNet + TENT,MAML (rotation aux),"
                              "MAML (rotation aux) + TTT")
    assert set(record["domains"]) == {"sinusoid", "glyphs"}  # the second run kept the first's entry
    for domain in record["domains"].values():
        for name, entry in domain["results"].items():
            assert "error" not in entry, (name, entry.get("error"))
            assert np.isfinite(entry["loss"])
    glyphs = record["domains"]["glyphs"]["results"]
    assert 0 <= glyphs["ProtoNet + TENT"]["accuracy"] <= 1
    assert glyphs["ProtoNet + TENT"]["test_time"]["steps"] >= 1
    assert glyphs["ClassWeightPredictor"]["learned"]["predictor scale, quad"]
