"""What every mixed-model fit returns to the result object: one record for ML, REML, Laplace and AGQ.

The Gaussian fit (:mod:`hiermeta.mixed.lmm`) and the GLMM fits (:mod:`hiermeta.mixed.glmm`)
return an :class:`Estimate`; :class:`hiermeta.mixed.result.MixedFit` wraps it with the model and
the data and derives everything a user reads (names, standard errors, variance components,
conditional modes, predictions, information criteria).
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import numpy as np

__all__ = ["Estimate"]


class Estimate(NamedTuple):
    """A fitted mixed model's numbers, in the model's own order (no names).

    Attributes:
      method: ``"REML"``, ``"ML"``, ``"Laplace"`` or ``"AGQ(n)"``.
      theta: the covariance parameters (:mod:`hiermeta.mixed.terms`): ``Sigma_k = s^2 T_k T_k'``.
      beta: ``(p,)`` fixed effects; beta_cov: ``(p, p)`` their covariance (lme4's ``vcov``).
      sigma: the residual sd ``s`` of a Gaussian model (None for the other families).
      b: the conditional modes of the random effects, one ``(L_k, q_k)`` array per term.
      b_cov: their conditional covariances, one ``(L_k, q_k, q_k)`` array per term (lme4's ``condVar``).
      loglik: the maximised log-likelihood (for REML: minus half the REML criterion), as lme4's ``logLik``.
      objective: the optimised criterion as lme4 prints it (``REML criterion`` or ``deviance``,
        -2 log L up to lme4's conventions).
      num_params: the number of estimated parameters (fixed effects, theta, and s), for AIC/BIC.
      converged: the optimiser met its tolerance and the estimate is finite.
      iterations: objective evaluations (or optimiser iterations; see ``message``).
      message: the optimiser's own account.
      singular: the names of covariance parameters on the boundary (a variance at 0, a
        correlation at +-1: lme4's "boundary (singular) fit").
      notes: every warning the fit raised, as text (also issued as warnings).
    """

    method: str
    theta: np.ndarray
    beta: np.ndarray
    beta_cov: np.ndarray
    sigma: Optional[float]
    b: list
    b_cov: list
    loglik: float
    objective: float
    num_params: int
    converged: bool
    iterations: int
    message: str
    singular: tuple = ()
    notes: tuple = ()
