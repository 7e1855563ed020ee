"""sigma-iMAML: phi and the shrinkage sigma both by the exact PLL hypergradient.

Empirical Bayes by predictive likelihood on every meta-parameter:

    maximise  PLL(phi, rho) = sum_t log p(D_t^val | theta_hat_t(phi, rho)),
    theta_hat_t = argmin_theta -log N(theta | phi, diag(exp(rho))) - log p(D_t^tr | theta),

rho = log sigma^2 per module (M-sigma-iMAML) or shared (sigma-iMAML).  At the inner optimum,
with H_t the Hessian of L_t and v_t = H_t^{-1} g_t (g_t = grad log p(D_t^val | theta_hat_t),
solved by conjugate gradient on Hessian-vector products):

    dPLL/dphi_m = sum_t v_{m,t} / sigma_m^2,
    dPLL/drho_m = sum_t v_{m,t} . (theta_hat_{m,t} - phi_m) / sigma_m^2.

With sigma fixed this is iMAML (lambda = 1/sigma^2); with Eq. 4's ``v = sigma^2 g`` the phi step
is first-order MAML.  Outer steps use means over tasks.  Metrics include ``cg_iterations`` and
``cg_residual`` (worst relative residual of H v = g over the batch).
"""

from __future__ import annotations

from typing import Optional, Union

import optax

from ..hierarchy import HierarchicalModel
from ..implicit import Solver
from ..solvers import InnerSolver
from .base import MetaLearner
from .bilevel import gaussian_prior_learner

__all__ = ["sigma_imaml", "m_sigma_imaml"]


def sigma_imaml(
    model: HierarchicalModel,
    *,
    inner_optimizer: Optional[optax.GradientTransformation] = None,
    inner_steps: Optional[int] = None,
    inner_solver: Optional[InnerSolver] = None,
    outer_optimizer: Optional[optax.GradientTransformation] = None,
    modular: bool = False,
    init_sigma: Optional[float] = None,
    hypergradient: Union[str, Solver] = "exact",
    name: Optional[str] = None,
) -> MetaLearner:
    """Build sigma-iMAML (``modular=False``: one sigma) or M-sigma-iMAML (one sigma per module).

    Args are as :func:`hiermeta.learners.shrinkage`; ``hypergradient`` defaults to ``"exact"``
    (conjugate gradient, :func:`hiermeta.implicit.cg_solve` defaults); pass
    ``cg_solve(damping=..., tol=..., maxiter=...)`` to tune it.  Meta-parameters:
    ``{"phi", "log_sigma2"}``.
    """
    default_name = "M-sigma-iMAML" if modular else "sigma-iMAML"
    return gaussian_prior_learner(
        model,
        name=name or default_name,
        phi_step="pll",
        phi_hypergradient=hypergradient,
        sigma_step=hypergradient,  # one solve serves both steps
        inner_optimizer=inner_optimizer,
        inner_steps=inner_steps,
        inner_solver=inner_solver,
        outer_optimizer=outer_optimizer,
        modular=modular,
        init_sigma=init_sigma,
    )


def m_sigma_imaml(model: HierarchicalModel, **kwargs) -> MetaLearner:
    """M-sigma-iMAML: :func:`sigma_imaml` with one sigma per module of ``model.partition``."""
    return sigma_imaml(model, modular=True, **kwargs)
