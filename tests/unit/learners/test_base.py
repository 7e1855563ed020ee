"""The learners on a model with extra hyperparameter sites: learned noise, fixed effects, a
correlated block and task covariates (gamma).

Every hypergradient is checked against central finite differences of an independent target: the
exact PLL at the closed-form MAP (``LinearGaussianLikelihood.posterior``) for the bilevel learners,
a NumPy re-implementation of the unrolled inner steps for MAML.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import hiermeta as hm
from hiermeta.learners import sigma_of
from hiermeta.learners.base import extra_values

T, N_TRAIN, N_VAL = 5, 6, 4


def _design(rng, T, N):
    days = rng.uniform(0.0, 3.0, size=(T, N))
    Z = np.stack([np.ones((T, N)), days], -1)  # intercept and slope: theta's design
    X = rng.normal(size=(T, N, 1))  # one unpooled fixed effect (beta)
    return Z, X


def _simulate(rng, T, n_train, n_val, phi, sigma, corr, gamma, beta, noise):
    z = rng.normal(size=(T, 1))
    C = np.array([[1.0, corr], [corr, 1.0]])
    cov = np.diag(sigma) @ C @ np.diag(sigma)
    theta = phi + z @ gamma + rng.multivariate_normal(np.zeros(2), cov, size=T)
    lik = hm.linear_gaussian(noise="learned", num_fixed=1)
    out = []
    for n in (n_train, n_val):
        Z, X = _design(rng, T, n)
        y = np.einsum("tnp,tp->tn", Z, theta) + X[..., 0] * beta + noise * rng.normal(size=(T, n))
        out.append(lik.make_data(y, np.ones((T, n), bool), Z, fixed=X, task_covariates=z))
    return lik, hm.TaskBatch(*out), theta


@pytest.fixture(scope="module")
def problem():
    rng = np.random.default_rng(3)
    lik, batch, _ = _simulate(rng, T, N_TRAIN, N_VAL, phi=np.array([1.0, -0.5]), sigma=np.array([1.2, 0.6]),
                              corr=0.4, gamma=np.array([[0.8, -0.3]]), beta=0.7, noise=0.5)
    model = hm.HierarchicalModel(lik, hm.ModulePartition.named(("Intercept", "Days")),
                                 correlated=[("Intercept", "Days")], num_task_covariates=1)
    return model, batch


START = dict(phi=np.array([0.6, -0.2]), sigma=np.array([0.9, 0.5]),
             extra={"noise_sd": 0.6, "beta": np.array([0.4]), "gamma": np.array([[0.5, -0.1]]),
                    "corr_chol_0": np.array([[1.0, 0.0], [0.3, np.sqrt(1 - 0.09)]])})


def _exact_map(model, params, data, fixed_sigma=None):
    """The closed-form MAP (posterior mean) of every task at the learner's meta-parameters."""
    extra = extra_values(model, params)
    sigma = sigma_of(params, model.partition.num_modules) if fixed_sigma is None else jnp.full((2,), fixed_sigma)
    mean = model.prior_mean(params["phi"], extra, data.task_covariates)
    L = model.prior_scale_tril(sigma, extra)
    return model.likelihood.posterior(data, mean, L, model.globals_of(extra))[0]


def _exact_pll(model, params, batch, fixed_sigma=None):
    theta = _exact_map(model, params, batch.train, fixed_sigma)
    extra = extra_values(model, params)
    return jnp.mean(jax.vmap(lambda th, d: model.log_likelihood(th, d, extra))(theta, batch.val))


def _finite_differences(fn, params, h=1e-5):
    """Central differences of a scalar function of a dict of arrays, leaf by leaf."""
    flat, unravel = jax.flatten_util.ravel_pytree(params)
    fn = jax.jit(fn)
    grad = np.zeros(flat.size)
    for i in range(flat.size):
        e = np.zeros(flat.size)
        e[i] = h
        grad[i] = (float(fn(unravel(flat + e))) - float(fn(unravel(flat - e)))) / (2 * h)
    return unravel(jnp.asarray(grad))


LEARNERS = {
    "M-Shrinkage": lambda m: hm.m_shrinkage(m, hypergradient="exact"),
    "M-sigma-iMAML": lambda m: hm.m_sigma_imaml(m),
    "iMAML": lambda m: hm.imaml(m, lam=2.0),
}


@pytest.mark.parametrize("name", list(LEARNERS))
def test_bilevel_hypergradients_equal_finite_differences_of_the_exact_pll(problem, name):
    model, batch = problem
    learner = LEARNERS[name](model)
    extra = dict(START["extra"])
    if name == "iMAML":  # fixed sigma and correlation
        extra.pop("corr_chol_0")
        state = learner.init(jax.random.PRNGKey(0), START["phi"], extra=extra)
        assert set(state.params["extra"]) == {"noise_sd", "beta", "gamma"}
    else:
        state = learner.init(jax.random.PRNGKey(0), START["phi"], sigma=START["sigma"], extra=extra)
        assert set(state.params["extra"]) == {"noise_sd", "beta", "gamma", "corr_chol_0"}
    params = state.params
    fixed = 2.0**-0.5 if name == "iMAML" else None
    grads, (inner, _, info) = jax.jit(learner.meta_gradient)(params, batch)
    np.testing.assert_allclose(inner.theta, _exact_map(model, params, batch.train, fixed), atol=1e-9)
    assert float(jnp.max(info.residual)) < 1e-8  # CG solved H v = g
    pll_fd = _finite_differences(lambda p: _exact_pll(model, p, batch, fixed), params)
    for site in ("noise_sd", "beta") + (("corr_chol_0",) if name != "iMAML" else ()):
        np.testing.assert_allclose(-grads["extra"][site], pll_fd["extra"][site], rtol=1e-5, atol=1e-7,
                                   err_msg=f"{name}: dPLL/d {site}")
    if "log_sigma2" in params:
        np.testing.assert_allclose(-grads["log_sigma2"], pll_fd["log_sigma2"], rtol=1e-5, atol=1e-7)
    if name == "M-Shrinkage":  # phi and gamma along the MAP gradient of L_t at the fixed MAP
        theta = _exact_map(model, params, batch.train)

        def map_objective(p):
            ex = extra_values(model, p)
            L_t = lambda th, d: model.inner_objective(th, p["phi"], sigma_of(p, 2), d, ex)
            return jnp.mean(jax.vmap(L_t)(theta, batch.train))

        map_fd = _finite_differences(map_objective, params)
        np.testing.assert_allclose(grads["phi"], map_fd["phi"], rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(grads["extra"]["gamma"], map_fd["extra"]["gamma"], rtol=1e-5, atol=1e-7)
        # Algorithm 1's step in closed form: -mean_t Sigma^{-1} (theta_hat_t - m_t), and z_t times it
        ex = extra_values(model, params)
        cov = model.prior_cov(sigma_of(params, 2), ex)
        resid = theta - model.prior_mean(params["phi"], ex, batch.train.task_covariates)
        pull = -np.linalg.solve(np.asarray(cov), np.asarray(resid).T).T
        np.testing.assert_allclose(grads["phi"], pull.mean(0), rtol=1e-8)
        np.testing.assert_allclose(grads["extra"]["gamma"],
                                   np.mean(np.asarray(batch.train.task_covariates)[:, :, None] * pull[:, None], 0),
                                   rtol=1e-8)
    else:  # phi and gamma along the PLL too
        np.testing.assert_allclose(-grads["phi"], pll_fd["phi"], rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(-grads["extra"]["gamma"], pll_fd["extra"]["gamma"], rtol=1e-5, atol=1e-7)


def test_eq4_hypergradient_uses_the_full_prior_covariance(problem):
    """Eq. 4 with a correlated prior: v = Sigma g, so dPLL/d phi = g (first-order MAML) exactly."""
    model, batch = problem
    learner = hm.m_sigma_imaml(model, hypergradient="eq4")
    state = learner.init(jax.random.PRNGKey(0), START["phi"], sigma=START["sigma"], extra=START["extra"])
    grads, (inner, _, _) = jax.jit(learner.meta_gradient)(state.params, batch)
    extra = extra_values(model, state.params)
    g = jax.jit(jax.vmap(jax.grad(lambda th, d: model.log_likelihood(th, d, extra))))(inner.theta, batch.val)
    np.testing.assert_allclose(-grads["phi"], jnp.mean(g, 0), rtol=1e-8)


def test_inner_solve_starts_at_and_shrinks_towards_the_task_prior_mean(problem):
    model, batch = problem
    learner = hm.m_shrinkage(model)
    state = learner.init(jax.random.PRNGKey(0), START["phi"], sigma=START["sigma"], extra=START["extra"])
    params = state.params
    prior_mean = np.asarray(START["phi"]) + np.asarray(batch.train.task_covariates) @ START["extra"]["gamma"]
    start = learner.inner_problem(params).init
    starts = np.stack([start(jax.tree_util.tree_map(lambda a: a[t], batch.train)) for t in range(T)])
    np.testing.assert_allclose(starts, prior_mean, rtol=1e-12)
    adapted = hm.adapt(learner, state, batch.train)
    assert bool(np.all(adapted.converged))
    np.testing.assert_allclose(adapted.theta, _exact_map(model, params, batch.train), atol=1e-9)
    # a task with almost no information sits at its own prior mean, not at phi
    weak = batch.train._replace(noise_sd=batch.train.noise_sd * 1e3)
    np.testing.assert_allclose(hm.adapt(learner, state, weak).theta, prior_mean, atol=1e-4)


def _maml_reference(flat_u, lr, batch, K):
    """K plain gradient steps on the linear-Gaussian NLL from phi + z gamma, in NumPy; the mean
    query NLL (up to its constant) as a function of (phi, gamma, log noise, beta)."""
    phi, gamma, log_noise, beta = flat_u[:2], flat_u[2:4].reshape(1, 2), flat_u[4], flat_u[5:6]
    noise = np.exp(log_noise)
    tr, va = batch.train, batch.val
    Z, X, y = (np.asarray(tr.inputs.random)[:, :, 0], np.asarray(tr.inputs.fixed)[:, :, 0], np.asarray(tr.obs)[..., 0])
    theta = phi + np.asarray(tr.task_covariates) @ gamma
    for _ in range(K):
        r = y - np.einsum("tnp,tp->tn", Z, theta) - X @ beta
        grad = -np.einsum("tnp,tn->tp", Z, r) / noise**2
        theta = theta - lr * grad
    Zv, Xv, yv = (np.asarray(va.inputs.random)[:, :, 0], np.asarray(va.inputs.fixed)[:, :, 0], np.asarray(va.obs)[..., 0])
    r = yv - np.einsum("tnp,tp->tn", Zv, theta) - Xv @ beta
    return np.mean(np.sum(r**2 / (2 * noise**2) + log_noise, axis=1))


@pytest.mark.parametrize("first_order", [False, True])
def test_maml_meta_gradient_for_noise_beta_gamma_matches_finite_differences(problem, first_order):
    model, batch = problem
    K, lr = 3, 0.02
    learner = hm.maml(model, inner_steps=K, init_lr=lr, first_order=first_order)
    extra = {k: START["extra"][k] for k in ("noise_sd", "beta", "gamma")}
    state = learner.init(jax.random.PRNGKey(0), START["phi"], extra=extra)
    assert set(state.params["extra"]) == {"noise_sd", "beta", "gamma"}
    grads, _ = jax.jit(learner.meta_gradient)(state.params, batch)
    u = np.concatenate([START["phi"], START["extra"]["gamma"].ravel(), [np.log(START["extra"]["noise_sd"])],
                        START["extra"]["beta"]])
    fd = np.zeros(u.size)
    for i in range(u.size):
        e = np.zeros(u.size)
        e[i] = 1e-6
        fd[i] = (_maml_reference(u + e, lr, batch, K) - _maml_reference(u - e, lr, batch, K)) / 2e-6
    mine = np.concatenate([grads["phi"], np.ravel(grads["extra"]["gamma"]), np.ravel(grads["extra"]["noise_sd"]),
                           grads["extra"]["beta"]])
    if not first_order:
        np.testing.assert_allclose(mine, fd, rtol=1e-5, atol=1e-7)
    else:  # first order: the steps' directions are constants; it differs from the exact gradient
        assert not np.allclose(mine, fd, rtol=1e-3)
        # but through theta_0 alone, d theta_K / d phi = I: the phi and gamma parts are the query gradient
        query = np.asarray(jax.jit(jax.grad(lambda th: jnp.mean(jax.vmap(
            lambda t, d: -model.log_likelihood(t, d, extra_values(model, state.params)))(th, batch.val))))(
            learner.adapt(state, batch.train).theta))
        np.testing.assert_allclose(grads["phi"], query.sum(0), rtol=1e-8)


def test_reptile_and_shrinkage_map_learn_the_extra_sites(problem):
    model, batch = problem
    reptile = hm.reptile(model, inner_solver=hm.solvers.newton())
    state = reptile.init(jax.random.PRNGKey(0), START["phi"], extra={"gamma": START["extra"]["gamma"]})
    grads, inner = jax.jit(reptile.meta_gradient)(state.params, batch)
    start = np.asarray(state.params["phi"]) + np.asarray(batch.train.task_covariates) @ START["extra"]["gamma"]
    diff = np.asarray(inner.theta) - start
    np.testing.assert_allclose(grads["phi"], -diff.mean(0), rtol=1e-8)
    np.testing.assert_allclose(grads["extra"]["gamma"],
                               -np.mean(np.asarray(batch.train.task_covariates)[:, :, None] * diff[:, None], 0), rtol=1e-8)
    smap = hm.m_shrinkage_map(model)
    state = smap.init(jax.random.PRNGKey(0), START["phi"], sigma=START["sigma"], extra=START["extra"])
    grads, inner = jax.jit(smap.meta_gradient)(state.params, batch)
    theta = _exact_map(model, state.params, batch.train)

    def joint(p):
        ex = extra_values(model, p)
        return jnp.mean(jax.vmap(lambda th, d: model.inner_objective(th, p["phi"], sigma_of(p, 2), d, ex))(theta, batch.train))

    fd = _finite_differences(joint, state.params)
    for site in ("noise_sd", "beta", "gamma", "corr_chol_0"):
        np.testing.assert_allclose(grads["extra"][site], fd["extra"][site], rtol=1e-5, atol=1e-7)


@pytest.mark.slow
def test_m_shrinkage_recovers_noise_and_sigma_with_many_groups():
    """1000 simulated groups: M-Shrinkage's (exact hypergradient) sigma, correlation, beta and gamma
    end near type-II ML on all rows and near the truth.  The plug-in PLL's noise sd is biased up
    (the query residuals at the MAP also carry the MAP's own error, ``z^T Cov(theta_hat - theta) z``,
    docs/theory.md): it must sit above type-II ML's, by less than 15%.  (At 200 groups the PLL's
    sampling error alone put sigma 35% low on this seed: the PLL needs many groups.)"""
    rng = np.random.default_rng(11)
    truth = dict(phi=np.array([2.0, 1.0]), sigma=np.array([1.5, 0.5]), corr=0.5, gamma=np.array([[1.0, 0.0]]),
                 beta=-0.5, noise=0.8)
    lik, batch, _ = _simulate(rng, 1000, 8, 8, **truth)
    model = hm.HierarchicalModel(lik, hm.ModulePartition.named(("Intercept", "Days")),
                                 correlated=[("Intercept", "Days")], num_task_covariates=1)
    learner = hm.m_shrinkage(model, hypergradient="exact", outer_optimizer=optax.adam(0.05))
    state = learner.init(jax.random.PRNGKey(0), data=batch.train)
    state, history = hm.fit(learner, state, hm.sample_from(batch, 1000), 300, data_key=jax.random.PRNGKey(1),
                            progress=False)
    rows = lambda d: d._replace(task_covariates=None)
    both = jax.tree_util.tree_map(lambda a, b: np.concatenate([a, b], axis=1), rows(batch.train), rows(batch.val))
    both = both._replace(task_covariates=batch.train.task_covariates)
    ml = hm.type2_ml(model, both)
    sigma = np.asarray(sigma_of(state.params, 2))
    extra = extra_values(model, state.params)
    np.testing.assert_allclose(sigma, ml.sigma, rtol=0.25)
    np.testing.assert_allclose(sigma, truth["sigma"], rtol=0.25)
    noise, noise_ml = float(extra["noise_sd"]), float(np.ravel(ml.extra["noise_sd"])[0])
    assert noise_ml < noise < 1.15 * noise_ml
    np.testing.assert_allclose(extra["beta"], ml.extra["beta"], atol=0.05)
    np.testing.assert_allclose(extra["gamma"], ml.extra["gamma"], atol=0.1)
    corr = np.asarray(extra["corr_chol_0"] @ extra["corr_chol_0"].T)[0, 1]
    assert corr == pytest.approx(ml.correlation()[0, 1], abs=0.15)
    assert np.ptp(history["sigma"][-50:], axis=0).max() < 0.01  # it has settled
    assert history["corr_chol_0"].shape == (300, 2, 2)


def test_init_rejects_bad_extra_sites(problem):
    model, _ = problem
    learner = hm.m_shrinkage(model)
    key = jax.random.PRNGKey(0)
    with pytest.raises(ValueError, match="noise_scale"):
        learner.init(key, START["phi"], extra={"noise_scale": 1.0})
    with pytest.raises(ValueError, match="gamma.*shape"):
        learner.init(key, START["phi"], extra={"gamma": np.zeros((2, 2))})
    with pytest.raises(ValueError, match="noise_sd"):
        learner.init(key, START["phi"], extra={"noise_sd": -1.0})
    with pytest.raises(ValueError, match="corr_chol_0.*not positive definite"):
        learner.init(key, START["phi"], extra={"corr_chol_0": np.array([[1.0, 1.2], [1.2, 1.0]])})
    with pytest.raises(ValueError, match="corr_chol_0.*Cholesky factor"):
        learner.init(key, START["phi"], extra={"corr_chol_0": np.array([[1.0, 0.0], [0.9, 0.9]])})
    with pytest.raises(ValueError, match="does not learn.*corr_chol_0"):
        hm.imaml(model, lam=1.0).init(key, START["phi"], extra={"corr_chol_0": np.eye(2)})
    with pytest.raises(ValueError, match="does not learn.*corr_chol_0"):
        hm.maml(model, inner_steps=1, init_lr=0.1).init(key, START["phi"], extra={"corr_chol_0": np.eye(2)})
    # the correlation matrix itself is accepted as a start, as its Cholesky factor
    state = learner.init(key, START["phi"], extra={"corr_chol_0": np.array([[1.0, 0.6], [0.6, 1.0]])})
    L = extra_values(model, state.params)["corr_chol_0"]
    assert float((L @ L.T)[0, 1]) == pytest.approx(0.6, rel=1e-10)
