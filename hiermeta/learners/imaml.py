"""iMAML (Rajeswaran et al. 2019): a fixed proximal strength lambda, phi by the exact hypergradient.

    theta_hat_t = argmin_theta  -log p(D_t^tr | theta) + lambda/2 ||theta - phi||^2
    maximise    PLL(phi) = sum_t log p(D_t^val | theta_hat_t(phi))

The proximal term is Eq. 1's prior with one shared, fixed sigma^2 = 1/lambda, so the inner
problem is the hierarchical model's L_t.  At the inner optimum, with H_t the Hessian of the
training negative log-likelihood and g_t = grad log p(D_t^val | theta_hat_t),

    dPLL/dphi = sum_t (I + H_t / lambda)^{-1} g_t = sum_t lambda (H_t + lambda I)^{-1} g_t,

with the linear system solved by conjugate gradient on Hessian-vector products (damping,
tolerance and iteration budget as in :func:`hiermeta.implicit.cg_solve`).  The meta-parameters
are ``{"phi"}``; outer steps use means over tasks.  Metrics include ``cg_iterations`` and
``cg_residual``.
"""

from __future__ import annotations

from typing import Optional, Union

import numpy as np
import optax

from ..hierarchy import HierarchicalModel
from ..implicit import Solver
from ..solvers import InnerSolver
from .base import MetaLearner
from .bilevel import gaussian_prior_learner

__all__ = ["imaml"]


def imaml(
    model: HierarchicalModel,
    *,
    lam: float,
    inner_optimizer: Optional[optax.GradientTransformation] = None,
    inner_steps: Optional[int] = None,
    inner_solver: Optional[InnerSolver] = None,
    outer_optimizer: Optional[optax.GradientTransformation] = None,
    hypergradient: Union[str, Solver] = "exact",
    name: Optional[str] = None,
) -> MetaLearner:
    """Build iMAML with proximal strength ``lam`` (> 0), i.e. a fixed shared sigma = lam^-1/2.

    Args:
      lam: lambda, the proximal regularisation strength (finite, > 0).
      inner_optimizer, inner_steps, inner_solver, outer_optimizer: as
        :func:`hiermeta.learners.shrinkage`.
      hypergradient: ``"exact"`` (default; conjugate gradient), a solver such as
        ``cg_solve(damping=..., maxiter=5)``, or ``"eq4"`` (then the step is first-order MAML
        on the proximal inner problem).
    """
    if not np.isfinite(lam) or lam <= 0:
        raise ValueError(f"lam (lambda) must be finite and > 0, got {lam}")
    return gaussian_prior_learner(
        model,
        name=name or "iMAML",
        phi_step="pll",
        phi_hypergradient=hypergradient,
        sigma_step="fixed",
        fixed_sigma=float(lam) ** -0.5,
        inner_optimizer=inner_optimizer,
        inner_steps=inner_steps,
        inner_solver=inner_solver,
        outer_optimizer=outer_optimizer,
    )
