"""MAML and M-MAML (Finn et al. 2017; learned inner rates as in Antoniou et al. 2019), and their
first-order versions FOMAML and FO-M-MAML.

Meta-parameters: phi (flat ``(P,)``) and ``log_lr``, the log inner learning rate: ``(1,)`` shared
by all coordinates (MAML) or ``(M,)`` one per module of ``model.partition`` (M-MAML).  There is no
prior: the inner loop descends the task's negative log-likelihood from phi,

    theta_0 = phi,   theta_{k+1} = theta_k - alpha * P(grad_theta[-log p(D_t^tr | theta_k)]),
    alpha = exp(log_lr) per coordinate (its module's rate),  P = identity (SGD) or a preconditioner,

and the meta-objective, minimised over (phi, log_lr), is the query loss after K steps:

    J(phi, log_lr) = mean_t  -log p(D_t^val | theta_{t,K}(phi, log_lr)).

MAML takes its exact gradient, backpropagating through the K unrolled steps (second order).
The first-order versions stop the gradient of each inner step's ``P(grad)`` (so the Hessian terms
vanish): d theta_K / d phi = I and d theta_K / d log_lr_m = -sum_k alpha_m P(g_k)_m, which gives
the classic FOMAML phi update (the query gradient at theta_K) plus a first-order rate update.
The K steps are the algorithm (not a solve of anything): step metrics report their stationarity
(``inner_stationarity``, the worst relative gradient norm at theta_K over the batch), never
judged, so MAML raises no convergence warnings.

On a model with task covariates the steps start at ``theta_0 = phi + z_t gamma``; the likelihood's
globals (``noise_sd``, ``beta``) enter every inner step and the query loss.  gamma and the globals
are meta-parameters (``params["extra"]``, unconstrained), differentiated through the unrolled steps
like phi (first order: through ``theta_0`` and the query loss only).  A model's correlation sites
and sigma play no part (MAML has no prior).
"""

from __future__ import annotations

import math
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ..hierarchy import HierarchicalModel
from ..inner import InnerProblem, run_inner
from ..solvers import gradient_steps
from ..utils import check_count
from .base import (MetaLearner, MetaState, extra_metrics, extra_params, extra_values, flat_phi,
                   inner_metrics, learned_sites, make_adapt, new_state, outer_update, starting_values, task_start)
from .info import MAMLInfo

__all__ = ["maml", "m_maml", "fomaml", "fo_m_maml", "learned_rate_sgd", "maml_params", "rates_of"]


def learned_rate_sgd(
    rates: jax.Array,
    preconditioner: Optional[optax.GradientTransformation] = None,
    first_order: bool = False,
) -> optax.GradientTransformation:
    """``update = -rates * P(grad)``, with per-coordinate ``rates`` ``(P,)`` that may be traced.

    ``first_order=True`` stops the gradient through ``P(grad)`` (not through ``rates``).
    An adaptive ``preconditioner`` differentiated through must keep square roots away from 0,
    e.g. ``optax.scale_by_adam(eps_root=1e-12)`` (``eps_root=0`` gives NaN meta-gradients where
    a gradient coordinate is exactly 0).
    """
    inner = preconditioner if preconditioner is not None else optax.identity()

    def init(params):
        return inner.init(params)

    def update(grads, state, params=None):
        direction, state = inner.update(grads, state, params)
        if first_order:
            direction = jax.lax.stop_gradient(direction)
        return jax.tree_util.tree_map(lambda d: -rates * d, direction), state

    return optax.GradientTransformation(init, update)


def rates_of(params, num_modules: int) -> jax.Array:
    """Per-module inner learning rates ``(M,)`` from ``params["log_lr"]`` (``(M,)`` or ``(1,)``)."""
    return jnp.broadcast_to(jnp.exp(params["log_lr"]), (num_modules,))


def maml_params(model: HierarchicalModel, phi, lr, modular: bool) -> dict:
    """Meta-parameters for flat ``phi`` ``(P,)`` and an inner rate (scalar, or ``(M,)`` if modular)."""
    part = model.partition
    lr = np.asarray(lr, dtype=float)
    if not modular and lr.ndim > 0 and np.ptp(lr) > 0:
        raise ValueError("a non-modular MAML learner has one inner learning rate for all modules")
    lr = part.check_per_module(lr, "lr")
    if not np.all(np.isfinite(lr)) or np.any(lr <= 0):
        raise ValueError(f"the inner learning rate must be finite and > 0, got {lr}")
    if not modular:
        lr = lr[:1]
    return {"phi": jnp.asarray(phi), "log_lr": jnp.asarray(np.log(lr), dtype=jnp.asarray(phi).dtype)}


def maml(
    model: HierarchicalModel,
    *,
    inner_steps: int,
    init_lr: float,
    outer_optimizer: Optional[optax.GradientTransformation] = None,
    modular: bool = False,
    first_order: bool = False,
    learn_lr: bool = True,
    preconditioner: Optional[optax.GradientTransformation] = None,
    remat: bool = False,
    name: Optional[str] = None,
) -> MetaLearner:
    """Build MAML (defaults), M-MAML (``modular``) or their first-order versions (``first_order``).

    Args:
      model: the hierarchical model; only its likelihood and partition are used (no prior).
      inner_steps: K, the unrolled inner steps during meta-training.
      init_lr: initial inner learning rate (> 0).
      outer_optimizer: optax optimiser on ``{"phi", "log_lr"}`` (default Adam, lr 1e-2).
      modular: one learned rate per module (M-MAML) instead of one shared rate.
      first_order: stop second-order terms (FOMAML, FO-M-MAML).
      learn_lr: if False the rate stays at ``init_lr`` (its gradient is zeroed).
      preconditioner: optional rate-free inner transformation (e.g. ``optax.scale_by_adam``).
      remat: rematerialise the inner steps (``jax.checkpoint``) to cut backpropagation memory.
    """
    inner_steps = check_count(inner_steps, "inner_steps", 1)
    if not np.isfinite(init_lr) or init_lr <= 0:
        raise ValueError(f"init_lr must be finite and > 0, got {init_lr}")
    outer = outer_optimizer if outer_optimizer is not None else optax.adam(1e-2)
    M = model.partition.num_modules

    sites = learned_sites(model, ("global", "group_coefficients"))

    def task_loss(theta, data_t, extra=None):
        return -model.log_likelihood(theta, data_t, extra)

    def steps(rates):  # the differentiable unrolled steps; stationarity reported, never judged
        return gradient_steps(learned_rate_sgd(rates, preconditioner, first_order), inner_steps, tol=math.inf,
                              remat=remat)

    def inner_problem(params) -> InnerProblem:
        extra = extra_values(model, params)
        return InnerProblem(task_start(model, params["phi"], extra), lambda th, d: task_loss(th, d, extra),
                            steps(model.partition.expand(rates_of(params, M))))

    def init(key, params=None, lr: Optional[float] = None, extra=None, data=None) -> MetaState:
        """phi (a pytree like the model's, or flat), the inner rate, the extra sites' constrained
        starts (``extra=``); ``data`` gives defaults where the likelihood offers ``initial_values``."""
        start = starting_values(model, data)
        if params is None:
            if "phi" not in start:
                raise ValueError("MAML's init needs params (phi), or data= whose likelihood offers initial_values")
            phi = jnp.asarray(start["phi"], dtype=jnp.zeros(()).dtype)
        else:
            phi = flat_phi(model, params)
        meta = maml_params(model, phi, init_lr if lr is None else lr, modular)
        if sites:
            meta["extra"] = extra_params(model, sites, extra, defaults=start, learner=name or "MAML")
        elif extra:
            raise ValueError("extra= given, but MAML learns no extra sites on this model")
        return new_state(meta, outer, key)

    def meta_objective(params, batch):
        problem = inner_problem(params)
        extra = extra_values(model, params)

        def one(train_t, val_t):
            result = run_inner(problem, train_t)
            return task_loss(result.theta, val_t, extra), result

        losses, result = jax.vmap(one)(batch.train, batch.val)
        return jnp.mean(losses), result

    def meta_gradient(params, batch):
        (loss, inner), grads = jax.value_and_grad(meta_objective, has_aux=True)(params, batch)
        if not learn_lr:
            grads = {**grads, "log_lr": jnp.zeros_like(grads["log_lr"])}
        return grads, (loss, inner)

    def step(state: MetaState, batch):
        grads, (loss, inner) = meta_gradient(state.params, batch)
        num_diverged = jnp.sum(inner.diverged)
        state, skipped = outer_update(state, grads, outer, ok=num_diverged == 0)
        return state, MAMLInfo(
            val_log_lik=-loss,
            inner_loss=jnp.mean(inner.final_loss),
            lr=rates_of(state.params, M),
            extra=extra_metrics(model, state.params),
            num_diverged=num_diverged,
            **inner_metrics(inner),
            skipped=skipped,
        )

    default = {(False, False): "MAML", (True, False): "M-MAML", (False, True): "FOMAML",
               (True, True): "FO-M-MAML"}[(bool(modular), bool(first_order))]
    return MetaLearner(
        name=name or default,
        model=model,
        init=init,
        step=step,
        inner_problem=inner_problem,
        adapt=make_adapt(inner_problem),
        # budget and tolerance for host-side checks (the rate here is the initial one)
        inner_solver=steps(np.full((model.partition.num_params,), float(init_lr))),
        meta_gradient=meta_gradient,
    )


def m_maml(model: HierarchicalModel, **kwargs) -> MetaLearner:
    """M-MAML: :func:`maml` with one learned inner learning rate per module."""
    return maml(model, modular=True, **kwargs)


def fomaml(model: HierarchicalModel, **kwargs) -> MetaLearner:
    """FOMAML: first-order :func:`maml` (one shared learned rate)."""
    return maml(model, first_order=True, **kwargs)


def fo_m_maml(model: HierarchicalModel, **kwargs) -> MetaLearner:
    """FO-M-MAML: first-order M-MAML (one learned rate per module)."""
    return maml(model, modular=True, first_order=True, **kwargs)
