"""Laplace approximation of each task's posterior under fixed (phi, sigma).

    p(theta_t | D_t, phi, sigma) ~ N(theta_hat_t, H_t^-1),
    theta_hat_t = argmin_theta L_t(theta),    H_t = Hessian_theta L_t(theta_hat_t),
    log p(D_t | phi, sigma) ~ -L_t(theta_hat_t) + P/2 log(2 pi) - 1/2 log|H_t|        (Laplace evidence)

with L_t = -log N(theta | phi, sigma^2) - log p(D_t | theta) the inner objective of Eq. 2, read off
the model (:meth:`HierarchicalModel.inner_objective`), so it is the MAP problem the meta-learners
solve.  The mode is found by damped Newton steps (Levenberg-Marquardt, :func:`hiermeta.solvers.levenberg_marquardt`:
a step is taken only when it lowers L_t, the damping shrinks after a success and grows after a
failure), vmapped over tasks.
On a linear-Gaussian domain L_t is quadratic, so the approximation is exact.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp

from .hierarchy import HierarchicalModel
from .solvers import levenberg_marquardt  # the one damped-Newton loop (hiermeta.solvers.newton's too)

__all__ = ["LaplaceResult", "laplace", "levenberg_marquardt"]


class LaplaceResult(NamedTuple):
    """Per task: ``mean`` (the MAP, ``(T, P)``), ``cov`` (``(T, P, P)``), ``log_evidence`` ``(T,)``,
    ``grad_norm`` (max |grad L_t| at the mode, ``(T,)``) and ``converged`` (gradient below ``tol``
    and a positive-definite Hessian, ``(T,)``)."""

    mean: jax.Array
    cov: jax.Array
    log_evidence: jax.Array
    grad_norm: jax.Array
    converged: jax.Array


def _one_task(model: HierarchicalModel, phi, sigma, data_t, theta0, num_steps: int, tol: float, extra=None):
    loss = lambda th: model.inner_objective(th, phi, sigma, data_t, extra)
    prior_var = model.partition.expand(sigma) ** 2
    grad, hess = jax.grad(loss), jax.hessian(loss)
    theta, value = levenberg_marquardt(loss, theta0, num_steps)
    H = hess(theta)
    H = 0.5 * (H + H.T)
    # a Hessian that is not positive definite (a saddle, or Newton stopped short on a multimodal
    # posterior) gets its eigenvalues floored at the smallest prior precision; flagged not converged
    eigval, eigvec = jnp.linalg.eigh(H)
    floor = jnp.min(1.0 / prior_var)
    positive = eigval[0] > 0
    eigval = jnp.where(positive, eigval, jnp.maximum(eigval, floor))
    cov = (eigvec / eigval) @ eigvec.T
    log_det = jnp.sum(jnp.log(eigval))
    P = theta.shape[0]
    log_evidence = -value + 0.5 * P * jnp.log(2.0 * jnp.pi) - 0.5 * log_det
    grad_norm = jnp.max(jnp.abs(grad(theta)))
    converged = (grad_norm <= tol) & positive
    return theta, 0.5 * (cov + cov.T), log_evidence, grad_norm, converged


def laplace(
    model: HierarchicalModel,
    phi: jax.Array,
    sigma: jax.Array,
    data,
    *,
    init: Optional[jax.Array] = None,
    num_steps: int = 500,
    tol: float = 1e-6,
    extra=None,
) -> LaplaceResult:
    """Laplace approximation of every task's posterior at ``phi`` ``(P,)``, ``sigma`` ``(M,)``.

    ``data`` holds the tasks' (support) data with a leading task axis; ``init`` ``(T, P)`` starts
    the Newton iterations (default phi); ``extra``: the model's other hyperparameter values
    (globals, correlations, gamma; :meth:`~hiermeta.HierarchicalModel.hyper_sites`).  Jittable and vmappable (e.g. over posterior draws of
    phi and sigma); check ``converged`` when the likelihood is not log-concave: where the Hessian
    at the end point is not positive definite, its eigenvalues are floored at the smallest prior
    precision ``min 1/sigma^2`` (a usable but flagged Gaussian).
    """
    part = model.partition
    phi = jnp.asarray(phi)
    sigma = jnp.broadcast_to(jnp.asarray(sigma, dtype=phi.dtype), (part.num_modules,))
    if phi.shape != (part.num_params,):
        raise ValueError(f"phi must have shape ({part.num_params},), got {phi.shape}")
    T = jax.tree_util.tree_leaves(data)[0].shape[0]
    if init is None:
        z = model.task_covariates(data) if model.num_task_covariates else None
        theta0 = jnp.broadcast_to(model.prior_mean(phi, extra, z), (T, part.num_params))
    else:
        theta0 = jnp.asarray(init)
    if theta0.shape != (T, part.num_params):
        raise ValueError(f"init must have shape {(T, part.num_params)}, got {theta0.shape}")
    one = lambda d, th0: _one_task(model, phi, sigma, d, th0, int(num_steps), float(tol), extra)
    return LaplaceResult(*jax.vmap(one)(data, theta0))
