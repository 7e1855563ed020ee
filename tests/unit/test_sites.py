"""hiermeta/sites.py: starting values and the unconstrained parametrisation of extra sites."""

import jax.numpy as jnp
import numpy as np
import pytest
from numpyro.distributions import constraints

from hiermeta.sites import HyperSite, constrain, default_init, tree_size, unconstrain


def test_default_starts_by_support():
    np.testing.assert_array_equal(default_init((2, 3), constraints.corr_cholesky), np.eye(3))
    np.testing.assert_array_equal(default_init((2,), constraints.positive), [1.0, 1.0])
    np.testing.assert_array_equal(default_init((3,), constraints.unit_interval), [0.5, 0.5, 0.5])
    np.testing.assert_array_equal(default_init((), constraints.real), 0.0)
    with pytest.raises(ValueError, match="no default starting value"):
        default_init((2,), constraints.interval(0.0, 3.0))


SITES = {
    "noise_sd": HyperSite((), constraints.positive, np.ones(()), "global"),
    "beta": HyperSite((2,), constraints.real, np.zeros(2), "global"),
    "p": HyperSite((1,), constraints.unit_interval, np.full(1, 0.5), "global"),
    "corr_chol_0": HyperSite((2, 2), constraints.corr_cholesky, np.eye(2), "correlation"),
}


def test_unconstrain_and_constrain_are_the_known_maps_and_each_others_inverse():
    rho = 0.6
    chol = np.array([[1.0, 0.0], [rho, np.sqrt(1 - rho**2)]])
    values = {"noise_sd": 2.5, "beta": np.array([-1.0, 3.0]), "p": np.array([0.2]), "corr_chol_0": chol}
    u = unconstrain(SITES, values)
    assert float(u["noise_sd"]) == pytest.approx(np.log(2.5), rel=1e-12)  # exp on a positive site
    np.testing.assert_allclose(u["beta"], [-1.0, 3.0])  # the identity on a real one
    np.testing.assert_allclose(u["p"], np.log(0.2 / 0.8), rtol=1e-12)  # the logit on (0, 1)
    assert u["corr_chol_0"].shape == (1,)  # d (d - 1) / 2 free numbers for a d x d correlation
    assert float(u["corr_chol_0"][0]) == pytest.approx(np.arctanh(rho), rel=1e-12)  # NumPyro's tanh stick-breaking
    back = constrain(SITES, u)
    for name, value in values.items():
        np.testing.assert_allclose(back[name], value, rtol=1e-12, atol=1e-14)


def test_unconstrain_refuses_a_wrong_shape_or_a_value_outside_the_support():
    good = {"noise_sd": 1.0, "beta": np.zeros(2), "p": np.array([0.5]), "corr_chol_0": np.eye(2)}
    with pytest.raises(ValueError, match=r"beta must have shape \(2,\), got \(3,\)"):
        unconstrain(SITES, {**good, "beta": np.zeros(3)})
    with pytest.raises(ValueError, match="noise_sd = -1.0 is outside its support"):
        unconstrain(SITES, {**good, "noise_sd": -1.0})
    with pytest.raises(ValueError, match="p = .* is outside its support"):
        unconstrain(SITES, {**good, "p": np.array([1.5])})
    with pytest.raises(ValueError, match=r"(?s)corr_chol_0 = .* is outside its support"):
        unconstrain(SITES, {**good, "corr_chol_0": np.array([[1.0, 0.0], [0.9, 0.9]])})  # row 2 not unit norm


def test_tree_size_counts_every_scalar():
    assert tree_size({"a": jnp.zeros((2, 3)), "b": [jnp.zeros(4), 1.0]}) == 11
    assert tree_size({}) == 0
