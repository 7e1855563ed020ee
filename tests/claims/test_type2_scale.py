"""Type-II ML on sufficient statistics, in chunks of tasks, compiled once.

The log marginal from per-task sufficient statistics against the per-observation closed form and an
independent dense Gaussian density (scipy), for every kind of linear-Gaussian model (masks, learned
noise per dimension, fixed effects, offsets, task covariates, correlated blocks); the chunked
objective against the unchunked one (a chunk size that does not divide T: padding must not count);
and one XLA compilation for two calls of type-II ML.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats

import hiermeta as hm
from hiermeta import empirical_bayes as eb


def random_case(seed, T=7, N=5, D=2, P=3, K=2, Q=2, noise="learned", noise_shape=(2,), correlated=True,
                offset=True):
    """A model with everything switched on and random data with unequal observation counts."""
    rng = np.random.default_rng(seed)
    Z = rng.normal(size=(T, N, D, P))
    X = rng.normal(size=(T, N, D, K)) if K else None
    off = rng.normal(size=(T, N, D)) if offset else None
    obs = rng.normal(size=(T, N, D)) * 3 + 1
    mask = rng.random((T, N)) < 0.7
    mask[:, 0] = True
    obs[~mask] = np.nan  # padding is never read
    scale = rng.uniform(0.5, 2.0, size=(T, N, D))
    z = rng.normal(size=(T, Q)) if Q else None
    data = hm.GaussianData.create(obs, scale, inputs=hm.LinearDesign(Z, X, off), mask=mask, task_covariates=z)
    lik = hm.linear_gaussian(noise=noise, noise_shape=noise_shape if noise == "learned" else (), num_fixed=K)
    part = hm.ModulePartition.from_labels(tuple(0.0 for _ in range(P)), ("a", "b", "b")[:P] if P == 3 else None)
    model = hm.HierarchicalModel(lik, part, correlated=[("a", "b")] if correlated else (), num_task_covariates=Q)
    phi = rng.normal(size=P)
    sigma = rng.uniform(0.5, 2.0, size=part.num_modules)
    extra = {}
    for name, site in model.hyper_sites().items():
        if name.startswith("corr_chol"):
            A = rng.normal(size=site.shape)
            C = A @ A.T + np.eye(site.shape[0])
            d = np.sqrt(np.diag(C))
            extra[name] = np.linalg.cholesky(C / d[:, None] / d[None, :])
        elif name == "noise_sd":
            extra[name] = rng.uniform(0.5, 2.0, size=site.shape)
        else:
            extra[name] = rng.normal(size=site.shape)
    return model, data, phi, sigma, extra


def dense_log_marginal(model, data, phi, sigma, extra):
    """log N(y_t; Z m_t + X beta + offset, Z Sigma Z^T + diag(sd^2)) per task over its observed scalars."""
    lik = model.likelihood
    design = data.inputs
    L = np.asarray(model.prior_scale_tril(jnp.asarray(sigma), extra))
    Sigma = L @ L.T
    m = np.broadcast_to(np.asarray(model.prior_mean(phi, extra, model.task_covariates(data))), (data.obs.shape[0], len(phi)))
    sd = np.asarray(lik.sd(data, model.globals_of(extra)))
    out = []
    for t in range(data.obs.shape[0]):
        keep = np.broadcast_to(np.asarray(data.mask[t])[:, None], data.obs.shape[1:])
        Zt = np.asarray(design.random[t])[keep]
        mean = Zt @ m[t]
        if design.fixed is not None:
            mean = mean + np.asarray(design.fixed[t])[keep] @ extra["beta"]
        if design.offset is not None:
            mean = mean + np.asarray(design.offset[t])[keep]
        cov = Zt @ Sigma @ Zt.T + np.diag(sd[t][keep] ** 2)
        out.append(scipy.stats.multivariate_normal(mean, cov).logpdf(np.asarray(data.obs[t])[keep]))
    return np.array(out)


CASES = {
    "everything": {},
    "known noise, no fixed effects": dict(noise="known", K=0, Q=0, offset=False),
    "scalar learned noise, diagonal": dict(noise_shape=(), correlated=False, Q=0),
    "covariates only": dict(K=0, correlated=False, noise_shape=(), D=1),
}


@pytest.mark.parametrize("case", list(CASES))
def test_statistics_log_marginal_equals_per_observation_and_dense(case):
    model, data, phi, sigma, extra = random_case(1, **CASES[case])
    lik = model.likelihood
    z = model.task_covariates(data)
    mean = model.prior_mean(phi, extra, z)
    L = model.prior_scale_tril(jnp.asarray(sigma), extra)
    g = model.globals_of(extra)
    per_obs = np.asarray(lik.log_marginal(data, mean, L, g))
    stats = lik.sufficient_statistics(data, z)
    from_stats = np.asarray(lik.log_marginal_from_statistics(stats, mean, L, g))
    np.testing.assert_allclose(from_stats, per_obs, rtol=1e-11, atol=1e-10)
    np.testing.assert_allclose(from_stats, dense_log_marginal(model, data, phi, sigma, extra), rtol=1e-9)
    # a sigma at 0 (a singular prior) is exact too
    L0 = model.prior_scale_tril(jnp.asarray(sigma) * jnp.arange(len(sigma)), extra)
    np.testing.assert_allclose(lik.log_marginal_from_statistics(stats, mean, L0, g),
                               lik.log_marginal(data, mean, L0, g), rtol=1e-11, atol=1e-10)


@pytest.mark.parametrize("method", ["ML", "REML"])
def test_chunked_objective_equals_unchunked_and_per_observation(method):
    """T = 7 tasks in chunks of 3 (the last chunk holds 1 task and 2 padding slots) against one chunk
    and against the per-observation objective: value, gradient and profiled fixed effects."""
    model, data, phi, sigma, extra = random_case(2)
    start = {"phi": phi, "sigma": sigma, **extra}
    T = 7
    results = []
    for statistics, chunk in ((False, None), (True, None), (True, 3)):
        objective = eb._compiled_objective(model, method, "exact", 1, statistics)
        u, psi = objective.pack(start)
        inputs = eb.task_statistics(model, data, chunk) if statistics else data
        if chunk:
            assert inputs.valid.shape == (3, 3) and int(inputs.valid.sum()) == T
        results.append([np.asarray(a) for a in objective.value_and_grad(u, inputs, psi, jnp.asarray(float(T)))])
    for other in results[1:]:
        for a, b in zip(other, results[0]):
            np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)


def test_padding_holds_no_observations():
    """Every statistic of a padding slot is zero and it is flagged invalid."""
    model, data, *_ = random_case(3)
    stats = eb.task_statistics(model, data, 4)  # 7 tasks: chunks of 4, one padding slot
    assert not bool(stats.valid[1, 3])
    for name, leaf in stats.stats._asdict().items():
        if leaf is not None and name != "task_covariates":
            assert np.all(np.asarray(leaf)[1, 3] == 0), name


_COMPILES = []
jax.monitoring.register_event_duration_secs_listener(
    lambda event, duration, **kw: _COMPILES.append(event) if event == "/jax/core/compile/backend_compile_duration" else None)
jax.monitoring.register_event_listener(
    lambda event, **kw: _COMPILES.append(event) if event == "/jax/compilation_cache/cache_hits" else None)


def compile_requests():
    """Programs handed to the backend so far (compiled, or read from the persistent cache)."""
    return _COMPILES.count("/jax/core/compile/backend_compile_duration")


def test_type2_ml_called_again_compiles_nothing():
    rng = np.random.default_rng(4)
    T, N = 40, 6
    Z = np.stack([np.ones((T, N)), rng.normal(size=(T, N))], -1)
    theta = np.array([1.0, -0.5]) + rng.normal(size=(T, 2)) * [1.0, 0.5]
    y = np.einsum("tnp,tp->tn", Z, theta) + 0.7 * rng.normal(size=(T, N))
    lik = hm.linear_gaussian(noise="learned")
    model = hm.HierarchicalModel(lik, hm.ModulePartition.from_labels((0.0, 0.0), ("a", "b")), correlated=[("a", "b")])
    data = lik.make_data(y, np.ones((T, N), bool), Z)
    first = hm.type2_ml(model, data)
    shifted = lik.make_data(y + 0.1, np.ones((T, N), bool), Z)  # new values, same shapes
    before = compile_requests()
    again = hm.type2_ml(model, shifted)
    assert compile_requests() == before, "the second call compiled a program"
    assert first.converged and again.converged
    assert again.phi[0] == pytest.approx(first.phi[0] + 0.1, abs=1e-6)  # an intercept shift moves phi only
    np.testing.assert_allclose(again.sigma, first.sigma, rtol=1e-5)


def test_legacy_driver_compiles_once():
    rng = np.random.default_rng(5)
    xbar = rng.normal(size=30) * 2 + 1

    def log_marginal(phi, sigma, data):  # x_t ~ N(phi, sigma^2 + 1)
        var = sigma[0] ** 2 + 1.0
        return jnp.sum(-0.5 * ((data - phi[0]) ** 2 / var + jnp.log(2 * jnp.pi * var)))

    fit = eb.type2_maximum_likelihood(log_marginal, [0.0], [1.0], jnp.asarray(xbar), num_tasks=30)
    shifted = jnp.asarray(xbar + 1)
    before = compile_requests()
    eb.type2_maximum_likelihood(log_marginal, [0.0], [1.0], shifted, num_tasks=30)
    assert compile_requests() == before
    assert fit.phi[0] == pytest.approx(xbar.mean(), abs=1e-5)  # closed form: the mean, var = max(s^2 - 1, 0)
    assert fit.sigma[0] ** 2 == pytest.approx(max(xbar.var() - 1.0, 0.0), rel=1e-4)


def test_mle_reference_is_least_squares(paper, paper_model):
    """An infinite prior sd is the flat prior: linear.posterior gives each task's weighted least
    squares (it was NaN: the Woodbury form multiplied inf by 0), and reference_losses uses it."""
    from hiermeta.models import linear

    _, tasks = linear.sample_tasks(paper, jax.random.PRNGKey(7), 30)
    mle, _ = linear.posterior(tasks.train, paper.phi, np.full(paper.num_params, np.inf))
    A = np.asarray(tasks.train.inputs).reshape(30, -1, paper.num_params)
    w = np.asarray(tasks.train.noise_sd).reshape(30, -1) ** -2.0
    x = np.asarray(tasks.train.obs).reshape(30, -1)
    expected = np.stack([np.linalg.solve(A[t].T @ (w[t, :, None] * A[t]), A[t].T @ (w[t] * x[t])) for t in range(30)])
    np.testing.assert_allclose(np.asarray(mle), expected, rtol=1e-9, atol=1e-9)
    oracle, mle_loss = linear.reference_losses(paper_model, tasks, paper.phi, paper.sigma)
    np.testing.assert_allclose(np.asarray(mle_loss), np.asarray(jax.vmap(paper_model.generalisation_loss)(mle, tasks.val)),
                               rtol=1e-12)
    assert np.all(np.isfinite(np.asarray(oracle)))


@pytest.mark.slow
def test_hundred_thousand_groups_in_chunks():
    """10^5 groups x 10 observations (correlated intercept and slope, learned noise): converges near
    the truth, and the estimate does not depend on the chunk size (one that does not divide T)."""
    rng = np.random.default_rng(8)
    T, N = 100_000, 10
    x = np.arange(N, dtype=float)
    cov = np.array([[625.0, 30.0], [30.0, 36.0]])
    theta = np.array([250.0, 10.0]) + rng.standard_normal((T, 2)) @ np.linalg.cholesky(cov).T
    y = theta[:, :1] + theta[:, 1:] * x + 25.0 * rng.standard_normal((T, N))
    lik = hm.linear_gaussian(noise="learned")
    model = hm.HierarchicalModel(lik, hm.ModulePartition.from_labels((0.0, 0.0), ("a", "b")), correlated=[("a", "b")])
    data = lik.make_data(y, np.ones((T, N), bool), np.broadcast_to(np.stack([np.ones(N), x], -1), (T, N, 2)))
    fit = hm.type2_ml(model, data)
    other = hm.type2_ml(model, data, chunk_size=3001)
    assert fit.converged and other.converged
    np.testing.assert_allclose(fit.phi, [250.0, 10.0], atol=0.3)
    np.testing.assert_allclose(fit.sigma, [25.0, 6.0], rtol=0.02)
    np.testing.assert_allclose(fit.extra["noise_sd"], 25.0, rtol=0.01)
    np.testing.assert_allclose(other.phi, fit.phi, rtol=1e-6)
    np.testing.assert_allclose(other.sigma, fit.sigma, rtol=1e-5)
    assert other.log_marginal == pytest.approx(fit.log_marginal, abs=1e-4)
