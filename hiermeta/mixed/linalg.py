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

When the coupling of the leading block with the rest is small (``size_lead * size_rest^2`` below
``DENSE_CROSS_WORK``: Penicillin, Pastes, grouseticks' three factors) the cross products of the two
are held as dense arrays and rescaled by the ``T_k`` with batched products, which costs
microseconds where SciPy's sparse matrices cost milliseconds of bookkeeping per evaluation; the
sparse path serves the large crossed designs (InstEval), where it is the one that scales.

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
DENSE_CROSS_WORK = 5e7  # size_lead * size_rest^2 up to which the cross products are held dense


class Layout:
    """The theta-free structure of a model's random effects: the leading term and the rest.

    ``order`` lists the terms' indices with the leading one first; the spherical effects ``u``
    are stored internally in that order (leading term level-major, then each other term
    level-major); :meth:`per_term` maps a vector back to one ``(L_k, q_k)`` array per term in
    the formula's order.  ``dense_cross``: hold the cross products of the leading block and the
    rest as dense arrays (default: when ``size_lead * size_rest^2 <= DENSE_CROSS_WORK``).
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
        self.dense_cross = (self.size_lead * float(self.size_rest) ** 2 <= DENSE_CROSS_WORK) if dense_cross is None \
            else bool(dense_cross)
        n = self.num_rows
        rows = np.arange(n)
        # the unscaled designs of the leading block and of the rest, CSR (n x size)
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
        if self.dense_cross and self.rest:
            # each row's entries of Z_B'Z_R and Z_R'Z_R: flat positions and unweighted products, so that
            # the weighted cross products are one bincount (PIRLS rebuilds them for every set of weights)
            lead_cols = lead.codes[:, None] * q + np.arange(q)  # (n, q)
            Q = self.size_rest
            self._lead_rest_index = (lead_cols[:, :, None] * Q + cols[:, None, :]).reshape(n, -1)
            self._lead_rest_value = (lead.Z[:, :, None] * vals[:, None, :]).reshape(n, -1)
            self._rest_gram_index = (cols[:, :, None] * Q + cols[:, None, :]).reshape(n, -1)
            self._rest_gram_value = (vals[:, :, None] * vals[:, None, :]).reshape(n, -1)

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

    def scale_rest_columns(self, M: np.ndarray, factors: Sequence[np.ndarray]) -> np.ndarray:
        """``M Lambda_R`` for a dense ``M`` ``(m, size_rest)``: each rest term's columns, level by level, times ``T_k``."""
        out = np.empty_like(M)
        for k in self.rest:
            t, o = self.terms[k], self.rest_offsets[k]
            L, q = t.num_levels, t.num_columns
            if q == 1:
                out[:, o: o + L] = M[:, o: o + L] * factors[k][0, 0]
            else:  # one matrix product over every (row, level) pair
                out[:, o: o + L * q] = (M[:, o: o + L * q].reshape(-1, q) @ factors[k]).reshape(M.shape[0], L * q)
        return out

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
        out = np.empty_like(np.asarray(u, dtype=float))
        lead_u = u[: self.size_lead].reshape(self.num_lead_levels, self.q_lead)
        out[: self.size_lead] = (lead_u @ factors[self.lead].T).ravel()
        for k in self.rest:
            t, o = self.terms[k], self.size_lead + self.rest_offsets[k]
            block = u[o: o + t.num_levels * t.num_columns].reshape(t.num_levels, t.num_columns)
            out[o: o + block.size] = (block @ factors[k].T).ravel()
        return out

    def random_predictor(self, b_per_term: Sequence[np.ndarray]) -> np.ndarray:
        """``sum_k Z_k[i] . b_{k, g_k(i)}`` for every row, from one ``(L_k, q_k)`` array per term."""
        eta = np.zeros(self.num_rows)
        for t, b in zip(self.terms, b_per_term):
            eta += np.einsum("nq,nq->n", t.Z, np.asarray(b)[t.codes])
        return eta


class CrossProducts(NamedTuple):
    """Weighted cross products of the unscaled designs (theta-free), the inputs of :func:`factorize`.

    ``lead_gram`` ``(L_B, q_B, q_B)``: ``sum over the rows of level l of w z z'`` (the leading
    term); ``lead_rest`` ``Z_B'WZ_R`` (CSR); ``rest_gram`` ``Z_R'WZ_R`` (CSR); ``lead_X``
    ``(L_B, q_B, p)``, ``rest_X`` ``(Q_R, p)``, ``XX`` ``(p, p)``; ``lead_y`` ``(L_B, q_B)``,
    ``rest_y`` ``(Q_R,)``, ``Xy`` ``(p,)``, ``yy`` the weighted response products.  ``lead_rest`` and
    ``rest_gram`` are dense arrays where the layout's ``dense_cross`` says so.
    """

    lead_gram: np.ndarray
    lead_rest: object  # sp.csr_matrix or np.ndarray
    rest_gram: object
    lead_X: np.ndarray
    rest_X: np.ndarray
    XX: np.ndarray
    lead_y: np.ndarray
    rest_y: np.ndarray
    Xy: np.ndarray
    yy: float

    @classmethod
    def build(cls, layout: Layout, X: np.ndarray, y: np.ndarray, weights: Optional[np.ndarray] = None) -> "CrossProducts":
        """The cross products of ``layout``'s designs, ``X`` ``(n, p)`` and ``y`` ``(n,)`` under weights ``w``."""
        n = layout.num_rows
        w = np.ones(n) if weights is None else np.asarray(weights, dtype=float)
        X = np.asarray(X, dtype=float).reshape(n, -1)
        y = np.asarray(y, dtype=float)
        lead = layout.terms[layout.lead]
        L, q = lead.num_levels, lead.num_columns
        wz = lead.Z * w[:, None]
        indicator = layout.lead_indicator
        lead_gram = np.asarray(indicator @ (wz[:, :, None] * lead.Z[:, None, :]).reshape(n, q * q)).reshape(L, q, q)
        lead_X = np.asarray(indicator @ (wz[:, :, None] * X[:, None, :]).reshape(n, -1)).reshape(L, q, X.shape[1])
        lead_y = np.asarray(indicator @ (wz * y[:, None])).reshape(L, q)
        Q = layout.size_rest
        if layout.dense_cross and layout.rest:
            lead_rest = np.bincount(layout._lead_rest_index.ravel(), (w[:, None] * layout._lead_rest_value).ravel(),
                                    minlength=layout.size_lead * Q).reshape(layout.size_lead, Q)
            rest_gram = np.bincount(layout._rest_gram_index.ravel(), (w[:, None] * layout._rest_gram_value).ravel(),
                                    minlength=Q * Q).reshape(Q, Q)
        else:
            WZr = sp.diags(w) @ layout.Z_rest
            lead_rest, rest_gram = sp.csr_matrix(layout.Z_lead.T @ WZr), sp.csr_matrix(layout.Z_rest.T @ WZr)
            if layout.dense_cross:  # no rest: empty
                lead_rest, rest_gram = lead_rest.toarray(), rest_gram.toarray()
        return cls(
            lead_gram=lead_gram,
            lead_rest=lead_rest,
            rest_gram=rest_gram,
            lead_X=lead_X,
            rest_X=np.asarray(layout.Z_rest_T @ (w[:, None] * X)),
            XX=(X * w[:, None]).T @ X,
            lead_y=lead_y,
            rest_y=np.asarray(layout.Z_rest_T @ (w * y)),
            Xy=X.T @ (w * y),
            yy=float(np.sum(w * y * y)),
        )


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
    F: object  # L_B^-1 A_BR (size_lead x Q_R): CSR, or dense with the layout's dense_cross
    rest_solve: object  # S^-1 as a callable on (Q_R, m) arrays
    rest_inverse: object  # () -> dense S^-1 (for conditional variances)

    def conditional_covariances(self, layout: Layout, factors: Sequence[np.ndarray]) -> list:
        """``Lambda A^-1 Lambda'`` blocks: per term an ``(L_k, q_k, q_k)`` array, the covariance of
        ``b_{k,l}`` given the data (times ``s^2`` for a Gaussian model; lme4's ``condVar``, which
        treats beta and theta as known)."""
        LiT = self.lead_inv
        out = [None] * len(layout.terms)
        # (A^-1)_BB, level l: Li_l' Li_l + (Li_l' F_l) S^-1 (F_l' Li_l)
        base = np.einsum("lji,ljk->lik", LiT, LiT)
        if layout.rest:
            G = self.F.toarray() if sp.issparse(self.F) else np.asarray(self.F)  # (size_lead, Q_R)
            SinvGt = self.rest_solve(G.T)  # (Q_R, size_lead)
            Lq = layout.q_lead
            Gl = G.reshape(layout.num_lead_levels, Lq, -1)
            Sl = SinvGt.T.reshape(layout.num_lead_levels, Lq, -1)
            inner = np.einsum("lap,lbp->lab", Gl, Sl)  # F_l S^-1 F_l'
            base = base + np.einsum("lji,ljk,lkm->lim", LiT, inner, LiT)
        T = factors[layout.lead]
        out[layout.lead] = np.einsum("ij,ljk,mk->lim", T, base, T)
        if layout.rest:
            Sinv = self.rest_inverse()
            for k in layout.rest:
                t, o = layout.terms[k], layout.rest_offsets[k]
                q = t.num_columns
                idx = o + np.arange(t.num_levels)[:, None] * q + np.arange(q)
                blocks = Sinv[idx[:, :, None], idx[:, None, :]]  # (L, q, q)
                out[k] = np.einsum("ij,ljk,mk->lim", factors[k], blocks, factors[k])
        return out


def _batched_cholesky_inverse(A: np.ndarray) -> tuple:
    """Level-wise Cholesky ``A_l = L_l L_l'`` of ``(L, q, q)``: ``(sum log|A_l|, L_l^-1 stack)``."""
    chol = np.linalg.cholesky(A)
    q = A.shape[-1]
    if q == 1:
        inv = 1.0 / chol
    else:
        inv = np.linalg.inv(chol)
        inv = np.tril(inv)
    log_det = 2.0 * float(np.sum(np.log(np.diagonal(chol, axis1=-2, axis2=-1))))
    return log_det, inv


def _factor_rest(S, dense_limit: int):
    """``(log|S|, solve, inverse)`` of the rest block's Schur complement, dense or sparse."""
    m = S.shape[0]
    if m <= dense_limit:
        S = S.toarray() if sp.issparse(S) else np.asarray(S)
        cho = scipy.linalg.cho_factor(S, lower=True, check_finite=False)
        log_det = 2.0 * float(np.sum(np.log(np.diag(cho[0]))))
        return log_det, (lambda rhs: scipy.linalg.cho_solve(cho, rhs, check_finite=False)), \
            (lambda: scipy.linalg.cho_solve(cho, np.eye(m), check_finite=False))
    lu = spla.splu(sp.csc_matrix(S), permc_spec="MMD_AT_PLUS_A", diag_pivot_thresh=0.0,
                   options=dict(SymmetricMode=True))
    diag = lu.U.diagonal()
    if np.any(diag <= 0):
        raise np.linalg.LinAlgError("the random-effects system is not positive definite")
    return float(np.sum(np.log(diag))), lu.solve, (lambda: lu.solve(np.eye(m)))


def factorize(layout: Layout, cross: CrossProducts, theta, dense_limit: int = DENSE_LIMIT) -> PLSFactor:
    """Factorise the PLS system at ``theta`` and solve it (module docstring).

    Raises ``numpy.linalg.LinAlgError`` when the fixed-effects block is not positive definite
    (a rank-deficient ``X``: callers check the design's rank before fitting).
    """
    factors = relative_factors(layout.terms, theta)
    T = factors[layout.lead]
    L, q = layout.num_lead_levels, layout.q_lead
    # leading block: A_l = T' G_l T + I, level by level
    A_lead = np.einsum("ji,ljk,km->lim", T, cross.lead_gram, T) + np.eye(q)
    log_det_lead, Li = _batched_cholesky_inverse(A_lead)
    c_lead = np.einsum("lij,jk,lk->li", Li, T.T, cross.lead_y)  # L_l^-1 T' (Z'Wy)_l
    H_lead = np.einsum("lij,jk,lkp->lip", Li, T.T, cross.lead_X)  # L_l^-1 T' (Z'WX)_l
    p = cross.XX.shape[0]
    c_flat, H_flat = c_lead.ravel(), H_lead.reshape(L * q, p)

    if layout.rest:
        if not sp.issparse(cross.lead_rest):  # small coupling: dense batched products
            Q = layout.size_rest
            C = layout.scale_rest_columns(cross.lead_rest, factors).reshape(L, q, Q)  # Z_B'WZ_R Lambda_R by level
            F = np.einsum("lij,jk,lkr->lir", Li, T.T, C).reshape(L * q, Q)  # L_l^-1 T' C_l
            G = layout.scale_rest_columns(layout.scale_rest_columns(cross.rest_gram, factors).T, factors)
            S = G + np.eye(Q) - F.T @ F
            r_rest = layout.scale_rest_columns(cross.rest_y[None, :], factors)[0] - F.T @ c_flat
            M_rest = layout.scale_rest_columns(cross.rest_X.T, factors).T - F.T @ H_flat
        else:
            Lam_lead = layout.scale_lead(T)
            Lam_rest = layout.scale_rest(factors)
            Li_block = sp.bsr_matrix((Li, np.arange(L), np.arange(L + 1)), shape=(L * q, L * q))
            F = sp.csr_matrix(Li_block @ (Lam_lead.T @ cross.lead_rest @ Lam_rest))
            S = Lam_rest.T @ cross.rest_gram @ Lam_rest + sp.identity(layout.size_rest, format="csr") - F.T @ F
            r_rest = Lam_rest.T @ cross.rest_y - F.T @ c_flat
            M_rest = np.asarray(Lam_rest.T @ cross.rest_X) - np.asarray(F.T @ H_flat)
        log_det_rest, rest_solve, rest_inverse = _factor_rest(S, dense_limit)
        Sinv_r = rest_solve(r_rest)
        Sinv_M = rest_solve(M_rest) if p else np.zeros((layout.size_rest, 0))
    else:
        F = sp.csr_matrix((layout.size_lead, 0))
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
        R = np.linalg.cholesky(S_X)
        log_det_X = 2.0 * float(np.sum(np.log(np.diag(R))))
        beta = scipy.linalg.cho_solve((R, True), g, check_finite=False)
        quad += float(g @ beta)
    else:
        log_det_X, beta = 0.0, np.zeros(0)

    # back substitution: u_R = S^-1 (r - M beta); u_B = L_B^-T (c - H beta - F u_R)
    if layout.rest:
        u_rest = Sinv_r - Sinv_M @ beta
        resid_lead = c_flat - H_flat @ beta - F @ u_rest
    else:
        u_rest = np.zeros(0)
        resid_lead = c_flat - H_flat @ beta
    u_lead = np.einsum("lji,lj->li", Li, resid_lead.reshape(L, q)).ravel()
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
