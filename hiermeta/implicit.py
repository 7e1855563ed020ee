"""Implicit hypergradients of the predictive log-likelihood (PLL).

Optimality condition of the inner problem (Eq. 2):  grad_theta L_t(theta_hat; meta) = 0.
By the implicit function theorem, with H_t = Hessian_theta L_t at theta_hat and
g_t = grad_theta log p(D_t^val | theta_hat),

    dPLL_t / d meta = -(d^2 L_t / d theta d meta)^T  v_t,     v_t = H_t^{-1} g_t.

For L_t = -log N(theta | phi, sigma^2) - log p(D^tr | theta) and rho_m = log sigma_m^2 this is

    dPLL_t / d phi_m = v_{m,t} / sigma_m^2,
    dPLL_t / d rho_m = v_{m,t} . (theta_hat_{m,t} - phi_m) / sigma_m^2.

A *solver* maps ``(hvp, prior_var, g)`` to ``v ~ H^{-1} g`` (``hvp(u) = H u``, ``prior_var`` =
sigma^2 per coordinate, or the map ``u -> Sigma u`` for a correlated prior):

- :func:`eq4_solve`, the paper's Eq. 4: H replaced by its prior block, ``v = sigma^2 g``;
- :func:`cg_solve`, the exact hypergradient: (preconditioned) conjugate gradient on
  Hessian-vector products (forward-over-reverse), ``(H + damping I) v = g``.

Two ways to use them, sharing :func:`implicit_vjp`:

- explicitly, :func:`implicit_hypergradient` (what the learners do; it also returns the solver's
  diagnostics, :class:`SolveInfo`);
- through ``jax.grad``: :func:`implicit_solution` wraps a forward solver of the inner problem as
  a ``jax.custom_vjp`` whose backward pass runs the solver.

Neither path differentiates the inner iterations: memory does not depend on their number.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "Solver",
    "SolveInfo",
    "CGSolver",
    "eq4_solve",
    "cg_solve",
    "as_solver",
    "hessian_vector_product",
    "implicit_vjp",
    "solve_with_info",
    "implicit_hypergradient",
    "implicit_solution",
]

# solver(hvp, prior_var, g) -> v ~ H^{-1} g;  hvp(v) = H v,  prior_var = sigma^2 per coordinate
Solver = Callable[[Callable[[jax.Array], jax.Array], jax.Array, jax.Array], jax.Array]


class SolveInfo(NamedTuple):
    """Diagnostics of one solve of ``H v = g``.

    Attributes:
      iterations: CG iterations taken; 0 for a direct formula (Eq. 4, any plain solver
        function); -1 when unknown (``jax.scipy.sparse.linalg.cg`` does not report it).
      residual: ``||H v - g|| / ||g||`` for the *undamped* H (0 when g = 0): the relative
        error of the linear solve behind the hypergradient, whatever the solver (for Eq. 4 it
        measures how much the dropped likelihood Hessian matters).
    """

    iterations: jax.Array
    residual: jax.Array


def _apply_prior_cov(prior_var, u):
    """``Sigma u`` for ``prior_var`` the per-coordinate variances ``(P,)`` or the map ``u -> Sigma u``
    (a correlated prior, :meth:`hiermeta.HierarchicalModel.prior_cov_operator`)."""
    return prior_var(u) if callable(prior_var) else prior_var * u


def eq4_solve(hvp, prior_var: jax.Array, g: jax.Array) -> jax.Array:
    """The paper's approximation ``H^{-1} g ~ Sigma g`` (Eq. 4): the likelihood Hessian dropped.

    ``Sigma = diag(sigma^2)`` in the paper; the full prior covariance for a correlated prior.
    """
    del hvp
    return _apply_prior_cov(prior_var, g)


class CGSolver(NamedTuple):
    """Conjugate gradient for ``(H + damping I) v = g``; build it with :func:`cg_solve`.

    Calling it is a :data:`Solver` (returns ``v``); :meth:`solve` also returns the iterations.
    """

    damping: float
    tol: float
    maxiter: int
    precondition: bool
    backend: str

    def __call__(self, hvp, prior_var, g):
        return self.solve(hvp, prior_var, g)[0]

    def solve(self, hvp, prior_var, g) -> tuple[jax.Array, jax.Array]:
        damping = self.damping

        def matvec(u):
            return hvp(u) + damping * u if damping else hvp(u)

        if self.precondition and callable(prior_var):  # a correlated prior: M^{-1} = Sigma (damping ignored)
            precond = prior_var
        elif self.precondition:  # M^{-1} = (diag(1 / sigma^2) + damping I)^{-1}: the prior block
            inv_diag = prior_var / (1.0 + damping * prior_var)
            precond = lambda r: inv_diag * r
        else:
            precond = lambda r: r
        if self.backend == "jax":
            v, _ = jax.scipy.sparse.linalg.cg(matvec, g, tol=self.tol, atol=0.0, maxiter=self.maxiter, M=precond)
            return v, jnp.asarray(-1, jnp.int32)
        return _cg_scan(matvec, precond, g, self.tol, self.maxiter)


def _cg_scan(matvec, precond, b, tol, maxiter):
    """Preconditioned CG from ``x = 0`` for exactly ``maxiter`` scan steps, frozen once converged.

    An iteration runs while ``||r|| > tol ||b||`` and the search direction has positive
    curvature (``p^T A p > 0``; otherwise H is not positive definite there and CG stops).
    A fixed-length ``lax.scan`` rather than a ``while_loop``: static cost, exact iteration
    budgets, and no data-dependent loop in XLA's CPU runtime.
    """
    threshold = tol * jnp.linalg.norm(b)
    x = jnp.zeros_like(b)
    z = precond(b)
    carry = (x, b, z, jnp.vdot(b, z), jnp.zeros((), jnp.int32))

    def body(carry, _):
        x, r, p, rz, k = carry
        Ap = matvec(p)
        pAp = jnp.vdot(p, Ap)
        active = (jnp.linalg.norm(r) > threshold) & (pAp > 0)
        alpha = jnp.where(active, rz / jnp.where(active, pAp, 1.0), 0.0)
        x_new = x + alpha * p
        r_new = r - alpha * Ap
        z_new = precond(r_new)
        rz_new = jnp.vdot(r_new, z_new)
        p_new = z_new + jnp.where(active, rz_new / jnp.where(active, rz, 1.0), 0.0) * p
        keep = lambda new, old: jnp.where(active, new, old)
        return (keep(x_new, x), keep(r_new, r), keep(p_new, p), keep(rz_new, rz), k + active), None

    (x, _, _, _, k), _ = jax.lax.scan(body, carry, None, length=maxiter)
    return x, k


def cg_solve(
    damping: float = 0.0,
    tol: float = 1e-10,
    maxiter: int = 20,
    precondition: bool = True,
    backend: str = "scan",
) -> CGSolver:
    """The exact solver: conjugate gradient on Hessian-vector products.

    Solves ``(H + damping I) v = g`` to ``||r|| <= tol ||g||`` or ``maxiter`` iterations.

    Args:
      damping: ``>= 0``; 0 is the exact hypergradient, > 0 regularises an ill-conditioned or
        indefinite H (iMAML's damping).
      tol: relative residual at which CG stops (``>= 0``; 0 runs all ``maxiter`` iterations).
      maxiter: ``>= 1`` iterations at most (``backend="scan"`` always spends ``maxiter``
        Hessian-vector products per task, the converged ones frozen).
      precondition: precondition by the prior block ``diag(1 / sigma^2) + damping`` (exact for
        the prior part, so its first iterate is Eq. 4's direction; essential when the module
        scales sigma_m differ by orders of magnitude).
      backend: ``"scan"`` (own CG under ``lax.scan``, reports its iterations) or ``"jax"``
        (``jax.scipy.sparse.linalg.cg``, a ``while_loop``; iterations reported as -1).
    """
    if not np.isfinite(damping) or damping < 0:
        raise ValueError(f"damping must be finite and >= 0, got {damping}")
    if not np.isfinite(tol) or tol < 0:
        raise ValueError(f"tol must be finite and >= 0, got {tol}")
    if int(maxiter) != maxiter or maxiter < 1:
        raise ValueError(f"maxiter must be an integer >= 1, got {maxiter}")
    if backend not in ("scan", "jax"):
        raise ValueError(f"backend must be 'scan' or 'jax', got {backend!r}")
    return CGSolver(float(damping), float(tol), int(maxiter), bool(precondition), backend)


def as_solver(hypergradient: Union[str, Solver]) -> Solver:
    """``"eq4"`` -> :func:`eq4_solve`, ``"exact"`` -> :func:`cg_solve` ``()``, a solver -> itself."""
    if isinstance(hypergradient, str):
        if hypergradient == "eq4":
            return eq4_solve
        if hypergradient == "exact":
            return cg_solve()
        raise ValueError(f"hypergradient must be 'eq4', 'exact' or a solver, got {hypergradient!r}")
    if not callable(hypergradient):
        raise ValueError(f"hypergradient must be 'eq4', 'exact' or a solver, got {hypergradient!r}")
    return hypergradient


def hessian_vector_product(inner_grad: Callable, theta_hat: jax.Array, meta: Any):
    """``v -> H v`` with ``H`` the Hessian of the inner loss at ``theta_hat`` (forward-over-reverse)."""

    def hvp(v):
        return jax.jvp(lambda th: inner_grad(th, meta), (theta_hat,), (v,))[1]

    return hvp


def implicit_vjp(inner_grad: Callable, theta_hat: jax.Array, meta: Any, v: jax.Array) -> Any:
    """``dPLL/d meta = -(d^2 L / d theta d meta)^T v`` for ``v ~ H^{-1} g``.

    Args:
      inner_grad: ``(theta, meta) -> grad_theta L(theta; meta)``.
      theta_hat: the inner solution ``(P,)``.
      meta: pytree of meta-parameters L depends on.
      v: the solved vector ``(P,)``.
    Returns:
      A pytree like ``meta``: the PLL hypergradient (an ascent direction).
    """
    _, vjp_fn = jax.vjp(lambda m: inner_grad(theta_hat, m), meta)
    (cotangent,) = vjp_fn(v)
    return jax.tree_util.tree_map(lambda c: -c, cotangent)


def solve_with_info(solver: Solver, hvp, prior_var, g) -> tuple[jax.Array, SolveInfo]:
    """``v ~ H^{-1} g`` by ``solver`` and its :class:`SolveInfo` (one extra Hessian-vector product)."""
    solve = getattr(solver, "solve", None)
    if solve is not None:
        v, iterations = solve(hvp, prior_var, g)
    else:
        v, iterations = solver(hvp, prior_var, g), jnp.zeros((), jnp.int32)
    g_norm = jnp.linalg.norm(g)
    residual = jnp.linalg.norm(hvp(v) - g) / jnp.where(g_norm > 0, g_norm, 1.0)
    return v, SolveInfo(jnp.asarray(iterations, jnp.int32), residual)


def implicit_hypergradient(
    inner_grad: Callable, theta_hat: jax.Array, meta: Any, g: jax.Array, prior_var: jax.Array, solver: Solver
) -> tuple[Any, SolveInfo]:
    """``dPLL/d meta`` (a pytree like ``meta``) for ``g = grad_theta PLL`` at ``theta_hat``, and diagnostics.

    ``v`` solves ``H v = g`` by ``solver`` (H the Hessian of the inner loss at ``theta_hat``),
    then :func:`implicit_vjp`.  ``inner_grad(theta, meta)`` as in :func:`implicit_vjp`.
    """
    hvp = hessian_vector_product(inner_grad, theta_hat, meta)
    v, info = solve_with_info(solver, hvp, prior_var, g)
    return implicit_vjp(inner_grad, theta_hat, meta, v), info


def implicit_solution(
    solve: Callable[[Any, Any], jax.Array],
    inner_grad: Callable[[jax.Array, Any, Any], jax.Array],
    prior_var: Callable[[Any], jax.Array],
    solver: Optional[Solver] = None,
) -> Callable[[Any, Any], jax.Array]:
    """``theta_hat(meta, data)``, differentiable in ``meta`` by the implicit function theorem.

    Optimality condition: ``inner_grad(theta_hat, meta, data) = 0``.  The forward pass is
    ``solve(meta, data)`` (e.g. K inner optimiser steps), never differentiated; the backward
    pass maps the cotangent ``c`` of ``theta_hat`` to ``-(d^2 L / d theta d meta)^T H^{-1} c``,
    solving ``H v = c`` with ``solver`` (default :func:`cg_solve` ``()``), as
    :func:`implicit_hypergradient` does.  ``jax.grad`` of any outer loss of ``theta_hat`` then
    gives the implicit hypergradient.  ``data`` gets a zero cotangent (it is not differentiated).

    Args:
      solve: ``(meta, data) -> theta_hat`` ``(P,)`` for one task.
      inner_grad: ``(theta, meta, data) -> grad_theta L``.
      prior_var: ``meta -> (P,)`` prior variance per coordinate (for Eq. 4 / preconditioning).
      solver: the linear solver.
    """
    solver = cg_solve() if solver is None else solver

    @jax.custom_vjp
    def solution(meta, data):
        return solve(meta, data)

    def fwd(meta, data):
        theta_hat = solve(meta, data)
        return theta_hat, (theta_hat, meta, data)

    def bwd(residuals, cotangent):
        theta_hat, meta, data = residuals
        grad_fn = lambda theta, m: inner_grad(theta, m, data)
        hyper, _ = implicit_hypergradient(grad_fn, theta_hat, meta, cotangent, prior_var(meta), solver)
        return hyper, None

    solution.defvjp(fwd, bwd)
    return solution
