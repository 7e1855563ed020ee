"""The swirl domain (Experiment 2): likelihood against an independent NumPy implementation,
the map's geometry, the generator, the closed-form MLE and the Bayes oracle."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _examples import load_example
from scipy.stats import norm

from hiermeta.models import swirl


def numpy_swirl(theta, omega=np.pi / 5):
    """Independent: an explicit rotation matrix per pair."""
    theta = np.asarray(theta, float)
    mu = np.empty_like(theta)
    for d in range(0, theta.shape[-1], 2):
        a = omega * np.hypot(theta[d], theta[d + 1])
        rot = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
        mu[d:d + 2] = rot @ theta[d:d + 2]
    return mu


def test_likelihood_and_inner_objective_match_numpy(swirl_domain, swirl_model, swirl_tasks):
    theta, batch = swirl_tasks
    rng = np.random.default_rng(0)
    phi, sigma = rng.normal(size=10), rng.uniform(1, 5, size=10)
    for t in range(theta.shape[0]):
        th = np.asarray(theta[t]) + rng.normal(size=10)  # not the generating value
        data_t = jax.tree_util.tree_map(lambda a: a[t], batch.train)
        obs, xi = np.asarray(data_t.obs), np.asarray(data_t.noise_sd)
        want_lik = norm.logpdf(obs, numpy_swirl(th), xi).sum()
        assert float(swirl_model.log_likelihood(jnp.asarray(th), data_t)) == pytest.approx(want_lik, rel=1e-12)
        want_obj = -(want_lik + norm.logpdf(th, phi, sigma).sum())
        got = swirl_model.inner_objective(jnp.asarray(th), jnp.asarray(phi), jnp.asarray(sigma), data_t)
        assert float(got) == pytest.approx(want_obj, rel=1e-12)
        loss = 0.5 * np.mean(np.sum((obs - numpy_swirl(th)) ** 2 / xi**2, axis=-1))
        assert float(swirl_model.generalisation_loss(jnp.asarray(th), data_t)) == pytest.approx(loss, rel=1e-12)


def test_swirl_geometry():
    rng = np.random.default_rng(1)
    theta = rng.normal(scale=5, size=(20, 10))
    mu = np.asarray(swirl.swirl(jnp.asarray(theta)))
    np.testing.assert_allclose(mu, np.stack([numpy_swirl(t) for t in theta]), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(swirl.unswirl(jnp.asarray(mu)), theta, atol=1e-10)  # a bijection
    # each pair keeps its radius, and the map preserves volume (|det J| = 1)
    np.testing.assert_allclose(np.hypot(mu[:, ::2], mu[:, 1::2]), np.hypot(theta[:, ::2], theta[:, 1::2]), rtol=1e-12)
    dets = np.linalg.det(np.asarray(jax.vmap(jax.jacfwd(swirl.swirl))(jnp.asarray(theta))))
    np.testing.assert_allclose(dets, 1.0, rtol=1e-10)
    # smooth at the origin: finite gradient, the identity
    np.testing.assert_allclose(jax.jacfwd(swirl.swirl)(jnp.zeros(10)), np.eye(10), atol=1e-15)
    with pytest.raises(ValueError, match="even"):
        swirl.swirl(jnp.zeros(3))


def test_generator_matches_the_model(swirl_domain):
    theta, batch = swirl.sample_tasks(swirl_domain, jax.random.PRNGKey(3), 4000)
    assert batch.train.obs.shape == (4000, 5, 10) and batch.val.obs.shape == (4000, 5, 10)
    theta = np.asarray(theta)
    np.testing.assert_allclose(theta.mean(0), swirl_domain.phi, atol=4 * 8 / np.sqrt(4000))
    np.testing.assert_allclose(theta.std(0), swirl_domain.sigma, rtol=0.05)
    resid = np.asarray(batch.val.obs) - np.asarray(swirl.swirl(jnp.asarray(theta)))[:, None]
    np.testing.assert_allclose(resid.std(axis=(0, 1)), 10.0, rtol=0.03)
    assert abs(resid.mean()) < 0.05


def test_mle_is_the_likelihood_maximum_and_its_expected_loss(swirl_domain, swirl_model):
    _, batch = swirl.sample_tasks(swirl_domain, jax.random.PRNGKey(4), 20000)
    theta_mle = swirl.mle(batch.train)
    grads = jax.vmap(jax.grad(swirl_model.log_likelihood))(theta_mle, batch.train)
    assert float(jnp.max(jnp.abs(grads))) < 1e-10  # stationary ...
    mu_hat = np.asarray(batch.train.obs).mean(axis=1)
    np.testing.assert_allclose(swirl.swirl(theta_mle), mu_hat, atol=1e-10)  # ... and fits the mean exactly
    loss = np.asarray(jax.vmap(swirl_model.generalisation_loss)(theta_mle, batch.val))
    sem = loss.std() / np.sqrt(loss.size)
    assert swirl.mle_expected_loss(swirl_domain) == 6.0
    assert abs(loss.mean() - 6.0) < 4 * sem, (loss.mean(), sem)


def test_oracle_finds_the_global_map_and_the_posterior_mean(swirl_domain, swirl_model):
    theta, batch = swirl.sample_tasks(swirl_domain, jax.random.PRNGKey(5), 40)
    phi, sigma = swirl_domain.phi, swirl_domain.sigma
    oracle = jax.jit(lambda d: swirl.oracle(swirl_model, d, phi, sigma, grid=129))(batch.train)
    assert float(jnp.max(oracle.grad_norm)) < 1e-6
    assert np.all(np.asarray(oracle.objective) <= np.asarray(oracle.local_objective) + 1e-9)
    # no other start does better: Newton from the true theta (which the oracle does not know)
    loss = lambda th, d: swirl_model.inner_objective(th, jnp.asarray(phi), jnp.asarray(sigma), d)
    _, from_truth = jax.vmap(lambda d, s: swirl._damped_newton(loss, s, d, 100))(batch.train, theta)
    assert np.all(np.asarray(oracle.objective) <= np.asarray(from_truth) + 1e-8)
    assert np.mean(np.asarray(oracle.objective) < np.asarray(oracle.local_objective) - 1e-6) > 0.2  # multimodal

    # posterior mean of mu by self-normalised importance sampling from the prior (independent)
    rng = np.random.default_rng(6)
    draws = phi + sigma * rng.normal(size=(400_000, 10))
    mu_draws = np.asarray(swirl.swirl(jnp.asarray(draws)))
    for t in range(3):
        xbar = np.asarray(batch.train.obs[t]).mean(axis=0)  # sufficient: log p(D | mu) = -5 |xbar - mu|^2 / 200 + c
        log_w = -5 * np.sum((xbar - mu_draws) ** 2, axis=-1) / (2 * 10.0**2)
        w = np.exp(log_w - log_w.max())
        w /= w.sum()
        ess = 1 / np.sum(w**2)
        want = w @ mu_draws
        spread = np.sqrt(w @ (mu_draws - want) ** 2 / ess)  # Monte-Carlo standard error
        np.testing.assert_allclose(oracle.mu_mean[t], want, atol=5 * spread.max() + 1e-3)


@pytest.mark.slow  # the nonlinear_toy study end to end
def test_nonlinear_toy_quick(tmp_path):
    """examples/nonlinear_toy.py end to end with tiny settings: JSON written, curves and references finite."""
    example = load_example("nonlinear_toy")
    example.main(["--quick", "--meta-steps", "20", "--inner-steps", "10", "--test-tasks", "40", "--test-steps", "30",
                  "--no-plot", "--out", str(tmp_path)])
    result = json.loads((tmp_path / "nonlinear_toy.json").read_text())
    assert result["schema"] == "hiermeta/nonlinear_toy/v1"
    assert set(result["methods"]) == {"Shrinkage", "M-Shrinkage", "Oracle (MAP)"}
    for entry in result["methods"].values():
        assert np.all(np.isfinite(np.asarray(entry["curve"]["mean"], float)))
    refs = result["references"]
    assert refs["MLE"]["expected"] == 6.0
    assert refs["Bayes oracle (global MAP)"]["max_grad_norm"] < 1e-6
    assert refs["posterior mean of mu"]["held_out"] < refs["MLE"]["held_out"]


def test_grid_predictive_is_the_exact_posterior_predictive(swirl_domain):
    """omega = 0 (a conjugate normal model per coordinate): the closed form; the paper's swirl: the
    ratio of prior expectations p(D^val | D^tr) = E[p(D^tr, D^val | theta)] / E[p(D^tr | theta)],
    by Monte Carlo from the prior, pair by pair (an independent estimator, not a lattice)."""
    from scipy.stats import multivariate_normal

    xi, n = 10.0, swirl_domain.n_train
    flat = swirl_domain._replace(omega=0.0)
    _, batch = swirl.sample_tasks(flat, jax.random.PRNGKey(7), 4)
    got = swirl.grid_predictive(batch.train, batch.val, flat.phi, flat.sigma, omega=0.0, grid=129)
    s2 = flat.sigma**2
    post_var = 1 / (1 / s2 + n / xi**2)
    post_mean = post_var * (flat.phi / s2 + np.asarray(batch.train.obs).sum(1) / xi**2)
    q, s = np.asarray(batch.val.obs), np.asarray(batch.train.obs)
    ones, eye = np.ones((n, n)), np.eye(n)
    for t in range(4):
        log_pred = sum(multivariate_normal.logpdf(q[t, :, d], np.full(n, post_mean[t, d]), post_var[d] * ones + xi**2 * eye)
                       for d in range(10))
        log_ev = sum(multivariate_normal.logpdf(s[t, :, d], np.full(n, flat.phi[d]), s2[d] * ones + xi**2 * eye)
                     for d in range(10))
        assert float(got.log_pred[t]) == pytest.approx(log_pred, abs=1e-5)
        assert float(got.log_evidence[t]) == pytest.approx(log_ev, abs=1e-5)
    want_pit = norm.cdf((q - post_mean[:, None]) / np.sqrt(post_var + xi**2))
    np.testing.assert_allclose(np.asarray(got.pit), want_pit, atol=1e-6)

    _, batch = swirl.sample_tasks(swirl_domain, jax.random.PRNGKey(8), 3)
    got = swirl.grid_predictive(batch.train, batch.val, swirl_domain.phi, swirl_domain.sigma)
    rng = np.random.default_rng(9)
    S = 400_000
    q, s = np.asarray(batch.val.obs), np.asarray(batch.train.obs)
    for t in range(3):
        want, sem2 = 0.0, 0.0
        for d in range(0, 10, 2):
            th = swirl_domain.phi[d:d + 2] + swirl_domain.sigma[d:d + 2] * rng.normal(size=(S, 2))
            mu = np.asarray(swirl.swirl(jnp.asarray(th)))
            ll = lambda x: np.sum(norm.logpdf(x[None], mu[:, None], xi), axis=(1, 2))
            a, b = ll(s[t, :, d:d + 2]), ll(q[t, :, d:d + 2])
            ref = a.max()
            w_ev, w_joint = np.exp(a - ref), np.exp(a + b - ref - b.max())
            want += np.log(w_joint.mean()) + b.max() - np.log(w_ev.mean())
            # delta-method variance of log(mean(joint)) - log(mean(ev))
            sem2 += (w_joint.var() / w_joint.mean() ** 2 + w_ev.var() / w_ev.mean() ** 2) / S
        assert float(got.log_pred[t]) == pytest.approx(want, abs=5 * np.sqrt(sem2) + 1e-3)
