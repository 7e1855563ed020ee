"""sigma-Reptile: Reptile's phi step on the shrinkage-regularised task loss, sigma by the predictive likelihood.

The NeurIPS version of Chen et al. ("Modular Meta-Learning with Shrinkage") evaluates it beside
sigma-iMAML on augmented Omniglot with long, minibatched inner loops.  Each meta-iteration:

1. for each task, theta_t <- phi, then K steps of an optimiser on random minibatches of the
   support (:func:`~hiermeta.learners.minibatch.minibatch_steps`) of
   L_t(theta) = -log N(theta | phi, sigma^2) - log p(D_t^tr | theta)              (Eq. 2);
2. phi takes Reptile's step  phi <- phi + beta mean_t (theta_t - phi)  (the outer optimiser on the
   pseudo-gradient ``-mean_t (theta_t - phi)``: ``optax.sgd(beta)`` is exactly this);
3. rho = log sigma^2 takes one step along the PLL hypergradient mean_t dlog p(D_t^val | theta_t)/drho,
   exactly by conjugate gradient at theta_t (``hypergradient="exact"``, the default) or by Eq. 4.

With sigma -> inf the prior drops out of step 1 and this is Reptile; the phi step is the MAP
step ``mean_t (theta_t - phi) / sigma^2`` times sigma^2 per module, so sigma no longer scales
phi's learning rate.  Support and query may hold different numbers of shots, and training
episodes other shots than test ones (Reptile trains Omniglot with more shots than it tests):
nothing in the step depends on them.  A preset of
:func:`~hiermeta.learners.bilevel.gaussian_prior_learner` (``phi_step="reptile"``).
"""

from __future__ import annotations

from typing import Optional, Union

import optax

from ..hierarchy import HierarchicalModel
from ..implicit import Solver
from ..solvers import InnerSolver
from .base import MetaLearner
from .bilevel import gaussian_prior_learner, phi_sigma_optimizer
from .minibatch import minibatch_steps

__all__ = ["sigma_reptile", "m_sigma_reptile"]


def sigma_reptile(
    model: HierarchicalModel,
    *,
    inner_optimizer=None,
    inner_steps: Optional[int] = None,
    batch_size: Optional[int] = None,
    inner_solver: Optional[InnerSolver] = None,
    outer_optimizer: Optional[optax.GradientTransformation] = None,
    modular: bool = False,
    init_sigma: Optional[float] = None,
    hypergradient: Union[str, Solver] = "exact",
    name: Optional[str] = None,
) -> MetaLearner:
    """Build sigma-Reptile (``modular=False``: one sigma) or M-sigma-Reptile (one sigma per module).

    Args:
      inner_optimizer: the inner optimiser (e.g. ``optax.sgd(0.1)`` or
        :func:`~hiermeta.learners.proximal_sgd` ``(rate)``), with ``inner_steps`` (K).
      batch_size: rows of the support per inner step (random minibatches, drawn afresh per task and
        meta-step); None: the whole support at every step.
      inner_solver: instead of the three above, an inner solver (e.g. Newton: the exact MAP).
      outer_optimizer: default ``phi_sigma_optimizer(optax.sgd(1.0), optax.adam(1e-2))``: Reptile's
        beta = 1 on phi, Adam on log sigma^2.
      modular, init_sigma: as :func:`~hiermeta.learners.shrinkage`.
      hypergradient: the sigma step: ``"exact"`` (CG, default), ``"eq4"`` or a solver of ``H v = g``.
    """
    if batch_size is not None:
        if inner_optimizer is None or inner_steps is None or inner_solver is not None:
            raise ValueError("batch_size= needs inner_optimizer= and inner_steps= (and no inner_solver=)")
        inner_optimizer, inner_steps = minibatch_steps(inner_optimizer, inner_steps, batch_size), None
    if outer_optimizer is None:
        outer_optimizer = phi_sigma_optimizer(optax.sgd(1.0), optax.adam(1e-2))
    return gaussian_prior_learner(
        model,
        name=name or ("M-sigma-Reptile" if modular else "sigma-Reptile"),
        phi_step="reptile",
        sigma_step=hypergradient,
        inner_optimizer=inner_optimizer,
        inner_steps=inner_steps,
        inner_solver=inner_solver,
        outer_optimizer=outer_optimizer,
        modular=modular,
        init_sigma=init_sigma,
    )


def m_sigma_reptile(model: HierarchicalModel, **kwargs) -> MetaLearner:
    """M-sigma-Reptile: :func:`sigma_reptile` with one sigma per module of ``model.partition``."""
    return sigma_reptile(model, modular=True, **kwargs)
