"""hiermeta.regression: the pooled least squares and the data-scaled priors, against NumPy and hand formulas."""

import jax.numpy as jnp
import numpy as np
import pytest

import hiermeta as hm
from hiermeta.regression import column_spread, min_norm_solve, module_mean, regression_prior_scales


@pytest.mark.parametrize("seed", range(6))
def test_min_norm_solve_is_lstsq_also_when_rank_deficient(seed):
    """The null direction's eigenvalue comes out as +-1e-15 of the largest: it must count as 0."""
    rng = np.random.default_rng(seed)
    A = rng.normal(size=(30, 4))
    A = np.column_stack([A, A[:, 0] + A[:, 1]])  # rank 4 of 5 columns
    w = rng.uniform(0.5, 2.0, size=30)
    y = rng.normal(size=30)
    got = min_norm_solve((A * w[:, None] ** 2).T @ A, (A * w[:, None] ** 2).T @ y)
    want = np.linalg.lstsq(A * w[:, None], y * w, rcond=None)[0]  # weights 1/sd: rows scaled by w
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12)


def test_column_spread_is_the_sd_or_the_rms_of_a_constant_column():
    columns = np.array([[1.0, 3.0, 0.0], [1.0, 5.0, 0.0], [1.0, 10.0, 0.0]])
    np.testing.assert_allclose(column_spread(columns), [1.0, np.std([3.0, 5.0, 10.0]), 1.0])


def test_module_mean_averages_each_module_s_coordinates():
    model = hm.HierarchicalModel(hm.linear_gaussian(), hm.ModulePartition.from_labels((0.0,) * 4, ("a", "b", "a", "b")))
    np.testing.assert_allclose(module_mean(model, [1.0, 10.0, 3.0, 30.0]), [2.0, 20.0])


def test_prior_scales_follow_rstanarm_autoscaling():
    """phi ~ N(start, (2.5 s / s(Z_p))^2), sigma scale s / s(Z_p), beta ~ N(start, (2.5 s / s(X_k))^2)."""
    model = hm.HierarchicalModel(hm.linear_gaussian(num_fixed=1), hm.ModulePartition.per_coordinate(jnp.zeros(2)))
    Z = np.array([[1.0, 0.0], [1.0, 2.0], [1.0, 4.0]])
    X = np.array([[5.0], [7.0], [9.0]])
    start = {"phi": np.array([1.0, 2.0]), "beta": np.array([3.0])}
    out = regression_prior_scales(start, 4.0, Z, X, model, None)
    np.testing.assert_allclose(out["phi_scale"], [2.5 * 4.0 / 1.0, 2.5 * 4.0 / np.std([0.0, 2.0, 4.0])])
    np.testing.assert_allclose(out["sigma_scale"], [4.0 / 1.0, 4.0 / np.std([0.0, 2.0, 4.0])])
    beta = out["global_priors"]["beta"]
    np.testing.assert_allclose(beta.loc, [3.0])
    np.testing.assert_allclose(beta.scale, [2.5 * 4.0 / np.std([5.0, 7.0, 9.0])])
