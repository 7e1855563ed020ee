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
