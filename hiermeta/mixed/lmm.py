"""Linear mixed models fitted exactly: ML and REML by lme4's profiled deviance.

For ``y ~ N(X beta + offset + Z b, s^2 W^-1)``, ``b = Lambda_theta u``, ``u ~ N(0, s^2 I)``
(:mod:`~hiermeta.mixed.terms`), the fixed effects and the residual variance maximise the
likelihood in closed form for given ``theta``, which leaves a criterion in ``theta`` alone
(Bates et al. 2015, eqs. 34 and 41; ``pwrss``, ``log|L|^2`` = ``log_det_A`` and
``log|R_X|^2`` = ``log_det_X`` from :func:`~hiermeta.mixed.linalg.factorize`):

    ML:    -2 log L(theta)      = log|L|^2 + n (1 + log(2 pi pwrss / n)) - sum log w_i
    REML:  -2 log L_R(theta)    = log|L|^2 + log|R_X|^2 + (n - p)(1 + log(2 pi pwrss / (n - p))) - sum log w_i

(the last term: prior weights ``w``, a row's residual variance ``s^2 / w_i``), with
``s^2 = pwrss / n`` (ML) or ``pwrss / (n - p)`` (REML), ``beta`` the PLS solution, the fixed
effects' covariance ``s^2 (R_X'R_X)^-1`` (lme4's ``vcov``), the conditional modes
``b = Lambda u`` and their conditional covariances ``s^2 Lambda (V'WV + I)^-1 Lambda'`` given
``theta`` and ``beta`` (lme4's ``condVar``).

``theta`` is optimised on the standardised scale (:mod:`~hiermeta.mixed.scaling`) from lme4's
start (``T_k = I`` there) by :func:`~hiermeta.mixed.optimize.minimize_bounded` (L-BFGS-B, a
finite-difference convergence check, a restart when it fails).  A fit that ends with a
diagonal entry of some ``T_k`` below ``SINGULAR_TOL`` (a variance at 0, or a correlation at
+-1) is a boundary (singular) fit, as lme4's ``isSingular`` says; it is reported and warned about
(:class:`~hiermeta.errors.EmpiricalBayesWarning`), as is a fit that did not pass the check.

The criterion is the same function of ``theta`` as lme4's ``devfun``: its minimum, the estimates
and their standard errors agree with lme4 to the optimiser's tolerance.
"""

from __future__ import annotations

import warnings
from typing import Optional

import numpy as np

from ..errors import EmpiricalBayesWarning
from .estimate import Estimate
from .linalg import DENSE_LIMIT, CrossProducts, Layout, factorize
from .optimize import blas_threads, minimize_bounded
from .scaling import standardize
from .terms import MixedDesign, relative_factors, theta_indices, theta_lower_bounds, theta_names, theta_start

__all__ = ["ProfiledDeviance", "fit_lmm", "singular_parameters", "SINGULAR_TOL"]

SINGULAR_TOL = 1e-4  # lme4's isSingular tolerance on the diagonal of T_k (here on the standardised scale)


class ProfiledDeviance:
    """The profiled ML or REML criterion of a Gaussian mixed model as a function of ``theta``.

    Built once per model (cross products of the standardised design; theta-free), then each call
    rescales and factorises (:func:`~hiermeta.mixed.linalg.factorize`).  ``theta`` is on the
    standardised scale; :attr:`scaling` maps it back.
    """

    def __init__(self, design: MixedDesign, reml: bool = True, dense_limit: int = DENSE_LIMIT):
        self.design = design
        self.std_design, self.scaling = standardize(design)
        self.reml = bool(reml)
        self.dense_limit = dense_limit
        n, p = design.num_rows, design.num_fixed
        if reml and n <= p:
            raise ValueError(f"REML needs more observations ({n}) than fixed effects ({p})")
        self.n, self.p = n, p
        self.layout = Layout(self.std_design.terms, n)
        y = np.asarray(design.response, dtype=float) - np.asarray(design.offset, dtype=float)
        self.cross = CrossProducts.build(self.layout, self.std_design.X, y, design.weights)
        self.sum_log_weights = float(np.sum(np.log(design.weights)))

    def factor(self, theta_s):
        return factorize(self.layout, self.cross, theta_s, self.dense_limit)

    def from_factor(self, f) -> float:
        """The criterion on the standardised scale from a factorisation (REML: shifted by ``2 log|det A|``)."""
        if self.reml:
            m = self.n - self.p
            return (f.log_det_A + f.log_det_X + m * (1.0 + np.log(2.0 * np.pi * f.pwrss / m))
                    - self.sum_log_weights)
        return f.log_det_A + self.n * (1.0 + np.log(2.0 * np.pi * f.pwrss / self.n)) - self.sum_log_weights

    def __call__(self, theta_s) -> float:
        return self.from_factor(self.factor(theta_s))

    def original(self, value: float) -> float:
        """The criterion of the original design (REML's ``log|R_X|^2`` differs by ``-2 log|det A|``)."""
        return value - 2.0 * self.scaling.log_abs_det_A if self.reml else value


def singular_parameters(terms, theta_s, tol: float = SINGULAR_TOL) -> tuple:
    """``(names, descriptions)`` of the diagonal entries of the ``T_k`` at (or below) ``tol``.

    A zero diagonal entry ``T_jj`` with the rest of row ``j`` zero is a variance at 0; with an
    entry left of it non-zero, column ``j`` is a linear function of the earlier ones (a
    correlation at +-1, or a rank-deficient covariance).
    """
    names, text = [], []
    all_names = theta_names(terms)
    offset = 0
    for t, T in zip(terms, relative_factors(terms, theta_s)):
        rows, cols = theta_indices(t)
        for i, (r, c) in enumerate(zip(rows, cols)):
            if r == c and T[r, r] < tol:
                names.append(all_names[offset + i])
                if t.correlated and r > 0 and np.any(np.abs(T[r, :r]) > tol):
                    text.append(f"{t.label()}: {t.columns[r]!r} is perfectly correlated with the term's other "
                                "columns (a correlation at +-1)")
                else:
                    text.append(f"{t.label()}: the variance of {t.columns[r]!r} is estimated as 0")
        offset += t.num_theta
    return tuple(names), tuple(text)


def fit_lmm(design: MixedDesign, method: str = "REML", *, start=None, dense_limit: int = DENSE_LIMIT,
            max_evaluations: int = 10000, threads: Optional[int] = 1, warn: bool = True) -> Estimate:
    """Fit a Gaussian linear mixed model by ML or REML (module docstring).

    Args:
      design: the model (checked: :func:`hiermeta.mixed.checks.check_design`).
      method: ``"REML"`` (lme4's default) or ``"ML"``.
      start: ``theta`` on the original scale (default: lme4's start, ``T_k = I``, on the
        standardised scale).
      dense_limit: rest coefficients up to which the Schur complement is factorised densely.
      threads: BLAS threads during the fit (:func:`~hiermeta.mixed.optimize.blas_threads`; None: as set).
      warn: issue the singular-fit and convergence warnings (they are recorded in any case).
    """
    method = str(method).upper()
    if method not in ("REML", "ML"):
        raise ValueError(f"method must be 'REML' or 'ML' for a Gaussian model, got {method!r}")
    with blas_threads(threads):
        return _fit(design, method, start, dense_limit, max_evaluations, warn)


def _fit(design, method, start, dense_limit, max_evaluations, warn) -> Estimate:
    crit = ProfiledDeviance(design, reml=method == "REML", dense_limit=dense_limit)
    terms = design.terms
    lower = theta_lower_bounds(terms)
    x0 = theta_start(terms) if start is None else crit.scaling.theta_s(np.asarray(start, dtype=float))
    opt = minimize_bounded(crit, x0, lower, max_evaluations=max_evaluations)
    theta_s = np.maximum(opt.x, lower)
    f = crit.factor(theta_s)
    value = crit.from_factor(f)
    n, p = crit.n, crit.p
    sigma2 = f.pwrss / ((n - p) if crit.reml else n)
    sigma = float(np.sqrt(sigma2))
    scaling = crit.scaling
    beta = scaling.beta(f.beta)
    beta_cov = scaling.beta_cov(sigma2 * np.linalg.inv(f.fixed_precision)) if p else np.zeros((0, 0))
    factors_s = relative_factors(crit.layout.terms, theta_s)
    b_s = crit.layout.per_term(crit.layout.lambda_times(factors_s, f.u))
    b = scaling.effects(b_s)
    b_cov = scaling.effect_covariances([sigma2 * C for C in f.conditional_covariances(crit.layout, factors_s)])
    objective = crit.original(value)
    singular, singular_text = singular_parameters(crit.layout.terms, theta_s)
    notes = []
    if singular:
        notes.append("boundary (singular) fit: " + "; ".join(singular_text))
    if not opt.converged:
        notes.append(f"the optimiser did not pass the convergence check after {opt.evaluations} evaluations of the "
                     f"{method} criterion ({opt.message}); the estimates may not be the optimum")
    if warn:
        for note in notes:
            warnings.warn(note, EmpiricalBayesWarning, stacklevel=3)
    return Estimate(
        method=method,
        theta=scaling.theta(theta_s),
        beta=beta,
        beta_cov=beta_cov,
        sigma=sigma,
        b=b,
        b_cov=b_cov,
        loglik=-0.5 * objective,
        objective=objective,
        num_params=p + len(theta_s) + 1,
        converged=bool(opt.converged and np.isfinite(objective)),
        iterations=opt.evaluations,
        message=opt.message,
        singular=singular,
        notes=tuple(notes),
    )
