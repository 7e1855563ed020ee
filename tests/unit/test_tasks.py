"""hiermeta.tasks: the checks every kind of task data shares, and merging the splits."""

import numpy as np
import pytest

import hiermeta as hm
from hiermeta.tasks import all_finite, boolean_mask, distinct, merge_splits, num_tasks, real_array


def test_boolean_mask_takes_booleans_and_0_1_and_refuses_the_rest():
    np.testing.assert_array_equal(boolean_mask(None, (2, 3)), np.ones((2, 3), bool))
    np.testing.assert_array_equal(boolean_mask(np.array([[1, 0]]), (1, 2)), [[True, False]])
    np.testing.assert_array_equal(boolean_mask(np.array([[1.0, 0.0]]), (1, 2)), [[True, False]])
    with pytest.raises(ValueError, match="0 and 1.*0.5"):
        boolean_mask(np.array([[1.0, 0.5]]), (1, 2))
    with pytest.raises(ValueError, match="shape"):
        boolean_mask(np.ones((2, 2), bool), (2, 3))
    with pytest.raises(ValueError, match="dtype"):
        boolean_mask(np.array([["a", "b"]]), (1, 2))


def test_real_array_refuses_complex_and_optionally_booleans():
    assert real_array([1, 2], "x").dtype == float
    with pytest.raises(ValueError, match="complex"):
        real_array([1 + 1j], "x")
    with pytest.raises(ValueError, match="real numbers"):
        real_array(np.array([True]), "x", booleans=False)
    np.testing.assert_array_equal(real_array(np.array([True, False]), "x"), [1.0, 0.0])


def test_all_finite_and_distinct():
    assert all_finite(np.ones((3, 4)))
    assert not all_finite(np.array([1.0, np.nan]))
    assert not all_finite(np.array([1.0, np.inf, -np.inf]))  # a sum of inf - inf is NaN: still caught
    assert all_finite(np.array([1e308, 1e308]))  # the sum overflows, the values are finite
    shared = np.broadcast_to(np.arange(3.0), (1000, 7, 3))
    assert distinct(shared).shape == (1, 1, 3)


def test_merge_splits_concatenates_observations_and_keeps_task_covariates_once():
    z = np.array([[1.0], [2.0]])
    a = hm.GaussianData.create(np.zeros((2, 3, 1)), 1.0, task_covariates=z)
    b = hm.GaussianData.create(np.ones((2, 2, 1)), 2.0, task_covariates=z)
    both = merge_splits(hm.TaskBatch(a, b))
    assert both.obs.shape == (2, 5, 1) and both.mask.shape == (2, 5)
    np.testing.assert_array_equal(both.task_covariates, z)
    np.testing.assert_array_equal(both.noise_sd[0, :, 0], [1, 1, 1, 2, 2])
    assert num_tasks(both) == 2
