"""hiermeta.starts: which start wins, and the checks of given starts."""

import jax.numpy as jnp
import numpy as np
import pytest

import hiermeta as hm
from hiermeta.starts import check_values, correlation_factor, default_start, start_values


@pytest.fixture(scope="module")
def model():
    lik = hm.linear_gaussian(noise="learned", num_fixed=1)
    part = hm.ModulePartition.from_labels((0.0, 0.0), ("a", "b"))
    return hm.HierarchicalModel(lik, part, correlated=[("a", "b")])


def test_given_beats_data_beats_default(model):
    data_values = {"phi": np.array([1.0, 2.0]), "noise_sd": np.array(3.0)}
    out = start_values(model, given={"phi": [5.0, 6.0]}, data_values=data_values)
    np.testing.assert_array_equal(out["phi"], [5.0, 6.0])
    assert float(out["noise_sd"]) == 3.0
    np.testing.assert_array_equal(out["sigma"], default_start(model)["sigma"])
    np.testing.assert_array_equal(out["corr_chol_0"], np.eye(2))


def test_a_correlation_start_may_be_the_matrix_or_its_factor():
    C = np.array([[1.0, 0.6], [0.6, 1.0]])
    L = correlation_factor("c", C)
    np.testing.assert_allclose(L @ L.T, C, rtol=1e-12)
    np.testing.assert_allclose(correlation_factor("c", L), L)
    with pytest.raises(ValueError, match="not positive definite"):
        correlation_factor("c", np.array([[1.0, 1.2], [1.2, 1.0]]))


def test_bad_starts_name_the_site_and_the_problem(model):
    with pytest.raises(ValueError, match="unknown sites \\['tau'\\]"):
        check_values(model, {"tau": 1.0})
    with pytest.raises(ValueError, match="beta.*shape \\(1,\\)"):
        check_values(model, {"beta": [1.0, 2.0]})
    with pytest.raises(ValueError, match="noise_sd.*outside its support"):
        check_values(model, {"noise_sd": -1.0})
    with pytest.raises(ValueError, match="sigma must be finite and > 0"):
        check_values(model, {"sigma": [1.0, 0.0]})
    with pytest.raises(ValueError, match="phi.*finite"):
        check_values(model, {"phi": [np.nan, 0.0]})
    with pytest.raises(ValueError, match="MAML does not learn \\['corr_chol_0'\\]"):
        check_values(model, {"corr_chol_0": np.eye(2)}, allowed={"phi"}, learner="MAML")
