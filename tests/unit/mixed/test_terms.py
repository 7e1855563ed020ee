"""Covariance parameters of random-effect terms: lme4's order, bounds, names and the round trip."""

import numpy as np
import pytest

from hiermeta.mixed.terms import (covariances, make_term, relative_factors, theta_from_covariances,
                                  theta_lower_bounds, theta_names, theta_start)


def _term(q, correlated=True, group="Subject"):
    n = 6
    Z = np.column_stack([np.ones(n)] + [np.arange(n, dtype=float) * (j + 1) for j in range(q - 1)])
    cols = ["(Intercept)"] + [f"x{j}" for j in range(1, q)]
    return make_term(group, np.arange(n) % 3, Z, cols, correlated=correlated)


def test_lme4_order_of_theta_and_names():
    # lme4: (1 + Days | Subject) has theta = (T11, T21, T22), named Subject.(Intercept), Subject.Days.(Intercept), Subject.Days
    t = _term(2)
    T = relative_factors([t], [1.5, -0.3, 0.7])[0]
    np.testing.assert_array_equal(T, [[1.5, 0.0], [-0.3, 0.7]])
    assert theta_names([t]) == ("Subject.(Intercept)", "Subject.x1.(Intercept)", "Subject.x1")
    np.testing.assert_array_equal(theta_start([t]), [1.0, 0.0, 1.0])
    np.testing.assert_array_equal(theta_lower_bounds([t]), [0.0, -np.inf, 0.0])
    assert t.label() == "(1 + x1 | Subject)"


def test_three_column_factor_fills_columns_in_order():
    t = _term(3)
    theta = np.arange(1.0, 7.0)  # T11 T21 T31 T22 T32 T33
    T = relative_factors([t], theta)[0]
    np.testing.assert_array_equal(T, [[1, 0, 0], [2, 4, 0], [3, 5, 6]])


def test_diagonal_term_has_only_its_diagonal():
    t = _term(3, correlated=False, group="g")
    assert t.num_theta == 3 and t.label() == "(1 + x1 + x2 || g)"
    T = relative_factors([t], [2.0, 3.0, 4.0])[0]
    np.testing.assert_array_equal(T, np.diag([2.0, 3.0, 4.0]))
    np.testing.assert_array_equal(theta_lower_bounds([t]), [0.0, 0.0, 0.0])


def test_covariance_round_trip_with_a_residual_scale():
    terms = [_term(2), _term(1, group="Batch"), _term(2, correlated=False, group="h")]
    theta = np.array([1.2, 0.4, 0.9, 0.6, 1.1, 0.2])
    covs = covariances(terms, theta, scale=25.0)
    # Sigma = s^2 T T'
    T0 = np.array([[1.2, 0.0], [0.4, 0.9]])
    np.testing.assert_allclose(covs[0], 625.0 * T0 @ T0.T)
    np.testing.assert_allclose(theta_from_covariances(terms, covs, scale=25.0), theta, rtol=1e-10)


def test_make_term_refuses_bad_input():
    with pytest.raises(ValueError, match="integers"):
        make_term("g", np.array([0.0, 1.0]), np.ones(2), ["(Intercept)"])
    with pytest.raises(ValueError, match="NaN"):
        make_term("g", np.array([0, 1]), np.array([1.0, np.nan]), ["(Intercept)"])
    with pytest.raises(ValueError, match="share n"):
        make_term("g", np.array([0, 1, 1]), np.ones(2), ["(Intercept)"])
    with pytest.raises(ValueError, match="names"):
        make_term("g", np.array([0, 1]), np.ones((2, 2)), ["(Intercept)"])
