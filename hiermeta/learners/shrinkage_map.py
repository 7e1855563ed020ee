"""M-Shrinkage MAP: sigma by maximising the joint MAP density instead of the PLL (the paper's
appendix variant, which shows why the predictive log-likelihood is needed).

Same model, inner loop and phi step as :func:`~hiermeta.learners.shrinkage.shrinkage`; only the
sigma step differs.  Both phi and rho = log sigma^2 descend the joint objective at the inner MAP,

    mean_t d L_t(theta_hat_t; phi, rho) / d (phi, rho),
    L_t = -log N(theta | phi, sigma^2) - log p(D_t^tr | theta)                          (Eq. 2)
    dL_t / d rho_m = D_m / 2 - ||theta_hat_{m,t} - phi_m||^2 / (2 sigma_m^2),

(by the envelope theorem this is the gradient of the joint MAP objective maximised over theta
too).  It pulls sigma_m^2 toward the spread of the *shrunk* estimates theta_hat, which is smaller
than sigma_m^2: sigma is biased low, and collapses to 0 for modules whose true spread is small
against the noise (Appendix B; ``docs/theory.md`` section 6).  On a model with extra sites
(globals, correlations, gamma) every one of them descends the same joint objective at the MAP.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import optax

from ..hierarchy import HierarchicalModel
from ..inner import run_inner
from ..solvers import InnerSolver
from .base import MetaLearner, MetaState, extra_metrics, extra_values, inner_metrics, outer_update
from .info import ShrinkageMAPInfo
from .shrinkage import shrinkage, sigma_of

__all__ = ["shrinkage_map", "m_shrinkage_map"]


def shrinkage_map(
    model: HierarchicalModel,
    *,
    inner_optimizer: Optional[optax.GradientTransformation] = None,
    inner_steps: Optional[int] = None,
    inner_solver: Optional[InnerSolver] = None,
    outer_optimizer: Optional[optax.GradientTransformation] = None,
    modular: bool = False,
    init_sigma: Optional[float] = None,
    name: Optional[str] = None,
) -> MetaLearner:
    """Build Shrinkage MAP (``modular=False``: one sigma) or M-Shrinkage MAP (one sigma per module);
    arguments as :func:`~hiermeta.learners.shrinkage.shrinkage`."""
    outer = outer_optimizer if outer_optimizer is not None else optax.adam(1e-2)
    base = shrinkage(model, inner_optimizer=inner_optimizer, inner_steps=inner_steps, inner_solver=inner_solver,
                     outer_optimizer=outer, modular=modular, init_sigma=init_sigma)
    M = model.partition.num_modules

    def joint_loss(params, theta, data_t):
        return model.inner_objective(theta, params["phi"], sigma_of(params, M), data_t, extra_values(model, params))

    def meta_gradient(params, batch):
        problem = base.inner_problem(params)
        inner = jax.vmap(lambda d: run_inner(problem, d))(batch.train)
        grads = jax.vmap(jax.grad(joint_loss), in_axes=(None, 0, 0))(params, inner.theta, batch.train)
        grads = jax.tree_util.tree_map(lambda a: jnp.mean(a, axis=0), grads)
        return grads, inner

    def step(state: MetaState, batch):
        grads, inner = meta_gradient(state.params, batch)
        extra = extra_values(model, state.params)
        val_log_lik = jax.vmap(lambda th, d: model.log_likelihood(th, d, extra))(inner.theta, batch.val)
        num_diverged = jnp.sum(inner.diverged)
        state, skipped = outer_update(state, grads, outer, ok=num_diverged == 0)
        return state, ShrinkageMAPInfo(
            val_log_lik=jnp.mean(val_log_lik),
            inner_loss=jnp.mean(inner.final_loss),
            sigma=sigma_of(state.params, M),
            extra=extra_metrics(model, state.params),
            num_diverged=num_diverged,
            **inner_metrics(inner),
            skipped=skipped,
        )

    default = "M-Shrinkage MAP" if modular else "Shrinkage MAP"
    return base._replace(name=name or default, step=step, meta_gradient=meta_gradient)


def m_shrinkage_map(model: HierarchicalModel, **kwargs) -> MetaLearner:
    """M-Shrinkage MAP: :func:`shrinkage_map` with one sigma per module."""
    return shrinkage_map(model, modular=True, **kwargs)
