"""The Eq. 4 hypergradient and the phi step of Algorithm 1 against independent formulas."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import hiermeta as hm
from hiermeta.implicit import eq4_solve, hessian_vector_product, implicit_vjp
from hiermeta.learners import shrinkage_params
from hiermeta.models import linear


def independent_terms(paper, batch, phi, sigma):
    """NumPy: closed-form MAP theta_hat, g = grad log p(D_val | theta_hat), per task."""
    A, xi2 = paper.design, paper.noise_sd**2
    F = paper.n_train * A.T @ np.diag(1 / xi2) @ A
    x_tr, x_val = np.asarray(batch.train.obs), np.asarray(batch.val.obs)
    theta_hat = np.linalg.solve(np.diag(sigma**-2) + F, (phi / sigma**2)[:, None] + A.T @ (x_tr / xi2).sum(1).T).T
    g = ((x_val - (theta_hat @ A.T)[:, None, :]) / xi2).sum(1) @ A
    return theta_hat, g


@pytest.mark.parametrize("modular", [True, False])
def test_meta_step_applies_eq4_and_the_map_phi_gradient(modular, paper, paper_model, paper_tasks):
    """With outer SGD at lr 1 the step moves (phi, rho) by exactly minus the gradients it used."""
    _, batch = paper_tasks
    phi = paper.phi + np.linspace(-0.5, 0.5, 8)
    sigma = np.array([3.0, 1.0, 2.0, 5.0, 0.8, 1.5, 2.5, 4.0]) if modular else np.full(8, 2.5)
    learner = hm.shrinkage(paper_model, inner_optimizer=optax.sgd(0.3), inner_steps=2000,
                           outer_optimizer=optax.sgd(1.0), modular=modular)
    state = learner.init(jax.random.PRNGKey(0), jnp.asarray(phi), sigma=sigma)
    new, metrics = jax.jit(learner.step)(state, batch)
    assert not bool(metrics.skipped)

    theta_hat, g = independent_terms(paper, batch, phi, sigma)
    eq4 = np.mean((theta_hat - phi) * g, axis=0)  # dPLL/d log sigma_m^2, per coordinate
    eq4 = eq4 if modular else eq4.sum(keepdims=True)
    map_phi_grad = -np.mean((theta_hat - phi) / sigma**2, axis=0)  # d L / d phi
    np.testing.assert_allclose(new.params["log_sigma2"] - state.params["log_sigma2"], eq4, rtol=1e-8)
    np.testing.assert_allclose(state.params["phi"] - new.params["phi"], map_phi_grad, rtol=1e-8)


def test_eq4_solver_and_vjp_give_the_paper_formula(paper, paper_model, paper_tasks):
    """Per task, -(d2L/dtheta drho)^T sigma^2 g = (theta_hat - phi) . g, and the phi part is g."""
    _, batch = paper_tasks
    phi, sigma = jnp.asarray(paper.phi), jnp.asarray(paper.sigma)
    theta_hat, g = independent_terms(paper, batch, paper.phi, paper.sigma)
    data_t = jax.tree_util.tree_map(lambda a: a[0], batch.train)
    params = shrinkage_params(paper_model, phi, sigma)

    def inner_grad(theta, p):
        return jax.grad(paper_model.inner_objective)(theta, p["phi"], jnp.exp(0.5 * p["log_sigma2"]), data_t)

    v = eq4_solve(None, sigma**2, jnp.asarray(g[0]))
    hyper = implicit_vjp(inner_grad, jnp.asarray(theta_hat[0]), params, v)
    np.testing.assert_allclose(hyper["log_sigma2"], (theta_hat[0] - paper.phi) * g[0], rtol=1e-10)
    np.testing.assert_allclose(hyper["phi"], g[0], rtol=1e-10)


def test_implicit_vjp_with_the_exact_hessian_equals_the_closed_form_derivative(paper, paper_model, paper_tasks):
    """Same layer, v = H^{-1} g solved densely: matches autodiff of PLL through the closed-form MAP."""
    _, batch = paper_tasks
    one = lambda tree: jax.tree_util.tree_map(lambda a: a[:1], tree)
    train, val = one(batch.train), one(batch.val)
    phi0, rho0 = jnp.asarray(paper.phi) + 0.3, jnp.log(jnp.asarray(paper.sigma) ** 2) - 0.5

    def pll(phi, rho):
        theta_hat, _ = linear.posterior(train, phi, jnp.exp(0.5 * rho))
        return paper_model.log_likelihood(theta_hat[0], jax.tree_util.tree_map(lambda a: a[0], val))

    want_phi, want_rho = jax.grad(pll, argnums=(0, 1))(phi0, rho0)

    train_t, val_t = (jax.tree_util.tree_map(lambda a: a[0], d) for d in (train, val))
    params = {"phi": phi0, "log_sigma2": rho0}

    def inner_grad(theta, p):
        return jax.grad(paper_model.inner_objective)(theta, p["phi"], jnp.exp(0.5 * p["log_sigma2"]), train_t)

    theta_hat = linear.posterior(train, phi0, jnp.exp(0.5 * rho0))[0][0]
    np.testing.assert_allclose(inner_grad(theta_hat, params), 0.0, atol=1e-10)  # optimality
    hvp = hessian_vector_product(inner_grad, theta_hat, params)
    H = jax.vmap(hvp)(jnp.eye(8))
    g = jax.grad(paper_model.log_likelihood)(theta_hat, val_t)
    hyper = implicit_vjp(inner_grad, theta_hat, params, jnp.linalg.solve(H, g))
    np.testing.assert_allclose(hyper["phi"], want_phi, rtol=1e-9)
    np.testing.assert_allclose(hyper["log_sigma2"], want_rho, rtol=1e-9)
