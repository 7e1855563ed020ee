"""hiermeta.predictive: coverage, the PIT and the log predictive against hand values and scipy."""

import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats
from scipy.special import logsumexp

import hiermeta as hm
from hiermeta import predictive as pr


def test_coverage_counts_pit_values_within_half_the_level_of_one_half():
    pit = np.array([0.26, 0.24, 0.74, 0.76, 0.5, np.nan])
    assert pr.coverage(pit, [0.5]) == [pytest.approx(3 / 5)]  # 0.26, 0.74, 0.5; NaN is padding
    assert pr.coverage(pit, [0.9]) == [pytest.approx(1.0)]
    assert pr.coverage(np.array([0.04, 0.96, 0.5]), [0.9]) == [pytest.approx(1 / 3)]


def test_interval_coverage_of_discrete_outcomes():
    """x is inside the central interval of level q iff F(x) >= (1 - q)/2 and F(x - 1) < (1 + q)/2."""
    below = np.array([0.0, 0.3, 0.7, 0.96])
    at = np.array([0.02, 0.6, 0.9, 1.0])
    # level 0.9: bounds 0.05 and 0.95 -> first out (F(x) < 0.05), second and third in, last out (F(x-1) >= 0.95)
    assert pr.interval_coverage(below, at, [0.9]) == [pytest.approx(0.5)]
    # F(x - 1) exactly at (1 + q)/2 is outside, F(x) exactly at (1 - q)/2 inside
    assert pr.interval_coverage(np.array([(1 + 0.9) / 2, 0.0]), np.array([1.0, (1 - 0.9) / 2]), [0.9]) == [0.5]


def test_score_draws_is_the_mixture_density_and_cdf():
    rng = np.random.default_rng(0)
    T, S, N = 3, 4, 5
    Z = rng.normal(size=(T, N, 1, 2))
    query = hm.GaussianData.create(rng.normal(size=(T, N, 1)), 0.8, inputs=Z)
    model = hm.HierarchicalModel(hm.linear_gaussian(), hm.ModulePartition.per_coordinate(jnp.zeros(2)))
    draws = rng.normal(size=(T, S, 2))
    log_w = rng.normal(size=(T, S))
    scores = pr.score_draws(model, draws, query, log_weights=log_w)
    w = np.exp(log_w - logsumexp(log_w, axis=1, keepdims=True))
    for t in range(T):
        mean = Z[t, :, 0] @ draws[t].T  # (N, S)
        y = np.asarray(query.obs[t, :, 0])
        per_draw = scipy.stats.norm.logpdf(y[:, None], mean, 0.8).sum(0)
        assert float(scores.log_pred[t]) == pytest.approx(logsumexp(per_draw, b=w[t]), rel=1e-12)
        np.testing.assert_allclose(scores.pit[t, :, 0], scipy.stats.norm.cdf(y[:, None], mean, 0.8) @ w[t], rtol=1e-12)
    np.testing.assert_array_equal(scores.num_obs, [N] * T)
    summary = scores.summary([0.5])
    per_obs = np.asarray(scores.log_pred) / N
    assert summary["lpd_per_obs"] == pytest.approx(per_obs.mean())
    assert summary["lpd_sem"] == pytest.approx(per_obs.std(ddof=1) / np.sqrt(T))
