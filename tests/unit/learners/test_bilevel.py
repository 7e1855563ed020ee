"""hiermeta/learners/bilevel.py: every (phi step, sigma step) combination on the linear domain.

The inner problem is solved exactly (Newton on a quadratic), so each step is checked against an
independent closed form: central finite differences of the exact mean PLL (``linear.posterior``'s
MAP) where the step is a PLL gradient; of the value function ``mean_t min_theta L_t`` where it is
the MAP step (the envelope theorem makes that a gradient); Reptile's step is that gradient times
sigma^2; Eq. 4 is no gradient, so it is checked against its formula ``mean_t (theta_hat - phi) * g``
and shown to differ from the exact one.
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import hiermeta as hm
from hiermeta.implicit import cg_solve
from hiermeta.learners import gaussian_prior_learner, shrinkage_params
from hiermeta.models import linear

SIGMA = np.array([3.0, 1.0, 2.0, 5.0, 0.8, 1.5, 2.5, 4.0])
PHI_SHIFT = np.linspace(-0.5, 0.5, 8)
CG = cg_solve(tol=1e-13, maxiter=50)
H = 1e-5


def rel_err(got, want):
    return float(np.linalg.norm(np.ravel(got) - np.ravel(want)) / np.linalg.norm(np.ravel(want)))


@pytest.fixture(scope="module")
def reference(paper, paper_model, paper_tasks):
    """Closed-form references at (phi, SIGMA): finite differences of the mean PLL and of the value function."""
    _, batch = paper_tasks
    params = shrinkage_params(paper_model, paper.phi + PHI_SHIFT, SIGMA)

    def theta_hat(p):
        return linear.posterior(batch.train, p["phi"], jnp.exp(0.5 * p["log_sigma2"]))[0]

    @jax.jit
    def pll(p):
        return jnp.mean(jax.vmap(paper_model.log_likelihood)(theta_hat(p), batch.val))

    @jax.jit
    def value(p):  # mean_t min_theta L_t(theta; phi, rho)
        sigma = jnp.exp(0.5 * p["log_sigma2"])
        losses = jax.vmap(lambda th, d: paper_model.inner_objective(th, p["phi"], sigma, d))(theta_hat(p), batch.train)
        return jnp.mean(losses)

    def central(f, key):
        return np.array([(float(f({**params, key: params[key].at[i].add(H)}))
                          - float(f({**params, key: params[key].at[i].add(-H)}))) / (2 * H) for i in range(8)])

    th = np.asarray(theta_hat(params))
    g = np.asarray(jax.vmap(jax.grad(paper_model.log_likelihood))(jnp.asarray(th), batch.val))
    return dict(params=params, batch=batch, pll_phi=central(pll, "phi"), pll_rho=central(pll, "log_sigma2"),
                value_phi=central(value, "phi"), eq4_rho=np.mean((th - np.asarray(params["phi"])) * g, axis=0))


@pytest.mark.parametrize("phi_step, sigma_step", list(itertools.product(("map", "reptile", "pll"),
                                                                       ("eq4", "exact", "fixed"))))
def test_each_combination_steps_along_its_closed_form(phi_step, sigma_step, paper_model, reference):
    learner = gaussian_prior_learner(
        paper_model, phi_step=phi_step, sigma_step=CG if sigma_step == "exact" else sigma_step,
        phi_hypergradient=CG if phi_step == "pll" else None, fixed_sigma=SIGMA if sigma_step == "fixed" else None,
        modular=True, outer_optimizer=optax.sgd(1.0))
    phi = reference["params"]["phi"]
    state = learner.init(jax.random.PRNGKey(0), phi, **({} if sigma_step == "fixed" else dict(sigma=SIGMA)))
    params = state.params
    # one compiled step: outer SGD at rate 1 moves the meta-parameters by minus the gradient it used
    new, info = jax.jit(learner.step)(state, reference["batch"])
    assert not bool(info.skipped)
    grads = jax.tree_util.tree_map(lambda a, b: np.asarray(a - b), params, new.params)
    # phi (to minimise)
    if phi_step == "pll":
        assert rel_err(-grads["phi"], reference["pll_phi"]) < 1e-6
    elif phi_step == "map":
        assert rel_err(grads["phi"], reference["value_phi"]) < 1e-6
    else:  # Reptile's step is the MAP gradient preconditioned by Sigma: -mean_t (theta_hat - phi)
        assert rel_err(grads["phi"], SIGMA**2 * reference["value_phi"]) < 1e-6
    # sigma
    if sigma_step == "exact":
        assert rel_err(-grads["log_sigma2"], reference["pll_rho"]) < 1e-6
    elif sigma_step == "eq4":
        assert rel_err(-grads["log_sigma2"], reference["eq4_rho"]) < 1e-9
        assert rel_err(reference["eq4_rho"], reference["pll_rho"]) > 0.1  # Eq. 4 is not the gradient here
    else:
        assert set(grads) == {"phi"}
    # it reports its solves and sigma's growth
    growth = np.zeros(8) if sigma_step == "fixed" else -0.5 * np.asarray(grads["log_sigma2"])  # sgd(1) on rho
    np.testing.assert_allclose(info.sigma_growth, growth, rtol=1e-10, atol=1e-14)
    if sigma_step == "fixed":
        np.testing.assert_allclose(info.sigma, SIGMA, rtol=1e-14)
        assert float(info.sigma_residual) == 0.0
    elif sigma_step == "exact":
        assert float(info.sigma_residual) < 1e-9
    else:  # Eq. 4's residual: how far the prior is from the inner Hessian
        assert float(info.sigma_residual) > 1e-2
    if phi_step != "pll" and sigma_step == "fixed":  # nothing to solve: no PLL term at all
        assert int(info.cg_iterations) == 0 and float(info.cg_residual) == 0.0


def test_one_solve_serves_both_steps_when_they_share_a_solver(paper_model, reference):
    """sigma-iMAML (one CG solve) equals the builder with the two steps' solvers given apart."""
    shared = hm.sigma_imaml(paper_model, hypergradient=CG, modular=True, outer_optimizer=optax.sgd(1.0))
    apart = gaussian_prior_learner(paper_model, phi_step="pll", phi_hypergradient=CG,
                                   sigma_step=cg_solve(tol=1e-13, maxiter=49), modular=True)
    g1, _ = jax.jit(shared.meta_gradient)(reference["params"], reference["batch"])
    g2, _ = jax.jit(apart.meta_gradient)(reference["params"], reference["batch"])
    for key in ("phi", "log_sigma2"):
        np.testing.assert_allclose(g1[key], g2[key], rtol=1e-8)


@pytest.mark.parametrize("kwargs, match", [
    (dict(phi_step="newton"), "phi_step"),
    (dict(sigma_step="cg"), "sigma_step"),
    (dict(sigma_step="fixed"), "fixed_sigma="),
    (dict(sigma_step="fixed", fixed_sigma=-1.0), "fixed sigma"),
    (dict(sigma_step="exact", fixed_sigma=1.0), "fixed_sigma is for"),
    (dict(phi_step="map", phi_hypergradient="exact"), "phi_hypergradient"),
    (dict(sigma_step="fixed", fixed_sigma=1.0, init_sigma=2.0), "init_sigma"),
])
def test_bad_combinations_are_refused_before_anything_compiles(kwargs, match, paper_model):
    with pytest.raises(ValueError, match=match):
        gaussian_prior_learner(paper_model, **kwargs)


def test_phi_sigma_optimizer_steps_phi_and_sigma_at_their_own_rates(paper_model, reference):
    opt = hm.learners.phi_sigma_optimizer(optax.sgd(2.0), optax.sgd(0.5))
    params = reference["params"]
    grads = jax.tree_util.tree_map(jnp.ones_like, params)
    updates, _ = opt.update(grads, opt.init(params), params)
    np.testing.assert_allclose(updates["phi"], -2.0)
    np.testing.assert_allclose(updates["log_sigma2"], -0.5)
