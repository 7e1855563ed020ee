"""Exact implicit hypergradients (conjugate gradient on Hessian-vector products) against exact answers.

References: dense solves of H v = g, the closed-form MAP of the linear domain (differentiated by
autodiff), central finite differences of PLL(phi, log sigma^2) with the inner problem solved to
convergence (Newton on a small non-linear model), and the Appendix B toy.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from scipy.optimize import brentq, minimize_scalar

import hiermeta as hm
from hiermeta.implicit import (
    cg_solve,
    eq4_solve,
    hessian_vector_product,
    implicit_hypergradient,
    implicit_solution,
    solve_with_info,
)
from hiermeta.learners import shrinkage_params
from hiermeta.models import linear

SIGMA = np.array([3.0, 1.0, 2.0, 5.0, 0.8, 1.5, 2.5, 4.0])  # distinct per module: 8 distinct curvatures
PHI_SHIFT = np.linspace(-0.5, 0.5, 8)


def rel_err(got, want):
    return float(np.linalg.norm(np.ravel(got) - np.ravel(want)) / np.linalg.norm(np.ravel(want)))


def first(tree, t=0):
    return jax.tree_util.tree_map(lambda a: a[t], tree)


def inner_grad_fn(model, data_t):
    def inner_grad(theta, p):
        return jax.grad(model.inner_objective)(theta, p["phi"], jnp.exp(0.5 * p["log_sigma2"]), data_t)

    return inner_grad


# ---------------------------------------------------------------------------- the linear solve


@pytest.fixture(scope="module")
def linear_system(paper, paper_model, paper_tasks):
    """Per task of the paper's domain: closed-form theta_hat, dense H, g, and the HVP ingredients."""
    _, batch = paper_tasks
    phi = jnp.asarray(paper.phi + PHI_SHIFT)
    params = shrinkage_params(paper_model, phi, SIGMA)
    theta_hat, _ = linear.posterior(batch.train, phi, jnp.asarray(SIGMA))
    g = jax.vmap(jax.grad(paper_model.log_likelihood))(theta_hat, batch.val)

    @jax.jit
    def dense_hessians(theta_hat, train):
        def one(th, d):
            return jax.vmap(hessian_vector_product(inner_grad_fn(paper_model, d), th, params))(jnp.eye(8))

        return jax.vmap(one)(theta_hat, train)

    return dict(params=params, theta_hat=theta_hat, g=g, H=np.asarray(dense_hessians(theta_hat, batch.train)),
                train=batch.train, val=batch.val)


def run_solver(paper_model, system, solver):
    params = system["params"]

    @jax.jit
    def solve_all(theta_hat, g, train):
        def one(th, g_t, d):
            hvp = hessian_vector_product(inner_grad_fn(paper_model, d), th, params)
            return solve_with_info(solver, hvp, jnp.asarray(SIGMA**2), g_t)

        return jax.vmap(one)(theta_hat, g, train)

    return solve_all(system["theta_hat"], system["g"], system["train"])


@pytest.mark.parametrize(
    "solver",
    [cg_solve(), cg_solve(precondition=False), cg_solve(backend="jax"), cg_solve(damping=0.3, tol=1e-12)],
    ids=["scan-preconditioned", "scan-plain", "jax-scipy-cg", "damped"],
)
def test_cg_equals_the_dense_solve(solver, paper_model, linear_system):
    v, info = run_solver(paper_model, linear_system, solver)
    H, g = linear_system["H"], np.asarray(linear_system["g"])
    np.testing.assert_allclose(H, np.swapaxes(H, 1, 2), rtol=1e-12, atol=1e-14)  # symmetric HVPs
    want = np.linalg.solve(H + solver.damping * np.eye(8), g[..., None])[..., 0]
    assert max(rel_err(v[t], want[t]) for t in range(len(want))) < 1e-8
    # diagnostics: the reported residual is the dense relative residual of the undamped system
    dense_residual = np.linalg.norm(np.einsum("tpq,tq->tp", H, v) - g, axis=1) / np.linalg.norm(g, axis=1)
    np.testing.assert_allclose(info.residual, dense_residual, rtol=1e-6, atol=1e-14)
    if solver.damping == 0:
        assert np.all(info.residual < 1e-9)
    else:
        assert np.all(info.residual > 1e-3)  # damping biases the solution, and says so
    if solver.backend == "scan":
        # stopped by the tolerance, not the budget (P = 8: exact arithmetic needs <= 8 iterations)
        assert np.all((info.iterations >= 1) & (info.iterations < solver.maxiter)), info.iterations
    else:
        assert np.all(info.iterations == -1)


@pytest.mark.parametrize("precondition", [True, False])
def test_truncated_cg_is_the_krylov_minimiser(precondition, paper_model, linear_system):
    """k CG iterations give argmin of ||x - H^{-1} g||_H over the (preconditioned) Krylov space."""
    k = 2
    v, info = run_solver(paper_model, linear_system, cg_solve(tol=0.0, maxiter=k, precondition=precondition))
    assert np.all(info.iterations == k)
    H, g = linear_system["H"], np.asarray(linear_system["g"])
    Minv = np.diag(SIGMA**2) if precondition else np.eye(8)
    for t in range(4):
        basis = [Minv @ g[t]]
        for _ in range(k - 1):
            basis.append(Minv @ H[t] @ basis[-1])
        B = np.stack(basis, axis=1)
        want = B @ np.linalg.solve(B.T @ H[t] @ B, B.T @ g[t])
        np.testing.assert_allclose(v[t], want, rtol=1e-8)
        assert info.residual[t] > 1e-4  # not yet converged after 2 of up to 8 iterations


def test_eq4_reports_zero_iterations_and_its_residual(paper_model, linear_system):
    v, info = run_solver(paper_model, linear_system, eq4_solve)
    np.testing.assert_allclose(v, SIGMA**2 * np.asarray(linear_system["g"]), rtol=1e-14)
    assert np.all(info.iterations == 0)
    H, g = linear_system["H"], np.asarray(linear_system["g"])
    dense = np.linalg.norm(np.einsum("tpq,tq->tp", H, v) - g, axis=1) / np.linalg.norm(g, axis=1)
    np.testing.assert_allclose(info.residual, dense, rtol=1e-8)


# ---------------------------------------------------------------------------- hypergradients, linear


def test_both_paths_equal_the_closed_form_derivative_and_finite_differences(paper, paper_model, paper_tasks):
    """Explicit path and custom_vjp path, after K = 3000 inner SGD steps, against autodiff through the
    closed-form MAP and against central differences of PLL (closed-form MAP): rel. error < 1e-6."""
    _, batch = paper_tasks
    params = shrinkage_params(paper_model, paper.phi + PHI_SHIFT, SIGMA)

    def pll_exact(p):
        theta_hat, _ = linear.posterior(batch.train, p["phi"], jnp.exp(0.5 * p["log_sigma2"]))
        return jnp.sum(jax.vmap(paper_model.log_likelihood)(theta_hat, batch.val))

    def inner_solve(p, d):
        loss = lambda th, d: paper_model.inner_objective(th, p["phi"], jnp.exp(0.5 * p["log_sigma2"]), d)
        return hm.inner.run_inner(hm.inner.InnerProblem(p["phi"], loss, optax.sgd(0.3)), d, 3000).theta

    inner_grad = lambda th, p, d: inner_grad_fn(paper_model, d)(th, p)
    solution = implicit_solution(inner_solve, inner_grad, lambda p: paper_model.partition.expand(jnp.exp(p["log_sigma2"])))

    def pll_implicit(p):
        return jnp.sum(jax.vmap(lambda tr, va: paper_model.log_likelihood(solution(p, tr), va))(batch.train, batch.val))

    def explicit(p):
        theta_hat = jax.vmap(lambda d: inner_solve(p, d))(batch.train)
        g = jax.vmap(jax.grad(paper_model.log_likelihood))(theta_hat, batch.val)
        prior_var = paper_model.partition.expand(jnp.exp(p["log_sigma2"]))
        hyper, info = jax.vmap(
            lambda th, g_t, d: implicit_hypergradient(inner_grad_fn(paper_model, d), th, p, g_t, prior_var, cg_solve())
        )(theta_hat, g, batch.train)
        return jax.tree_util.tree_map(lambda a: a.sum(0), hyper), info

    @jax.jit
    def everything(p):
        return jax.grad(pll_exact)(p), jax.grad(pll_implicit)(p), explicit(p)

    want, via_custom_vjp, (via_explicit, info) = everything(params)
    assert np.all(info.residual < 1e-9) and np.all(info.iterations < 20)
    pll_fn = jax.jit(pll_exact)
    for key in ("phi", "log_sigma2"):
        assert rel_err(via_custom_vjp[key], want[key]) < 1e-6, key
        assert rel_err(via_explicit[key], want[key]) < 1e-6, key
        # central differences, coordinate by coordinate
        h = 1e-5
        fd = np.array([(float(pll_fn({**params, key: params[key].at[i].add(h)}))
                        - float(pll_fn({**params, key: params[key].at[i].add(-h)}))) / (2 * h) for i in range(8)])
        assert rel_err(want[key], fd) < 1e-6, key


# ---------------------------------------------------------------------------- a non-linear model


def nonlinear_mean(theta, x):
    return (theta["amp"][0] * jnp.tanh(theta["shape"][0] * x + theta["shape"][1]))[:, None]


@pytest.fixture(scope="module")
def nonlinear():
    """y = a tanh(w x + b) + noise, modules {a} and {w, b}; 4 tasks, 6 + 6 observations."""
    part = hm.ModulePartition.per_leaf({"amp": jnp.zeros(1), "shape": jnp.zeros(2)})
    model = hm.HierarchicalModel(hm.GaussianLikelihood(nonlinear_mean), part)
    rng = np.random.default_rng(0)
    T = 4
    theta = np.array([1.5, 0.8, 0.2]) + np.array([0.5, 0.3, 0.3]) * rng.normal(size=(T, 3))

    def split(n):
        x = rng.uniform(-2, 2, size=(T, n))
        mu = theta[:, :1] * np.tanh(theta[:, 1:2] * x + theta[:, 2:3])
        return hm.GaussianData.create((mu + 0.3 * rng.normal(size=(T, n)))[..., None], 0.3, inputs=x)

    return model, hm.TaskBatch(split(6), split(6))


def test_nonlinear_hypergradient_matches_finite_differences(nonlinear):
    model, batch = nonlinear
    params = {"phi": jnp.array([1.2, 1.0, 0.0]), "log_sigma2": jnp.log(jnp.array([0.6, 0.4]) ** 2)}
    loss = lambda th, p, d: model.inner_objective(th, p["phi"], jnp.exp(0.5 * p["log_sigma2"]), d)

    def newton(p, d):
        """500 SGD steps from phi, then 20 Newton steps: the inner optimum to machine precision."""
        theta = hm.inner.run_inner(hm.inner.InnerProblem(p["phi"], lambda th, d: loss(th, p, d), optax.sgd(0.01)), d, 500).theta
        step = lambda _, th: th - jnp.linalg.solve(jax.hessian(loss)(th, p, d), jax.grad(loss)(th, p, d))
        return jax.lax.fori_loop(0, 20, step, theta)

    prior_var = lambda p: model.partition.expand(jnp.exp(p["log_sigma2"]))
    solution = implicit_solution(newton, jax.grad(loss), prior_var, cg_solve(tol=1e-12))

    def pll(p, solve):
        return jnp.sum(jax.vmap(lambda tr, va: model.log_likelihood(solve(p, tr), va))(batch.train, batch.val))

    @jax.jit
    def everything(p):
        theta_hat = jax.vmap(lambda d: newton(p, d))(batch.train)
        g = jax.vmap(jax.grad(model.log_likelihood))(theta_hat, batch.val)
        explicit, info = jax.vmap(
            lambda th, g_t, d: implicit_hypergradient(lambda t, m: jax.grad(loss)(t, m, d), th, p, g_t, prior_var(p),
                                                      cg_solve(tol=1e-12))
        )(theta_hat, g, batch.train)
        optimality = jax.vmap(lambda th, d: jax.grad(loss)(th, p, d))(theta_hat, batch.train)
        return (jax.grad(lambda p: pll(p, solution))(p), jax.tree_util.tree_map(lambda a: a.sum(0), explicit),
                info, optimality)

    via_custom_vjp, via_explicit, info, optimality = everything(params)
    assert float(jnp.max(jnp.abs(optimality))) < 1e-12
    assert np.all(info.residual < 1e-11)
    pll_fn = jax.jit(lambda p: pll(p, newton))
    h = 1e-5
    for key, size in (("phi", 3), ("log_sigma2", 2)):
        fd = np.array([(float(pll_fn({**params, key: params[key].at[i].add(h)}))
                        - float(pll_fn({**params, key: params[key].at[i].add(-h)}))) / (2 * h) for i in range(size)])
        assert rel_err(via_custom_vjp[key], fd) < 1e-6, (key, via_custom_vjp[key], fd)
        assert rel_err(via_explicit[key], fd) < 1e-6, key


# ---------------------------------------------------------------------------- learners


def closed_form_mean_pll(paper_model, batch):
    def pll(phi, log_sigma2):
        theta_hat, _ = linear.posterior(batch.train, phi, jnp.broadcast_to(jnp.exp(0.5 * log_sigma2), (8,)))
        return jnp.mean(jax.vmap(paper_model.log_likelihood)(theta_hat, batch.val))

    return jax.jit(jax.grad(pll, argnums=(0, 1)))


@pytest.mark.parametrize("modular", [True, False])
def test_sigma_imaml_step_is_the_closed_form_hypergradient(modular, paper, paper_model, paper_tasks):
    """Outer SGD at lr 1: (phi, rho) move by exactly the mean closed-form PLL gradient."""
    _, batch = paper_tasks
    sigma = SIGMA if modular else np.full(8, 2.5)
    learner = hm.sigma_imaml(paper_model, inner_optimizer=optax.sgd(0.3), inner_steps=3000,
                             outer_optimizer=optax.sgd(1.0), modular=modular)
    state = learner.init(jax.random.PRNGKey(0), jnp.asarray(paper.phi + PHI_SHIFT), sigma=sigma)
    new, metrics = jax.jit(learner.step)(state, batch)
    assert not bool(metrics.skipped)
    assert 1 <= int(metrics.cg_iterations) < 20 and float(metrics.cg_residual) < 1e-9
    want_phi, want_rho = closed_form_mean_pll(paper_model, batch)(state.params["phi"], state.params["log_sigma2"])
    assert rel_err(new.params["phi"] - state.params["phi"], want_phi) < 1e-6
    assert rel_err(new.params["log_sigma2"] - state.params["log_sigma2"], want_rho) < 1e-6


def test_shrinkage_exact_option_uses_the_exact_sigma_gradient_and_the_map_phi_step(paper, paper_model, paper_tasks):
    _, batch = paper_tasks
    learner = hm.m_shrinkage(paper_model, inner_optimizer=optax.sgd(0.3), inner_steps=3000,
                             outer_optimizer=optax.sgd(1.0), hypergradient="exact")
    state = learner.init(jax.random.PRNGKey(0), jnp.asarray(paper.phi + PHI_SHIFT), sigma=SIGMA)
    new, metrics = jax.jit(learner.step)(state, batch)
    _, want_rho = closed_form_mean_pll(paper_model, batch)(state.params["phi"], state.params["log_sigma2"])
    assert rel_err(new.params["log_sigma2"] - state.params["log_sigma2"], want_rho) < 1e-6
    theta_hat, _ = linear.posterior(batch.train, state.params["phi"], jnp.asarray(SIGMA))
    map_step = np.mean((theta_hat - state.params["phi"]) / SIGMA**2, axis=0)  # -dL/dphi
    assert rel_err(new.params["phi"] - state.params["phi"], map_step) < 1e-6
    assert float(metrics.cg_residual) < 1e-9


def test_imaml_meta_gradient_is_the_dense_formula(paper, paper_model, paper_tasks):
    """phi moves by mean_t (I + H_t / lambda)^{-1} g_t, H_t the training-likelihood Hessian (dense)."""
    _, batch = paper_tasks
    lam = 0.05
    learner = hm.imaml(paper_model, lam=lam, inner_optimizer=optax.sgd(0.3), inner_steps=3000,
                       outer_optimizer=optax.sgd(1.0))
    phi = jnp.asarray(paper.phi + PHI_SHIFT)
    state = learner.init(jax.random.PRNGKey(0), phi)
    assert set(state.params) == {"phi"}
    new, metrics = jax.jit(learner.step)(state, batch)
    np.testing.assert_allclose(metrics.sigma, np.full(8, lam**-0.5), rtol=1e-12)
    theta_hat, _ = linear.posterior(batch.train, phi, jnp.full(8, lam**-0.5))
    g = np.asarray(jax.vmap(jax.grad(paper_model.log_likelihood))(theta_hat, batch.val))
    H_lik = np.asarray(jax.vmap(jax.hessian(lambda th, d: -paper_model.log_likelihood(th, d)))(theta_hat, batch.train))
    want = np.mean(np.linalg.solve(np.eye(8) + H_lik / lam, g[..., None])[..., 0], axis=0)
    assert rel_err(new.params["phi"] - phi, want) < 1e-6
    # and it is not first-order MAML (mean g) on this domain
    assert rel_err(g.mean(0), want) > 0.1


# ---------------------------------------------------------------------------- Appendix B


def test_appendix_b_exact_and_eq4_sigma_gradients_share_their_root():
    """1-D toy (N = K = 5, sigma_true^2 = 2.25, 20,000 tasks): the CG gradient is Eq. 4's times
    1 / (1 + N sigma^2) task by task, so both mean gradients vanish at the same sigma^2."""
    N = 5
    domain = linear.LinearDomain(phi=np.array([0.7]), sigma=np.array([1.5]), design=np.ones((1, 1)),
                                 noise_sd=np.ones(1), n_train=N, n_val=N)
    _, batch = linear.sample_tasks(domain, jax.random.PRNGKey(0), 20_000)
    model = linear.make_model(1)
    phi = jnp.asarray([float(np.mean(batch.train.obs))])

    @jax.jit
    def gradients(log_s2, batch):
        params = {"phi": phi, "log_sigma2": log_s2[None]}
        theta_hat, _ = linear.posterior(batch.train, phi, jnp.exp(0.5 * log_s2)[None])

        def per_task(th, train_t, val_t):
            g = jax.grad(model.log_likelihood)(th, val_t)
            terms = [implicit_hypergradient(inner_grad_fn(model, train_t), th, params, g, jnp.exp(log_s2)[None], s)[0]
                     for s in (cg_solve(), eq4_solve)]
            return [t["log_sigma2"][0] for t in terms]

        exact, eq4 = jax.vmap(per_task)(theta_hat, batch.train, batch.val)
        return exact, eq4

    for sigma2 in (0.5, 3.0):
        exact, eq4 = gradients(jnp.log(sigma2), batch)
        np.testing.assert_allclose(exact, eq4 / (1 + N * sigma2), rtol=1e-9, atol=1e-14)
    roots = [np.exp(brentq(lambda r: float(jnp.mean(gradients(jnp.asarray(r), batch)[i])), np.log(0.2), np.log(20.0),
                           xtol=1e-12)) for i in (0, 1)]
    assert roots[0] == pytest.approx(roots[1], rel=1e-8)
    assert roots[0] == pytest.approx(2.25, abs=0.15)  # the truth, up to sampling (se ~0.05)


# ---------------------------------------------------------------------------- end to end, and bad input


def test_shrinkage_with_the_exact_hypergradient_reaches_the_pll_optimum(paper, paper_model):
    """One shared sigma: Eq. 4 stops at 5.39 (closed form); the exact gradient must go to the PLL optimum 6.21."""
    steps = 1500
    learner = hm.shrinkage(paper_model, inner_optimizer=optax.sgd(0.3), inner_steps=200, hypergradient="exact",
                           outer_optimizer=optax.adam(optax.cosine_decay_schedule(0.03, steps, alpha=0.1)))
    state = learner.init(jax.random.PRNGKey(0), jnp.zeros(8))
    sample = lambda key: linear.sample_tasks(paper, key, 25)[1]
    state, history = hm.fit(learner, state, sample, steps, data_key=jax.random.PRNGKey(1), progress=False)
    assert int(state.num_skipped) == 0
    assert np.all(history["cg_iterations"] < 20) and np.max(history["cg_residual"]) < 1e-6
    learned = float(np.exp(0.5 * state.params["log_sigma2"][0]))
    optimum = np.exp(minimize_scalar(lambda ls: linear.expected_loss(paper, paper.phi, np.exp(ls)),
                                     bounds=(0.0, 4.0), method="bounded").x)
    eq4_root = np.exp(brentq(lambda ls: linear.expected_eq4_gradient(paper, np.exp(ls)).sum(), 0.0, 4.0))
    assert optimum == pytest.approx(6.21, abs=0.01) and eq4_root == pytest.approx(5.39, abs=0.01)
    assert learned == pytest.approx(optimum, rel=0.06), learned


@pytest.mark.parametrize(
    "kwargs, match",
    [(dict(damping=-1.0), "damping"), (dict(damping=np.inf), "damping"), (dict(tol=-1e-3), "tol"),
     (dict(maxiter=0), "maxiter"), (dict(maxiter=2.5), "maxiter"), (dict(backend="while"), "backend")],
)
def test_bad_solver_configuration(kwargs, match):
    with pytest.raises(ValueError, match=match):
        cg_solve(**kwargs)


def test_bad_learner_configuration(paper_model):
    sgd = optax.sgd(0.1)
    for lam in (0.0, -1.0, np.nan, np.inf):
        with pytest.raises(ValueError, match="lam"):
            hm.imaml(paper_model, lam=lam, inner_optimizer=sgd, inner_steps=5)
    with pytest.raises(ValueError, match="hypergradient"):
        hm.sigma_imaml(paper_model, inner_optimizer=sgd, inner_steps=5, hypergradient="newton")
    with pytest.raises(ValueError, match="init_sigma"):
        hm.m_sigma_imaml(paper_model, inner_optimizer=sgd, inner_steps=5, init_sigma=-1.0)
    learner = hm.imaml(paper_model, lam=1.0, inner_optimizer=sgd, inner_steps=5)
    with pytest.raises(ValueError, match="fixed sigma"):
        learner.init(jax.random.PRNGKey(0), jnp.zeros(8), sigma=2.0)


def test_imaml_runs_through_fit_and_evaluate(paper, paper_model, paper_tasks):
    """iMAML's meta-parameters are {"phi"} alone (sigma fixed): the shared training and evaluation code takes them."""
    _, batch = paper_tasks
    learner = hm.imaml(paper_model, lam=0.05, inner_optimizer=optax.sgd(0.3), inner_steps=50)
    state = learner.init(jax.random.PRNGKey(0), jnp.zeros(8))
    state, history = hm.fit(learner, state, hm.sample_from(batch, 10), 20, data_key=jax.random.PRNGKey(1),
                            chunk_size=10, progress=False)
    assert int(state.num_skipped) == 0 and history["cg_iterations"].shape == (20,)
    assert np.all(history["cg_residual"] < 1e-8)
    assert float(jnp.max(jnp.abs(state.params["phi"]))) > 0  # phi moved from 0
    curve = hm.evaluate(learner, state, batch, 5)
    at_phi = jax.vmap(paper_model.generalisation_loss)(jnp.broadcast_to(state.params["phi"], (25, 8)), batch.val)
    np.testing.assert_allclose(curve.per_task[:, 0], at_phi, rtol=1e-12)


@pytest.mark.slow
def test_m_sigma_imaml_recovers_the_sigma_groups_and_the_oracle_loss(paper, paper_model):
    steps = 1500
    learner = hm.m_sigma_imaml(paper_model, inner_optimizer=optax.sgd(0.3), inner_steps=200,
                               outer_optimizer=optax.adam(optax.cosine_decay_schedule(0.03, steps, alpha=0.1)))
    state = learner.init(jax.random.PRNGKey(0), jnp.zeros(8))
    sample = lambda key: linear.sample_tasks(paper, key, 25)[1]
    state, _ = hm.fit(learner, state, sample, steps, data_key=jax.random.PRNGKey(1), progress=False)
    sigma = np.exp(0.5 * np.asarray(state.params["log_sigma2"]))
    assert np.all((sigma[:4] > 6.5) & (sigma[:4] < 9.5)), sigma
    assert np.all((sigma[4:] > 1.6) & (sigma[4:] < 2.5)), sigma
    _, test = linear.sample_tasks(paper, jax.random.PRNGKey(2), 1000)
    curve = hm.evaluate(learner, state, test, 200)
    oracle_theta, _ = linear.posterior(test.train, paper.phi, paper.sigma)
    oracle = np.asarray(jax.vmap(paper_model.generalisation_loss)(oracle_theta, test.val))
    assert abs(np.mean(curve.per_task[:, 200] - oracle)) < 0.05
