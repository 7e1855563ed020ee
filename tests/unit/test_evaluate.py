"""LossCurve's summaries against values computed by hand: the standard error sd / sqrt(T) and the
16th-84th percentile band (the central 68% of the per-task losses)."""

import math
import statistics

import numpy as np

from hiermeta.evaluate import loss_curve


def test_sem_is_the_sample_sd_over_root_t():
    rng = np.random.default_rng(0)
    per_task = rng.normal(5.0, 2.0, size=(40, 3))
    curve = loss_curve(per_task)
    for k in range(3):
        column = per_task[:, k].tolist()
        assert math.isclose(curve.mean[k], statistics.fmean(column), rel_tol=1e-13)
        assert math.isclose(curve.sem[k], statistics.stdev(column) / math.sqrt(40), rel_tol=1e-12)
    # sd / T (or the population sd) would be far off
    assert not np.allclose(curve.sem, per_task.std(axis=0, ddof=1) / 40)
    assert loss_curve(per_task[:1]).sem.tolist() == [0.0, 0.0, 0.0]  # one task: no spread to estimate


def test_band_is_the_16th_to_84th_percentile():
    # 101 evenly spaced losses 0, 1, ..., 100: the q-th percentile (linear interpolation) is q itself
    per_task = np.stack([np.arange(101.0), 10.0 + 2.0 * np.arange(101.0)], axis=1)
    rng = np.random.default_rng(1)
    curve = loss_curve(per_task[rng.permutation(101)])  # order of tasks does not matter
    np.testing.assert_allclose(curve.lower, [16.0, 42.0], rtol=0, atol=1e-12)
    np.testing.assert_allclose(curve.upper, [84.0, 178.0], rtol=0, atol=1e-12)
    assert curve.steps.tolist() == [0, 1]
    # a 68% band of a normal sample: about one sd either side of the mean
    normal = np.random.default_rng(2).normal(0.0, 1.0, size=(200_000, 1))
    big = loss_curve(normal)
    np.testing.assert_allclose([big.lower[0], big.upper[0]], [-0.9945, 0.9945], atol=0.01)
