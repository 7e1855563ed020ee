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
from .base import MetaLearner, MetaState, inner_metrics, make_adapt, new_state, outer_update

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

    def task_loss(theta, data_t):
        return -model.log_likelihood(theta, data_t)

    def inner_problem(params) -> InnerProblem:
        return InnerProblem(params["phi"], task_loss, inner_solver)

    def init(key, params) -> MetaState:
        return new_state({"phi": model.partition.ravel(params)}, outer, key)

    def step(state: MetaState, batch):
        problem = inner_problem(state.params)
        inner = jax.vmap(lambda d: run_inner(problem, d))(batch.train)
        phi = state.params["phi"]
        grads = {"phi": -jnp.mean(inner.theta - phi, axis=0)}
        val_log_lik = jax.vmap(model.log_likelihood)(inner.theta, batch.val)
        num_diverged = jnp.sum(inner.diverged)
        state, skipped = outer_update(state, grads, outer, ok=num_diverged == 0)
        metrics = {
            "val_log_lik": jnp.mean(val_log_lik),
            "inner_loss": jnp.mean(inner.final_loss),
            "num_diverged": num_diverged,
            **inner_metrics(inner),
            "skipped": skipped,
        }
        return state, metrics

    return MetaLearner(
        name=name or "Reptile",
        model=model,
        init=init,
        step=step,
        inner_problem=inner_problem,
        adapt=make_adapt(inner_problem),
        inner_solver=inner_solver,
    )
