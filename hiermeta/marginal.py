"""Each task's marginal likelihood for any likelihood: the Laplace approximation and adaptive
Gauss-Hermite quadrature, differentiable in every hyperparameter through the mode.

For task t with hyperparameters psi = (phi, sigma, correlations, gamma, globals g),

    p(D_t | psi) = int N(theta | m_t, Sigma) p(D_t | theta, g) dtheta = int exp(-L_t(theta; psi)) dtheta,

``L_t`` the inner objective of Eq. 2 (:meth:`~hiermeta.HierarchicalModel.inner_objective`, read off
the model's trace, so it is the density every other method uses).  With the mode and its Hessian

    theta_hat_t(psi) = argmin_theta L_t(theta; psi),      H_t = d^2 L_t / d theta^2 at theta_hat_t,

* **Laplace** (lme4's ``nAGQ = 1``):

      log p(D_t | psi) ~ -L_t(theta_hat_t) + P/2 log(2 pi) - 1/2 log|H_t|;

  exact when ``L_t`` is quadratic in theta (a linear-Gaussian likelihood).
* **Adaptive Gauss-Hermite quadrature** with K nodes (lme4's ``nAGQ = K``; one scalar random
  effect, P = 1): with the Gauss-Hermite nodes x_k and weights w_k (weight function exp(-x^2))
  placed on the Laplace Gaussian, ``theta_k = theta_hat + sqrt(2) s x_k``, ``s = H^{-1/2}``,

      log p(D_t | psi) ~ log(sqrt(2) s) + logsumexp_k [ log w_k + x_k^2 - L_t(theta_k) ],

  exact when ``exp(-L_t)`` is the Laplace Gaussian times a polynomial of degree below 2K; K = 1
  is the Laplace approximation.

The mode is found by damped Newton steps with the exact Hessian (a step is kept only if it
does not raise ``L_t``; Levenberg-Marquardt damping otherwise) until the Newton decrement
``g^T H^-1 g`` is below ``tol (1 + |L_t|)``.  Its derivative is not unrolled: ``theta_hat`` is a
``jax.lax.custom_root`` of ``grad_theta L_t = 0``, so by the implicit function theorem

    d theta_hat / d psi = -H^{-1} d^2 L_t / (d theta d psi),

and the rest (``L_t``, ``log|H_t|`` and the nodes, third derivatives included) is differentiated
by JAX as written.  Where the Hessian at the end point is not positive definite (a saddle, or a
likelihood that is not log-concave) the approximation is not valid: its eigenvalues are floored
at the smallest prior precision, the task is flagged (``hessian_pd`` False) and type-II ML warns.
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.special import logsumexp

from .hierarchy import HierarchicalModel

__all__ = [
    "APPROXIMATIONS",
    "MarginalInfo",
    "newton_minimise",
    "approximate_log_marginal",
    "marginal_info",
    "compiled_marginal_info",
    "quadrature_posterior",
    "check_approximation",
]

APPROXIMATIONS = ("laplace", "agq")


class MarginalInfo(NamedTuple):
    """Per task: ``log_marginal`` ``(T,)``, ``mode`` ``(T, P)`` (theta_hat), ``hessian_pd`` ``(T,)``
    (the Hessian at the mode is positive definite), ``decrement`` ``(T,)`` (the last Newton decrement
    ``g^T H^-1 g``), ``grad_norm`` ``(T,)`` (max |grad L_t| at the mode), ``num_steps`` ``(T,)``
    (Newton steps taken) and ``converged`` ``(T,)`` (decrement below the tolerance within the steps)."""

    log_marginal: jax.Array
    mode: jax.Array
    hessian_pd: jax.Array
    decrement: jax.Array
    grad_norm: jax.Array
    num_steps: jax.Array
    converged: jax.Array


def check_approximation(approximation: str, num_nodes, num_params: int) -> int:
    """Validate an approximation name and node count; return the number of nodes (1 for Laplace)."""
    if approximation not in APPROXIMATIONS:
        raise ValueError(f"approximation must be one of {APPROXIMATIONS}, got {approximation!r}")
    if approximation == "laplace":
        if num_nodes not in (None, 1):
            raise ValueError(f"the Laplace approximation uses one node; got num_nodes={num_nodes} "
                             "(use approximation='agq' for more)")
        return 1
    if num_nodes is None:
        raise ValueError("approximation='agq' needs num_nodes (the Gauss-Hermite nodes, lme4's nAGQ; e.g. 9 or 25)")
    if isinstance(num_nodes, bool) or int(num_nodes) != num_nodes or num_nodes < 1:
        raise ValueError(f"num_nodes must be an integer >= 1, got {num_nodes!r}")
    if num_params != 1:
        raise ValueError(f"adaptive Gauss-Hermite quadrature needs one scalar random effect per task (P = 1); "
                         f"this model has P = {num_params}: use approximation='laplace'")
    return int(num_nodes)


def newton_minimise(loss, start, *, tol: float = 1e-20, max_steps: int = 50):
    """Damped Newton on ``loss(theta)`` from ``start`` under ``lax.while_loop`` (not differentiable).

    Each iteration solves ``(H + lam I) delta = -g`` with the exact Hessian; the step is kept if it
    is finite and does not raise the loss (up to rounding), after which ``lam`` shrinks tenfold,
    else ``lam`` grows (from ``1e-3 max|diag H|``).  Converged when the decrement ``-g . delta`` of a
    kept step is below ``tol (1 + |loss|)`` or an undamped Newton step is below rounding (a
    stationary point); stops then, when the damping runs off (``lam > 1e30``: stalled, not
    converged), or after ``max_steps``.  Returns ``(theta, (num_steps, decrement, converged))``.
    """
    grad, hess = jax.grad(loss), jax.hessian(loss)
    dtype = start.dtype
    eye = jnp.eye(start.shape[0], dtype=dtype)

    def cond(state):
        *_, k, stop, _ = state
        return (k < max_steps) & ~stop

    def body(state):
        theta, value, lam, _, k, _, _ = state
        g, H = grad(theta), hess(theta)
        H = 0.5 * (H + H.T)
        delta = -jnp.linalg.solve(H + lam * eye, g)
        decrement = -jnp.dot(g, delta)
        new_value = loss(theta + delta)
        finite = jnp.isfinite(new_value) & jnp.all(jnp.isfinite(delta))
        accept = finite & (new_value <= value + 1e-13 * (1.0 + jnp.abs(value)))
        # an undamped Newton step below rounding: a stationary point (a saddle too: the caller checks H)
        tiny = finite & (lam == 0) & (jnp.max(jnp.abs(delta)) <= 1e-14 * (1.0 + jnp.max(jnp.abs(theta))))
        theta = jnp.where(accept, theta + delta, theta)
        value = jnp.where(accept, new_value, value)
        bump = jnp.maximum(10.0 * lam, 1e-3 * jnp.max(jnp.abs(jnp.diag(H))) + 1e-12)
        lam = jnp.where(accept, jnp.where(lam > 1e-14, 0.1 * lam, 0.0), bump)
        converged = (accept & (jnp.abs(decrement) <= tol * (1.0 + jnp.abs(value)))) | tiny
        return theta, value, lam, decrement, k + 1, converged | (lam > 1e30), converged

    false = jnp.zeros((), bool)
    init = (start, loss(start), jnp.zeros((), dtype), jnp.asarray(jnp.inf, dtype), jnp.zeros((), jnp.int32),
            false, false)
    theta, value, _, decrement, k, _, converged = jax.lax.while_loop(cond, body, init)
    return theta, (k, decrement, converged)


def _mode(loss, hyper, start, tol, max_steps):
    """``argmin_theta loss(theta, hyper)`` as a ``lax.custom_root`` of its gradient (implicit derivative)."""

    def solve(_, x0):
        fixed = jax.lax.stop_gradient(hyper)
        theta, (steps, decrement, done) = newton_minimise(lambda th: loss(th, fixed), x0, tol=tol,
                                                          max_steps=max_steps)
        # custom_root's derivative rule wants floating auxiliary outputs
        return theta, (steps.astype(x0.dtype), decrement, done.astype(x0.dtype))

    def tangent_solve(linear, y):  # H x = y with the (small, dense) Hessian
        return jnp.linalg.solve(jax.jacobian(linear)(y), y)

    stationarity = lambda th: jax.grad(loss)(th, hyper)
    return jax.lax.custom_root(stationarity, jax.lax.stop_gradient(start), solve, tangent_solve, has_aux=True)


def _log_det(H, prior_precision_floor):
    """``(log|H|, positive definite)``; a Hessian that is not positive definite gets its eigenvalues
    floored at ``prior_precision_floor`` (a usable but flagged value, held constant for the gradient)."""
    H = 0.5 * (H + H.T)
    chol = jnp.linalg.cholesky(jax.lax.stop_gradient(H))
    pd = jnp.all(jnp.isfinite(chol)) & jnp.all(jnp.diagonal(chol) > 0)
    safe = jnp.where(pd, H, jnp.eye(H.shape[0], dtype=H.dtype))
    log_det_pd = 2.0 * jnp.sum(jnp.log(jnp.diagonal(jnp.linalg.cholesky(safe))))
    eig = jnp.linalg.eigvalsh(jax.lax.stop_gradient(H))
    log_det_floored = jnp.sum(jnp.log(jnp.maximum(eig, prior_precision_floor)))
    return jnp.where(pd, log_det_pd, log_det_floored), pd


def _gauss_hermite(num_nodes: int):
    x, w = np.polynomial.hermite.hermgauss(int(num_nodes))
    return jnp.asarray(x), jnp.asarray(np.log(w))


def _task(model: HierarchicalModel, hyper, data_t, start, nodes, tol, max_steps):
    """One task's approximate log marginal and diagnostics (differentiable in ``hyper``)."""

    def loss(theta, h):
        phi, sigma, extra = h
        return model.inner_objective(theta, phi, sigma, data_t, extra)

    theta_hat, (steps, decrement, done) = _mode(loss, hyper, start, tol, max_steps)
    value = loss(theta_hat, hyper)
    H = jax.hessian(loss)(theta_hat, hyper)
    floor = jnp.min(1.0 / model.partition.expand(jax.lax.stop_gradient(hyper[1])) ** 2)
    log_det, pd = _log_det(H, floor)
    P = theta_hat.shape[0]
    if nodes is None:
        log_marginal = -value + 0.5 * P * jnp.log(2.0 * jnp.pi) - 0.5 * log_det
    else:
        x, log_w = nodes
        scale = jnp.sqrt(2.0) * jnp.exp(-0.5 * log_det)  # sqrt(2) s, s = H^{-1/2}
        at_nodes = jax.vmap(lambda xk: loss(theta_hat + scale * xk, hyper))(x)
        log_marginal = jnp.log(scale) + logsumexp(log_w + x**2 - at_nodes)
    grad_norm = jnp.max(jnp.abs(jax.grad(loss)(jax.lax.stop_gradient(theta_hat), jax.lax.stop_gradient(hyper))))
    return log_marginal, (theta_hat, pd, decrement, grad_norm, steps.astype(jnp.int32), done > 0)


def _prepare(model: HierarchicalModel, phi, sigma, data, extra, approximation, num_nodes):
    part = model.partition
    num_nodes = check_approximation(approximation, num_nodes, part.num_params)
    phi = jnp.asarray(phi)
    sigma = jnp.broadcast_to(jnp.asarray(sigma, dtype=phi.dtype), (part.num_modules,))
    extra = dict(extra or {})
    T = jax.tree_util.tree_leaves(data)[0].shape[0]
    z = model.task_covariates(data) if model.num_task_covariates else None
    start = jnp.broadcast_to(model.prior_mean(phi, extra, z), (T, part.num_params))
    nodes = None if approximation == "laplace" else _gauss_hermite(num_nodes)
    return (phi, sigma, extra), start, nodes


def _all_tasks(model, phi, sigma, data, extra, approximation, num_nodes, tol, max_steps):
    hyper, start, nodes = _prepare(model, phi, sigma, data, extra, approximation, num_nodes)
    one = lambda d, s: _task(model, hyper, d, s, nodes, float(tol), int(max_steps))
    return jax.vmap(one)(data, start)


def approximate_log_marginal(model: HierarchicalModel, phi, sigma, data, extra=None, *,
                             approximation: str = "laplace", num_nodes: Optional[int] = None,
                             tol: float = 1e-20, max_steps: int = 50) -> jax.Array:
    """``log p(D_t | phi, sigma, extra)`` per task ``(T,)`` by ``"laplace"`` or ``"agq"`` (``num_nodes``).

    Jittable and differentiable in phi, sigma and every value of ``extra`` (the model's other
    hyperparameter sites: correlations, gamma, the likelihood's globals), the mode implicitly.
    ``tol`` and ``max_steps`` control the Newton solve of each task's mode.
    """
    return _all_tasks(model, phi, sigma, data, extra, approximation, num_nodes, tol, max_steps)[0]


def marginal_info(model: HierarchicalModel, phi, sigma, data, extra=None, *, approximation: str = "laplace",
                  num_nodes: Optional[int] = None, tol: float = 1e-20, max_steps: int = 50) -> MarginalInfo:
    """:func:`approximate_log_marginal` with each task's mode and the health of its solve (:class:`MarginalInfo`)."""
    value, (mode, pd, decrement, grad_norm, steps, done) = _all_tasks(
        model, phi, sigma, data, extra, approximation, num_nodes, tol, max_steps)
    return MarginalInfo(value, mode, pd, decrement, grad_norm, steps, done)


@functools.lru_cache(maxsize=32)
def compiled_marginal_info(model: HierarchicalModel, approximation: str = "laplace", num_nodes: Optional[int] = None):
    """``jax.jit`` of :func:`marginal_info` for one model and approximation: ``f(phi, sigma, data, extra)``."""
    return jax.jit(lambda phi, sigma, data, extra: marginal_info(
        model, phi, sigma, data, extra, approximation=approximation, num_nodes=num_nodes))


def quadrature_posterior(model: HierarchicalModel, phi, sigma, data, extra=None, *, num_nodes: int = 32,
                         tol: float = 1e-20, max_steps: int = 50):
    """The posterior of each task's scalar theta (P = 1) as weighted Gauss-Hermite nodes.

    Returns ``(draws (T, K, 1), log_weights (T, K))``: ``theta_k = theta_hat + sqrt(2) s x_k`` with
    unnormalised log-weights ``log w_k + x_k^2 - L_t(theta_k)``, so ``sum_k w~_k f(theta_k)`` is the
    adaptive quadrature of ``E[f(theta) | D_t, phi, sigma, extra]``, exact for polynomial-times-Laplace
    integrands below degree 2K.  Feed them to :func:`hiermeta.predictive.score_draws` for the
    posterior predictive at fixed hyperparameters.
    """
    num_nodes = check_approximation("agq", num_nodes, model.partition.num_params)
    info = marginal_info(model, phi, sigma, data, extra, tol=tol, max_steps=max_steps)
    hyper, _, _ = _prepare(model, phi, sigma, data, extra, "laplace", None)
    x, log_w = _gauss_hermite(num_nodes)

    def one(data_t, mode):
        loss = lambda th: model.inner_objective(th, hyper[0], hyper[1], data_t, hyper[2])
        H = jax.hessian(loss)(mode)
        floor = jnp.min(1.0 / model.partition.expand(hyper[1]) ** 2)
        log_det, _ = _log_det(H, floor)
        theta = mode[None, :] + jnp.sqrt(2.0) * jnp.exp(-0.5 * log_det) * x[:, None]
        return theta, log_w + x**2 - jax.vmap(loss)(theta)

    return jax.vmap(one)(data, info.mode)
