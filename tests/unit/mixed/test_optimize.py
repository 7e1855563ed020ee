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


def test_the_check_hessian_matches_the_analytic_one_inside_and_at_a_bound():
    """The convergence check's Hessian (the fixed effects' covariance of a GLMM comes from it): central
    differences inside (an off-diagonal entry from f(x +- (h_i e_i + h_j e_j)) and the gradient's
    evaluations), forward ones next to a bound; against the exact Hessian of a non-quadratic function."""
    def f(x):
        return np.exp(0.7 * x[0]) + x[0] * x[1] ** 2 + np.cos(x[1] * x[2]) + 0.3 * x[2] ** 4 + x[0] * x[2]

    def hess(x):
        a, b, c = x
        return np.array([[0.49 * np.exp(0.7 * a), 2 * b, 1.0],
                         [2 * b, 2 * a - c * c * np.cos(b * c), -np.sin(b * c) - b * c * np.cos(b * c)],
                         [1.0, -np.sin(b * c) - b * c * np.cos(b * c), -b * b * np.cos(b * c) + 3.6 * c * c]])

    from hiermeta.mixed.optimize import _check

    x = np.array([0.4, -0.8, 1.3])
    evaluations = []
    counted = lambda z: evaluations.append(1) or f(z)  # noqa: E731
    H = _check(counted, x, np.full(3, -np.inf))[4]
    np.testing.assert_allclose(H, hess(x), rtol=2e-6, atol=2e-6)
    assert len(evaluations) == 1 + 2 * 3 + 3 * 2  # f0, f(x +- h e_i), f(x +- (h e_i + h e_j))
    # the first coordinate at its bound: one-sided differences in its row and column (O(h))
    x_bound = np.array([0.0, -0.8, -2.0])  # the gradient pulls x0 inside: it stays a free coordinate
    converged, grad, step, on_bound, H = _check(f, x_bound, np.array([0.0, -np.inf, -np.inf]))
    assert not on_bound.any() and grad[0] < 0
    np.testing.assert_allclose(H, hess(x_bound), rtol=1e-3, atol=1e-3)
