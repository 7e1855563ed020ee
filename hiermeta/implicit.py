"""Implicit hypergradients of the predictive log-likelihood (PLL).

Optimality condition of the inner problem (Eq. 2):  grad_theta L_t(theta_hat; meta) = 0.
By the implicit function theorem, with H_t = Hessian_theta L_t at theta_hat and
g_t = grad_theta log p(D_t^val | theta_hat),

    dPLL_t / d meta = -(d^2 L_t / d theta d meta)^T  v_t,     v_t = H_t^{-1} g_t.

For L_t = -log N(theta | phi, sigma^2) - log p(D^tr | theta) and rho_m = log sigma_m^2 this is

    dPLL_t / d phi_m = v_{m,t} / sigma_m^2,
    dPLL_t / d rho_m = v_{m,t} . (theta_hat_{m,t} - phi_m) / sigma_m^2.

The paper's Eq. 4 replaces H_t by its prior block diag(1 / sigma^2), i.e. v_t = sigma^2 g_t,
which gives dPLL/d rho_m ~ (theta_hat_m - phi_m) . g_m and dPLL/d phi ~ g (first-order MAML).
A *solver* maps ``(hvp, prior_var, g)`` to ``v``; :func:`eq4_solve` is the paper's, and an
exact solver (conjugate gradient on ``hvp``) plugs into the same place.  The vector-Jacobian
product below never touches the inner iterations, so memory does not depend on their number.
"""

from __future__ import annotations

from typing import Any, Callable

import jax

__all__ = ["eq4_solve", "implicit_vjp", "hessian_vector_product", "Solver"]

# solver(hvp, prior_var, g) -> v ~ H^{-1} g;  hvp(v) = H v,  prior_var = sigma^2 per coordinate
Solver = Callable[[Callable[[jax.Array], jax.Array], jax.Array, jax.Array], jax.Array]


def eq4_solve(hvp, prior_var: jax.Array, g: jax.Array) -> jax.Array:
    """The paper's approximation ``H^{-1} g ~ sigma^2 g`` (Eq. 4): the likelihood Hessian dropped."""
    del hvp
    return prior_var * g


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
