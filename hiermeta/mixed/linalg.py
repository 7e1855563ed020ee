"""The penalised least-squares (PLS) system of a mixed model, factorised term by term.

For covariance parameters ``theta`` (relative factors ``T_k``, :mod:`hiermeta.mixed.terms`), row
weights ``w`` and ``V = Z Lambda_theta`` (the design of the spherical effects ``u``, ``b = Lambda u``),
lme4's PLS system (Bates et al. 2015, eqs. 16-18) is

    [ V'WV + I   V'WX ] [u]   [V'Wy]
    [ X'WV       X'WX ] [b] = [X'Wy]          (b here: the fixed effects beta)

and everything a fit needs comes from its Cholesky factor: ``log|V'WV + I|``, the fixed-effects
block's ``log|R_X|^2``, the solution ``(u, beta)`` and the penalised weighted residual sum of
squares ``pwrss = y'Wy - c'c`` (``c`` the forward-solved right-hand side).  A Gaussian model's
profiled deviance and a GLMM's Laplace approximation (with PIRLS weights) are both written in them.

**Structure.**  ``A = V'WV + I`` is sparse: the rows of one term's coefficients couple only within
a level (``V_k'WV_k`` is block diagonal, ``L_k`` blocks of ``q_k x q_k``); two terms couple
where their levels share rows (nested factors: each level of the inner factor meets one level of
the outer; crossed factors: a sparse cross table).  The term with the most coefficients
``L_k q_k`` is the *leading* block ``B`` (block diagonal, factorised level by level, batched);
the other terms form the *rest* ``R``, whose Schur complement

    S = A_RR - F'F,     F = L_B^-1 A_BR        (L_B the level-wise Cholesky factor of A_BB)

is ``Q_R x Q_R``, ``Q_R = sum over the other terms of L_k q_k`` (InstEval's ``(1|s) + (1|d)``:
2972 leading levels, ``Q_R`` = 1128).  ``S`` is factorised densely (LAPACK Cholesky) up to
``dense_limit`` coefficients and by a sparse LU (SciPy's SuperLU, symmetric ordering) beyond;
a model with one term has no rest and costs ``O(L q^3)``: one small Cholesky per level.  The
fixed effects come last, through the ``p x p`` Schur complement ``X'WX - H'H``.

**The coupling held compactly.**  ``Z_B'WZ_R`` has a fixed pattern of non-zeros (a leading level's
rows meet a few levels of the rest); where ``S`` is dense (``Q_R`` up to ``dense_limit``) and the
pairs of non-zeros that share a leading level are not too many (``PAIR_LIMIT``), the layout
records that pattern once and every product is a gather and a ``bincount``: with
``M_l = T_B A_l^-1 T_B'`` (``q_B x q_B``, ``A_l`` the leading block of level ``l``),

    F'F = Lambda_R' C' blockdiag(M_l) C Lambda_R,   (C' blockdiag(M_l) C)_ij = sum over pairs (s, t)
          of non-zeros of C in one leading level at columns (i, j) of c_s c_t (M_l)_{a_s a_t}

where the products ``c_s c_t`` depend on the weights only (:class:`CrossProducts`, once per
weights) and each ``theta`` costs one pass over the pairs.  Penicillin, Pastes, grouseticks'
three factors (each observation its own level: two non-zeros per leading level) and InstEval
(about 1.25 million pairs) take this path; SciPy's sparse matrices (general, slower by their
bookkeeping per product) serve the rest.

The weighted cross products of the unscaled design (:class:`CrossProducts`) do not depend on
``theta``: a linear mixed model builds them once and each deviance evaluation only rescales them
by the ``T_k`` (cost of the order of their non-zeros plus the factorisation of ``S``); PIRLS
rebuilds them for each new set of weights (cost of the order of the rows).
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Sequence

import numpy as np
import scipy.linalg
import scipy.sparse as sp
import scipy.sparse.linalg as spla

from .terms import Term, relative_factors

__all__ = ["Layout", "CrossProducts", "PLSFactor", "factorize", "DENSE_LIMIT"]

DENSE_LIMIT = 4000  # rest coefficients up to which the Schur complement S is factorised densely
PAIR_LIMIT = 2e7  # pairs of coupling non-zeros within a leading level up to which the coupling is held compactly


class Layout:
    """The theta-free structure of a model's random effects: the leading term and the rest.

    ``order`` lists the terms' indices with the leading one first; the spherical effects ``u``
    are stored internally in that order (leading term level-major, then each other term
    level-major); :meth:`per_term` maps a vector back to one ``(L_k, q_k)`` array per term in
    the formula's order.  ``dense_cross``: hold the coupling of the leading block and the rest
    compactly (module docstring; default: when ``size_rest <= DENSE_LIMIT`` and its pairs within
    a leading level number at most ``PAIR_LIMIT``), else as SciPy sparse matrices.
    """

    def __init__(self, terms: Sequence[Term], num_rows: int, dense_cross: Optional[bool] = None):
        self.terms = tuple(terms)
        if not self.terms:
            raise ValueError("a mixed model needs at least one random-effect term")
        for t in self.terms:
            if t.codes.shape != (num_rows,) or t.Z.shape[0] != num_rows:
                raise ValueError(f"term {t.label()} does not have {num_rows} rows")
        self.num_rows = int(num_rows)
        sizes = [t.num_levels * t.num_columns for t in self.terms]
        self.lead = int(np.argmax(sizes))
        self.rest = tuple(k for k in range(len(self.terms)) if k != self.lead)
        self.order = (self.lead,) + self.rest
        lead = self.terms[self.lead]
        self.num_lead_levels, self.q_lead = lead.num_levels, lead.num_columns
        self.size_lead = lead.num_levels * lead.num_columns
        offsets, start = {}, 0
        for k in self.rest:
            offsets[k] = start
            start += sizes[k]
        self.rest_offsets = offsets
        self.size_rest = start
        self.size = self.size_lead + self.size_rest
        n = self.num_rows
        rows = np.arange(n)
        q = lead.num_columns
        self.Z_lead = sp.csr_matrix(
            (lead.Z.ravel(), (np.repeat(rows, q), (lead.codes[:, None] * q + np.arange(q)).ravel())),
            shape=(n, self.size_lead))
        self.lead_indicator = sp.csr_matrix((np.ones(n), (lead.codes, rows)), shape=(lead.num_levels, n))
        if self.rest:
            cols = np.concatenate([offsets[k] + self.terms[k].codes[:, None] * self.terms[k].num_columns
                                   + np.arange(self.terms[k].num_columns) for k in self.rest], axis=1)
            vals = np.concatenate([self.terms[k].Z for k in self.rest], axis=1)
            self.Z_rest = sp.csr_matrix((vals.ravel(), (np.repeat(rows, cols.shape[1]), cols.ravel())),
                                        shape=(n, self.size_rest))
        else:
            cols, vals = np.zeros((n, 0), dtype=np.int64), np.zeros((n, 0))
            self.Z_rest = sp.csr_matrix((n, 0))
        self.Z_rest_T = sp.csr_matrix(self.Z_rest.T)
        self.dense_cross = False
        if self.rest and (dense_cross or (dense_cross is None and self.size_rest <= DENSE_LIMIT)):
            self.dense_cross = self._compact_coupling(lead, cols, vals, limit=None if dense_cross else PAIR_LIMIT)

    def _compact_coupling(self, lead: Term, cols: np.ndarray, vals: np.ndarray, limit: Optional[float]) -> bool:
        """Record the pattern of ``C = Z_B'WZ_R`` and ``Z_R'WZ_R`` (module docstring); False (nothing
        recorded) when the pairs of non-zeros within a leading level number more than ``limit``."""
        n, q, Q = self.num_rows, self.q_lead, self.size_rest
        lead_cols = lead.codes[:, None] * q + np.arange(q)  # (n, q)
        keys = (lead_cols[:, :, None] * Q + cols[:, None, :]).reshape(n, -1)  # each row's entries of C
        unique, index = np.unique(keys.ravel(), return_inverse=True)  # sorted: by leading row, so by level
        c_rows, c_cols = unique // Q, unique % Q
        c_level = c_rows // q
        per_level = np.bincount(c_level, minlength=self.num_lead_levels)
        num_pairs = float(np.sum(per_level * (per_level - 1) // 2))
        if limit is not None and num_pairs > limit:
            return False
        # pairs s < t of non-zeros in one leading level (contiguous in the sorted order)
        end = np.cumsum(per_level)[c_level]
        after = end - np.arange(unique.size) - 1
        first = np.repeat(np.arange(unique.size), after)
        second = first + 1 + (np.arange(first.size) - np.repeat(np.cumsum(after) - after, after))
        small = np.int32 if max(Q * Q, unique.size, self.size_lead * q) < 2**31 else np.int64
        self._c_index, self._c_value = index.reshape(n, -1), (lead.Z[:, :, None] * vals[:, None, :]).reshape(n, -1)
        self.c_rows, self.c_cols, self.num_c = c_rows.astype(small), c_cols.astype(small), unique.size
        self.pair_first, self.pair_second = first.astype(small), second.astype(small)
        # each unordered pair adds c_s c_t M_l[a_s, a_t] at (col_s, col_t) and at (col_t, col_s): recorded at the
        # upper-triangle one, and twice where the two columns are one (two leading coefficients, one rest column)
        low, high = np.minimum(c_cols[first], c_cols[second]), np.maximum(c_cols[first], c_cols[second])
        self.pair_position = (low * Q + high).astype(small)
        self.pair_same_column = np.flatnonzero(low == high).astype(small)
        self.rest_scalar = all(self.terms[k].num_columns == 1 for k in self.rest)
        a = c_rows % q
        self.pair_block = (c_level[first] * q * q + a[first] * q + a[second]).astype(small)  # into M_l, flattened
        self.diagonal_block = (c_level * q * q + a * q + a).astype(small)
        self._rest_gram_index = (cols[:, :, None] * Q + cols[:, None, :]).reshape(n, -1)
        self._rest_gram_value = (vals[:, :, None] * vals[:, None, :]).reshape(n, -1)
        return True

    def scale_lead(self, T: np.ndarray) -> sp.bsr_matrix:
        """``I_{L_B} kron T`` as a block-sparse matrix."""
        L, q = self.num_lead_levels, self.q_lead
        return sp.bsr_matrix((np.broadcast_to(T, (L, q, q)).copy(), np.arange(L), np.arange(L + 1)),
                             shape=(L * q, L * q))

    def scale_rest(self, factors: Sequence[np.ndarray]) -> sp.csr_matrix:
        """``blockdiag_k (I_{L_k} kron T_k)`` over the rest terms."""
        blocks = []
        for k in self.rest:
            t, T = self.terms[k], factors[k]
            L, q = t.num_levels, t.num_columns
            blocks.append(sp.bsr_matrix((np.broadcast_to(T, (L, q, q)).copy(), np.arange(L), np.arange(L + 1)),
                                        shape=(L * q, L * q)))
        return sp.block_diag(blocks, format="csr") if blocks else sp.csr_matrix((0, 0))

    def rest_lambda(self, x: np.ndarray, factors: Sequence[np.ndarray], transpose: bool = False) -> np.ndarray:
        """``Lambda_R x`` (``Lambda_R' x`` with ``transpose``) for ``x`` ``(size_rest,)`` or ``(size_rest, m)``:
        each rest term's rows, level by level, times ``T_k`` (``T_k'``)."""
        x = np.asarray(x, dtype=float)
        out = np.empty_like(x)
        for k in self.rest:
            t, o = self.terms[k], self.rest_offsets[k]
            L, q = t.num_levels, t.num_columns
            if q == 1:
                out[o: o + L] = x[o: o + L] * factors[k][0, 0]
            else:
                T = factors[k].T if transpose else factors[k]
                block = x[o: o + L * q].reshape((L, q, -1))
                out[o: o + L * q] = np.matmul(T, block).reshape(x[o: o + L * q].shape)
        return out

    def scale_rest_columns(self, M: np.ndarray, factors: Sequence[np.ndarray]) -> np.ndarray:
        """``M Lambda_R`` for a dense ``M`` ``(m, size_rest)``."""
        return self.rest_lambda(np.asarray(M).T, factors, transpose=True).T

    def per_term(self, vector: np.ndarray) -> list:
        """A vector in the internal order as one ``(L_k, q_k)`` array per term (formula order)."""
        vector = np.asarray(vector)
        out = [None] * len(self.terms)
        lead = self.terms[self.lead]
        out[self.lead] = vector[: self.size_lead].reshape(lead.num_levels, lead.num_columns)
        for k in self.rest:
            t, o = self.terms[k], self.size_lead + self.rest_offsets[k]
            out[k] = vector[o: o + t.num_levels * t.num_columns].reshape(t.num_levels, t.num_columns)
        return out

    def lambda_times(self, factors: Sequence[np.ndarray], u: np.ndarray) -> np.ndarray:
        """``b = Lambda_theta u`` in the internal order."""
        u = np.asarray(u, dtype=float)
        out = np.empty_like(u)
        lead_u = u[: self.size_lead].reshape(self.num_lead_levels, self.q_lead)
        out[: self.size_lead] = (lead_u @ factors[self.lead].T).ravel()
        out[self.size_lead:] = self.rest_lambda(u[self.size_lead:], factors)
        return out

    def design_times(self, b: np.ndarray) -> np.ndarray:
        """``Z b`` for every row, ``b`` in the internal order (two sparse products)."""
        eta = self.Z_lead @ b[: self.size_lead]
        if self.rest:
            eta = eta + self.Z_rest @ b[self.size_lead:]
        return eta

    def random_predictor(self, b_per_term: Sequence[np.ndarray]) -> np.ndarray:
        """``sum_k Z_k[i] . b_{k, g_k(i)}`` for every row, from one ``(L_k, q_k)`` array per term."""
        eta = np.zeros(self.num_rows)
        for t, b in zip(self.terms, b_per_term):
            b = np.asarray(b)
            eta += t.Z[:, 0] * b[t.codes, 0] if t.num_columns == 1 else np.sum(t.Z * b[t.codes], axis=1)
        return eta


class CrossProducts(NamedTuple):
    """Weighted cross products of the unscaled designs (theta-free), the inputs of :func:`factorize`.

    ``lead_gram`` ``(L_B, q_B, q_B)``: ``sum over the rows of level l of w z z'`` (the leading
    term); ``lead_rest`` ``Z_B'WZ_R``; ``rest_gram`` ``Z_R'WZ_R``; ``lead_X`` ``(L_B, q_B, p)``,
    ``rest_X`` ``(Q_R, p)``, ``XX`` ``(p, p)``; ``lead_y`` ``(L_B, q_B)``, ``rest_y`` ``(Q_R,)``,
    ``Xy`` ``(p,)``, ``yy`` the weighted response products.  With the layout's ``dense_cross``
    (compact coupling), ``lead_rest`` is the vector of ``C``'s non-zeros in the layout's pattern,
    ``pair_products`` the products ``c_s c_t`` of its pairs and ``rest_gram`` dense; otherwise
    ``lead_rest`` and ``rest_gram`` are CSR matrices.
    """

    lead_gram: np.ndarray
    lead_rest: object  # np.ndarray (compact) or sp.csr_matrix
    rest_gram: object
    lead_X: np.ndarray
    rest_X: np.ndarray
    XX: np.ndarray
    lead_y: np.ndarray
    rest_y: np.ndarray
    Xy: np.ndarray
    yy: float
    pair_products: Optional[np.ndarray] = None

    @classmethod
    def build(cls, layout: Layout, X: np.ndarray, y: np.ndarray, weights: Optional[np.ndarray] = None) -> "CrossProducts":
        """The cross products of ``layout``'s designs, ``X`` ``(n, p)`` and ``y`` ``(n,)`` under weights ``w``."""
        n = layout.num_rows
        w = np.ones(n) if weights is None else np.asarray(weights, dtype=float)
        X = np.asarray(X, dtype=float).reshape(n, -1)
        y = np.asarray(y, dtype=float)
        p = X.shape[1]
        lead = layout.terms[layout.lead]
        L, q = lead.num_levels, lead.num_columns
        wz = lead.Z * w[:, None]
        # the leading term's sums by level, one sparse product: [w z z' | w z x' | w z y]
        per_row = np.concatenate([(wz[:, :, None] * lead.Z[:, None, :]).reshape(n, q * q),
                                  (wz[:, :, None] * X[:, None, :]).reshape(n, q * p), wz * y[:, None]], axis=1)
        sums = np.asarray(layout.lead_indicator @ per_row)
        lead_gram = sums[:, : q * q].reshape(L, q, q)
        lead_X = sums[:, q * q: q * q + q * p].reshape(L, q, p)
        lead_y = sums[:, q * q + q * p:]
        Q = layout.size_rest
        pairs = None
        if not layout.rest:
            lead_rest, rest_gram, rest_X, rest_y = np.zeros(0), np.zeros((0, 0)), np.zeros((0, p)), np.zeros(0)
        else:
            rest_sums = np.asarray(layout.Z_rest_T @ np.concatenate([w[:, None] * X, (w * y)[:, None]], axis=1))
            rest_X, rest_y = rest_sums[:, :p], rest_sums[:, p]
            if layout.dense_cross:
                lead_rest = _sums(layout._c_index.ravel(), (w[:, None] * layout._c_value).ravel(),
                                        minlength=layout.num_c)
                pairs = lead_rest[layout.pair_first] * lead_rest[layout.pair_second]
                rest_gram = _sums(layout._rest_gram_index.ravel(),
                                        (w[:, None] * layout._rest_gram_value).ravel(), minlength=Q * Q).reshape(Q, Q)
            else:
                WZr = sp.diags(w) @ layout.Z_rest
                lead_rest, rest_gram = sp.csr_matrix(layout.Z_lead.T @ WZr), sp.csr_matrix(layout.Z_rest.T @ WZr)
        return cls(lead_gram=lead_gram, lead_rest=lead_rest, rest_gram=rest_gram, lead_X=lead_X, rest_X=rest_X,
                   XX=(X * w[:, None]).T @ X, lead_y=lead_y, rest_y=rest_y, Xy=X.T @ (w * y),
                   yy=float(np.sum(w * y * y)), pair_products=pairs)


class Coupling:
    """``F = blockdiag_l(L_l^-1 T_B') C Lambda_R`` (``size_lead x Q_R``), held as its factors (the
    compact coupling ``C`` of the layout): ``F @ x``, ``F.T @ y`` and :meth:`toarray`, as a matrix."""

    def __init__(self, layout: Layout, LiT: np.ndarray, c: np.ndarray, factors: Sequence[np.ndarray]):
        self.layout, self.LiT, self.c, self.factors = layout, LiT, c, factors
        self.shape = (layout.size_lead, layout.size_rest)
        self._C = None

    def _matrix(self) -> sp.csr_matrix:
        if self._C is None:
            lay = self.layout
            self._C = sp.csr_matrix((self.c, (lay.c_rows, lay.c_cols)), shape=self.shape)
        return self._C

    def __matmul__(self, x):
        x = np.asarray(x, dtype=float)
        lay = self.layout
        if x.ndim == 1:  # one gather and a bincount (the back substitution of every factorisation)
            Cx = _sums(lay.c_rows, self.c * lay.rest_lambda(x, self.factors)[lay.c_cols], minlength=self.shape[0])
        else:
            Cx = np.asarray(self._matrix() @ lay.rest_lambda(x, self.factors))
        L, q = self.layout.num_lead_levels, self.layout.q_lead
        return np.matmul(self.LiT, Cx.reshape(L, q, -1)).reshape(Cx.shape)

    def transpose_times(self, y):
        """``F' y`` for ``y`` ``(size_lead,)`` or ``(size_lead, m)``."""
        y = np.asarray(y, dtype=float)
        L, q = self.layout.num_lead_levels, self.layout.q_lead
        v = np.matmul(np.swapaxes(self.LiT, 1, 2), y.reshape(L, q, -1)).reshape(y.shape)
        return self.layout.rest_lambda(np.asarray(self._matrix().T @ v), self.factors, transpose=True)

    @property
    def T(self):
        return _Transposed(self)

    def toarray(self) -> np.ndarray:
        return self @ np.eye(self.shape[1])


class _Transposed:
    def __init__(self, F: Coupling):
        self.F = F

    def __matmul__(self, y):
        return self.F.transpose_times(y)


class PLSFactor(NamedTuple):
    """The factorised PLS system at one ``theta`` (:func:`factorize`).

    Attributes:
      log_det_A: ``log|V'WV + I|`` (lme4's ``log|L_theta|^2``).
      log_det_X: ``log|R_X|^2``, the fixed effects' block after the random effects are eliminated.
      beta: ``(p,)`` the fixed effects solving the system; u: the spherical random effects
        (internal order, :meth:`Layout.per_term`).
      pwrss: the penalised weighted residual sum of squares ``||W^1/2 (y - X beta - V u)||^2 + ||u||^2``.
      fixed_precision: ``R_X'R_X`` ``(p, p)``: ``s^2`` times its inverse is the fixed effects' covariance.
    """

    log_det_A: float
    log_det_X: float
    beta: np.ndarray
    u: np.ndarray
    pwrss: float
    fixed_precision: np.ndarray
    # pieces for conditional variances
    lead_inv: np.ndarray  # (L_B, q_B, q_B) inverses of the level-wise Cholesky factors of A_BB
    F: object  # L_B^-1 A_BR (size_lead x Q_R): a Coupling (compact), a CSR matrix, or empty without a rest
    rest_solve: object  # S^-1 as a callable on (Q_R, m) arrays
    rest_inverse: object  # () -> dense S^-1 (for conditional variances)

    def conditional_covariances(self, layout: Layout, factors: Sequence[np.ndarray]) -> list:
        """``Lambda A^-1 Lambda'`` blocks: per term an ``(L_k, q_k, q_k)`` array, the covariance of
        ``b_{k,l}`` given the data (times ``s^2`` for a Gaussian model; lme4's ``condVar``, which
        treats beta and theta as known)."""
        LiT = self.lead_inv
        out = [None] * len(layout.terms)
        # (A^-1)_BB, level l: Li_l' Li_l + (Li_l' F_l) S^-1 (F_l' Li_l)
        base = np.matmul(np.swapaxes(LiT, 1, 2), LiT)
        if layout.rest:
            G = self.F.toarray()  # (size_lead, Q_R)
            SinvGt = self.rest_solve(G.T)  # (Q_R, size_lead)
            Lq = layout.q_lead
            Gl = G.reshape(layout.num_lead_levels, Lq, -1)
            Sl = SinvGt.T.reshape(layout.num_lead_levels, Lq, -1)
            inner = np.matmul(Gl, np.swapaxes(Sl, 1, 2))  # F_l S^-1 F_l'
            base = base + np.matmul(np.swapaxes(LiT, 1, 2), np.matmul(inner, LiT))
        T = factors[layout.lead]
        out[layout.lead] = np.matmul(np.matmul(T, base), T.T)
        if layout.rest:
            Sinv = self.rest_inverse()
            for k in layout.rest:
                t, o = layout.terms[k], layout.rest_offsets[k]
                q = t.num_columns
                idx = o + np.arange(t.num_levels)[:, None] * q + np.arange(q)
                blocks = Sinv[idx[:, :, None], idx[:, None, :]]  # (L, q, q)
                out[k] = np.matmul(np.matmul(factors[k], blocks), factors[k].T)
        return out


def _sums(index: np.ndarray, weights: np.ndarray, minlength: int) -> np.ndarray:
    """``out[j] = sum of weights[i] over index[i] == j`` (``np.bincount``), float also when empty."""
    return np.bincount(index, weights, minlength=minlength).astype(float, copy=False)


def _blocks_times(A: np.ndarray, B: np.ndarray) -> np.ndarray:
    """``A_l B_l`` for stacks ``(L, q, k)`` and ``(L, k, m)``: for ``k <= 4`` a sum of ``k`` broadcast
    outer products (about twice as fast as ``np.matmul``'s loop over many tiny matrices)."""
    k = A.shape[-1]
    if k > 4:
        return np.matmul(A, B)
    out = A[:, :, 0:1] * B[:, 0:1, :]
    for j in range(1, k):
        out += A[:, :, j: j + 1] * B[:, j: j + 1, :]
    return out


def _batched_cholesky_inverse(A: np.ndarray) -> tuple:
    """Level-wise Cholesky ``A_l = L_l L_l'`` of ``(L, q, q)``: ``(sum log|A_l|, L_l^-1 stack)``.

    ``q = 1, 2`` in closed form (``L = [[a, 0], [b, c]]``, ``L^-1 = [[1/a, 0], [-b/(a c), 1/c]]``),
    which saves LAPACK's per-matrix overhead on many small blocks; LAPACK beyond.
    """
    q = A.shape[-1]
    if q == 1:
        if np.any(~(A[:, 0, 0] > 0)):
            raise np.linalg.LinAlgError("a block of the random-effects system is not positive definite")
        d = np.sqrt(A[:, 0, 0])
        return 2.0 * float(np.sum(np.log(d))), (1.0 / d)[:, None, None]
    if q == 2:
        a = np.sqrt(A[:, 0, 0])
        b = A[:, 1, 0] / a
        c2 = A[:, 1, 1] - b * b
        if np.any(~(c2 > 0)) or np.any(~(a > 0)):
            raise np.linalg.LinAlgError("a block of the random-effects system is not positive definite")
        c = np.sqrt(c2)
        inv = np.zeros_like(A)
        inv[:, 0, 0], inv[:, 1, 1], inv[:, 1, 0] = 1.0 / a, 1.0 / c, -b / (a * c)
        return 2.0 * float(np.sum(np.log(a) + np.log(c))), inv
    chol = np.linalg.cholesky(A)
    inv = np.tril(np.linalg.inv(chol))
    log_det = 2.0 * float(np.sum(np.log(np.diagonal(chol, axis1=-2, axis2=-1))))
    return log_det, inv


def _cholesky(S: np.ndarray, overwrite: bool = False) -> np.ndarray:
    """The lower Cholesky factor (Fortran order) of the symmetric positive definite matrix whose upper
    triangle is that of the C-ordered ``S`` (its lower triangle is not read).

    LAPACK's ``potrf`` is called directly (``scipy.linalg.cho_factor``'s wrappers cost more than the
    factorisation of a small ``S``) on ``S.T``, which is ``S``'s memory in Fortran order: no copy, and
    with ``overwrite`` the factor takes ``S``'s place.
    """
    S = np.ascontiguousarray(S, dtype=float)
    c, info = scipy.linalg.lapack.dpotrf(S.T, lower=1, clean=1, overwrite_a=int(overwrite))
    if info != 0:
        raise np.linalg.LinAlgError("the random-effects or fixed-effects system is not positive definite")
    return c


def _cholesky_solve(c: np.ndarray, rhs) -> np.ndarray:
    """``S^-1 rhs`` from the lower factor of :func:`_cholesky` (LAPACK's ``potrs``)."""
    x, info = scipy.linalg.lapack.dpotrs(c, rhs, lower=1)
    if info != 0:  # pragma: no cover - only for malformed arguments
        raise ValueError(f"potrs failed with info {info}")
    return x


def _factor_rest(S, dense_limit: int, upper: bool = False):
    """``(log|S|, solve, inverse)`` of the rest block's Schur complement, dense or sparse.

    ``upper``: only the upper triangle of the dense ``S`` holds the matrix (overwritten).
    """
    m = S.shape[0]
    if upper and m > dense_limit:
        S = np.triu(S) + np.triu(S, 1).T
    if m <= dense_limit:
        c = _cholesky(S.toarray() if sp.issparse(S) else S, overwrite=upper)
        log_det = 2.0 * float(np.sum(np.log(np.diag(c))))
        return log_det, (lambda rhs: _cholesky_solve(c, rhs)), (lambda: _cholesky_solve(c, np.eye(m)))
    lu = spla.splu(sp.csc_matrix(S), permc_spec="MMD_AT_PLUS_A", diag_pivot_thresh=0.0,
                   options=dict(SymmetricMode=True))
    diag = lu.U.diagonal()
    if np.any(diag <= 0):
        raise np.linalg.LinAlgError("the random-effects system is not positive definite")
    return float(np.sum(np.log(diag))), lu.solve, (lambda: lu.solve(np.eye(m)))


def _compact_rest(layout: Layout, cross: CrossProducts, factors, LiT, c_lead, H_lead) -> tuple:
    """``(S, upper, r_rest, M_rest, F)`` from the compact coupling (module docstring): gathers and
    bincounts; ``upper``: only ``S``'s upper triangle is filled (scalar rest terms), else all of it."""
    Q, q, L = layout.size_rest, layout.q_lead, layout.num_lead_levels
    c = cross.lead_rest
    LiT_t = np.swapaxes(LiT, 1, 2)
    M = _blocks_times(LiT_t, LiT).ravel()  # M_l = T A_l^-1 T', flattened level by level
    values = cross.pair_products * M[layout.pair_block]
    inner = _sums(layout.pair_position, values, minlength=Q * Q)  # C' blockdiag(M_l) C, upper triangle
    if layout.pair_same_column.size:
        inner += _sums(layout.pair_position[layout.pair_same_column], values[layout.pair_same_column], Q * Q)
    inner = inner.reshape(Q, Q)
    diagonal = np.diag_indices(Q)
    inner[diagonal] += _sums(layout.c_cols, c * c * M[layout.diagonal_block], minlength=Q)
    if layout.rest_scalar:  # Lambda_R = diag(d): S = (Z_R'WZ_R - inner) d d' + I, in place, upper triangle
        d = layout.rest_lambda(np.ones(Q), factors)
        S = np.subtract(cross.rest_gram, inner, out=inner)
        S *= d[:, None]
        S *= d[None, :]
        upper = True
    else:
        inner = np.triu(inner) + np.triu(inner, 1).T
        S = layout.rest_lambda(layout.rest_lambda(cross.rest_gram - inner, factors, True).T, factors, True)
        upper = False
    S[diagonal] += 1.0
    p = H_lead.shape[-1]
    vV = _blocks_times(LiT_t, np.concatenate([c_lead[:, :, None], H_lead], axis=2))  # T L_l^-T [c_l | H_l]
    v, V = vV[:, :, 0].ravel(), vV[:, :, 1:].reshape(L * q, p)
    r_rest = layout.rest_lambda(cross.rest_y - _sums(layout.c_cols, c * v[layout.c_rows], minlength=Q),
                                factors, True)
    CtV = _sums((layout.c_cols[:, None] * p + np.arange(p)).ravel(), (c[:, None] * V[layout.c_rows]).ravel(),
                      minlength=Q * p).reshape(Q, p) if p else np.zeros((Q, 0))
    M_rest = layout.rest_lambda(cross.rest_X - CtV, factors, True)
    return S, upper, r_rest, M_rest, Coupling(layout, LiT, c, factors)


def factorize(layout: Layout, cross: CrossProducts, theta, dense_limit: int = DENSE_LIMIT) -> PLSFactor:
    """Factorise the PLS system at ``theta`` and solve it (module docstring).

    Raises ``numpy.linalg.LinAlgError`` when the fixed-effects block is not positive definite
    (a rank-deficient ``X``: callers check the design's rank before fitting).
    """
    factors = relative_factors(layout.terms, theta)
    T = factors[layout.lead]
    L, q = layout.num_lead_levels, layout.q_lead
    p = cross.XX.shape[0]
    # leading block: A_l = T' G_l T + I, level by level (products with the one T as 2-D BLAS calls)
    GT = (cross.lead_gram.reshape(L * q, q) @ T).reshape(L, q, q)  # G_l T
    A_lead = (np.swapaxes(GT, 1, 2).reshape(L * q, q) @ T).reshape(L, q, q)  # (G_l T)' T
    A_lead[:, np.arange(q), np.arange(q)] += 1.0
    log_det_lead, Li = _batched_cholesky_inverse(A_lead)
    LiT = (Li.reshape(L * q, q) @ T.T).reshape(L, q, q)  # L_l^-1 T'
    # L_l^-1 T' [(Z'Wy)_l | (Z'WX)_l] in one batched product
    cH = _blocks_times(LiT, np.concatenate([cross.lead_y[:, :, None], cross.lead_X], axis=2) if p
                       else cross.lead_y[:, :, None])
    c_lead, H_lead = cH[:, :, 0], cH[:, :, 1:]
    c_flat, H_flat = c_lead.ravel(), H_lead.reshape(L * q, p)

    if layout.rest:
        upper = False
        if layout.dense_cross:
            S, upper, r_rest, M_rest, F = _compact_rest(layout, cross, factors, LiT, c_lead, H_lead)
        else:
            Lam_lead = layout.scale_lead(T)
            Lam_rest = layout.scale_rest(factors)
            Li_block = sp.bsr_matrix((Li, np.arange(L), np.arange(L + 1)), shape=(L * q, L * q))
            F = sp.csr_matrix(Li_block @ (Lam_lead.T @ cross.lead_rest @ Lam_rest))
            S = Lam_rest.T @ cross.rest_gram @ Lam_rest + sp.identity(layout.size_rest, format="csr") - F.T @ F
            r_rest = Lam_rest.T @ cross.rest_y - F.T @ c_flat
            M_rest = np.asarray(Lam_rest.T @ cross.rest_X) - np.asarray(F.T @ H_flat)
        log_det_rest, rest_solve, rest_inverse = _factor_rest(S, dense_limit, upper)
        solved = np.asarray(rest_solve(np.column_stack([r_rest, M_rest])))  # S^-1 [r | M] in one solve
        Sinv_r, Sinv_M = solved[:, 0], solved[:, 1:]
    else:
        F = np.zeros((layout.size_lead, 0))
        log_det_rest = 0.0
        rest_solve = lambda rhs: np.zeros((0,) + np.shape(rhs)[1:])  # noqa: E731
        rest_inverse = lambda: np.zeros((0, 0))  # noqa: E731
        r_rest = M_rest = None
        Sinv_r, Sinv_M = np.zeros(0), np.zeros((0, p))

    # fixed effects: S_X = X'WX - H'H - M' S^-1 M;  g = X'Wy - H'c - M' S^-1 r
    S_X = cross.XX - H_flat.T @ H_flat
    g = cross.Xy - H_flat.T @ c_flat
    quad = float(c_flat @ c_flat)
    if layout.rest:
        S_X = S_X - M_rest.T @ Sinv_M
        g = g - M_rest.T @ Sinv_r
        quad += float(r_rest @ Sinv_r)
    if p:
        S_X = 0.5 * (S_X + S_X.T)
        R = _cholesky(S_X)
        log_det_X = 2.0 * float(np.sum(np.log(np.diag(R))))
        beta = _cholesky_solve(R, g)
        quad += float(g @ beta)
    else:
        log_det_X, beta = 0.0, np.zeros(0)

    # back substitution: u_R = S^-1 (r - M beta); u_B = L_B^-T (c - H beta - F u_R)
    resid_lead = c_flat - H_flat @ beta
    if layout.rest:
        u_rest = Sinv_r - Sinv_M @ beta
        resid_lead = resid_lead - np.asarray(F @ u_rest).ravel()
    else:
        u_rest = np.zeros(0)
    u_lead = _blocks_times(np.swapaxes(Li, 1, 2), resid_lead.reshape(L, q, 1)).ravel()
    return PLSFactor(
        log_det_A=log_det_lead + log_det_rest,
        log_det_X=log_det_X,
        beta=beta,
        u=np.concatenate([u_lead, u_rest]),
        pwrss=max(cross.yy - quad, 0.0),
        fixed_precision=S_X if p else np.zeros((0, 0)),
        lead_inv=Li,
        F=F,
        rest_solve=rest_solve,
        rest_inverse=rest_inverse,
    )
