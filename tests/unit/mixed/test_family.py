"""The GLMM families row by row against scipy.stats, finite differences and their own definitions."""

import numpy as np
import pytest
from scipy import stats

from hiermeta.errors import DataDefectError
from hiermeta.mixed.family import FAMILIES, LINKS, Bernoulli, Binomial, Poisson, get_family


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def test_binomial_log_likelihood_is_scipys_log_pmf(rng):
    trials = rng.integers(1, 30, 200).astype(float)
    mu = rng.uniform(0.01, 0.99, 200)
    k = rng.binomial(trials.astype(int), mu)
    fam = Binomial()
    y, w = fam.prepare(k / trials, trials)
    np.testing.assert_allclose(fam.log_likelihood(y, mu, w), stats.binom.logpmf(k, trials, mu), rtol=1e-12, atol=1e-12)
    # the predictive CDF of the count, and the counts themselves
    np.testing.assert_array_equal(fam.counts(y, w), k)
    np.testing.assert_allclose(fam.cdf(k, mu, w), stats.binom.cdf(k, trials, mu), rtol=1e-12)


def test_bernoulli_accepts_booleans_and_is_the_one_trial_binomial(rng):
    mu = rng.uniform(0.01, 0.99, 50)
    y_bool = rng.uniform(size=50) < mu
    fam = get_family("bernoulli")
    y, w = fam.prepare(y_bool)
    assert y.dtype == float and np.all(w == 1) and fam.is_binary(w)
    np.testing.assert_allclose(fam.log_likelihood(y, mu, w), stats.bernoulli.logpmf(y_bool, mu), rtol=1e-12)
    with pytest.raises(DataDefectError, match="0/1 or boolean"):
        fam.prepare(np.array([0.0, 0.5, 1.0]))
    assert not Binomial().is_binary(np.array([1.0, 2.0])) and Binomial().is_binary(np.ones(3))


def test_poisson_log_likelihood_is_scipys_log_pmf(rng):
    mu = rng.uniform(0.1, 20.0, 200)
    y = rng.poisson(mu).astype(float)
    fam = Poisson()
    yy, w = fam.prepare(y)
    np.testing.assert_allclose(fam.log_likelihood(yy, mu, w), stats.poisson.logpmf(y, mu), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(fam.cdf(y, mu, w), stats.poisson.cdf(y, mu), rtol=1e-12)
    # frequency weights multiply the row's log-likelihood
    np.testing.assert_allclose(fam.log_likelihood(yy, mu, 2 * w), 2 * stats.poisson.logpmf(y, mu), rtol=1e-12)


@pytest.mark.parametrize("name", ["binomial", "poisson"])
def test_deviance_residuals_are_twice_the_log_likelihood_below_the_saturated_model(rng, name):
    fam = get_family(name)
    if name == "binomial":
        w = rng.integers(1, 20, 100).astype(float)
        y = rng.binomial(w.astype(int), 0.3) / w
    else:
        w = np.ones(100)
        y = rng.poisson(3.0, 100).astype(float)
    mu = fam.inverse_link(rng.normal(size=100) + (0.0 if name == "binomial" else 1.0))
    saturated = fam.log_likelihood(y, np.clip(y, 1e-300, 1 - 1e-16) if name == "binomial" else np.maximum(y, 1e-300), w)
    np.testing.assert_allclose(fam.deviance_residuals(y, mu, w), 2 * (saturated - fam.log_likelihood(y, mu, w)),
                               rtol=1e-9, atol=1e-9)
    assert np.all(fam.deviance_residuals(y, mu, w) >= 0)


@pytest.mark.parametrize("link", sorted(LINKS))
def test_every_link_inverts_and_its_derivative_is_the_finite_difference(link):
    L = LINKS[link]
    eta = np.linspace(-3.0, 2.5, 23)
    mu = L.inverse(eta)
    np.testing.assert_allclose(L.link(mu), eta, rtol=1e-10, atol=1e-10)
    h = 1e-6
    np.testing.assert_allclose(L.mu_eta(eta), (L.inverse(eta + h) - L.inverse(eta - h)) / (2 * h),
                               rtol=1e-7, atol=1e-9)
    # bounded far out, as R bounds them: mu stays inside its range, d mu / d eta positive
    far = np.array([-1e4, -50.0, 50.0, 1e3])
    assert np.all(np.isfinite(L.inverse(far))) and np.all(L.mu_eta(far) > 0)
    if link not in ("log", "identity"):
        assert np.all((L.inverse(far) > 0) & (L.inverse(far) < 1))


def test_the_variance_functions_and_the_starting_means():
    mu = np.array([0.1, 0.5, 0.9])
    np.testing.assert_allclose(Binomial().variance(mu), mu * (1 - mu))
    np.testing.assert_allclose(Poisson().variance(mu), mu)
    for fam, y, w in [(Binomial(), np.array([0.0, 1.0, 0.5]), np.array([3.0, 5.0, 2.0])),
                      (Poisson(), np.array([0.0, 4.0, 1.0]), np.ones(3))]:
        m = fam.start_mu(y, w)
        assert np.all(m > 0) and np.all(np.isfinite(fam.link.link(m)))
        if fam.name == "binomial":
            assert np.all(m < 1)


def test_links_are_checked_and_families_compare_by_name_and_link():
    assert get_family("binomial").link.name == "logit" and get_family("binomial", "probit").link.name == "probit"
    assert get_family("Poisson") == Poisson("log") and Binomial("probit") != Binomial()
    assert not Binomial().canonical or Binomial().link.name == "logit"
    assert not Binomial("cloglog").canonical and Poisson().canonical
    with pytest.raises(ValueError, match="takes the links"):
        get_family("poisson", "logit")
    with pytest.raises(ValueError, match="unknown family"):
        get_family("gamma")
    assert set(FAMILIES) == {"binomial", "bernoulli", "poisson", "gaussian"}
    assert isinstance(get_family("bernoulli"), Bernoulli)


def test_gaussian_rows_are_scipys_normal_with_the_weights_dividing_the_variance(rng):
    y, mu, w = rng.normal(size=20), rng.normal(size=20), rng.uniform(0.5, 2.0, 20)
    fam = get_family("gaussian")
    assert fam.link.name == "identity" and not fam.discrete and fam.has_scale
    np.testing.assert_allclose(fam.log_likelihood(y, mu, w, scale=1.7), stats.norm.logpdf(y, mu, 1.7 / np.sqrt(w)))
    np.testing.assert_allclose(fam.cdf(y, mu, w, scale=1.7), stats.norm.cdf(y, mu, 1.7 / np.sqrt(w)))
    np.testing.assert_allclose(fam.deviance_residuals(y, mu, w), w * (y - mu) ** 2)
    with pytest.raises(ValueError, match="residual sd"):
        fam.log_likelihood(y, mu, w)


def test_bad_responses_are_refused_naming_the_rows():
    with pytest.raises(DataDefectError, match="non-negative integers.*first rows and values 1 \\(-1\\)"):
        Poisson().prepare(np.array([0.0, -1.0, 2.0]))
    with pytest.raises(DataDefectError, match="non-negative integers.*2 \\(2.5\\)"):
        Poisson().prepare(np.array([0.0, 1.0, 2.5]))
    with pytest.raises(DataDefectError, match="successes exceed the trials.*1 \\(1.5\\)"):
        Binomial().prepare(np.array([0.5, 1.5]), np.array([2.0, 2.0]))  # 3 successes out of 2 trials
    with pytest.raises(DataDefectError, match="positive integer"):
        Binomial().prepare(np.array([0.5, 0.5]), np.array([2.0, 0.0]))
    with pytest.raises(DataDefectError, match="non-integer numbers of successes"):
        Binomial().prepare(np.array([0.3, 0.5]), np.array([2.0, 2.0]))
    with pytest.raises(DataDefectError, match="missing or infinite"):
        Binomial().prepare(np.array([np.nan, 0.5]), np.array([2.0, 2.0]))
