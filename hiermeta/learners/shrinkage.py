"""Shrinkage and M-Shrinkage: Algorithm 1 of Chen et al.

Meta-parameters: phi (flat, ``(P,)``) and rho = log sigma^2 (``(M,)`` per module for
M-Shrinkage, ``(1,)`` shared by all modules for Shrinkage).  Each meta-iteration:

1. for each task, theta_t <- phi, then K optimiser steps on
   L_t(theta) = -log N(theta | phi, sigma^2) - log p(D_t^tr | theta)              (Eq. 2);
2. phi takes one outer step along the MAP gradient  mean_t dL_t/dphi = -mean_t (theta_hat_t - phi) / sigma^2;
3. rho takes one outer step along the PLL hypergradient  mean_t dlog p(D_t^val | theta_hat_t)/d rho,
   by Eq. 4 (``hypergradient=eq4_solve``) or by any other solver of H v = g.

Means over tasks (not sums) keep the outer learning rates independent of the batch size.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ..hierarchy import HierarchicalModel
from ..implicit import Solver, eq4_solve, hessian_vector_product, implicit_vjp
from ..inner import InnerProblem, run_inner
from .base import MetaLearner, MetaState, make_adapt, new_state, outer_update

__all__ = ["shrinkage", "m_shrinkage", "shrinkage_params", "sigma_of"]


def sigma_of(params, num_modules: int) -> jax.Array:
    """Per-module sigma ``(M,)`` from ``params["log_sigma2"]`` (``(M,)`` or shared ``(1,)``)."""
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


def shrinkage(
    model: HierarchicalModel,
    *,
    inner_optimizer: optax.GradientTransformation,
    inner_steps: int,
    outer_optimizer: Optional[optax.GradientTransformation] = None,
    modular: bool = False,
    init_sigma: float = 1.0,
    hypergradient: Solver = eq4_solve,
    name: Optional[str] = None,
) -> MetaLearner:
    """Build the Shrinkage (``modular=False``) or M-Shrinkage (``modular=True``) learner.

    Args:
      model: the hierarchical model; its partition defines the modules.
      inner_optimizer: optax optimiser for the K inner steps on L_t (e.g. ``optax.sgd(0.3)``).
      inner_steps: K, the number of inner steps during meta-training.
      outer_optimizer: optax optimiser on ``{"phi", "log_sigma2"}`` (default Adam, lr 1e-2).
      modular: one sigma per module (True) or one sigma shared by all modules (False).
      init_sigma: initial sigma (> 0).
      hypergradient: solver for ``v ~ H^{-1} g`` (default: the paper's Eq. 4).
    """
    if int(inner_steps) < 0:
        raise ValueError(f"inner_steps must be >= 0, got {inner_steps}")
    if not np.isfinite(init_sigma) or init_sigma <= 0:
        raise ValueError(f"init_sigma must be finite and > 0, got {init_sigma}")
    outer = outer_optimizer if outer_optimizer is not None else optax.adam(1e-2)
    M = model.partition.num_modules

    def unpack(params):
        sigma = sigma_of(params, M)
        return params["phi"], sigma

    def inner_loss(theta, params, data_t):
        phi, sigma = unpack(params)
        return model.inner_objective(theta, phi, sigma, data_t)

    def inner_problem(params) -> InnerProblem:
        return InnerProblem(
            init=params["phi"],
            loss=lambda theta, data_t: inner_loss(theta, params, data_t),
            optimizer=inner_optimizer,
        )

    def init(key, params, sigma: Optional[float] = None) -> MetaState:
        phi = model.partition.ravel(params)
        meta = shrinkage_params(model, phi, init_sigma if sigma is None else sigma, modular=modular)
        return new_state(meta, outer, key)

    def task_terms(params, theta_hat, train_t, val_t):
        """Per task: dL/d(meta) at theta_hat (MAP step) and the PLL hypergradient."""
        inner_grad = jax.grad(lambda th, p: inner_loss(th, p, train_t))
        map_grad = jax.grad(lambda p: inner_loss(theta_hat, p, train_t))(params)
        val_log_lik, g = jax.value_and_grad(model.log_likelihood)(theta_hat, val_t)
        prior_var = model.partition.expand(unpack(params)[1] ** 2)
        v = hypergradient(hessian_vector_product(inner_grad, theta_hat, params), prior_var, g)
        pll_grad = implicit_vjp(inner_grad, theta_hat, params, v)
        return map_grad, pll_grad, val_log_lik

    def step(state: MetaState, batch):
        problem = inner_problem(state.params)
        inner = jax.vmap(lambda d: run_inner(problem, d, inner_steps))(batch.train)
        map_grad, pll_grad, val_log_lik = jax.vmap(task_terms, in_axes=(None, 0, 0, 0))(
            state.params, inner.theta, batch.train, batch.val
        )
        mean = lambda tree: jax.tree_util.tree_map(lambda a: jnp.mean(a, axis=0), tree)
        map_grad, pll_grad = mean(map_grad), mean(pll_grad)
        # minimise: phi along the MAP objective, log sigma^2 along -PLL
        grads = {"phi": map_grad["phi"], "log_sigma2": -pll_grad["log_sigma2"]}
        num_diverged = jnp.sum(inner.diverged)
        state, skipped = outer_update(state, grads, outer, ok=num_diverged == 0)
        metrics = {
            "val_log_lik": jnp.mean(val_log_lik),
            "inner_loss": jnp.mean(inner.final_loss),
            "sigma": sigma_of(state.params, M),
            "num_diverged": num_diverged,
            "skipped": skipped,
        }
        return state, metrics

    default_name = "M-Shrinkage" if modular else "Shrinkage"
    return MetaLearner(
        name=name or default_name,
        model=model,
        init=init,
        step=step,
        inner_problem=inner_problem,
        adapt=make_adapt(inner_problem),
    )


def m_shrinkage(model: HierarchicalModel, **kwargs) -> MetaLearner:
    """M-Shrinkage: :func:`shrinkage` with one sigma per module of ``model.partition``."""
    return shrinkage(model, modular=True, **kwargs)
