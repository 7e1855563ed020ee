"""The meta-step shared by the Gaussian-prior learners: Shrinkage, sigma-iMAML and iMAML.

All three solve the same bilevel problem and differ only in which meta-parameters move and
along which gradient:

    inner   theta_hat_t = argmin_theta L_t(theta; phi, rho),
            L_t = -log N(theta | phi, diag(exp(rho))) - log p(D_t^tr | theta)      (Eq. 2),
            solved from phi by the learner's inner solver (:mod:`hiermeta.solvers`: K optimiser
            steps, Newton or L-BFGS; ``run_inner``, vmapped over tasks);
    outer   phi: along the MAP gradient  -mean_t dL_t/dphi          (Shrinkage, Algorithm 1)
                 or the PLL hypergradient mean_t dPLL_t/dphi         (sigma-iMAML, iMAML);
            rho: along the PLL hypergradient mean_t dPLL_t/drho     (learned sigma)
                 or not at all                                      (iMAML: fixed lambda = 1/sigma^2).

PLL hypergradients come from :func:`hiermeta.implicit.implicit_hypergradient` at the inner
solution, with the configured linear solver (Eq. 4 or conjugate gradient); nothing is
differentiated through the inner steps.  Step metrics report how stationary the inner solutions
are (``inner_stationarity``, ``num_unconverged``).  This module is the machinery; each learner's file states its algorithm.

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
from ..implicit import Solver, as_solver, implicit_hypergradient
from ..inner import InnerProblem, run_inner
from ..solvers import GRADIENT_STEPS_TOL, InnerSolver, PriorScaled, curvature_step_size, gradient_steps, resolve_inner_solver
from ..utils import check_count
from .base import (MetaLearner, MetaState, extra_metrics, extra_params, extra_values, flat_phi,
                   inner_metrics, learned_sites, make_adapt, new_state, outer_update, starting_values, task_start)
from .info import BilevelInfo

__all__ = ["sigma_of", "shrinkage_params", "gaussian_prior_learner", "proximal_sgd", "ProximalSGD"]


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


def gaussian_prior_learner(
    model: HierarchicalModel,
    *,
    name: str,
    inner_optimizer: Optional[optax.GradientTransformation] = None,
    inner_steps: Optional[int] = None,
    inner_solver: Optional[InnerSolver] = None,
    outer_optimizer: Optional[optax.GradientTransformation],
    hypergradient: Union[str, Solver],
    phi_gradient: str,
    modular: bool = False,
    init_sigma: Optional[float] = None,
    fixed_sigma: Optional[float] = None,
) -> MetaLearner:
    """Build a learner on the bilevel problem above (see the module docstring).

    Args:
      inner_solver, inner_optimizer, inner_steps: the inner solver
        (:func:`hiermeta.solvers.resolve_inner_solver`): an ``InnerSolver``, or K steps of an
        optax optimiser (converged at relative gradient norm 1e-2), or by default Newton (up to
        256 parameters) or L-BFGS.  ``inner_optimizer`` may also be :func:`proximal_sgd` (a
        step that depends on sigma^2 per coordinate), with ``inner_steps``; ``inner_solver``
        may be :func:`hiermeta.solvers.prior_scaled` ``(solver)`` (run in the prior's scale).
      phi_gradient: ``"map"`` (Algorithm 1's MAP step) or ``"pll"`` (the PLL hypergradient).
      hypergradient: ``"eq4"``, ``"exact"`` (conjugate gradient) or a solver of ``H v = g``.
      modular: learned sigma per module (True) or shared by all modules (False).
      init_sigma: initial learned sigma (> 0); default 1, or data-scaled when ``init`` gets ``data=``.
      fixed_sigma: if given (> 0), sigma is fixed at this shared value and the meta-parameters
        are ``{"phi"}`` only (iMAML); otherwise ``{"phi", "log_sigma2"}``.
    """
    # a solver that depends on sigma^2 per coordinate is rebuilt from it at every meta-step
    for_prior = None
    if isinstance(inner_optimizer, ProximalSGD):
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
    if phi_gradient not in ("map", "pll"):
        raise ValueError(f"phi_gradient must be 'map' or 'pll', got {phi_gradient!r}")
    if init_sigma is not None:
        initial = model.partition.check_per_module(init_sigma, "init_sigma")  # a scalar or one per module
        if not np.all(np.isfinite(initial)) or np.any(initial <= 0) or (not modular and np.ptp(initial) > 0):
            raise ValueError(f"init_sigma must be finite and > 0 (one value unless modular), got {init_sigma}")
    if fixed_sigma is not None and (not np.isfinite(fixed_sigma) or fixed_sigma <= 0):
        raise ValueError(f"the fixed sigma must be finite and > 0, got {fixed_sigma}")
    solver = as_solver(hypergradient)
    outer = outer_optimizer if outer_optimizer is not None else optax.adam(1e-2)
    M = model.partition.num_modules
    learn_sigma = fixed_sigma is None
    # the extra sites it learns: all of them, but iMAML keeps its prior (sigma and correlation) fixed
    kinds = ("global", "correlation", "group_coefficients") if learn_sigma else ("global", "group_coefficients")
    sites = learned_sites(model, kinds)

    def sigma_from(params):
        if learn_sigma:
            return sigma_of(params, M)
        return jnp.full((M,), fixed_sigma, dtype=params["phi"].dtype)

    def inner_loss(theta, params, data_t):
        return model.inner_objective(theta, params["phi"], sigma_from(params), data_t, extra_values(model, params))

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
        """Per task: dL/d(meta) at theta_hat (MAP step), the PLL hypergradient, diagnostics.

        The PLL's total derivative is its implicit part through theta_hat plus its direct part
        (the query likelihood's own dependence on the globals, e.g. noise_sd and beta)."""
        inner_grad = jax.grad(lambda th, p: inner_loss(th, p, train_t))
        map_grad = jax.grad(lambda p: inner_loss(theta_hat, p, train_t))(params)
        val_log_lik, (g, direct) = jax.value_and_grad(query_log_lik, argnums=(0, 1))(theta_hat, params, val_t)
        cov = model.prior_cov_operator(sigma_from(params), extra_values(model, params))
        implicit, info = implicit_hypergradient(inner_grad, theta_hat, params, g, cov, solver)
        pll_grad = jax.tree_util.tree_map(jnp.add, implicit, direct)
        return map_grad, pll_grad, val_log_lik, info

    def meta_gradient(params, batch):
        """The gradient (to minimise) of one meta-step on ``batch``, and ``(inner, val_log_lik, info)``."""
        problem = inner_problem(params)
        inner = jax.vmap(lambda d: run_inner(problem, d))(batch.train)
        map_grad, pll_grad, val_log_lik, info = jax.vmap(task_terms, in_axes=(None, 0, 0, 0))(
            params, inner.theta, batch.train, batch.val
        )
        mean = lambda tree: jax.tree_util.tree_map(lambda a: jnp.mean(a, axis=0), tree)
        map_grad, pll_grad = mean(map_grad), mean(pll_grad)
        # minimise: phi (and gamma) along the MAP objective or -PLL; sigma, correlations, globals along -PLL
        grads = {"phi": map_grad["phi"] if phi_gradient == "map" else -pll_grad["phi"]}
        if learn_sigma:
            grads["log_sigma2"] = -pll_grad["log_sigma2"]
        if sites:
            grads["extra"] = {
                site_name: map_grad["extra"][site_name]
                if phi_gradient == "map" and site.kind == "group_coefficients" else -pll_grad["extra"][site_name]
                for site_name, site in sites.items()
            }
        return grads, (inner, val_log_lik, info)

    def step(state: MetaState, batch):
        grads, (inner, val_log_lik, info) = meta_gradient(state.params, batch)
        num_diverged = jnp.sum(inner.diverged)
        state, skipped = outer_update(state, grads, outer, ok=num_diverged == 0)
        return state, BilevelInfo(
            val_log_lik=jnp.mean(val_log_lik),
            inner_loss=jnp.mean(inner.final_loss),
            sigma=sigma_from(state.params),
            extra=extra_metrics(model, state.params),
            num_diverged=num_diverged,
            **inner_metrics(inner),
            skipped=skipped,
            cg_iterations=jnp.max(info.iterations),  # the most any task took
            cg_residual=jnp.max(info.residual),  # worst relative residual of H v = g
        )

    return MetaLearner(
        name=name,
        model=model,
        init=init,
        step=step,
        inner_problem=inner_problem,
        adapt=make_adapt(inner_problem),
        inner_solver=inner_solver,
        meta_gradient=meta_gradient,
    )
