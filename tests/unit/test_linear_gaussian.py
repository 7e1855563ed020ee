"""hiermeta.linear_gaussian: statistics, groups, pooled starts, posterior and predictive against
per-observation formulas, NumPy least squares and dense Gaussian densities (scipy)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats

import hiermeta as hm
from hiermeta.linear_gaussian import _sum_log_squares, group_statistics


def case(seed=0, T=6, N=4, D=2, P=2, K=1, Q=1, noise="learned", shared=True):
    """A model with fixed effects and task covariates; with ``shared`` tasks 0, 2, 4 and 1, 3, 5 share a design."""
    rng = np.random.default_rng(seed)
    Z = rng.normal(size=(T, N, D, P))
    X = rng.normal(size=(T, N, D, K))
    scale = rng.uniform(0.5, 2.0, size=(T, N, D))
    mask = np.ones((T, N), bool)
    if shared:
        Z, X, scale = Z[np.arange(T) % 2], X[np.arange(T) % 2], scale[np.arange(T) % 2]
    else:
        mask[0, -1] = False
    obs = rng.normal(size=(T, N, D)) * 2 + 1
    z = rng.normal(size=(T, Q))
    data = hm.GaussianData.create(obs, scale, inputs=hm.LinearDesign(Z, X, rng.normal(size=(T, N, D))), mask=mask,
                                  task_covariates=z)
    lik = hm.linear_gaussian(noise=noise, num_fixed=K)
    model = hm.HierarchicalModel(lik, hm.ModulePartition.per_coordinate(jnp.zeros(P)), num_task_covariates=Q)
    extra = {"beta": rng.normal(size=K), "gamma": rng.normal(size=(Q, P))}
    if noise == "learned":
        extra["noise_sd"] = np.array(1.3)
    return model, data, rng.normal(size=P), rng.uniform(0.5, 2.0, size=P), extra


def test_groups_sum_their_tasks_log_marginals_exactly():
    model, data, phi, sigma, extra = case()
    lik = model.likelihood
    z = model.task_covariates(data)
    stats = jax.tree_util.tree_map(np.asarray, lik.sufficient_statistics(data, z))
    groups = group_statistics(stats)
    assert groups is not None and groups.moments.shape[0] == 2  # two designs
    assert groups.moments[0, -1, -1] == 3  # three tasks each

    def both(phi, sigma):
        L = model.prior_scale_tril(sigma, extra)
        g = model.globals_of(extra)
        per_task = lik.log_marginal(data, model.prior_mean(phi, extra, z), L, g)
        at_zero = model.prior_mean(phi, extra, jnp.zeros((1, 1))).reshape(-1)
        slope = model.prior_mean(phi, extra, jnp.eye(1)) - at_zero
        return jnp.sum(per_task), jnp.sum(lik.log_marginal_from_groups(
            jax.tree_util.tree_map(jnp.asarray, groups), at_zero, slope, L, g))

    per_task, grouped = both(jnp.asarray(phi), jnp.asarray(sigma))
    np.testing.assert_allclose(grouped, per_task, rtol=1e-12)
    grads = [jax.grad(lambda p, s: both(p, s)[i], argnums=(0, 1))(jnp.asarray(phi), jnp.asarray(sigma)) for i in (0, 1)]
    for a, b in zip(*grads):
        np.testing.assert_allclose(b, a, rtol=1e-10)


def test_distinct_designs_are_not_grouped():
    model, data, *_ = case(shared=False)
    stats = jax.tree_util.tree_map(np.asarray, model.likelihood.sufficient_statistics(data, model.task_covariates(data)))
    assert group_statistics(stats) is None


def test_log_marginal_equals_a_dense_gaussian_density():
    model, data, phi, sigma, extra = case(shared=False)
    lik = model.likelihood
    z = np.asarray(model.task_covariates(data))
    L = np.asarray(model.prior_scale_tril(jnp.asarray(sigma), extra))
    m = np.asarray(model.prior_mean(phi, extra, z))
    got = np.asarray(lik.log_marginal(data, m, L, model.globals_of(extra)))
    for t in range(z.shape[0]):
        keep = np.broadcast_to(np.asarray(data.mask[t])[:, None], data.obs.shape[1:])
        Zt = np.asarray(data.inputs.random[t])[keep]
        mean = Zt @ m[t] + np.asarray(data.inputs.fixed[t])[keep] @ extra["beta"] + np.asarray(data.inputs.offset[t])[keep]
        sd = 1.3 * np.asarray(data.noise_sd[t])[keep]
        want = scipy.stats.multivariate_normal(mean, Zt @ L @ L.T @ Zt.T + np.diag(sd**2)).logpdf(
            np.asarray(data.obs[t])[keep])
        assert got[t] == pytest.approx(want, rel=1e-10)


@pytest.mark.parametrize("noise", ["known", "learned"])
def test_pooled_start_is_weighted_least_squares_with_weights_one_over_sd_squared(noise):
    """phi, gamma, beta: lstsq of (y - offset) / sd on the pooled columns / sd; the residual rms
    (weighted for learned noise, else unweighted) over rms(Z_p) gives sigma."""
    model, data, *_ = case(noise=noise, shared=False)
    obs, scale, mask = (np.asarray(a) for a in (data.obs, data.noise_sd, data.mask))
    keep = np.broadcast_to(mask[..., None], obs.shape)
    Z, X, off = (np.asarray(a)[keep] for a in data.inputs)
    z = np.broadcast_to(np.asarray(data.task_covariates)[:, None, None, :], obs.shape + (1,))[keep]
    A = np.column_stack([Z, z * Z, X])
    y, w = obs[keep] - off, 1.0 / scale[keep]
    coef = np.linalg.lstsq(A * w[:, None], y * w, rcond=None)[0]
    resid = y - A @ coef
    s = np.sqrt(np.mean((resid * w) ** 2)) if noise == "learned" else np.sqrt(np.mean(resid**2))
    start = model.likelihood.initial_values(data, model)
    np.testing.assert_allclose(start["phi"], coef[:2], rtol=1e-10)
    np.testing.assert_allclose(start["gamma"], coef[2:4].reshape(1, 2), rtol=1e-10)
    np.testing.assert_allclose(start["beta"], coef[4:], rtol=1e-10)
    np.testing.assert_allclose(start["sigma"], s / np.sqrt(np.mean(Z**2, axis=0)), rtol=1e-10)
    if noise == "learned":
        assert float(start["noise_sd"]) == pytest.approx(s, rel=1e-10)


def test_posterior_with_flat_coordinates_and_the_exact_predictive():
    rng = np.random.default_rng(3)
    T, N, D, P = 3, 5, 1, 2
    Z = rng.normal(size=(T, N, D, P))
    sup = hm.GaussianData.create(rng.normal(size=(T, N, D)), 0.7, inputs=Z)
    qry = hm.GaussianData.create(rng.normal(size=(T, 2, D)), 0.7, inputs=Z[:, :2])
    lik = hm.linear_gaussian()
    phi, prec = np.array([0.5, -1.0]), np.array([4.0, 0.0])  # the second coordinate flat
    mean, cov = lik.posterior_from_precision(sup, jnp.asarray(phi), jnp.asarray(prec))
    for t in range(T):
        A = Z[t, :, 0]
        Lam = np.diag(prec) + A.T @ A / 0.49
        np.testing.assert_allclose(cov[t], np.linalg.inv(Lam), rtol=1e-10)
        np.testing.assert_allclose(mean[t], phi + np.linalg.solve(Lam, A.T @ (np.asarray(sup.obs[t, :, 0]) - A @ phi) / 0.49),
                                   rtol=1e-10)
    L = np.diag([1.5, 0.5])
    log_pred, log_ev, m, sd = lik.predictive(sup, qry, jnp.asarray(phi), jnp.asarray(L))
    for t in range(T):
        A, Aq = Z[t, :, 0], Z[t, :2, 0]
        V = np.linalg.inv(np.linalg.inv(L @ L) + A.T @ A / 0.49)
        mu = phi + V @ A.T @ (np.asarray(sup.obs[t, :, 0]) - A @ phi) / 0.49
        pred = scipy.stats.multivariate_normal(Aq @ mu, Aq @ V @ Aq.T + 0.49 * np.eye(2))
        assert float(log_pred[t]) == pytest.approx(pred.logpdf(np.asarray(qry.obs[t, :, 0])), rel=1e-10)
        np.testing.assert_allclose(sd[t, :, 0], np.sqrt(np.diag(Aq @ V @ Aq.T) + 0.49), rtol=1e-10)
        np.testing.assert_allclose(m[t, :, 0], Aq @ mu, rtol=1e-10)
        assert float(log_ev[t]) == pytest.approx(scipy.stats.multivariate_normal(
            A @ phi, A @ L @ L @ A.T + 0.49 * np.eye(N)).logpdf(np.asarray(sup.obs[t, :, 0])), rel=1e-10)


def test_from_design_broadcasts_a_shared_design():
    data = hm.GaussianData.from_design(np.zeros((4, 3, 2)), np.ones((2, 5)), np.array([1.0, 2.0]))
    assert data.inputs.shape == (4, 3, 2, 5) and data.noise_sd.shape == (4, 3, 2)
    with pytest.raises(ValueError, match="design must end in"):
        hm.GaussianData.from_design(np.zeros((4, 3, 2)), np.ones((3, 5)), 1.0)


def test_sum_of_log_squares_over_many_values():
    sd = np.random.default_rng(4).uniform(1e-3, 1e3, size=(3, 1500))
    np.testing.assert_allclose(_sum_log_squares(jnp.asarray(sd)), np.sum(np.log(sd**2), axis=1), rtol=1e-13)
