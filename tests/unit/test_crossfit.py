"""hiermeta.crossfit: the support/query split and the spread of a learned sigma, by hand."""

import jax
import numpy as np
import pytest

import hiermeta as hm
from hiermeta.crossfit import resplit, run_off, sigma_spread


@pytest.mark.parametrize("fraction", [0.01, 0.25, 0.5, 0.99])
def test_every_task_keeps_a_support_and_a_query_row(fraction):
    """Task t holds out clip(round(fraction n_t), 1, n_t - 1) of its n_t rows, padding never."""
    counts = np.array([2, 3, 5, 8])
    mask = np.arange(8)[None, :] < counts[:, None]
    data = hm.GaussianData.create(np.zeros((4, 8, 1)), 1.0, mask=mask)
    batch = resplit(data, jax.random.PRNGKey(0), fraction)
    support, query = np.asarray(batch.train.mask), np.asarray(batch.val.mask)
    want = np.clip(np.round(fraction * counts), 1, counts - 1)
    np.testing.assert_array_equal(query.sum(1), want)
    np.testing.assert_array_equal(support.sum(1), counts - want)
    assert not np.any(support & query) and np.array_equal(support | query, mask)


def test_spread_reports_the_low_high_median_and_ratio_of_the_tail():
    history = {"sigma": np.array([[100.0], [1.0], [2.0], [10.0], [3.0]])}
    spread = sigma_spread(history, last=4)
    assert spread.last == 4
    np.testing.assert_allclose([spread.low[0], spread.high[0], spread.median[0], spread.ratio[0]], [1.0, 10.0, 2.5, 10.0])


def test_run_off_flags_a_sigma_too_large_or_at_the_float_floor():
    too_large, at_floor = run_off([1.0, 101.0, np.inf, 1e-9], [1.0, 1.0, 1.0, 1.0])
    np.testing.assert_array_equal(too_large, [False, True, True, False])
    np.testing.assert_array_equal(at_floor, [False, False, False, True])
