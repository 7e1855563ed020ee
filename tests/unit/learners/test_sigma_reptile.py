"""hiermeta/learners/sigma_reptile.py on the linear domain: its two steps against closed forms, its
sigma step's fixed point against the closed-form PLL optimum (and Eq. 4's root for the Eq. 4
variant), and Reptile as sigma -> inf."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from scipy.optimize import brentq, minimize_scalar

import hiermeta as hm
from hiermeta.implicit import cg_solve
from hiermeta.learners import phi_sigma_optimizer
from hiermeta.models import linear

SIGMA = np.array([3.0, 1.0, 2.0, 5.0, 0.8, 1.5, 2.5, 4.0])
CG = cg_solve(tol=1e-13, maxiter=50)


def closed_form_pll(paper_model, batch):
    """Mean PLL at the closed-form MAP, as a function of (phi, log sigma^2 per module)."""
    def pll(phi, log_sigma2):
        theta_hat, _ = linear.posterior(batch.train, phi, jnp.broadcast_to(jnp.exp(0.5 * log_sigma2), (8,)))
        return jnp.mean(jax.vmap(paper_model.log_likelihood)(theta_hat, batch.val))
    return pll


def test_phi_takes_reptiles_step_and_sigma_the_exact_pll_gradient(paper, paper_model, paper_tasks):
    _, batch = paper_tasks
    beta = 0.7
    learner = hm.learners.m_sigma_reptile(paper_model, hypergradient=CG,
                                 outer_optimizer=phi_sigma_optimizer(optax.sgd(beta), optax.sgd(1.0)))
    phi = jnp.asarray(paper.phi + np.linspace(-0.5, 0.5, 8))
    state = learner.init(jax.random.PRNGKey(0), phi, sigma=SIGMA)
    new, info = jax.jit(learner.step)(state, batch)
    assert not bool(info.skipped) and float(info.sigma_residual) < 1e-9
    theta_hat, _ = linear.posterior(batch.train, phi, jnp.asarray(SIGMA))
    want = beta * np.mean(theta_hat - phi, axis=0)
    assert np.linalg.norm(new.params["phi"] - phi - want) / np.linalg.norm(want) < 1e-9
    pll = jax.jit(closed_form_pll(paper_model, batch))
    rho, h = state.params["log_sigma2"], 1e-5
    fd = np.array([(float(pll(phi, rho.at[i].add(h))) - float(pll(phi, rho.at[i].add(-h)))) / (2 * h) for i in range(8)])
    moved = np.asarray(new.params["log_sigma2"] - rho)
    assert np.linalg.norm(moved - fd) / np.linalg.norm(fd) < 1e-6


@pytest.mark.parametrize("hypergradient", ["exact", "eq4"])
def test_sigma_step_fixed_point_is_the_closed_form_one(hypergradient, paper, paper_model):
    """At phi = the truth (where Reptile's step vanishes in expectation: E theta_hat = phi), the root in
    one shared sigma of the mean sigma step on 4000 tasks equals the root of the closed-form gradient
    on the same tasks (autodiff through the exact MAP for "exact"; mean_t (theta_hat - phi) . g for Eq. 4)
    to 1e-6, and the population fixed point (the PLL optimum 6.21 of ``linear.expected_loss``; Eq. 4's
    root 5.39 of ``linear.expected_eq4_gradient``) up to sampling error."""
    _, batch = linear.sample_tasks(paper, jax.random.PRNGKey(7), 4000)
    phi = jnp.asarray(paper.phi)
    learner = hm.learners.sigma_reptile(paper_model, hypergradient=CG if hypergradient == "exact" else "eq4")
    step = jax.jit(lambda r: learner.meta_gradient({"phi": phi, "log_sigma2": r[None]}, batch)[0])

    def closed(r):
        theta_hat, _ = linear.posterior(batch.train, phi, jnp.full(8, jnp.exp(0.5 * r)))
        if hypergradient == "exact":
            return jax.grad(lambda r: closed_form_pll(paper_model, batch)(phi, jnp.full(8, r)))(r)
        g = jax.vmap(jax.grad(paper_model.log_likelihood))(theta_hat, batch.val)
        return jnp.mean(jnp.sum((theta_hat - phi) * g, axis=1))

    closed = jax.jit(closed)
    root = lambda f: float(np.exp(0.5 * brentq(f, 2 * np.log(2.0), 2 * np.log(20.0), xtol=1e-12)))
    learned = root(lambda r: -float(step(jnp.asarray(r))["log_sigma2"][0]))
    exact = root(lambda r: float(closed(jnp.asarray(r))))
    assert learned == pytest.approx(exact, rel=1e-6)
    if hypergradient == "exact":
        population = np.exp(minimize_scalar(lambda ls: linear.expected_loss(paper, paper.phi, np.exp(ls)),
                                            bounds=(0.0, 4.0), method="bounded").x)
        assert population == pytest.approx(6.21, abs=0.01)
    else:
        population = np.exp(brentq(lambda ls: linear.expected_eq4_gradient(paper, np.exp(ls)).sum(), 0.0, 4.0))
        assert population == pytest.approx(5.39, abs=0.01)
    assert learned == pytest.approx(population, rel=0.1)
    # and Reptile's phi step vanishes there up to sampling error (4 standard errors per coordinate)
    move = np.asarray(step(jnp.asarray(2 * np.log(learned)))["phi"])
    theta_hat, _ = linear.posterior(batch.train, phi, jnp.full(8, learned))
    se = np.std(np.asarray(theta_hat - phi), axis=0, ddof=1) / np.sqrt(4000)
    assert np.all(np.abs(move) < 4 * se), (move, se)


@pytest.mark.parametrize("sigma, close", [(1e6, True), (3.0, False)])
def test_sigma_reptile_is_reptile_as_sigma_goes_to_infinity(sigma, close, one_step, paper_model, paper_tasks):
    _, batch = paper_tasks
    beta, inner = 0.7, optax.sgd(0.2)
    phi = jnp.linspace(-1.0, 2.0, 8)
    rep = hm.reptile(paper_model, inner_optimizer=inner, inner_steps=10, outer_optimizer=optax.sgd(beta))
    srep = hm.learners.sigma_reptile(paper_model, inner_optimizer=inner, inner_steps=10, init_sigma=sigma,
                            outer_optimizer=phi_sigma_optimizer(optax.sgd(beta), optax.set_to_zero()))
    reptile_move = -one_step(rep, rep.init(jax.random.PRNGKey(0), phi), batch)["phi"]
    sigma_reptile_move = -one_step(srep, srep.init(jax.random.PRNGKey(0), phi), batch)["phi"]
    if close:
        np.testing.assert_allclose(sigma_reptile_move, reptile_move, rtol=1e-6)
    else:
        assert np.max(np.abs(sigma_reptile_move - reptile_move)) > 1e-2
