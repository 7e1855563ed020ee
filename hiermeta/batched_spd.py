"""Many small symmetric positive-definite (SPD) matrices at once: inverse, log-determinant, quadratic form.

For ``B`` ``(n, P, P)`` SPD and ``c`` ``(n, P)``, per matrix

    quad_logdet(B, c) = (c^T B^-1 c,  log|B|),

with its derivative in closed form (``v = B^-1 c``):

    d(c^T B^-1 c) = 2 v . dc - v^T dB v,        d log|B| = tr(B^-1 dB).

Why not ``jnp.linalg.cholesky``: on CPU XLA calls LAPACK once per matrix, and the derivative of a
Cholesky factor runs triangular solves per matrix; for the 10^5 blocks of 8 x 8 of a type-II ML
evaluation (:mod:`hiermeta.empirical_bayes`) that costs ~0.1 s where the arithmetic is
milliseconds.  Here the batch is the innermost, vectorised axis and the inverse is Gauss-Jordan
elimination over the P pivots, a fixed-length ``lax.fori_loop`` of rank-one updates of one
``(P, P, n)`` array (P^3 multiply-adds per matrix; a program of a few operations whatever P).
Without pivoting this is stable for SPD matrices: the pivots are the squared diagonal of the
Cholesky factor (each a Schur complement, > 0), so ``log|B| = sum_j log(pivot_j)``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["spd_inverse_logdet", "quad_logdet", "trace_solve_logdet"]


def _inverse_batch_last(A):
    """``(A^-1, log|A|)`` for ``A`` ``(P, P, n)`` SPD, the batch last (Gauss-Jordan, no pivoting)."""
    P = A.shape[0]
    index = jnp.arange(P)

    def pivot(j, carry):
        A, log_det = carry
        p = A[j, j]  # (n,)
        row = A[j] / p  # (P, n): row j of the eliminated matrix
        col = A[:, j]  # (P, n)
        on_j = (index == j)[:, None]  # (P, 1)
        A = A - col[:, None, :] * row[None, :, :]
        A = jnp.where(on_j[:, :, None], row[None, :, :], A)  # row j: the scaled pivot row
        A = jnp.where(on_j[None, :, :], jnp.where(on_j, 1.0 / p, -col / p)[:, None, :], A)  # column j
        return A, log_det + jnp.log(p)

    return jax.lax.fori_loop(0, P, pivot, (A, jnp.zeros(A.shape[-1], A.dtype)))


def spd_inverse_logdet(B):
    """``(B^-1 (n, P, P), log|B| (n,))`` for SPD ``B`` ``(n, P, P)`` (a matrix that is not positive
    definite gives a non-finite or meaningless result: check beforehand)."""
    inverse, log_det = _inverse_batch_last(jnp.moveaxis(B, 0, -1))
    return jnp.moveaxis(inverse, -1, 0), log_det


@jax.custom_jvp
def quad_logdet(B, c):
    """``(c^T B^-1 c (n,), log|B| (n,))`` for SPD ``B`` ``(n, P, P)`` and ``c`` ``(n, P)``; differentiable
    to any order, in forward and reverse mode, by the closed forms in the module docstring."""
    inverse, log_det = spd_inverse_logdet(B)
    return jnp.einsum("np,npq,nq->n", c, inverse, c), log_det


@quad_logdet.defjvp
def _quad_logdet_jvp(primals, tangents):
    B, c = primals
    dB, dc = tangents
    inverse, log_det = spd_inverse_logdet(B)
    v = jnp.einsum("npq,nq->np", inverse, c)
    d_quad = 2.0 * jnp.sum(v * dc, -1) - jnp.einsum("np,npq,nq->n", v, dB, v)
    d_log_det = jnp.einsum("npq,nqp->n", inverse, dB)
    return (jnp.sum(v * c, -1), log_det), (d_quad, d_log_det)


@jax.custom_jvp
def trace_solve_logdet(B, S):
    """``(tr(B^-1 S) (n,), log|B| (n,))`` for SPD ``B`` and symmetric ``S``, both ``(n, P, P)``:
    :func:`quad_logdet` summed over vectors, ``sum_k c_k^T B^-1 c_k = tr(B^-1 sum_k c_k c_k^T)``.
    Derivative: ``d tr(B^-1 S) = tr(B^-1 dS) - tr(B^-1 S B^-1 dB)``."""
    inverse, log_det = spd_inverse_logdet(B)
    return jnp.einsum("npq,nqp->n", inverse, S), log_det


@trace_solve_logdet.defjvp
def _trace_solve_logdet_jvp(primals, tangents):
    B, S = primals
    dB, dS = tangents
    inverse, log_det = spd_inverse_logdet(B)
    left = jnp.einsum("npq,nqr->npr", inverse, S)  # B^-1 S
    d_trace = jnp.einsum("npq,nqp->n", inverse, dS) - jnp.einsum("npq,nqr,nrp->n", left, inverse, dB)
    d_log_det = jnp.einsum("npq,nqp->n", inverse, dB)
    return (jnp.trace(left, axis1=-2, axis2=-1), log_det), (d_trace, d_log_det)
