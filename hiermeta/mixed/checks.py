"""Data defects a mixed model cannot survive, found before anything is fitted.

* **A rank-deficient fixed design** (on the rows used: every row, missing values being an error
  in :mod:`~hiermeta.mixed.formula`).  ``X beta`` does not identify ``beta`` then: the fixed
  block ``R_X`` of the PLS system is singular, and an optimiser returns NaN or arbitrary
  coefficients with enormous standard errors.  Columns are taken in formula order and a column
  is *dependent* when its residual after projection on the kept columns has a norm below
  ``tol`` (1e-7, lme4's ``qr`` tolerance) times its own.  Default: drop the dependent columns
  with a :class:`~hiermeta.errors.DesignWarning` naming them, as lme4 (and R's ``lm``) do --
  interactions of factors with an empty cell are common and their dependent dummies carry no
  information; the fit records what was dropped.  ``rank_deficient="error"`` refuses instead.
* **A random-effect term with as many coefficients as observations** beside a Gaussian residual
  (``L_k q_k >= n``; one level per row for ``(1 | g)``): the term's variance and the residual
  variance enter the likelihood only through their sum, so neither is identified (lme4's
  ``check.nobs.vs.nRE``, an error by default there too).  A GLMM has no residual variance and may
  have one level per row (an observation-level effect for overdispersion).  A grouping factor
  with one level is refused as well (lme4: "grouping factors must have > 1 sampled level").
* **An all-equal response** (or, Gaussian, one the fixed effects reproduce exactly): the residual
  variance is 0, the deviance runs to minus infinity; binomial all 0 or all 1, Poisson all 0: the
  intercept runs to minus/plus infinity.  An error.

Separation in a binomial GLMM is a property of the fit, not only of the data; the GLMM fit
(:mod:`hiermeta.mixed.glmm`) detects it.
"""

from __future__ import annotations

import warnings

import numpy as np

from ..errors import DataDefectError, DesignWarning
from .terms import MixedDesign

__all__ = ["independent_columns", "drop_dependent_columns", "check_terms", "check_response", "check_design", "RANK_TOL"]

RANK_TOL = 1e-7  # lme4's tolerance of the QR rank test of X


def independent_columns(X: np.ndarray, tol: float = RANK_TOL) -> np.ndarray:
    """Boolean mask of the columns kept when those dependent on earlier kept ones are dropped.

    Gram-Schmidt with re-orthogonalisation, in column order: column ``j`` is kept when
    ``||x_j - Q Q' x_j|| > tol ||x_j||`` (``Q`` an orthonormal basis of the kept columns); a
    column of zeros is dependent.
    """
    X = np.asarray(X, dtype=float)
    n, p = X.shape
    keep = np.zeros(p, dtype=bool)
    basis = np.zeros((n, 0))
    for j in range(p):
        x = X[:, j]
        norm = float(np.linalg.norm(x))
        if norm == 0.0:
            continue
        r = x / norm
        for _ in range(2):  # twice is enough (Kahan's re-orthogonalisation)
            r = r - basis @ (basis.T @ r)
        rn = float(np.linalg.norm(r))
        if rn > tol:
            keep[j] = True
            basis = np.column_stack([basis, r / rn])
    return keep


def drop_dependent_columns(design: MixedDesign, action: str = "drop") -> tuple:
    """``(design, dropped names)``: ``design`` without the dependent fixed columns (module docstring).

    ``action``: ``"drop"`` (warn, as lme4) or ``"error"`` (raise :class:`DataDefectError`).
    """
    if action not in ("drop", "error"):
        raise ValueError(f"rank_deficient must be 'drop' or 'error', got {action!r}")
    if design.num_fixed == 0:
        return design, ()
    keep = independent_columns(design.X)
    if keep.all():
        return design, ()
    dropped = tuple(n for n, k in zip(design.fixed_names, keep) if not k)
    kept = tuple(n for n, k in zip(design.fixed_names, keep) if k)
    message = (f"the fixed-effects design is rank deficient: column(s) {list(dropped)} are linear combinations "
               f"of the columns before them ({design.num_fixed} columns, rank {int(keep.sum())})")
    if action == "error":
        raise DataDefectError(message + "; remove them from the formula (or pass rank_deficient='drop')")
    warnings.warn(message + "; they are dropped, as lme4 does", DesignWarning, stacklevel=3)
    return design._replace(X=design.X[:, keep], fixed_names=kept), dropped


def check_terms(design: MixedDesign, family: str = "gaussian") -> None:
    """Refuse a grouping factor with one level, and (Gaussian) a term with ``L_k q_k >= n`` coefficients."""
    n = design.num_rows
    for t in design.terms:
        if t.num_levels < 2:
            raise DataDefectError(f"the grouping factor {t.group!r} of {t.label()} has {t.num_levels} level; a "
                                  "random effect needs at least 2 levels")
        size = t.num_levels * t.num_columns
        if family == "gaussian" and size >= n:
            raise DataDefectError(
                f"{t.label()} has {size} random coefficients for {n} observations "
                f"({t.num_levels} levels of {t.group!r}{' x ' + str(t.num_columns) + ' columns' if t.num_columns > 1 else ''}): "
                "beside the residual its variance is not identifiable (only their sum is). Drop the term, or fit "
                "a model without a residual (a GLMM) if an observation-level effect is meant")


def check_response(design: MixedDesign, family: str = "gaussian") -> None:
    """Refuse a response the model cannot fit (module docstring)."""
    y = np.asarray(design.response, dtype=float)
    name = design.response_name
    if family == "gaussian":
        scale = max(float(np.max(np.abs(y))), 1e-300)
        if float(np.ptp(y)) <= 1e-12 * scale:
            raise DataDefectError(f"the response {name!r} has the same value ({y[0]:g}) on every row: there is no "
                                  "variance to model (the residual variance would be 0)")
        if design.num_fixed:
            resid = y - design.offset - design.X @ np.linalg.lstsq(design.X, y - design.offset, rcond=None)[0]
            if float(np.linalg.norm(resid)) <= 1e-10 * max(float(np.linalg.norm(y)), 1e-300):
                raise DataDefectError(f"the fixed effects {list(design.fixed_names)} reproduce the response {name!r} "
                                      "exactly: the residual variance would be 0")
    elif family == "binomial" and (np.all(y == 0) or np.all(y == 1)):
        raise DataDefectError(f"the binomial response {name!r} is {int(y[0])} on every row: the intercept runs to "
                              f"{'-' if y[0] == 0 else '+'}infinity")
    elif family == "poisson" and np.all(y == 0):
        raise DataDefectError(f"the Poisson response {name!r} is 0 on every row: the intercept runs to -infinity")


def check_design(design: MixedDesign, family: str = "gaussian", rank_deficient: str = "drop") -> tuple:
    """Every check above: ``(design with dependent columns dropped, dropped names)``."""
    check_response(design, family)
    check_terms(design, family)
    return drop_dependent_columns(design, rank_deficient)
