"""The internally standardised scale every mixed-model fit optimises on, and the way back.

A covariate in metres next to one in days (grouseticks' raw ``HEIGHT``, 400-550 m) gives
covariance parameters and fixed effects that differ by orders of magnitude, and an optimiser with
one tolerance for all of them stops at once or never.  The fits therefore work on a design whose
columns are of unit size, an exact reparametrisation:

* fixed effects: ``X_s = X A`` with ``beta = A beta_s``.  With an intercept column, every other
  column is centred and divided by its sd (``A`` unit upper-triangular in the intercept's row,
  diagonal ``1/s_j``); without one, divided by its root mean square.  Constant columns other than
  the intercept are left alone (the rank check sees them).  ``cov(beta) = A cov(beta_s) A'`` and
  ``log|R_X|^2 = log|R_X,s|^2 - 2 log|det A|`` (REML's determinant).
* random effects: each term's columns divided by their root mean square ``d_j`` (an intercept's
  is 1; no centring, which would change what a diagonal ``(x || g)`` term means):
  ``Z_s = Z D^-1``, ``b_s = D b``, ``T_s = D T`` (still lower triangular), so
  ``Sigma = D^-1 Sigma_s D^-1`` and the likelihood is unchanged.

The response is not rescaled: the covariance parameters ``theta`` are relative to the residual sd
and do not depend on its units.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from .terms import MixedDesign, relative_factors, theta_from_factors

__all__ = ["Standardization", "standardize"]


class Standardization(NamedTuple):
    """The map between a design and its standardised copy (module docstring).

    Attributes:
      A: ``(p, p)`` with ``X_s = X A`` and ``beta = A beta_s``.
      log_abs_det_A: ``log|det A|``.
      column_scales: per term the ``q_k`` root mean squares ``d`` of its columns.
      terms: the original terms (for the theta maps).
    """

    A: np.ndarray
    log_abs_det_A: float
    column_scales: tuple
    terms: tuple

    def beta(self, beta_s: np.ndarray) -> np.ndarray:
        return self.A @ beta_s

    def beta_s(self, beta: np.ndarray) -> np.ndarray:
        return np.linalg.solve(self.A, beta)

    def beta_cov(self, cov_s: np.ndarray) -> np.ndarray:
        return self.A @ cov_s @ self.A.T

    def log_det_X(self, log_det_X_s: float) -> float:
        """``log|R_X|^2`` of the original design from the standardised one's."""
        return log_det_X_s - 2.0 * self.log_abs_det_A

    def theta(self, theta_s: np.ndarray) -> np.ndarray:
        """``T = D^-1 T_s`` for every term."""
        factors = relative_factors(self.terms, theta_s)
        return theta_from_factors(self.terms, [T / d[:, None] for T, d in zip(factors, self.column_scales)])

    def theta_s(self, theta: np.ndarray) -> np.ndarray:
        """``T_s = D T`` for every term."""
        factors = relative_factors(self.terms, theta)
        return theta_from_factors(self.terms, [T * d[:, None] for T, d in zip(factors, self.column_scales)])

    def effects(self, b_s: list) -> list:
        """Per-term random effects ``(L_k, q_k)`` on the original scale: ``b = D^-1 b_s``."""
        return [b / d for b, d in zip(b_s, self.column_scales)]

    def effect_covariances(self, cov_s: list) -> list:
        """Per-term ``(L_k, q_k, q_k)`` covariances on the original scale: ``D^-1 C D^-1``."""
        return [C / d[:, None] / d[None, :] for C, d in zip(cov_s, self.column_scales)]


def _rms(a: np.ndarray) -> np.ndarray:
    r = np.sqrt(np.mean(np.square(a), axis=0))
    return np.where(r > 0, r, 1.0)


def standardize(design: MixedDesign) -> tuple:
    """``(standardised design, Standardization)``: the same model on unit-sized columns."""
    X = np.asarray(design.X, dtype=float)
    n, p = X.shape
    A = np.eye(p)
    if p:
        const = np.all(X == X[:1], axis=0)
        intercept = np.flatnonzero(const & (X[0] == 1.0))
        if intercept.size:
            i0 = int(intercept[0])
            mean, sd = X.mean(axis=0), X.std(axis=0)
            for j in range(p):
                if j != i0 and sd[j] > 0:
                    A[j, j] = 1.0 / sd[j]
                    A[i0, j] = -mean[j] / sd[j]
        else:
            A = np.diag(1.0 / _rms(X))
    X_s = X @ A
    scales, terms = [], []
    for t in design.terms:
        d = _rms(t.Z)
        scales.append(d)
        terms.append(t._replace(Z=t.Z / d))
    log_abs_det = float(np.sum(np.log(np.abs(np.diag(A))))) if p else 0.0  # A is triangular up to a permutation
    std = Standardization(A=A, log_abs_det_A=log_abs_det, column_scales=tuple(scales), terms=tuple(design.terms))
    return design._replace(X=X_s, terms=tuple(terms)), std
