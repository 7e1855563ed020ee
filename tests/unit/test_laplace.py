"""hiermeta.laplace: modes, the Laplace and AGQ marginal likelihoods and the flooring rule, against
scipy (optimisation, quadrature), hand formulas and finite differences."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.integrate
import scipy.optimize
from scipy.special import gammaln

import hiermeta as hm
from hiermeta import families as fam
from hiermeta import laplace as lap

COUNTS = np.array([[0.0, 2.0, 1.0], [4.0, 3.0, 6.0]])
PHI, SIGMA = 0.4, 0.8


@pytest.fixture(scope="module")
def poisson():
    lik = fam.poisson()
    model = hm.HierarchicalModel(lik, hm.ModulePartition.per_coordinate(jnp.zeros(1)))
    return model, lik.make_data(COUNTS, None, np.ones(COUNTS.shape + (1,)))


def neg_log_joint(theta, y):
    """L_t(theta) = -log N(theta | PHI, SIGMA^2) - sum log Poisson(y | exp(theta))."""
    prior = 0.5 * ((theta - PHI) / SIGMA) ** 2 + np.log(SIGMA) + 0.5 * np.log(2 * np.pi)
    return prior - np.sum(y * theta - np.exp(theta) - gammaln(y + 1.0))


def mode_of(y):
    """The root of L_t'(theta) = (theta - PHI) / SIGMA^2 + sum(exp(theta) - y) (scipy's brentq)."""
    return scipy.optimize.brentq(lambda th: (th - PHI) / SIGMA**2 + np.sum(np.exp(th) - y), -20, 20, xtol=1e-15)


def hand_agq(y, K):
    """The AGQ formula with K nodes at the mode (K = 1: Laplace), H = 1 / SIGMA^2 + n exp(mode)."""
    mode = mode_of(y)
    H = 1.0 / SIGMA**2 + len(y) * np.exp(mode)
    x, w = np.polynomial.hermite.hermgauss(K)
    s = np.sqrt(2.0 / H)
    return np.log(s) + np.log(np.sum(w * np.exp(x**2 - np.array([neg_log_joint(mode + s * xk, y) for xk in x]))))


def exact(y):
    return np.log(scipy.integrate.quad(lambda th: np.exp(-neg_log_joint(th, y)), -20, 20, epsabs=1e-14)[0])


@pytest.mark.parametrize("K", [1, 3, 4])
def test_agq_and_laplace_equal_the_hand_formula(poisson, K):
    model, data = poisson
    got = lap.approximate_log_marginal(model, jnp.array([PHI]), jnp.array([SIGMA]), data,
                                       approximation="laplace" if K == 1 else "agq", num_nodes=None if K == 1 else K)
    want = [hand_agq(y, K) for y in COUNTS]
    np.testing.assert_allclose(got, want, rtol=1e-10)
    if K == 1:  # and Laplace is the Gaussian formula -L + 1/2 log 2 pi - 1/2 log H
        assert not np.allclose(got, [hand_agq(y, 2) for y in COUNTS], rtol=1e-6)


def test_agq_with_many_nodes_is_the_integral(poisson):
    model, data = poisson
    got = lap.approximate_log_marginal(model, jnp.array([PHI]), jnp.array([SIGMA]), data, approximation="agq",
                                       num_nodes=25)
    np.testing.assert_allclose(got, [exact(y) for y in COUNTS], rtol=1e-10)


def test_marginal_is_differentiated_through_the_mode_as_finite_differences(poisson):
    model, data = poisson
    f = lambda p: jnp.sum(lap.approximate_log_marginal(model, p[:1], jnp.exp(p[1:]), data))
    p = jnp.array([PHI, np.log(SIGMA)])
    g = np.asarray(jax.grad(f)(p))
    h = 1e-5
    fd = [(float(f(p.at[i].add(h))) - float(f(p.at[i].add(-h)))) / (2 * h) for i in range(2)]
    np.testing.assert_allclose(g, fd, rtol=1e-7)


def test_mode_and_diagnostics(poisson):
    model, data = poisson
    info = lap.marginal_info(model, jnp.array([PHI]), jnp.array([SIGMA]), data)
    np.testing.assert_allclose(info.mode[:, 0], [mode_of(y) for y in COUNTS], atol=1e-13)
    assert np.all(np.asarray(info.converged)) and np.all(np.asarray(info.hessian_pd))
    assert np.all(np.asarray(info.decrement) < 1e-20) and np.all(np.asarray(info.num_steps) >= 1)


def test_floored_hessian_rule():
    """Positive definite: log|H| from Cholesky.  Not: eigenvalues floored at the given floor."""
    H = jnp.array([[2.0, 0.5], [0.5, 1.0]])
    log_det, pd, inverse = lap.floored_hessian(H, 0.1, with_inverse=True)
    assert bool(pd) and float(log_det) == pytest.approx(np.log(1.75))
    np.testing.assert_allclose(inverse, np.linalg.inv(np.asarray(H)), rtol=1e-12)
    saddle = jnp.array([[1.0, 0.0], [0.0, -2.0]])
    log_det, pd, inverse = lap.floored_hessian(saddle, 0.25, with_inverse=True)
    assert not bool(pd) and float(log_det) == pytest.approx(np.log(1.0 * 0.25))
    np.testing.assert_allclose(inverse, np.diag([1.0, 4.0]), rtol=1e-12)


def test_laplace_posterior_of_a_linear_gaussian_task_is_exact():
    rng = np.random.default_rng(0)
    Z = rng.normal(size=(2, 4, 1, 2))
    data = hm.GaussianData.create(rng.normal(size=(2, 4, 1)), 0.5, inputs=Z)
    model = hm.HierarchicalModel(hm.linear_gaussian(), hm.ModulePartition.per_coordinate(jnp.zeros(2)))
    phi, sigma = jnp.array([0.3, -0.2]), jnp.array([1.5, 0.7])
    result = lap.laplace(model, phi, sigma, data)
    mean, cov = model.likelihood.posterior(data, phi, jnp.diag(sigma))
    np.testing.assert_allclose(result.mean, mean, rtol=1e-9)
    np.testing.assert_allclose(result.cov, cov, rtol=1e-9)
    np.testing.assert_allclose(result.log_evidence, model.likelihood.log_marginal(data, phi, jnp.diag(sigma)), rtol=1e-10)
    assert np.all(np.asarray(result.converged))
