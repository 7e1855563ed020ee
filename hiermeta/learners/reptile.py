"""Reptile (Nichol et al. 2018), the batched version.

Meta-parameter: phi (flat ``(P,)``).  Each meta-iteration adapts every task of the batch from phi
with K steps of a fixed inner optimiser on its negative log-likelihood (no prior), or another
inner solver (:mod:`hiermeta.solvers`), then moves phi toward the adapted parameters:

    theta_t = SGD_K(-log p(D_t^tr | .), from phi),     phi <- phi + beta * mean_t (theta_t - phi).

Implemented as an outer optax step on the pseudo-gradient ``-mean_t (theta_t - phi)``, so
``outer_optimizer=optax.sgd(beta)`` is the update above.  This is the sigma -> inf limit of the
shrinkage phi step, ``-mean_t (theta_hat_t - phi) / sigma^2``, rescaled by sigma^2.  The query
split is only used for the ``val_log_lik`` metric.  The K steps are Reptile's algorithm, not a
solve: their stationarity is reported (metric ``inner_stationarity``) but not judged, unless an
``inner_solver`` with a tolerance is given.

With task covariates the inner start is ``m_t = phi + z_t gamma`` and gamma takes the same
first-order step, ``-mean_t z_t (theta_t - m_t)^T``; the likelihood's globals (``noise_sd``,
``beta``; in ``params["extra"]``, unconstrained) descend the query negative log-likelihood per
observation at the adapted theta_t, held fixed (first order: nothing is differentiated through
the inner steps).
"""

from __future__ import annotations

import math
from typing import Optional

import jax
import jax.numpy as jnp
import optax

from ..hierarchy import HierarchicalModel
from ..inner import InnerProblem, run_inner
from ..solvers import InnerSolver, resolve_inner_solver
from .base import (MetaLearner, MetaState, extra_metrics, extra_params, extra_values, flat_phi,
                   inner_metrics, learned_sites, make_adapt, new_state, outer_update, starting_values, task_start)
from .info import ReptileInfo

__all__ = ["reptile"]


def reptile(
    model: HierarchicalModel,
    *,
    inner_optimizer: Optional[optax.GradientTransformation] = None,
    inner_steps: Optional[int] = None,
    inner_solver: Optional[InnerSolver] = None,
    outer_optimizer: Optional[optax.GradientTransformation] = None,
    name: Optional[str] = None,
) -> MetaLearner:
    """Build batched Reptile.

    Args:
      model: the hierarchical model; only its likelihood and partition are used (no prior).
      inner_optimizer: the fixed inner optimiser (e.g. ``optax.sgd(0.1)``), used at test time too.
      inner_steps: K, inner steps per task during meta-training (>= 1).
      inner_solver: instead of the two above, an inner solver (e.g.
        :func:`hiermeta.solvers.newton` ``()``: each task's maximum-likelihood fit).
      outer_optimizer: optax optimiser on ``{"phi"}`` (default ``optax.sgd(1.0)``: beta = 1).
    """
    if inner_solver is None and inner_optimizer is None and inner_steps is None:
        raise ValueError("Reptile needs inner_optimizer= and inner_steps=, or inner_solver=")
    inner_solver = resolve_inner_solver(inner_solver, inner_optimizer, inner_steps, tol=math.inf, min_steps=1,
                                        num_params=model.partition.num_params)
    outer = outer_optimizer if outer_optimizer is not None else optax.sgd(1.0)

    sites = learned_sites(model, ("global", "group_coefficients"))

    def task_loss(theta, data_t, extra):
        return -model.log_likelihood(theta, data_t, extra)

    def inner_problem(params) -> InnerProblem:
        extra = extra_values(model, params)
        return InnerProblem(task_start(model, params["phi"], extra), lambda th, d: task_loss(th, d, extra),
                            inner_solver)

    def init(key, params=None, extra=None, data=None) -> MetaState:
        """phi (a pytree like the model's, or flat), the extra sites' constrained starts (``extra=``),
        defaults from ``data`` where the likelihood offers ``initial_values``, else each site's default."""
        start = starting_values(model, data)
        if params is None:
            if "phi" not in start:
                raise ValueError("Reptile's init needs params (phi), or data= whose likelihood offers initial_values")
            meta = {"phi": jnp.asarray(start["phi"], dtype=jnp.zeros(()).dtype)}
        else:
            meta = {"phi": flat_phi(model, params)}
        if sites:
            meta["extra"] = extra_params(model, sites, extra, defaults=start, learner=name or "Reptile")
        elif extra:
            raise ValueError("extra= given, but Reptile learns no extra sites on this model")
        return new_state(meta, outer, key)

    def pseudo_objective(params, theta, train_t, val_t):
        """Its gradient is the step: -(theta - m_t) for phi, -z_t (theta - m_t)^T for gamma, and for
        the globals the query NLL per observation with theta held fixed (first order)."""
        theta = jax.lax.stop_gradient(theta)
        extra = extra_values(model, params)
        start = inner_problem(params).init
        m = start(train_t) if callable(start) else start
        n_val = model.likelihood.num_observations(jax.tree_util.tree_map(lambda a: a[None], val_t))[0]
        return 0.5 * jnp.sum((theta - m) ** 2) + task_loss(theta, val_t, extra) / jnp.maximum(n_val, 1)

    def meta_gradient(params, batch):
        problem = inner_problem(params)
        inner = jax.vmap(lambda d: run_inner(problem, d))(batch.train)
        grads = jax.vmap(jax.grad(pseudo_objective), in_axes=(None, 0, 0, 0))(params, inner.theta, batch.train,
                                                                             batch.val)
        return jax.tree_util.tree_map(lambda a: jnp.mean(a, axis=0), grads), inner

    def step(state: MetaState, batch):
        grads, inner = meta_gradient(state.params, batch)
        extra = extra_values(model, state.params)
        val_log_lik = jax.vmap(lambda th, d: model.log_likelihood(th, d, extra))(inner.theta, batch.val)
        num_diverged = jnp.sum(inner.diverged)
        state, skipped = outer_update(state, grads, outer, ok=num_diverged == 0)
        return state, ReptileInfo(
            val_log_lik=jnp.mean(val_log_lik),
            inner_loss=jnp.mean(inner.final_loss),
            extra=extra_metrics(model, state.params),
            num_diverged=num_diverged,
            **inner_metrics(inner),
            skipped=skipped,
        )

    return MetaLearner(
        name=name or "Reptile",
        model=model,
        init=init,
        step=step,
        inner_problem=inner_problem,
        adapt=make_adapt(inner_problem),
        inner_solver=inner_solver,
        meta_gradient=meta_gradient,
    )
