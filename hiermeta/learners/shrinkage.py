"""Shrinkage and M-Shrinkage: Algorithm 1 of Chen et al.

Meta-parameters: phi (flat, ``(P,)``) and rho = log sigma^2 (``(M,)`` per module for
M-Shrinkage, ``(1,)`` shared by all modules for Shrinkage).  Each meta-iteration:

1. for each task, theta_t <- phi, then the inner solver on (K optimiser steps in the paper)
   L_t(theta) = -log N(theta | phi, sigma^2) - log p(D_t^tr | theta)              (Eq. 2);
2. phi takes one outer step along the MAP gradient  mean_t dL_t/dphi = -mean_t (theta_hat_t - phi) / sigma^2;
3. rho takes one outer step along the PLL hypergradient  mean_t dlog p(D_t^val | theta_hat_t)/d rho,
   by Eq. 4 (``hypergradient="eq4"``, the paper's), exactly by conjugate gradient
   (``hypergradient="exact"`` or ``hiermeta.implicit.cg_solve(...)``), or by any solver of H v = g.

Means over tasks (not sums) keep the outer learning rates independent of the batch size.
The step info (:class:`~hiermeta.learners.info.BilevelInfo`) holds the solvers' diagnostics: ``inner_stationarity`` (worst relative gradient
norm of the inner solutions over the batch), ``num_unconverged``, ``cg_iterations`` (0 for Eq. 4)
and ``cg_residual``, the worst relative residual ``||H v - g|| / ||g||`` over the batch.
"""

from __future__ import annotations

from typing import Optional, Union

import optax

from ..hierarchy import HierarchicalModel
from ..implicit import Solver
from ..solvers import InnerSolver
from .base import MetaLearner
from .bilevel import gaussian_prior_learner, shrinkage_params, sigma_of

__all__ = ["shrinkage", "m_shrinkage", "shrinkage_params", "sigma_of"]


def shrinkage(
    model: HierarchicalModel,
    *,
    inner_optimizer: Optional[optax.GradientTransformation] = None,
    inner_steps: Optional[int] = None,
    inner_solver: Optional[InnerSolver] = None,
    outer_optimizer: Optional[optax.GradientTransformation] = None,
    modular: bool = False,
    init_sigma: Optional[float] = None,
    hypergradient: Union[str, Solver] = "eq4",
    name: Optional[str] = None,
) -> MetaLearner:
    """Build the Shrinkage (``modular=False``) or M-Shrinkage (``modular=True``) learner.

    Args:
      model: the hierarchical model; its partition defines the modules.
      inner_optimizer: optax optimiser for the K inner steps on L_t (e.g. ``optax.sgd(0.3)``);
        a solve counts as converged at relative gradient norm 1e-2 (:mod:`hiermeta.solvers`).
      inner_steps: K, the number of inner steps during meta-training (alone: K gradient steps
        of size ``1 / lambda_max`` of the Hessian, :func:`hiermeta.solvers.gradient_steps`).
      inner_solver: instead of the two above, an inner solver such as
        :func:`hiermeta.solvers.newton` ``()`` or :func:`~hiermeta.solvers.lbfgs` ``()``, or
        either in the prior's scale (:func:`~hiermeta.solvers.prior_scaled`: for a network whose
        layers have very different sigmas).
        With none of the three: Newton for up to 256 parameters, L-BFGS above.
      outer_optimizer: optax optimiser on ``{"phi", "log_sigma2"}`` (default Adam, lr 1e-2).
      modular: one sigma per module (True) or one sigma shared by all modules (False).
      init_sigma: initial sigma (> 0); default 1, or data-scaled when ``init`` gets ``data=``.
      hypergradient: the sigma hypergradient: ``"eq4"`` (default, the paper's Eq. 4),
        ``"exact"`` (conjugate gradient, :func:`hiermeta.implicit.cg_solve` defaults), or a
        solver ``(hvp, prior_var, g) -> v ~ H^{-1} g`` such as ``cg_solve(damping=..., maxiter=...)``.
    """
    default_name = "M-Shrinkage" if modular else "Shrinkage"
    return gaussian_prior_learner(
        model,
        name=name or default_name,
        phi_step="map",
        sigma_step=hypergradient,
        inner_optimizer=inner_optimizer,
        inner_steps=inner_steps,
        inner_solver=inner_solver,
        outer_optimizer=outer_optimizer,
        modular=modular,
        init_sigma=init_sigma,
    )


def m_shrinkage(model: HierarchicalModel, **kwargs) -> MetaLearner:
    """M-Shrinkage: :func:`shrinkage` with one sigma per module of ``model.partition``."""
    return shrinkage(model, modular=True, **kwargs)
