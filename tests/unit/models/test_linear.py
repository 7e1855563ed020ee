"""Closed forms of the linear-Gaussian domain against independent dense computations."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from scipy import stats

import hiermeta as hm
from hiermeta.learners import shrinkage_params
from hiermeta.models import linear

EIGHT_SCHOOLS_Y = np.array([28.0, 8, -3, 7, -1, 1, 18, 12])
EIGHT_SCHOOLS_SE = np.array([15.0, 10, 16, 11, 9, 11, 10, 18])


def irregular_data(seed=0):
    """3 tasks, P = 2, D = 2: per-observation designs, per-task noise, 3 / 1 / 2 observations."""
    rng = np.random.default_rng(seed)
    T, N, D, P = 3, 3, 2, 2
    design = rng.normal(size=(T, N, D, P))
    noise = np.array([[0.5, 1.0], [2.0, 0.3], [1.0, 1.0]])[:, None, :]  # (T, 1, D)
    mask = np.array([[1, 1, 1], [1, 0, 0], [1, 1, 0]], bool)
    obs = rng.normal(size=(T, N, D)) * 2 + 1
    obs[~mask] = np.nan  # padding may hold anything
    return linear.make_data(obs, design, noise, mask), (obs, design, noise, mask)


def dense_task(raw, t):
    """Stacked observed rows of task t: y (n*D,), A (n*D, P), noise variances (n*D,)."""
    obs, design, noise, mask = raw
    rows = np.flatnonzero(mask[t])
    y = obs[t, rows].reshape(-1)
    A = design[t, rows].reshape(-1, design.shape[-1])
    var = np.broadcast_to(noise[t], obs.shape[1:])[rows].reshape(-1) ** 2
    return y, A, var


def test_log_marginal_equals_dense_multivariate_normal():
    data, raw = irregular_data()
    phi, sd = np.array([0.3, -1.0]), np.array([1.5, 0.7])
    got = np.asarray(linear.log_marginal_likelihood(data, phi, sd))
    for t in range(3):
        y, A, var = dense_task(raw, t)
        want = stats.multivariate_normal(A @ phi, A @ np.diag(sd**2) @ A.T + np.diag(var)).logpdf(y)
        assert got[t] == pytest.approx(want, rel=1e-12)


def test_log_marginal_paper_domain(paper, paper_tasks):
    _, batch = paper_tasks
    data = linear.merge_splits(batch)
    got = np.asarray(linear.log_marginal_likelihood(data, paper.phi, paper.sigma))
    A = np.tile(paper.design, (8, 1))
    cov = A @ np.diag(paper.sigma**2) @ A.T + np.diag(np.tile(paper.noise_sd, 8) ** 2)
    want = stats.multivariate_normal(A @ paper.phi, cov).logpdf(np.asarray(data.obs).reshape(25, -1))
    np.testing.assert_allclose(got, want, rtol=1e-12)


def test_eight_schools_marginal_is_normal_with_inflated_variance():
    data = linear.make_data(EIGHT_SCHOOLS_Y[:, None, None], np.ones((1, 1)), EIGHT_SCHOOLS_SE[:, None, None])
    mu, tau = 4.4, 3.6
    got = np.asarray(linear.log_marginal_likelihood(data, [mu], [tau]))
    want = stats.norm(mu, np.sqrt(tau**2 + EIGHT_SCHOOLS_SE**2)).logpdf(EIGHT_SCHOOLS_Y)
    np.testing.assert_allclose(got, want, rtol=1e-12)


def test_posterior_and_predictive_equal_dense_gaussian_conditioning():
    data, raw = irregular_data(1)
    phi, sd = np.array([0.5, 2.0]), np.array([1.0, 3.0])
    mean, cov = linear.posterior(data, phi, sd)
    A_new, noise_new = np.array([[1.0, -1.0], [0.5, 2.0]]), np.array([0.2, 0.4])
    pred_mean, pred_cov = linear.posterior_predictive(data, phi, sd, A_new, noise_new)
    for t in range(3):
        y, A, var = dense_task(raw, t)
        S = np.diag(sd**2)
        C = A @ S @ A.T + np.diag(var)
        K = S @ A.T @ np.linalg.inv(C)  # Kalman gain
        m, V = phi + K @ (y - A @ phi), S - K @ A @ S
        np.testing.assert_allclose(mean[t], m, rtol=1e-10)
        np.testing.assert_allclose(cov[t], V, rtol=1e-10, atol=1e-14)
        np.testing.assert_allclose(pred_mean[t], A_new @ m, rtol=1e-10)
        np.testing.assert_allclose(pred_cov[t], A_new @ V @ A_new.T + np.diag(noise_new**2), rtol=1e-10)


@pytest.mark.parametrize("which", ["paper", "irregular"])
def test_inner_loop_converges_to_closed_form_map(which, paper, paper_model, paper_tasks):
    if which == "paper":
        data, model, phi, sigma, lr = paper_tasks[1].train, paper_model, paper.phi, paper.sigma, 0.3
    else:
        data, _ = irregular_data(2)
        model, phi, sigma, lr = linear.make_model(2), np.array([0.5, -0.5]), np.array([2.0, 1.0]), 0.02
    learner = hm.m_shrinkage(model, inner_optimizer=optax.sgd(lr), inner_steps=1)
    state = learner.init(jax.random.PRNGKey(0), jnp.asarray(phi), sigma=sigma)
    theta = jax.jit(learner.adapt, static_argnums=2)(state, data, 3000).theta
    want, _ = linear.posterior(data, phi, sigma)
    np.testing.assert_allclose(theta, want, rtol=1e-9, atol=1e-9)


def test_model_log_densities_match_scipy(paper, paper_model, paper_tasks):
    theta, batch = paper_tasks
    data_t = jax.tree_util.tree_map(lambda a: a[3], batch.train)
    log_prior, log_lik = paper_model.task_log_densities(theta[3], jnp.asarray(paper.phi), jnp.asarray(paper.sigma), data_t)
    assert float(log_prior) == pytest.approx(stats.norm(paper.phi, paper.sigma).logpdf(theta[3]).sum(), rel=1e-12)
    x = np.asarray(data_t.obs)
    want = stats.norm(np.asarray(theta[3]) @ paper.design.T, paper.noise_sd).logpdf(x).sum()
    assert float(log_lik) == pytest.approx(want, rel=1e-12)
    assert float(paper_model.log_likelihood(theta[3], data_t)) == pytest.approx(want, rel=1e-12)
    # generalisation loss = 1/2 sum_d (x - mu)^2 / xi^2 per observation
    resid = (x - np.asarray(theta[3]) @ paper.design.T) / paper.noise_sd
    loss = float(paper_model.generalisation_loss(theta[3], data_t))
    assert loss == pytest.approx(0.5 * np.sum(resid**2) / x.shape[0], rel=1e-12)


def test_generator_matches_the_marginal_distribution(paper):
    """Data drawn by sample_tasks have the model's marginal mean A phi and covariance A S A^T + Xi."""
    _, batch = linear.sample_tasks(paper, jax.random.PRNGKey(1), 20000)
    x = np.asarray(batch.train.obs[:, 0, :])  # first observation of each task
    cov = paper.design @ np.diag(paper.sigma**2) @ paper.design.T + np.diag(paper.noise_sd**2)
    se_mean = np.sqrt(np.diag(cov) / len(x))
    assert np.all(np.abs(x.mean(0) - paper.design @ paper.phi) < 4.5 * se_mean)
    se_cov = np.sqrt((np.outer(np.diag(cov), np.diag(cov)) + cov**2) / len(x))
    assert np.all(np.abs(np.cov(x.T) - cov) < 4.5 * se_cov)


def test_expected_loss_formulas_and_monte_carlo(paper, paper_model):
    A, W = paper.design, paper.design.T @ np.diag(paper.noise_sd**-2.0) @ paper.design
    # MLE: 1/2 (D + P / n); oracle: 1/2 (D + tr(W Lambda^-1))
    assert linear.expected_loss(paper, paper.phi, np.inf) == pytest.approx(0.5 * (9 + 8 / 4), rel=1e-12)
    lam = np.diag(paper.sigma**-2.0) + 4 * W
    oracle = 0.5 * (9 + np.trace(W @ np.linalg.inv(lam)))
    assert linear.expected_loss(paper, paper.phi, paper.sigma) == pytest.approx(oracle, rel=1e-12)
    # a mis-specified (phi, sigma): closed form against the mean loss over 40,000 simulated tasks
    phi_hat, sigma_hat = paper.phi + np.linspace(-1, 1, 8), np.full(8, 3.0)
    _, batch = linear.sample_tasks(paper, jax.random.PRNGKey(5), 40000)
    theta_hat, _ = linear.posterior(batch.train, phi_hat, sigma_hat)
    losses = np.asarray(jax.vmap(paper_model.generalisation_loss)(theta_hat, batch.val))
    want = linear.expected_loss(paper, phi_hat, sigma_hat)
    assert abs(losses.mean() - want) < 4 * losses.std() / np.sqrt(len(losses))


def test_type2_ml_recovers_phi_and_sigma(paper, paper_model):
    _, batch = linear.sample_tasks(paper, jax.random.PRNGKey(7), 4000)
    data = linear.merge_splits(batch)
    fit = linear.fit_type2_ml(data, paper_model)
    assert fit.converged, fit
    np.testing.assert_allclose(fit.sigma, paper.sigma, rtol=0.06)
    np.testing.assert_allclose(fit.phi, paper.phi, atol=0.5)  # se(phi_1..4) ~ 0.13
    # it is a maximum: the truth and small perturbations score lower
    total = lambda phi, sigma: float(jnp.sum(linear.log_marginal_likelihood(data, phi, sigma)))
    best = total(fit.phi, fit.sigma)
    assert best == pytest.approx(fit.log_marginal, rel=1e-12)
    assert best >= total(paper.phi, paper.sigma)
    for d in np.eye(8)[:2] * 0.05:
        assert best > total(fit.phi, fit.sigma * np.exp(d)) and best > total(fit.phi + d, fit.sigma)


def test_evaluate_step_zero_and_convergence_match_closed_forms(paper, paper_model, paper_tasks):
    """Loss at k = 0 is the loss at phi; after many steps it is the loss at the exact MAP."""
    _, batch = paper_tasks
    learner = hm.m_shrinkage(paper_model, inner_optimizer=optax.sgd(0.3), inner_steps=1)
    state = learner.init(jax.random.PRNGKey(0), jnp.asarray(paper.phi))
    state = state._replace(params=shrinkage_params(paper_model, paper.phi, paper.sigma))
    curve = hm.evaluate(learner, state, batch, 3000)
    task_loss = jax.vmap(paper_model.generalisation_loss)
    at_phi = task_loss(jnp.broadcast_to(jnp.asarray(paper.phi), (25, 8)), batch.val)
    at_map = task_loss(linear.posterior(batch.train, paper.phi, paper.sigma)[0], batch.val)
    np.testing.assert_allclose(curve.per_task[:, 0], at_phi, rtol=1e-12)
    np.testing.assert_allclose(curve.per_task[:, -1], at_map, rtol=1e-9)
    assert curve.mean[-1] == pytest.approx(float(np.mean(at_map)), rel=1e-9)
    assert np.all(curve.lower <= curve.mean) and np.all(curve.mean <= curve.upper)


def test_expected_eq4_gradient_matches_monte_carlo(paper, paper_model):
    sigma_hat = np.array([3.0, 5.0, 8.0, 12.0, 1.0, 2.0, 3.0, 4.0])
    _, batch = linear.sample_tasks(paper, jax.random.PRNGKey(11), 40000)
    theta_hat, _ = linear.posterior(batch.train, paper.phi, sigma_hat)
    g = jax.vmap(jax.grad(paper_model.log_likelihood))(theta_hat, batch.val)
    per_task = np.asarray((theta_hat - paper.phi) * g)
    se = per_task.std(0) / np.sqrt(len(per_task))
    assert np.all(np.abs(per_task.mean(0) - linear.expected_eq4_gradient(paper, sigma_hat)) < 4 * se)
    # the paper's claim for M-Shrinkage: Eq. 4's fixed point is the true sigma
    np.testing.assert_allclose(linear.expected_eq4_gradient(paper, paper.sigma), 0.0, atol=1e-12)
