"""The one builder of the Gaussian-prior learners: Shrinkage, sigma-iMAML, iMAML, sigma-Reptile and the rest.

All of them solve the same bilevel problem and differ only in how phi and sigma move, two
independent choices (:func:`gaussian_prior_learner`'s ``phi_step`` and ``sigma_step``):

    inner   theta_hat_t = argmin_theta L_t(theta; phi, rho),
            L_t = -log N(theta | phi, diag(exp(rho))) - log p(D_t^tr | theta)      (Eq. 2),
            solved from phi by the learner's inner solver (:mod:`hiermeta.solvers`: K optimiser
            steps, Newton or L-BFGS; ``run_inner``, vmapped over tasks), or by K steps on random
            minibatches of the support (:mod:`hiermeta.learners.minibatch`);
    phi     "map":     along -mean_t dL_t/dphi = mean_t (theta_hat_t - phi) / sigma^2  (Algorithm 1)
            "reptile": along mean_t (theta_hat_t - phi)                               (Reptile's step)
            "pll":     along the PLL hypergradient mean_t dPLL_t/dphi                 (iMAML's step)
    sigma   "eq4":     along Eq. 4's approximation of mean_t dPLL_t/drho
            "exact":   along mean_t dPLL_t/drho by conjugate gradient (or any solver of H v = g)
            "fixed":   not at all (iMAML: lambda = 1/sigma^2).

The named learners are presets: Shrinkage (map, eq4), sigma-iMAML (pll, exact), iMAML (pll,
fixed), sigma-Reptile (reptile, exact, minibatched K steps).  PLL hypergradients come from
:func:`hiermeta.implicit.implicit_hypergradient` at the inner solution; nothing is
differentiated through the inner steps, and each distinct linear solve runs once per task.
Step metrics (:class:`~hiermeta.learners.info.BilevelInfo`) report how stationary the inner
solutions are, each solve's residual (``sigma_residual``: Eq. 4's ``||H Sigma g - g|| / ||g||``,
how far the prior is from the Hessian) and ``sigma_growth``, which :func:`hiermeta.fit` reads to
warn when a sigma runs off (:mod:`hiermeta.learners.runoff`).

**Extra sites** (:meth:`hiermeta.HierarchicalModel.hyper_sites`; unconstrained in ``params["extra"]``,
:mod:`hiermeta.learners.base`).  The prior of theta_t is ``N(m_t, Sigma)`` with ``m_t = phi + z_t gamma``
and ``Sigma = diag(s) C diag(s)`` on a correlated block (``C = L_C L_C^T``, site ``corr_chol_k``), and
the likelihood may hold globals ``g`` (``noise_sd``, ``beta``).  Then

    L_t(theta; meta) = -log N(theta | m_t, Sigma) - log p(D_t^tr | theta, g),   started at m_t,
    PLL_t(meta)      = log p(D_t^val | theta_hat_t(meta), g),
    dPLL_t/d meta    = d/d meta log p(D_t^val | theta, g)|_{theta_hat_t}       (direct: g only)
                       - (d^2 L_t / d theta d meta)^T H_t^{-1} grad_theta log p(D_t^val | theta_hat_t)
                                                                           (implicit: every site),

with Eq. 4 replacing ``H_t^{-1}`` by ``Sigma`` (the prior block) and CG preconditioned by ``Sigma``.
gamma moves with phi (MAP gradient for Shrinkage, PLL for sigma-iMAML and iMAML); the correlation
factors with sigma (PLL; fixed at the identity for iMAML); the globals along the PLL's total
derivative for every learner.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ..hierarchy import HierarchicalModel
from ..implicit import Solver, SolveInfo, as_solver, implicit_hypergradient
from ..inner import Adaptation, InnerProblem, run_inner
from ..solvers import GRADIENT_STEPS_TOL, InnerSolver, PriorScaled, curvature_step_size, gradient_steps, resolve_inner_solver
from ..tasks import num_tasks
from ..utils import check_count
from .base import (MetaLearner, MetaState, extra_metrics, extra_params, extra_values, flat_phi,
                   inner_metrics, learned_sites, make_adapt, new_state, outer_update, starting_values, task_start)
from .info import BilevelInfo
from .minibatch import MinibatchSteps

__all__ = ["sigma_of", "shrinkage_params", "gaussian_prior_learner", "phi_sigma_optimizer", "proximal_sgd",
           "ProximalSGD", "PHI_STEPS"]


class ProximalSGD(NamedTuple):
    """Proximal gradient descent (build with :func:`proximal_sgd`).

    ``learning_rate`` is the rate on the likelihood, or None for ``1 / lambda_max`` of the
    likelihood's Hessian at the start of each task's solve (``power_iterations`` Hessian-vector
    products, :func:`hiermeta.solvers.curvature_step_size`)."""

    learning_rate: Optional[float]
    power_iterations: int = 10

    def for_prior(self, prior_var, learning_rate=None) -> optax.GradientTransformation:
        """The optax step for prior variances ``prior_var`` (sigma^2 per coordinate) at rate
        ``learning_rate`` on the likelihood (default: this one's fixed rate)."""
        rate = self.learning_rate if learning_rate is None else learning_rate
        if rate is None:
            raise ValueError("this proximal step chooses its rate per task: build its solver with .solver(prior_var, K)")
        return optax.scale(-1.0 / (1.0 / rate + 1.0 / prior_var))

    def solver(self, prior_var, num_steps: int) -> InnerSolver:
        """K proximal gradient steps for prior variances ``prior_var`` (per coordinate), as an inner solver."""
        if self.learning_rate is not None:
            return gradient_steps(self.for_prior(prior_var), num_steps)

        def solve(loss, theta0, steps=None, observe=None):
            rate = curvature_step_size(loss, theta0, self.power_iterations, prior_var=prior_var)
            return gradient_steps(self.for_prior(prior_var, rate), num_steps).solve(loss, theta0, steps, observe)

        return InnerSolver(f"{num_steps} proximal gradient steps (curvature rate)", num_steps, GRADIENT_STEPS_TOL, solve)


def proximal_sgd(learning_rate: Optional[float] = None, *, power_iterations: int = 10) -> ProximalSGD:
    """Proximal gradient descent on L_t, for ``inner_optimizer=`` (with ``inner_steps=``): stable whatever sigma.

    L_t = f(theta) + sum_i (theta_i - phi_i)^2 / (2 s_i), f = -log p(D_t^tr | theta), s = sigma^2 per
    coordinate.  A gradient step on f at rate ``a`` followed by the exact proximal map of the
    prior term is

        theta <- theta - grad L_t(theta) / (1/a + 1/s),

    plain gradient descent on L_t with the per-coordinate rate ``1 / (1/a + 1/s)``: ``a`` where
    sigma is large (the module is free), ``s`` where it is small (one step puts theta at phi + s
    times the likelihood's pull).  It converges for ``a < 2 / L`` (L the likelihood's curvature)
    however small sigma gets, to the same MAP; plain SGD on L_t needs ``a < 2 s`` as well.

    ``learning_rate=None`` (default) takes ``a = 1 / L`` per task, with L the largest eigenvalue
    of the likelihood's Hessian at the start (``power_iterations`` Hessian-vector products of
    L_t less the prior's ``diag(1/s)``; not differentiated): the textbook step of proximal
    gradient, stable at any scale of the data or the network.  A fixed rate that is stable for
    a large prior variance is not for a small one and the converse: on the few-shot convnet
    (``examples/fewshot.py``) L is about 150 for the summed log-likelihood of a 5-way 1-shot
    support, so a fixed a = 0.08 oscillates in every layer whose sigma exceeds about 0.09.
    The Gaussian-prior learners (Shrinkage, sigma-iMAML, iMAML) build its step from their
    current sigma at every meta-step.  The prior is taken as diagonal (``s`` per coordinate).
    """
    if learning_rate is not None and (isinstance(learning_rate, bool) or not np.isfinite(learning_rate)
                                      or learning_rate <= 0):
        raise ValueError(f"learning_rate must be finite and > 0 (or None: from the curvature), got {learning_rate}")
    return ProximalSGD(None if learning_rate is None else float(learning_rate),
                       check_count(power_iterations, "power_iterations", 1))


def _prior_dependent_solve(*args, **kwargs):
    raise ValueError("this inner solver depends on sigma (proximal steps, prior scale): solve with learner.inner_problem(params).solver")


def sigma_of(params, num_modules: int) -> jax.Array:
    """Per-module sigma ``(M,)`` from ``params["log_sigma2"]`` (``(M,)`` or shared ``(1,)``)."""
    if "log_sigma2" not in params:
        raise ValueError(f"these meta-parameters learn no sigma (they hold {sorted(params)}), e.g. MAML's or iMAML's")
    return jnp.broadcast_to(jnp.exp(0.5 * params["log_sigma2"]), (num_modules,))


def shrinkage_params(model: HierarchicalModel, phi, sigma, modular: bool = True) -> dict:
    """Meta-parameters for given phi (pytree or flat ``(P,)``) and sigma (scalar or ``(M,)``)."""
    part = model.partition
    phi = jnp.asarray(phi) if np.ndim(phi) == 1 and np.shape(phi)[0] == part.num_params else part.ravel(phi)
    sigma = part.check_per_module(sigma, "sigma")
    if not np.all(np.isfinite(sigma)) or np.any(sigma <= 0):
        raise ValueError(f"sigma must be finite and > 0, got {sigma}")
    if not modular:
        if np.ptp(sigma) > 0:
            raise ValueError("a shared-sigma (non-modular) learner needs one sigma for all modules")
        sigma = sigma[:1]
    return {"phi": phi, "log_sigma2": jnp.asarray(2.0 * np.log(sigma), dtype=phi.dtype)}


PHI_STEPS = ("map", "reptile", "pll")


def _check_sigma_step(sigma_step):
    if isinstance(sigma_step, str):
        if sigma_step == "fixed":
            return None
        if sigma_step not in ("eq4", "exact"):
            raise ValueError(f"sigma_step (the sigma hypergradient) must be 'eq4', 'exact', 'fixed' or a solver "
                             f"of H v = g, got {sigma_step!r}")
    return as_solver(sigma_step)


def phi_sigma_optimizer(phi: optax.GradientTransformation, sigma: optax.GradientTransformation):
    """One optax step for a Gaussian-prior learner's meta-parameters: ``phi`` on phi (and on the group
    coefficients gamma, which move with it), ``sigma`` on log sigma^2 and every other extra site."""

    def labels(params):
        out = {name: jax.tree_util.tree_map(lambda _: "sigma", value) for name, value in params.items()}
        out["phi"] = jax.tree_util.tree_map(lambda _: "phi", params["phi"])
        if "extra" in params:
            out["extra"] = {k: jax.tree_util.tree_map(lambda _: "phi" if k == "gamma" else "sigma", v)
                            for k, v in params["extra"].items()}
        return out

    return optax.multi_transform({"phi": phi, "sigma": sigma}, labels)


def gaussian_prior_learner(
    model: HierarchicalModel,
    *,
    phi_step: str = "pll",
    sigma_step: Union[str, Solver] = "exact",
    phi_hypergradient: Union[str, Solver, None] = None,
    fixed_sigma=None,
    modular: bool = False,
    init_sigma=None,
    inner_optimizer=None,
    inner_steps: Optional[int] = None,
    inner_solver: Optional[InnerSolver] = None,
    outer_optimizer: Optional[optax.GradientTransformation] = None,
    name: Optional[str] = None,
) -> MetaLearner:
    """A learner on the bilevel problem of the module docstring, its phi and sigma steps chosen apart.

    Every Gaussian-prior learner is one of these (:func:`~hiermeta.learners.shrinkage` is
    ``phi_step="map", sigma_step="eq4"``; :func:`~hiermeta.learners.sigma_imaml` ``"pll", "exact"``;
    :func:`~hiermeta.learners.imaml` ``"pll", "fixed"``; :func:`~hiermeta.learners.sigma_reptile`
    ``"reptile", "exact"``).

    Args:
      phi_step: how phi (and gamma) move, to minimise:
        ``"map"``: ``mean_t dL_t/dphi = -mean_t Sigma^{-1} (theta_hat_t - m_t)`` (Algorithm 1);
        ``"reptile"``: ``-mean_t (theta_hat_t - m_t)`` (Reptile's step: the MAP step times Sigma,
        so ``optax.sgd(beta)`` is ``phi <- phi + beta mean_t (theta_hat_t - phi)``);
        ``"pll"``: ``-mean_t dPLL_t/dphi`` by the implicit hypergradient (``phi_hypergradient``).
      sigma_step: how rho = log sigma^2 moves: ``"eq4"`` (the paper's Eq. 4), ``"exact"`` (conjugate
        gradient, :func:`hiermeta.implicit.cg_solve` defaults), a solver of ``H v = g``, or
        ``"fixed"`` (sigma held at ``fixed_sigma``; the meta-parameters are then ``{"phi"}``).
      phi_hypergradient: the solver of ``H v = g`` for ``phi_step="pll"`` (default ``"exact"``; ``"eq4"``
        makes it first-order MAML's step).  When it equals ``sigma_step`` one solve serves both.
      fixed_sigma: sigma for ``sigma_step="fixed"``: a scalar or one value per module (> 0).
      modular: a learned sigma per module (True) or one shared by all modules (False).
      init_sigma: initial learned sigma (> 0; scalar, or per module when modular); default 1, or
        data-scaled when ``init`` gets ``data=``.
      inner_solver, inner_optimizer, inner_steps: the inner solver
        (:func:`hiermeta.solvers.resolve_inner_solver`): an ``InnerSolver``, or K steps of an
        optax optimiser (converged at relative gradient norm 1e-2), or by default Newton (up to
        256 parameters) or L-BFGS.  ``inner_optimizer`` may also be :func:`proximal_sgd` (a
        step that depends on sigma^2 per coordinate) with ``inner_steps``, or
        :func:`~hiermeta.learners.minibatch.minibatch_steps` (K steps on random minibatches of
        each support, keys from ``state.key`` and the step count; no ``inner_steps``);
        ``inner_solver`` may be :func:`hiermeta.solvers.prior_scaled` ``(solver)``.
      outer_optimizer: optax optimiser on the meta-parameters (default Adam, lr 1e-2; see
        :func:`phi_sigma_optimizer` for separate rates).

    The other extra sites: the correlation factors move with sigma (fixed with it); the
    likelihood's globals along the PLL with sigma's solver (phi's when sigma is fixed and phi's
    step is the PLL's, else ``"exact"``).
    """
    if phi_step not in PHI_STEPS:
        raise ValueError(f"phi_step must be one of {PHI_STEPS}, got {phi_step!r}")
    sigma_solver = _check_sigma_step(sigma_step)
    learn_sigma = sigma_solver is not None
    if phi_hypergradient is not None and phi_step != "pll":
        raise ValueError(f"phi_hypergradient applies to phi_step='pll' only (this phi_step is {phi_step!r})")
    phi_solver = as_solver("exact" if phi_hypergradient is None else phi_hypergradient) if phi_step == "pll" else None
    M = model.partition.num_modules
    if learn_sigma:
        if fixed_sigma is not None:
            raise ValueError(f"fixed_sigma is for sigma_step='fixed'; this sigma_step is {sigma_step!r}")
        if init_sigma is not None:
            initial = model.partition.check_per_module(init_sigma, "init_sigma")  # a scalar or one per module
            if not np.all(np.isfinite(initial)) or np.any(initial <= 0) or (not modular and np.ptp(initial) > 0):
                raise ValueError(f"init_sigma must be finite and > 0 (one value unless modular), got {init_sigma}")
    else:
        if fixed_sigma is None:
            raise ValueError("sigma_step='fixed' needs fixed_sigma= (a scalar or one value per module)")
        if init_sigma is not None:
            raise ValueError("init_sigma is for a learned sigma; sigma_step='fixed' takes fixed_sigma=")
        fixed = np.asarray(model.partition.check_per_module(fixed_sigma, "fixed_sigma"), dtype=float)
        if not np.all(np.isfinite(fixed)) or np.any(fixed <= 0):
            raise ValueError(f"the fixed sigma must be finite and > 0, got {fixed_sigma}")
    name = name or f"phi {phi_step} / sigma {sigma_step if isinstance(sigma_step, str) else 'solver'}"

    # the inner loop: a solver that depends on sigma^2 per coordinate is rebuilt from it at every meta-step
    for_prior = None
    minibatch = None
    if isinstance(inner_optimizer, MinibatchSteps):
        if inner_solver is not None or inner_steps is not None:
            raise ValueError("inner_optimizer=minibatch_steps(...) carries its own K: give no inner_steps= or inner_solver=")
        minibatch = inner_optimizer
        inner_solver = gradient_steps(optax.sgd(0.0), minibatch.num_steps, tol=minibatch.tol)._replace(
            name=minibatch.name, solve=_prior_dependent_solve)
        for_prior = lambda prior_var: gradient_steps(minibatch.transformation(prior_var), minibatch.num_steps,
                                                     tol=minibatch.tol)
    elif isinstance(inner_optimizer, ProximalSGD):
        if inner_solver is not None or inner_steps is None:
            raise ValueError("inner_optimizer=proximal_sgd(rate) needs inner_steps= (K) and no inner_solver=")
        rate = inner_optimizer.learning_rate
        if rate is None and model.correlated:
            raise ValueError("proximal_sgd() takes its rate from the likelihood's curvature, found by taking a diagonal "
                             "prior's curvature off; this model has correlated blocks: give proximal_sgd(rate), or "
                             "use inner_solver=hiermeta.solvers.newton() or lbfgs()")
        inner_solver = inner_optimizer.solver(jnp.inf, check_count(inner_steps, 'inner_steps', 0))._replace(
            name=f"{inner_steps} proximal gradient steps ({'curvature rate' if rate is None else f'rate {rate:g}'})",
            solve=_prior_dependent_solve,
        )
        for_prior = lambda prior_var: inner_optimizer.solver(prior_var, inner_solver.num_steps)
    elif isinstance(inner_solver, PriorScaled):
        if inner_optimizer is not None or inner_steps is not None:
            raise ValueError("give inner_solver= or inner_optimizer= with inner_steps=, not both")
        for_prior = inner_solver.for_prior
        inner_solver = inner_solver.solver._replace(name=f"{inner_solver.solver.name} in prior scale",
                                                    solve=_prior_dependent_solve)
    else:
        inner_solver = resolve_inner_solver(inner_solver, inner_optimizer, inner_steps,
                                            num_params=model.partition.num_params)
    outer = outer_optimizer if outer_optimizer is not None else optax.adam(1e-2)
    # the extra sites it learns: all of them, but a fixed sigma keeps its correlations fixed too
    kinds = ("global", "correlation", "group_coefficients") if learn_sigma else ("global", "group_coefficients")
    sites = learned_sites(model, kinds)
    has_globals = any(site.kind == "global" for site in sites.values())
    # the linear solves of one step, each once: phi's, sigma's, and the globals' (sigma's, else phi's, else CG)
    globals_solver = (sigma_solver or phi_solver or as_solver("exact")) if has_globals else None
    solvers = []
    for solver in (phi_solver, sigma_solver, globals_solver):
        if solver is not None and solver not in solvers:
            solvers.append(solver)
    role = {key: (solvers.index(s) if s is not None else None)
            for key, s in (("phi", phi_solver), ("sigma", sigma_solver), ("global", globals_solver))}

    def sigma_from(params):
        if learn_sigma:
            return sigma_of(params, M)
        return jnp.asarray(np.broadcast_to(fixed, (M,)), dtype=params["phi"].dtype)

    def inner_loss(theta, params, data_t, weight=1.0):
        """``-log N(theta | m_t, Sigma) - weight * log p(data_t | theta)`` (Eq. 2 at weight 1)."""
        log_prior, log_lik = model.task_log_densities(theta, params["phi"], sigma_from(params), data_t,
                                                      extra_values(model, params))
        return -(log_prior + weight * log_lik)

    def query_log_lik(theta, params, val_t):
        return model.log_likelihood(theta, val_t, extra_values(model, params))

    def inner_problem(params) -> InnerProblem:
        solver = inner_solver
        if for_prior is not None:  # the solver depends on sigma^2 per coordinate
            solver = for_prior(model.partition.expand(sigma_from(params) ** 2))
        return InnerProblem(
            init=task_start(model, params["phi"], extra_values(model, params)),
            loss=lambda theta, data_t: inner_loss(theta, params, data_t),
            solver=solver,
        )

    def solve_tasks(params, data, key, num_steps=None):
        """Every task's inner solve; K minibatch steps (a key per task) when so configured."""
        problem = inner_problem(params)
        if minibatch is None:
            return jax.vmap(lambda d: run_inner(problem, d, num_steps))(data)
        prior_var = model.partition.expand(sigma_from(params) ** 2)
        start = problem.init

        def one(d, k):
            theta0 = start(d) if callable(start) else start
            return minibatch.solve(lambda th, rows, w: inner_loss(th, params, rows, w), theta0, d, k, prior_var,
                                   num_steps)

        return jax.vmap(one)(data, jax.random.split(key, num_tasks(data)))

    def init(key, params=None, sigma=None, extra=None, data=None) -> MetaState:
        """Meta-parameters from phi (``params``: a pytree like the model's, or flat ``(P,)``), sigma
        and the extra sites' constrained values; ``data`` (tasks with a leading axis, e.g. the
        support) gives data-scaled defaults for whatever is not given (the likelihood's
        ``initial_values``: a pooled fit), else phi is required, sigma ``init_sigma`` (1) and each
        extra site its default."""
        start = starting_values(model, data)
        if params is None:
            if "phi" not in start:
                raise ValueError(f"{name}.init needs params (phi), or data= whose likelihood offers initial_values")
            phi = jnp.asarray(start["phi"], dtype=jnp.zeros(()).dtype)
        else:
            phi = flat_phi(model, params)
        meta = {"phi": phi}
        if not learn_sigma:
            if sigma is not None:
                raise ValueError(f"{name} has a fixed sigma (lambda); init takes no sigma")
        else:
            if sigma is None:
                sigma = init_sigma
            if sigma is None and "sigma" in start:
                sigma = np.asarray(start["sigma"], dtype=float)
                sigma = sigma if modular else float(np.exp(np.mean(np.log(sigma))))
            meta = shrinkage_params(model, phi, 1.0 if sigma is None else sigma, modular=modular)
        if sites:
            meta["extra"] = extra_params(model, sites, extra, defaults=start, learner=name)
        elif extra:
            raise ValueError(f"extra= given, but {name} learns no extra sites on this model")
        return new_state(meta, outer, key)

    def task_terms(params, theta_hat, train_t, val_t):
        """Per task: the first-order phi step (MAP or Reptile), the PLL hypergradient of each solve,
        the query log-likelihood and each solve's diagnostics.

        The PLL's total derivative is its implicit part through theta_hat plus its direct part
        (the query likelihood's own dependence on the globals, e.g. noise_sd and beta)."""
        inner_grad = jax.grad(lambda th, p: inner_loss(th, p, train_t))
        if phi_step == "map":
            first_order = jax.grad(lambda p: inner_loss(theta_hat, p, train_t))(params)
        elif phi_step == "reptile":  # -(theta_hat - m_t) for phi, -z_t (theta_hat - m_t)^T for gamma
            theta = jax.lax.stop_gradient(theta_hat)

            def half_distance(p):
                start = task_start(model, p["phi"], extra_values(model, p))
                return 0.5 * jnp.sum((theta - (start(train_t) if callable(start) else start)) ** 2)

            first_order = jax.grad(half_distance)(params)
        else:
            first_order = None
        val_log_lik, (g, direct) = jax.value_and_grad(query_log_lik, argnums=(0, 1))(theta_hat, params, val_t)
        cov = model.prior_cov_operator(sigma_from(params), extra_values(model, params))
        pll, iterations, residuals = [], [], []
        for solver in solvers:
            implicit, info = implicit_hypergradient(inner_grad, theta_hat, params, g, cov, solver)
            pll.append(jax.tree_util.tree_map(jnp.add, implicit, direct))
            iterations.append(info.iterations)
            residuals.append(info.residual)
        return first_order, pll, val_log_lik, iterations, residuals

    def gradient_and_solves(params, batch, key):
        """The gradient (to minimise) of one meta-step on ``batch``, and ``(inner, val_log_lik, iterations,
        residuals)`` (the last two: a ``(T,)`` array per distinct solve)."""
        inner = solve_tasks(params, batch.train, key)
        first_order, pll, val_log_lik, iterations, residuals = jax.vmap(task_terms, in_axes=(None, 0, 0, 0))(
            params, inner.theta, batch.train, batch.val
        )
        mean = lambda tree: jax.tree_util.tree_map(lambda a: jnp.mean(a, axis=0), tree)
        first_order, pll = mean(first_order), [mean(p) for p in pll]
        phi_like = first_order if first_order is not None else jax.tree_util.tree_map(jnp.negative, pll[role["phi"]])
        grads = {"phi": phi_like["phi"]}
        if learn_sigma:
            grads["log_sigma2"] = -pll[role["sigma"]]["log_sigma2"]
        if sites:
            grads["extra"] = {}
            for site_name, site in sites.items():
                if site.kind == "group_coefficients":
                    grads["extra"][site_name] = phi_like["extra"][site_name]
                else:  # correlations move with sigma, globals with their solve
                    which = role["sigma"] if site.kind == "correlation" else role["global"]
                    grads["extra"][site_name] = -pll[which]["extra"][site_name]
        return grads, (inner, val_log_lik, iterations, residuals)

    def meta_gradient(params, batch, key=None):
        """The gradient (to minimise) of one meta-step on ``batch`` and ``(inner, val_log_lik, info)``,
        ``info`` the worst over the step's solves per task (a ``SolveInfo``; zeros when nothing is
        solved).  ``key`` draws the minibatches (default ``PRNGKey(0)``; the step uses the state's)."""
        grads, (inner, val_log_lik, iterations, residuals) = gradient_and_solves(
            params, batch, jax.random.PRNGKey(0) if key is None else key)
        worst = lambda xs, like: jnp.max(jnp.stack(xs), axis=0) if xs else jnp.zeros_like(like)
        info = SolveInfo(worst(iterations, val_log_lik).astype(jnp.int32), worst(residuals, val_log_lik))
        return grads, (inner, val_log_lik, info)

    def step_key(state):
        return jax.random.fold_in(state.key, state.step)

    def step(state: MetaState, batch):
        grads, (inner, val_log_lik, iterations, residuals) = gradient_and_solves(state.params, batch, step_key(state))
        num_diverged = jnp.sum(inner.diverged)
        before = sigma_from(state.params)
        state, skipped = outer_update(state, grads, outer, ok=num_diverged == 0)
        after = sigma_from(state.params)
        zero = jnp.zeros((), before.dtype)
        worst = lambda xs: jnp.max(jnp.stack([jnp.max(x) for x in xs])) if xs else zero
        return state, BilevelInfo(
            val_log_lik=jnp.mean(val_log_lik),
            inner_loss=jnp.mean(inner.final_loss),
            sigma=after,
            extra=extra_metrics(model, state.params),
            num_diverged=num_diverged,
            **inner_metrics(inner),
            skipped=skipped,
            cg_iterations=worst(iterations).astype(jnp.int32),  # the most any task took, over the solves
            cg_residual=worst(residuals),  # worst relative residual of H v = g, over the solves
            sigma_residual=jnp.max(residuals[role["sigma"]]) if learn_sigma else zero,
            sigma_growth=jnp.log(after) - jnp.log(before),
        )

    def adapt(state: MetaState, support, num_steps: Optional[int] = None) -> Adaptation:
        if minibatch is None:
            return make_adapt(inner_problem)(state, support, num_steps)
        r = solve_tasks(state.params, support, step_key(state), num_steps)
        return Adaptation(r.theta, r.final_loss, r.stationarity, r.converged, r.diverged)

    return MetaLearner(
        name=name,
        model=model,
        init=init,
        step=step,
        inner_problem=inner_problem,
        adapt=adapt,
        inner_solver=inner_solver,
        meta_gradient=meta_gradient,
    )
