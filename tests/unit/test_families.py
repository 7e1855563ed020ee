"""hiermeta.families: input checks, CDFs and normalising constants against scipy, the pooled GLM start."""

import jax.numpy as jnp
import numpy as np
import pytest
import scipy.optimize
import scipy.stats
from numpyro.infer.util import log_density

import hiermeta as hm
from hiermeta import families as fam
from hiermeta.families.base import newton_glm

ONES = np.ones((2, 3, 1))


def test_responses_outside_a_family_s_support_are_refused():
    with pytest.raises(ValueError, match="Bernoulli response must be 0 or 1.*0.5"):
        fam.bernoulli().make_data(np.array([[0.0, 1.0, 0.5], [1.0, 0.0, 1.0]]), None, ONES)
    with pytest.raises(ValueError, match="trials must be positive integers"):
        fam.binomial().make_data(np.zeros((2, 3)), None, ONES, trials=np.array([[1, 0, 2], [1, 1, 1]]))
    with pytest.raises(ValueError, match="successes exceed trials"):
        fam.binomial().make_data(np.array([[3.0, 0, 0], [0, 0, 0]]), None, ONES, trials=2)
    with pytest.raises(ValueError, match="non-negative integer counts"):
        fam.poisson().make_data(np.array([[1.0, -1.0, 0.0], [0.0, 2.5, 1.0]]), None, ONES)
    with pytest.raises(ValueError, match="mask must hold booleans"):
        fam.poisson().make_data(np.zeros((2, 3)), np.array([[1, 0.5, 1], [1, 1, 1]]), ONES)


def test_cdfs_equal_scipy():
    eta = jnp.array([[-0.7, 0.3, 1.2]])
    Z = np.ones((1, 3, 1))
    y = np.array([[0.0, 2.0, 5.0]])
    binomial = fam.binomial()
    data = binomial.make_data(y, None, Z, trials=np.array([[3, 4, 6]]))
    p = 1 / (1 + np.exp(-np.asarray(eta)))
    np.testing.assert_allclose(binomial.cdf_from_eta(eta, data, jnp.asarray(y)), scipy.stats.binom.cdf(y, [[3, 4, 6]], p),
                               rtol=1e-10)
    poisson = fam.poisson()
    data = poisson.make_data(y, None, Z)
    np.testing.assert_allclose(poisson.cdf_from_eta(eta, data, jnp.asarray(y)),
                               scipy.stats.poisson.cdf(y, np.exp(np.asarray(eta))), rtol=1e-10)
    bern = fam.bernoulli()
    data = bern.make_data(np.array([[0.0, 1.0, 1.0]]), None, Z)
    np.testing.assert_allclose(bern.cdf_from_eta(eta, data, jnp.zeros((1, 3))), 1 - p, rtol=1e-12)
    t = fam.student_t(scale=2.0, df=3.0)
    data = t.make_data(y, None, Z)
    np.testing.assert_allclose(t.cdf_from_eta(eta, data, jnp.asarray(y)),
                               scipy.stats.t.cdf(y, 3.0, np.asarray(eta), 2.0), rtol=1e-8)


@pytest.mark.parametrize("nu", [1.5, 7.0])
def test_student_t_normaliser_is_the_part_of_the_log_density_free_of_theta(nu):
    """log p = normaliser - (nu + 1)/2 sum log(1 + ((y - eta)/s)^2 / nu): the normaliser is
    n [lgamma((nu+1)/2) - lgamma(nu/2) - 1/2 log(nu pi) - log s] (scipy's t.logpdf)."""
    lik = fam.student_t(scale=0.7, df=nu)
    y = np.array([[0.3, -1.0, 2.5, 0.0]])
    data = lik.make_data(y, np.array([[1, 1, 1, 0]]), np.ones((1, 4, 1)))
    eta = 0.4
    z = (y[0, :3] - eta) / 0.7
    want = np.sum(scipy.stats.t.logpdf(y[0, :3], nu, eta, 0.7) + 0.5 * (nu + 1) * np.log1p(z**2 / nu))
    assert float(lik.log_normaliser(data)[0]) == pytest.approx(want, rel=1e-12)
    total, _ = log_density(lik, (jnp.full((1, 1), eta), data), {}, {})
    assert float(total) == pytest.approx(np.sum(scipy.stats.t.logpdf(y[0, :3], nu, eta, 0.7)), rel=1e-12)


def test_pooled_logistic_start_is_the_maximum_likelihood_fit():
    rng = np.random.default_rng(0)
    A = np.column_stack([np.ones(60), rng.normal(size=60)])
    y = (rng.uniform(size=60) < 1 / (1 + np.exp(-(0.5 + A[:, 1])))).astype(float)

    def gradient_and_weights(eta):
        p = 1 / (1 + np.exp(-eta))
        return y - p, p * (1 - p)

    coef = newton_glm(A, gradient_and_weights, ridge=0.0)
    nll = lambda b: np.sum(np.logaddexp(0, A @ b) - y * (A @ b))
    want = scipy.optimize.minimize(nll, np.zeros(2), method="BFGS", tol=1e-12).x
    np.testing.assert_allclose(coef, want, atol=1e-6)


def test_glm_start_sigma_is_one_link_unit_over_the_rms_of_the_column():
    rng = np.random.default_rng(1)
    Z = np.stack([np.ones((5, 4)), rng.normal(size=(5, 4)) * 3], -1)
    lik = fam.poisson()
    data = lik.make_data(rng.poisson(2.0, size=(5, 4)).astype(float), None, Z)
    model = hm.HierarchicalModel(lik, hm.ModulePartition.per_coordinate(jnp.zeros(2)))
    start = lik.initial_values(data, model)
    np.testing.assert_allclose(start["sigma"], 1.0 / np.sqrt(np.mean(Z.reshape(-1, 2) ** 2, axis=0)), rtol=1e-12)
