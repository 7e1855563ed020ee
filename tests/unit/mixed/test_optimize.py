"""The bounded minimiser and its convergence check on functions with known minima."""

import numpy as np

from hiermeta.mixed.optimize import check_optimum, minimize_bounded


def _quadratic(x):
    return (x[0] - 1.0) ** 2 + 10.0 * (x[1] + 2.0) ** 2 + 0.5 * (x[0] - 1.0) * x[1]


def test_minimum_with_an_active_bound():
    # x1 >= 0 binds (unconstrained minimum near x1 = -2); then x0 = 1 - 0.25 x1 = 1
    res = minimize_bounded(_quadratic, [3.0, 3.0], [-np.inf, 0.0])
    np.testing.assert_allclose(res.x, [1.0, 0.0], atol=1e-6)
    assert res.converged and res.on_bound.tolist() == [False, True]


def test_interior_minimum_of_a_badly_scaled_function():
    f = lambda x: 1e4 * (x[0] - 0.3) ** 2 + 1e-2 * (x[1] - 5.0) ** 2 + (x[0] - 0.3) * (x[1] - 5.0) * 0.1  # noqa: E731
    res = minimize_bounded(f, [1.0, 1.0], [0.0, 0.0])
    np.testing.assert_allclose(res.x, [0.3, 5.0], atol=1e-3)
    assert res.converged


def test_check_rejects_a_point_that_is_not_the_minimum():
    converged, grad, step, on_bound = check_optimum(_quadratic, np.array([1.5, 0.5]), np.array([-np.inf, -np.inf]))
    assert not converged
    np.testing.assert_allclose(grad, [1.25, 50.25], rtol=1e-6)  # the exact gradient
