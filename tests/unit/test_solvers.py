"""hiermeta.solvers: the damped-Newton loop and L-BFGS against scipy and hand computations."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.optimize

from hiermeta import solvers


def logistic_loss(theta, data):
    """A convex, non-quadratic loss: logistic regression with a ridge."""
    X, y = data
    eta = X @ theta
    return jnp.sum(jnp.logaddexp(0.0, eta) - y * eta) + 0.5 * jnp.sum(theta**2)


def problems(T=4, n=12, P=3, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(T, n, P))
    y = (rng.uniform(size=(T, n)) < 0.5).astype(float)
    return jnp.asarray(X), jnp.asarray(y)


def scipy_minimum(data_t):
    f = lambda th: float(logistic_loss(jnp.asarray(th), data_t))
    g = lambda th: np.asarray(jax.grad(logistic_loss)(jnp.asarray(th), data_t))
    return scipy.optimize.minimize(f, np.zeros(data_t[0].shape[-1]), jac=g, method="BFGS", tol=1e-12).x


def test_damped_newton_one_problem_and_a_batch_reach_scipy_s_minimum():
    X, y = problems()
    start = jnp.zeros((X.shape[0], X.shape[-1]))
    batch = solvers.damped_newton(logistic_loss, start, 30, args=(X, y), threshold=jnp.full(4, 1e-9), scaled=True)
    for t in range(4):
        one, _ = solvers.damped_newton(lambda th: logistic_loss(th, (X[t], y[t])), start[t], 30, scaled=True)
        want = scipy_minimum((X[t], y[t]))
        np.testing.assert_allclose(one.theta, want, atol=1e-8)
        np.testing.assert_allclose(batch.theta[t], want, atol=1e-8)
    assert bool(jnp.all(batch.frozen)) and int(jnp.max(batch.steps)) < 30


def test_a_step_that_raises_the_loss_is_refused_and_the_damping_grows():
    """From x = 1.2 on f(x) = sqrt(1 + x^2) the Newton step -x (1 + x^2) overshoots to x = -1.728,
    where f is higher: refused (theta stays, no step counted), and lam grows tenfold; damped enough,
    the step is kept and lam shrinks tenfold."""
    f = lambda x: jnp.sqrt(1.0 + x[0] ** 2)
    state, _ = solvers.damped_newton(f, jnp.array([1.2]), 1, damping=1e-6)
    assert float(state.theta[0]) == 1.2 and int(state.steps) == 0
    assert float(state.damping) == pytest.approx(1e-5)
    state, _ = solvers.damped_newton(f, jnp.array([1.2]), 1, damping=10.0)
    assert int(state.steps) == 1 and float(f(state.theta)) < float(f(jnp.array([1.2])))
    assert float(state.damping) == pytest.approx(1.0)


def test_lbfgs_line_search_refuses_a_step_without_sufficient_decrease():
    """The first L-BFGS step from x = 1 on f(x) = sqrt(1 + x^2) is the Newton step to x = -1, where f
    is the same: Armijo's condition f(x + a d) <= f(x) + c1 a g.d (g.d < 0) refuses it, so after one
    iteration the loss is strictly lower (a wrong sign would accept the step and leave it equal)."""
    f = lambda x: jnp.sqrt(1.0 + x[0] ** 2)
    result = solvers.lbfgs(max_steps=1).solve(f, jnp.array([1.0]))
    assert float(result.final_loss) < float(f(jnp.array([1.0]))) - 1e-6


def test_newton_and_lbfgs_reach_the_minimum_and_report_stationarity():
    X, y = problems(T=1)
    loss = lambda th: logistic_loss(th, (X[0], y[0]))
    want = scipy_minimum((X[0], y[0]))
    theta0 = jnp.zeros(3)
    g0 = float(jnp.linalg.norm(jax.grad(loss)(theta0)))
    for solver in (solvers.newton(), solvers.lbfgs(max_steps=200)):
        r = solver.solve(loss, theta0)
        np.testing.assert_allclose(r.theta, want, atol=1e-7)
        assert float(r.stationarity) == pytest.approx(float(jnp.linalg.norm(jax.grad(loss)(r.theta))) / g0, rel=1e-6)
        assert bool(r.converged)


def test_levenberg_marquardt_minimises_a_quadratic_in_a_few_steps():
    A = jnp.array([[3.0, 1.0], [1.0, 2.0]])
    b = jnp.array([1.0, -1.0])
    theta, value = solvers.levenberg_marquardt(lambda th: 0.5 * th @ A @ th - b @ th, jnp.zeros(2), 10)
    np.testing.assert_allclose(theta, np.linalg.solve(np.asarray(A), np.asarray(b)), rtol=1e-10)
