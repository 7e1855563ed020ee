"""Random-effect terms: several grouping factors, lme4's model, as plain NumPy data.

A mixed model over ``n`` rows (Bates et al. 2015, "Fitting Linear Mixed-Effects Models Using
lme4", J. Stat. Softw. 67(1), sections 2 and 3):

    eta_i = x_i beta + offset_i + sum_k Z_k[i] . b_{k, g_k(i)}          (the linear predictor)
    b_{k,l} ~ N(0, Sigma_k)   independently over terms k and levels l = 0..L_k - 1
    y_i | b ~ family(eta_i)   (Gaussian: y_i ~ N(eta_i, s^2 / w_i))

A *term* ``k`` (:class:`Term`) is lme4's ``(x | g)``: a grouping factor ``g_k`` with ``L_k``
levels, ``q_k`` columns ``Z_k`` ``(n, q_k)`` (the model matrix of ``x``: an intercept, slopes,
factor dummies) and a covariance ``Sigma_k`` ``(q_k, q_k)`` shared by its levels: full
(``(x | g)``, correlated) or diagonal (``(x || g)``).  With one term this is Eq. 1 of the
shrinkage paper (tasks = levels, modules = coordinates, ``phi`` the fixed effects of the term's
columns); with several, crossed or nested, the levels of different terms share rows.

**Relative covariance factors** (lme4's Lambda_theta).  ``Sigma_k = s^2 T_k T_k^T`` with ``T_k``
lower triangular (``s`` the residual sd of a Gaussian model, 1 for the other families), so a
model's covariance parameters are the free entries ``theta`` of every ``T_k``, column by column
(lme4's order: for ``q = 2``, ``theta = (T_11, T_21, T_22)``); a diagonal term holds its diagonal
only.  Diagonal entries are bounded below by 0 (a boundary fit sets one to 0), the others are
free.  The full random-effect vector is ``b = Lambda_theta u``, ``u ~ N(0, s^2 I)``, with
``Lambda_theta = blockdiag_k (I_{L_k} kron T_k)``: term by term, level-major (the ``q_k``
coefficients of level 0, then of level 1, ...).
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Optional, Sequence

import numpy as np

__all__ = [
    "Term",
    "MixedDesign",
    "theta_sizes",
    "theta_indices",
    "theta_start",
    "theta_lower_bounds",
    "theta_names",
    "relative_factors",
    "theta_from_factors",
    "covariances",
    "theta_from_covariances",
    "make_term",
]


class Term(NamedTuple):
    """One random-effect term, lme4's ``(columns | group)``.

    Attributes:
      group: the grouping factor's name (``"Subject"``; ``"batch:cask"`` for an interaction).
      levels: the level names, in the order of ``codes``.
      codes: ``(n,)`` integer level (``0..L - 1``) of every row.
      Z: ``(n, q)`` the term's columns on every row.
      columns: the ``q`` column names (``"(Intercept)"``, ``"Days"``, ...).
      correlated: a full covariance over the columns (``(x | g)``) or a diagonal one (``(x || g)``).
    """

    group: str
    levels: tuple
    codes: np.ndarray
    Z: np.ndarray
    columns: tuple
    correlated: bool = True

    @property
    def num_levels(self) -> int:
        return len(self.levels)

    @property
    def num_columns(self) -> int:
        return int(self.Z.shape[1])

    @property
    def num_theta(self) -> int:
        """Free entries of the term's relative covariance factor."""
        q = self.num_columns
        return q * (q + 1) // 2 if self.correlated else q

    def label(self) -> str:
        """lme4's notation: ``(1 + Days | Subject)``, ``(1 || g)``."""
        bar = "|" if self.correlated else "||"
        cols = " + ".join("1" if c == "(Intercept)" else c for c in self.columns)
        return f"({cols} {bar} {self.group})"


class MixedDesign(NamedTuple):
    """Every numeric input of a mixed model, row by row (what a formula evaluates to).

    Attributes:
      response: ``(n,)`` the response (binomial: the proportion of successes, with the trials in
        ``weights``, as lme4 does).
      X: ``(n, p)`` the fixed-effects design; fixed_names: its ``p`` column names.
      terms: the random-effect terms (:class:`Term`), in formula order.
      offset: ``(n,)`` a known part of the linear predictor (zeros when there is none).
      weights: ``(n,)`` prior weights (Gaussian: the residual variance of row i is ``s^2 / w_i``;
        binomial: the number of trials).
      response_name: the response's name, for summaries.
    """

    response: np.ndarray
    X: np.ndarray
    fixed_names: tuple
    terms: tuple
    offset: np.ndarray
    weights: np.ndarray
    response_name: str = "y"

    @property
    def num_rows(self) -> int:
        return int(self.response.shape[0])

    @property
    def num_fixed(self) -> int:
        return int(self.X.shape[1])

    @property
    def num_random(self) -> int:
        """Length of the random-effect vector ``b``: ``sum_k L_k q_k``."""
        return int(sum(t.num_levels * t.num_columns for t in self.terms))


# ---------------------------------------------------------------------------- theta <-> T_k


def _lower_indices(term: Term) -> tuple:
    """Row and column indices of the free entries of ``T_k``, column by column (lme4's order)."""
    return _lower_indices_of(term.Z.shape[1], term.correlated)


@functools.lru_cache(maxsize=None)
def _lower_indices_of(q: int, correlated: bool) -> tuple:
    if not correlated:
        rows = cols = np.arange(q)
    else:
        cols, rows = np.triu_indices(q)  # (col, row) pairs with row >= col, ordered by column
    rows.flags.writeable = cols.flags.writeable = False  # shared by every call
    return rows, cols


def theta_indices(term: Term) -> tuple:
    """``(rows, cols)``: where each of ``term``'s covariance parameters sits in ``T_k`` (lme4's order)."""
    return _lower_indices(term)


def theta_sizes(terms: Sequence[Term]) -> tuple:
    """Number of covariance parameters of each term."""
    return tuple(t.num_theta for t in terms)


def theta_start(terms: Sequence[Term]) -> np.ndarray:
    """lme4's start: ``T_k = I`` for every term (random effects as large as the residual)."""
    out = []
    for t in terms:
        rows, cols = _lower_indices(t)
        out.append((rows == cols).astype(float))
    return np.concatenate(out) if out else np.zeros(0)


def theta_lower_bounds(terms: Sequence[Term]) -> np.ndarray:
    """0 for the diagonal entries of every ``T_k``, ``-inf`` for the others."""
    out = []
    for t in terms:
        rows, cols = _lower_indices(t)
        out.append(np.where(rows == cols, 0.0, -np.inf))
    return np.concatenate(out) if out else np.zeros(0)


def theta_names(terms: Sequence[Term]) -> tuple:
    """``group.column`` for a diagonal entry, ``group.row.column`` for an off-diagonal one (lme4's)."""
    names = []
    for t in terms:
        rows, cols = _lower_indices(t)
        for r, c in zip(rows, cols):
            if r == c:
                names.append(f"{t.group}.{t.columns[r]}")
            else:
                names.append(f"{t.group}.{t.columns[r]}.{t.columns[c]}")
    return tuple(names)


def _split(terms: Sequence[Term], theta) -> list:
    theta = np.asarray(theta, dtype=float)
    sizes = theta_sizes(terms)
    if theta.shape != (sum(sizes),):
        raise ValueError(f"theta must have shape ({sum(sizes)},) for these terms {sizes}, got {theta.shape}")
    return np.split(theta, np.cumsum(sizes)[:-1]) if sizes else []


def relative_factors(terms: Sequence[Term], theta) -> list:
    """The lower-triangular ``T_k`` ``(q_k, q_k)`` of every term from ``theta``."""
    out = []
    for t, th in zip(terms, _split(terms, theta)):
        T = np.zeros((t.num_columns, t.num_columns))
        rows, cols = _lower_indices(t)
        T[rows, cols] = th
        out.append(T)
    return out


def theta_from_factors(terms: Sequence[Term], factors: Sequence[np.ndarray]) -> np.ndarray:
    """The inverse of :func:`relative_factors`: the free entries of every ``T_k``, lme4's order
    (the entries above the diagonal, and off the diagonal of a diagonal term, are ignored)."""
    out = []
    for t, T in zip(terms, factors):
        rows, cols = _lower_indices(t)
        out.append(np.asarray(T, dtype=float)[rows, cols])
    return np.concatenate(out) if out else np.zeros(0)


def covariances(terms: Sequence[Term], theta, scale: float = 1.0) -> list:
    """``Sigma_k = scale^2 T_k T_k^T`` of every term (``scale``: the residual sd, or 1)."""
    return [scale**2 * (T @ T.T) for T in relative_factors(terms, theta)]


def theta_from_covariances(terms: Sequence[Term], covs: Sequence[np.ndarray], scale: float = 1.0) -> np.ndarray:
    """The inverse of :func:`covariances`: ``T_k`` the Cholesky factor of ``Sigma_k / scale^2``.

    A singular ``Sigma_k`` (a variance of 0) gets the limit of the factor of ``Sigma_k + eps I``;
    a diagonal term takes the square roots of the diagonal.
    """
    out = []
    for t, S in zip(terms, covs):
        S = np.asarray(S, dtype=float) / scale**2
        if S.shape != (t.num_columns,) * 2:
            raise ValueError(f"the covariance of {t.label()} must be {(t.num_columns,) * 2}, got {S.shape}")
        if not t.correlated:
            out.append(np.sqrt(np.maximum(np.diag(S), 0.0)))
            continue
        jitter = 1e-12 * max(float(np.max(np.abs(np.diag(S)))), 1e-300)
        T = np.linalg.cholesky(S + jitter * np.eye(t.num_columns))
        rows, cols = _lower_indices(t)
        out.append(T[rows, cols])
    return np.concatenate(out) if out else np.zeros(0)


def make_term(group: str, codes, Z, columns, levels: Optional[Sequence] = None, correlated: bool = True) -> Term:
    """A :class:`Term` from arrays, checked: ``codes`` integers in ``0..L-1``, ``Z`` finite ``(n, q)``."""
    codes = np.asarray(codes)
    Z = np.asarray(Z, dtype=float)
    if Z.ndim == 1:
        Z = Z[:, None]
    if codes.ndim != 1 or Z.ndim != 2 or Z.shape[0] != codes.shape[0]:
        raise ValueError(f"term {group!r}: codes (n,) and Z (n, q) must share n, got {codes.shape} and {Z.shape}")
    if not np.issubdtype(codes.dtype, np.integer):
        raise ValueError(f"term {group!r}: level codes must be integers, got dtype {codes.dtype}")
    num_levels = int(codes.max()) + 1 if codes.size else 0
    if levels is None:
        levels = tuple(str(i) for i in range(num_levels))
    levels = tuple(levels)
    if codes.size and (codes.min() < 0 or codes.max() >= len(levels)):
        raise ValueError(f"term {group!r}: level codes must lie in 0..{len(levels) - 1}")
    if not np.all(np.isfinite(Z)):
        raise ValueError(f"term {group!r}: its columns hold NaN or infinite values")
    columns = tuple(columns)
    if len(columns) != Z.shape[1]:
        raise ValueError(f"term {group!r}: {Z.shape[1]} columns but {len(columns)} names")
    return Term(str(group), levels, codes.astype(np.int64), Z, columns, bool(correlated))
