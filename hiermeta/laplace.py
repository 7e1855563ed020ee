"""The Laplace approximation of every task at fixed hyperparameters: its posterior, its marginal
likelihood, and adaptive Gauss-Hermite quadrature built on it.

For task t with hyperparameters psi = (phi, sigma, correlations, gamma, globals g), ``L_t`` the
inner objective of Eq. 2 (:meth:`~hiermeta.HierarchicalModel.inner_objective`, read off the model's
trace, so it is the MAP problem the meta-learners solve and the density every other method uses),

    theta_hat_t(psi) = argmin_theta L_t(theta; psi),      H_t = d^2 L_t / d theta^2 at theta_hat_t,

* **posterior** (:func:`laplace`): ``p(theta_t | D_t, psi) ~ N(theta_hat_t, H_t^-1)``;
* **marginal likelihood** (lme4's ``nAGQ = 1``), ``p(D_t | psi) = int exp(-L_t(theta; psi)) dtheta``:

      log p(D_t | psi) ~ -L_t(theta_hat_t) + P/2 log(2 pi) - 1/2 log|H_t|;

  both exact when ``L_t`` is quadratic in theta (a linear-Gaussian likelihood);
* **adaptive Gauss-Hermite quadrature** with K nodes (lme4's ``nAGQ = K``; one scalar random
  effect, P = 1): with the nodes x_k and weights w_k (weight function exp(-x^2)) placed on the
  Laplace Gaussian, ``theta_k = theta_hat + sqrt(2) s x_k``, ``s = H^{-1/2}``,

      log p(D_t | psi) ~ log(sqrt(2) s) + logsumexp_k [ log w_k + x_k^2 - L_t(theta_k) ],

  exact when ``exp(-L_t)`` is the Laplace Gaussian times a polynomial of degree below 2K; K = 1
  is the Laplace approximation.

**The modes** are found for all tasks at once by the one damped-Newton loop
(:func:`hiermeta.solvers.damped_newton`: Levenberg-Marquardt with Marquardt's scaling, a step kept
only if it does not raise ``L_t`` beyond rounding), each task freezing once its gradient norm is
``tol`` (default ``eps^(2/3)``) times its gradient at the start, the loop stopping once every task
is frozen.  Their derivative is not unrolled: ``theta_hat`` is a ``jax.lax.custom_root`` of
``grad_theta L_t = 0``, so by the implicit function theorem

    d theta_hat / d psi = -H^{-1} d^2 L_t / (d theta d psi),

(one ``P x P`` block per task) and the rest (``L_t``, ``log|H_t|`` and the nodes, third
derivatives included) is differentiated by JAX as written.

**The flooring rule** (:func:`floored_hessian`, the one place it is decided): where ``H_t`` is not
positive definite (its Cholesky factorisation fails: the solve ended on a saddle, or the
likelihood is not log-concave) the approximation is not valid; its eigenvalues are then floored
at the smallest prior precision ``min_m 1 / sigma_m^2`` (the curvature the prior alone gives),
which yields a usable Gaussian and log-determinant, held constant for differentiation; the task is
flagged (``hessian_pd`` / ``converged`` False) and type-II ML warns.
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.special import logsumexp

from .hierarchy import HierarchicalModel
from .solvers import damped_newton, levenberg_marquardt, resolved_tol

__all__ = [
    "APPROXIMATIONS",
    "LaplaceResult",
    "MarginalInfo",
    "laplace",
    "floored_hessian",
    "approximate_log_marginal",
    "marginal_info",
    "compiled_marginal_info",
    "quadrature_posterior",
    "check_approximation",
    "levenberg_marquardt",
]

APPROXIMATIONS = ("laplace", "agq")

# A mode's Newton decrement g^T H^-1 g at or below this many eps times (1 + |L|) is at rounding level.
_DECREMENT_ROUNDING = 8.0


class LaplaceResult(NamedTuple):
    """Per task: ``mean`` (the MAP, ``(T, P)``), ``cov`` (``(T, P, P)``), ``log_evidence`` ``(T,)``,
    ``grad_norm`` (max |grad L_t| at the mode, ``(T,)``) and ``converged`` (gradient below ``tol``
    and a positive-definite Hessian, ``(T,)``)."""

    mean: jax.Array
    cov: jax.Array
    log_evidence: jax.Array
    grad_norm: jax.Array
    converged: jax.Array


class MarginalInfo(NamedTuple):
    """Per task: ``log_marginal`` ``(T,)``, ``mode`` ``(T, P)`` (theta_hat), ``hessian_pd`` ``(T,)``
    (the Hessian at the mode is positive definite), ``decrement`` ``(T,)`` (the Newton decrement
    ``g^T H^-1 g`` at the mode), ``grad_norm`` ``(T,)`` (max |grad L_t| at the mode), ``num_steps``
    ``(T,)`` (Newton steps kept) and ``converged`` ``(T,)`` (the solve froze at its tolerance, or its
    decrement is at the loss's rounding level, ``8 eps (1 + |L_t|)``)."""

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


# ---------------------------------------------------------------------------- the flooring rule


def floored_hessian(H, floor, with_inverse: bool = False):
    """``(log|H|, positive definite, H^-1 or None)`` for one symmetric ``H`` (the module docstring's rule).

    Positive definite (its Cholesky factor is finite with a positive diagonal): the log-determinant
    from the factor, differentiable.  Otherwise every eigenvalue is floored at ``floor`` (the
    smallest prior precision): the log-determinant (and inverse) of that matrix, held constant
    for differentiation."""
    H = 0.5 * (H + H.T)
    chol = jnp.linalg.cholesky(jax.lax.stop_gradient(H))
    pd = jnp.all(jnp.isfinite(chol)) & jnp.all(jnp.diagonal(chol) > 0)
    safe = jnp.where(pd, H, jnp.eye(H.shape[0], dtype=H.dtype))
    factor = jnp.linalg.cholesky(safe)
    eigval, eigvec = jnp.linalg.eigh(jax.lax.stop_gradient(H))
    floored = jnp.maximum(eigval, floor)
    log_det = jnp.where(pd, 2.0 * jnp.sum(jnp.log(jnp.diagonal(factor))), jnp.sum(jnp.log(floored)))
    if not with_inverse:
        return log_det, pd, None
    eye = jnp.eye(H.shape[0], dtype=H.dtype)
    inverse = jnp.where(pd, jax.scipy.linalg.cho_solve((factor, True), eye), (eigvec / floored) @ eigvec.T)
    return log_det, pd, 0.5 * (inverse + inverse.T)


# ---------------------------------------------------------------------------- the modes


def _loss(model: HierarchicalModel):
    def loss(theta, hyper, data_t):
        phi, sigma, extra = hyper
        return model.inner_objective(theta, phi, sigma, data_t, extra)

    return loss


def _modes(model: HierarchicalModel, hyper, data, start, max_steps: int, tol: Optional[float]):
    """Every task's mode ``(T, P)`` and its solve ``(steps kept, frozen)``, the mode a
    ``lax.custom_root`` of the gradients (implicitly differentiable in ``hyper``)."""
    loss = _loss(model)
    gradients = jax.vmap(jax.grad(loss), (0, None, 0))

    def solve(_, x0):
        fixed = jax.lax.stop_gradient(hyper)
        g0 = jnp.sqrt(jnp.sum(gradients(x0, fixed, data) ** 2, axis=-1))
        slack = 8.0 * float(jnp.finfo(x0.dtype).eps)
        state = damped_newton(lambda th, d: loss(th, fixed, d), x0, max_steps, args=data,
                              threshold=resolved_tol(tol, x0.dtype) * g0, scaled=True, slack=slack)
        # custom_root's derivative rule wants floating auxiliary outputs
        return state.theta, (state.steps.astype(x0.dtype), state.frozen.astype(x0.dtype))

    def tangent_solve(linear, y):  # the gradients' Jacobian is block diagonal: one P x P block per task
        columns = jax.vmap(lambda e: linear(jnp.broadcast_to(e, y.shape)))(jnp.eye(y.shape[-1], dtype=y.dtype))
        blocks = jnp.moveaxis(columns, 0, -1)  # blocks[t, i, p] = d g_ti / d theta_tp
        return jnp.linalg.solve(blocks, y[..., None])[..., 0]

    return jax.lax.custom_root(lambda th: gradients(th, hyper, data), jax.lax.stop_gradient(start), solve,
                               tangent_solve, has_aux=True)


def _hyper(model: HierarchicalModel, phi, sigma, extra):
    phi = jnp.asarray(phi)
    sigma = jnp.broadcast_to(jnp.asarray(sigma, dtype=phi.dtype), (model.partition.num_modules,))
    return phi, sigma, dict(extra or {})


def _prior_start(model: HierarchicalModel, hyper, data):
    phi, _, extra = hyper
    T = jax.tree_util.tree_leaves(data)[0].shape[0]
    z = model.task_covariates(data) if model.num_task_covariates else None
    return jnp.broadcast_to(model.prior_mean(phi, extra, z), (T, model.partition.num_params))


def _floor(model: HierarchicalModel, sigma):
    """The smallest prior precision ``min 1 / sigma^2`` (held constant)."""
    return jnp.min(1.0 / model.partition.expand(jax.lax.stop_gradient(sigma)) ** 2)


# ---------------------------------------------------------------------------- the posterior


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
    the Newton iterations (default the prior mean); ``num_steps``: the most Newton iterations;
    ``tol``: the largest |gradient| at the mode for ``converged``; ``extra``: the model's other
    hyperparameter values (globals, correlations, gamma; :meth:`~hiermeta.HierarchicalModel.hyper_sites`).
    Jittable (e.g. ``lax.map`` over posterior draws of phi and sigma); check ``converged`` when the
    likelihood is not log-concave (the flooring rule, module docstring).
    """
    part = model.partition
    hyper = _hyper(model, phi, sigma, extra)
    if hyper[0].shape != (part.num_params,):
        raise ValueError(f"phi must have shape ({part.num_params},), got {hyper[0].shape}")
    start = _prior_start(model, hyper, data) if init is None else jnp.asarray(init)
    T = jax.tree_util.tree_leaves(data)[0].shape[0]
    if start.shape != (T, part.num_params):
        raise ValueError(f"init must have shape {(T, part.num_params)}, got {start.shape}")
    theta, _ = _modes(model, hyper, data, start, int(num_steps), None)
    loss, floor = _loss(model), _floor(model, hyper[1])

    def one(theta_t, data_t):
        value, g = jax.value_and_grad(loss)(theta_t, hyper, data_t)
        log_det, pd, cov = floored_hessian(jax.hessian(loss)(theta_t, hyper, data_t), floor, with_inverse=True)
        log_evidence = -value + 0.5 * theta_t.shape[0] * jnp.log(2.0 * jnp.pi) - 0.5 * log_det
        grad_norm = jnp.max(jnp.abs(g))
        return theta_t, cov, log_evidence, grad_norm, (grad_norm <= tol) & pd

    return LaplaceResult(*jax.vmap(one)(theta, data))


# ---------------------------------------------------------------------------- the marginal likelihood


def _gauss_hermite(num_nodes: int):
    x, w = np.polynomial.hermite.hermgauss(int(num_nodes))
    return jnp.asarray(x), jnp.asarray(np.log(w))


def _all_tasks(model, phi, sigma, data, extra, approximation, num_nodes, tol, max_steps) -> MarginalInfo:
    num_nodes = check_approximation(approximation, num_nodes, model.partition.num_params)
    hyper = _hyper(model, phi, sigma, extra)
    nodes = None if approximation == "laplace" else _gauss_hermite(num_nodes)
    theta_hat, (steps, frozen) = _modes(model, hyper, data, _prior_start(model, hyper, data), int(max_steps), tol)
    loss, floor = _loss(model), _floor(model, hyper[1])

    def one(theta_t, data_t):
        value = loss(theta_t, hyper, data_t)
        H = jax.hessian(loss)(theta_t, hyper, data_t)
        log_det, pd, _ = floored_hessian(H, floor)
        P = theta_t.shape[0]
        if nodes is None:
            log_marginal = -value + 0.5 * P * jnp.log(2.0 * jnp.pi) - 0.5 * log_det
        else:
            x, log_w = nodes
            scale = jnp.sqrt(2.0) * jnp.exp(-0.5 * log_det)  # sqrt(2) s, s = H^{-1/2}
            at_nodes = jax.vmap(lambda xk: loss(theta_t + scale * xk, hyper, data_t))(x)
            log_marginal = jnp.log(scale) + logsumexp(log_w + x**2 - at_nodes)
        fixed_theta, fixed_hyper = jax.lax.stop_gradient(theta_t), jax.lax.stop_gradient(hyper)
        g = jax.grad(loss)(fixed_theta, fixed_hyper, data_t)
        decrement = g @ jnp.linalg.solve(jax.lax.stop_gradient(0.5 * (H + H.T)), g)
        return log_marginal, pd, decrement, jnp.max(jnp.abs(g)), jax.lax.stop_gradient(value)

    log_marginal, pd, decrement, grad_norm, value = jax.vmap(one)(theta_hat, data)
    eps = jnp.finfo(theta_hat.dtype).eps
    at_rounding = jnp.abs(decrement) <= _DECREMENT_ROUNDING * eps * (1.0 + jnp.abs(value))
    return MarginalInfo(log_marginal, theta_hat, pd, decrement, grad_norm, steps.astype(jnp.int32),
                        (frozen > 0) | at_rounding)


def approximate_log_marginal(model: HierarchicalModel, phi, sigma, data, extra=None, *,
                             approximation: str = "laplace", num_nodes: Optional[int] = None,
                             tol: Optional[float] = None, max_steps: int = 50) -> jax.Array:
    """``log p(D_t | phi, sigma, extra)`` per task ``(T,)`` by ``"laplace"`` or ``"agq"`` (``num_nodes``).

    Jittable and differentiable in phi, sigma and every value of ``extra`` (the model's other
    hyperparameter sites: correlations, gamma, the likelihood's globals), the mode implicitly.
    ``tol`` (relative gradient norm; None: ``eps^(2/3)``) and ``max_steps`` control the Newton
    solve of the modes.
    """
    return _all_tasks(model, phi, sigma, data, extra, approximation, num_nodes, tol, max_steps).log_marginal


def marginal_info(model: HierarchicalModel, phi, sigma, data, extra=None, *, approximation: str = "laplace",
                  num_nodes: Optional[int] = None, tol: Optional[float] = None, max_steps: int = 50) -> MarginalInfo:
    """:func:`approximate_log_marginal` with each task's mode and the health of its solve (:class:`MarginalInfo`)."""
    return _all_tasks(model, phi, sigma, data, extra, approximation, num_nodes, tol, max_steps)


@functools.lru_cache(maxsize=32)
def compiled_marginal_info(model: HierarchicalModel, approximation: str = "laplace", num_nodes: Optional[int] = None):
    """``jax.jit`` of :func:`marginal_info` for one model and approximation: ``f(phi, sigma, data, extra)``."""
    return jax.jit(lambda phi, sigma, data, extra: marginal_info(
        model, phi, sigma, data, extra, approximation=approximation, num_nodes=num_nodes))


def quadrature_posterior(model: HierarchicalModel, phi, sigma, data, extra=None, *, num_nodes: int = 32,
                         tol: Optional[float] = None, max_steps: int = 50):
    """The posterior of each task's scalar theta (P = 1) as weighted Gauss-Hermite nodes.

    Returns ``(draws (T, K, 1), log_weights (T, K))``: ``theta_k = theta_hat + sqrt(2) s x_k`` with
    unnormalised log-weights ``log w_k + x_k^2 - L_t(theta_k)``, so ``sum_k w~_k f(theta_k)`` is the
    adaptive quadrature of ``E[f(theta) | D_t, phi, sigma, extra]``, exact for polynomial-times-Laplace
    integrands below degree 2K.  Feed them to :func:`hiermeta.predictive.score_draws` for the
    posterior predictive at fixed hyperparameters.
    """
    num_nodes = check_approximation("agq", num_nodes, model.partition.num_params)
    info = marginal_info(model, phi, sigma, data, extra, tol=tol, max_steps=max_steps)
    hyper = _hyper(model, phi, sigma, extra)
    loss, floor = _loss(model), _floor(model, hyper[1])
    x, log_w = _gauss_hermite(num_nodes)

    def one(data_t, mode):
        log_det, _, _ = floored_hessian(jax.hessian(loss)(mode, hyper, data_t), floor)
        theta = mode[None, :] + jnp.sqrt(2.0) * jnp.exp(-0.5 * log_det) * x[:, None]
        return theta, log_w + x**2 - jax.vmap(lambda th: loss(th, hyper, data_t))(theta)

    return jax.vmap(one)(data, info.mode)
