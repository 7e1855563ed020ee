"""Inner solvers: how a task's MAP ``theta_hat_t = argmin_theta L_t(theta)`` is computed, and how
close the answer is.

Shaped like optax: a factory returns an :class:`InnerSolver`, a NamedTuple holding its budget,
its tolerance and one pure function

    result = solver.solve(loss, theta0, num_steps=None, observe=None)      # an InnerResult

for one task (``loss: theta -> scalar``); callers vmap it over tasks.  Every loop is a
fixed-length ``lax.scan`` (frozen once converged), so a solve is jittable, vmappable and compiled
once per shape; there is no data-dependent ``while_loop`` (the XLA CPU deadlock seen with
``optax.lbfgs``, whose zoom line search is one).

- :func:`gradient_steps` ``(optimizer=None, num_steps)``: K steps of an optax optimiser (the
  paper's inner loop; differentiable, MAML backpropagates through it).  Without an optimiser the
  step is ``1 / lambda_max`` of the Hessian at the start, from power iterations on
  Hessian-vector products, per task.
- :func:`newton` ``(max_steps, tol)``: Newton steps with the exact Hessian, damped
  (Levenberg-Marquardt with Marquardt's diagonal scaling): a step is kept only if it does not
  raise the loss, so it cannot diverge.  For up to a few hundred parameters.
- :func:`lbfgs` ``(max_steps, tol)``: limited-memory BFGS with a backtracking (Armijo) line
  search of a fixed number of trials; pairs failing the curvature condition are not stored.

Stationarity
------------
Every solve reports

    stationarity = ||grad L(theta_K)|| / max(||grad L(theta_0)||, tiny),

the gradient norm at the end relative to the start, and ``converged = stationarity <= tol`` (and
not diverged).  Why this measure: it needs one gradient (so it is cheap for a neural network and
defined for non-convex losses and for MAML's K steps, where the Newton decrement
``sqrt(g^T H^-1 g)`` is not); it does not depend on the scale of the loss; and it is invariant to
the units of the data: expressing the response in other units (y -> c y, with phi, sigma and the
noise in the same units, so theta -> c theta) multiplies both gradients by 1/c.  It is *not*
invariant to rescaling one coordinate alone (e.g. a slope per day vs per week): that changes it
by at most the rescaling factor.  Newton, L-BFGS and the curvature step are themselves
equivariant to a change of units, so their whole path (and stationarity) is the same in any
units; a fixed optax learning rate is not (SGD with rate 0.3 on data in milliseconds is another
algorithm than on data in seconds).  On the paper's linear domain a relative gradient of 1e-2
corresponds to about 0.1 posterior standard deviations from the MAP (Newton decrement).

``tol`` defaults: ``1e-2`` for gradient steps (the gradient reduced a hundredfold: what K steps
of a first-order method can promise), ``None`` (``eps^(2/3)`` of the parameters' dtype:
3.7e-11 in float64, 2.4e-5 in float32) for Newton and L-BFGS: well above rounding, which both
reach because they tolerate a rise of the loss within its rounding error (8 eps |L|), and tight
enough that theta is the MAP to about 1e-8 relative in float64 (``sqrt(eps)`` is not: on
sleepstudy a Newton solve stopped at relative gradient 1.5e-8 was 5e-8 from the MAP).  ``tol=math.inf`` reports
stationarity without ever judging it (MAML's K steps are the algorithm, not a solve).
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from .errors import ConvergenceWarning
from .utils import check_count

__all__ = [
    "ConvergenceWarning",
    "InnerResult",
    "InnerSolver",
    "DIVERGENCE_FACTOR",
    "gradient_steps",
    "newton",
    "lbfgs",
    "default_solver",
    "resolve_inner_solver",
    "resolved_tol",
    "curvature_step_size",
    "levenberg_marquardt",
    "damped_newton",
    "DampedNewtonState",
    "warn_unconverged",
    "PriorScaled",
    "prior_scaled",
    "rescaled",
]

# The loss rising by more than this many times (1 + |initial loss|) counts as divergence.
DIVERGENCE_FACTOR = 100.0

# Default tolerance of gradient steps (relative gradient norm); Newton/L-BFGS default to eps^(2/3).
GRADIENT_STEPS_TOL = 1e-2

# Newton for up to this many parameters when no solver is given, L-BFGS above.
NEWTON_MAX_PARAMS = 256


class InnerResult(NamedTuple):
    """Outcome of one task's inner solve.

    Attributes:
      theta: final parameters ``(P,)``.
      initial_loss, final_loss: the inner loss at the start and at the end.
      diverged: True when the final loss or theta is not finite, or (gradient steps) the loss
        rose by more than ``DIVERGENCE_FACTOR * (1 + |initial_loss|)``.
      stationarity: ``||grad L(theta)|| / max(||grad L(theta_0)||, tiny)`` at the end (module
        docstring); ``inf`` when not finite.
      converged: ``stationarity <= tol`` and not diverged.
      trace: ``observe(theta_k)`` stacked for k = 0..num_steps (iterates of the solver, frozen
        once converged), or None.

    The diagnostics (losses, stationarity, flags) are not differentiated.
    """

    theta: jax.Array
    initial_loss: jax.Array
    final_loss: jax.Array
    diverged: jax.Array
    stationarity: jax.Array
    converged: jax.Array
    trace: Any = None


class InnerSolver(NamedTuple):
    """An inner solver (build one with :func:`gradient_steps`, :func:`newton` or :func:`lbfgs`).

    Attributes:
      name: what it is, for messages.
      num_steps: its budget: K optimiser steps, or the most Newton / L-BFGS iterations.
      tol: relative gradient norm at which a solve counts as converged (None: ``eps^(2/3)`` of
        the parameters' dtype; ``inf``: never judged).
      solve: ``solve(loss, theta0, num_steps=None, observe=None) -> InnerResult`` for one task,
        ``loss: theta -> scalar``; ``num_steps`` overrides the budget (static).
    """

    name: str
    num_steps: int
    tol: Optional[float]
    solve: Callable[..., InnerResult]


# ---------------------------------------------------------------------------- shared pieces


def _check_steps(value, what: str, minimum: int) -> int:
    return check_count(value, what, minimum)


def _check_tol(tol) -> Optional[float]:
    if tol is None:
        return None
    if isinstance(tol, bool) or not isinstance(tol, (int, float, np.floating, np.integer)) or not tol > 0:
        raise ValueError(f"tol must be a number > 0 (math.inf: never judged) or None, got {tol!r}")
    return float(tol)


def resolved_tol(tol: Optional[float], dtype) -> float:
    """``tol``, or ``eps^(2/3)`` of ``dtype`` when it is None."""
    return float(np.finfo(np.dtype(dtype)).eps ** (2.0 / 3.0)) if tol is None else float(tol)


def _norm(x):
    return jnp.sqrt(jnp.sum(x * x))


def _finish(loss, theta, initial_loss, g0_norm, tol, trace, check_rise: bool) -> InnerResult:
    """Final loss, stationarity, divergence and convergence at ``theta`` (not differentiated)."""
    theta_d = jax.lax.stop_gradient(theta)
    final_loss, g = jax.value_and_grad(loss)(theta_d)
    g_norm = _norm(g)
    g0_norm = g_norm if g0_norm is None else jax.lax.stop_gradient(g0_norm)
    initial_loss = final_loss if initial_loss is None else initial_loss
    tiny = jnp.finfo(theta.dtype).tiny
    stationarity = g_norm / jnp.maximum(g0_norm, tiny)
    stationarity = jnp.where(jnp.isfinite(stationarity), stationarity, jnp.inf)
    initial_loss = jax.lax.stop_gradient(initial_loss)
    diverged = ~jnp.isfinite(final_loss) | ~jnp.all(jnp.isfinite(theta))
    if check_rise:
        diverged |= final_loss - initial_loss > DIVERGENCE_FACTOR * (1.0 + jnp.abs(initial_loss))
    converged = ~diverged & (stationarity <= resolved_tol(tol, theta.dtype))
    return InnerResult(theta, initial_loss, final_loss, diverged, stationarity, converged, trace)


def _stack_trace(observe, theta0, records):
    if observe is None:
        return None
    first = observe(theta0)
    return jax.tree_util.tree_map(lambda a, b: jnp.concatenate([a[None], b]), first, records)


def _freeze_threshold(tol, theta0, g0_norm):
    """``||g||`` below which Newton / L-BFGS stop (``tol * ||g_0||``; never for ``tol = inf``)."""
    t = resolved_tol(tol, theta0.dtype)
    return (t if math.isfinite(t) else 0.0) * g0_norm


def _budget(solver_steps: int, num_steps) -> int:
    return solver_steps if num_steps is None else _check_steps(num_steps, "num_steps", 0)


# ---------------------------------------------------------------------------- gradient steps


def curvature_step_size(loss, theta0, iterations: int = 10, prior_var=None) -> jax.Array:
    """``1 / lambda_max`` of the Hessian of ``loss`` at ``theta0`` (not differentiated).

    With ``prior_var`` (variances per coordinate, ``inf`` where there is no prior), the Hessian
    is that of ``loss`` less a Gaussian prior's ``diag(1 / prior_var)``: the likelihood's
    curvature when ``loss`` is ``-log p(D | theta) + sum_i (theta_i - m_i)^2 / (2 prior_var_i)``.

    ``lambda_max`` (the largest |eigenvalue|) is estimated by ``iterations`` power iterations on
    Hessian-vector products from a fixed pseudo-random start: the weight of eigenvalues below half
    the largest shrinks by ``4^-iterations`` against it, so unless the start is nearly orthogonal
    to the top eigenvector the estimate exceeds ``lambda_max / 2`` and the step stays below the
    stability limit ``2 / lambda_max`` of gradient descent on a quadratic (a solve that runs off
    anyway is flagged as diverged).  A zero Hessian gives step 1.
    """
    theta0 = jax.lax.stop_gradient(theta0)
    _, loss_hvp = jax.linearize(jax.grad(loss), theta0)
    if prior_var is None:
        hvp = loss_hvp
    else:
        precision = 1.0 / jax.lax.stop_gradient(jnp.asarray(prior_var, theta0.dtype))
        hvp = lambda v: loss_hvp(v) - precision * v
    v = jax.random.normal(jax.random.PRNGKey(0), theta0.shape, theta0.dtype)
    v = v / _norm(v)

    def body(v, _):
        w = hvp(v)
        n = _norm(w)
        return w / jnp.where(n > 0, n, 1.0), n

    _, norms = jax.lax.scan(body, v, None, length=iterations)
    lam = norms[-1]
    return jnp.where(lam > 0, 1.0 / jnp.where(lam > 0, lam, 1.0), 1.0)


def gradient_steps(
    optimizer: Optional[optax.GradientTransformation] = None,
    num_steps: int = 100,
    tol: Optional[float] = GRADIENT_STEPS_TOL,
    *,
    power_iterations: int = 10,
    unroll: int = 1,
    remat: bool = False,
) -> InnerSolver:
    """``num_steps`` steps of an optax ``optimizer`` from ``theta0``, under ``lax.scan``.

    Args:
      optimizer: the optax transformation; None: plain gradient descent with step
        :func:`curvature_step_size` (``1 / lambda_max`` of the Hessian at ``theta0``, per task).
      num_steps: K (>= 0).
      tol: relative gradient norm for ``converged`` (default 1e-2; ``math.inf``: never judged).
      power_iterations: Hessian-vector products spent on ``lambda_max`` (no optimizer only).
      unroll: ``lax.scan`` unrolling.
      remat: wrap each step in ``jax.checkpoint`` (reverse-mode differentiation then stores only
        the carries and recomputes each step: less memory, same values and gradients).

    Differentiable in the starting point and in anything ``optimizer`` closes over (MAML
    backpropagates through it); the curvature step size is not differentiated.
    """
    K = _check_steps(num_steps, "num_steps", 0)
    tol = _check_tol(tol)
    power_iterations = _check_steps(power_iterations, "power_iterations", 1)
    unroll = _check_steps(unroll, "unroll", 1)
    name = f"{K} gradient steps" + ("" if optimizer is not None else " (curvature step)")

    def solve(loss, theta0, num_steps=None, observe=None) -> InnerResult:
        n = _budget(K, num_steps)
        opt = optimizer
        if opt is None:
            opt = optax.sgd(curvature_step_size(loss, theta0, power_iterations))
        value_and_grad = jax.value_and_grad(loss)

        def body(carry, _):
            theta, opt_state, (loss0, g0_norm) = carry
            value, grad = value_and_grad(theta)
            # the loss and ||g|| at theta_0 from the first step (the carry starts at -1): no step
            # counter (a buffer of size K) and no separate evaluation at theta_0
            first = g0_norm < 0
            loss0 = jnp.where(first, jax.lax.stop_gradient(value), loss0)
            g0_norm = jnp.where(first, jax.lax.stop_gradient(_norm(grad)), g0_norm)
            updates, opt_state = opt.update(grad, opt_state, theta)
            theta = optax.apply_updates(theta, updates)
            return (theta, opt_state, (loss0, g0_norm)), (observe(theta) if observe is not None else None)

        if remat:
            body = jax.checkpoint(body)
        minus_one = -jnp.ones((), theta0.dtype)
        carry = (theta0, opt.init(theta0), (minus_one, minus_one))
        (theta, _, (loss0, g0_norm)), records = jax.lax.scan(body, carry, None, length=n, unroll=unroll)
        trace = _stack_trace(observe, theta0, records)
        if n == 0:
            return _finish(loss, theta, None, None, tol, trace, check_rise=True)
        return _finish(loss, theta, loss0, g0_norm, tol, trace, check_rise=True)

    return InnerSolver(name, K, tol, solve)


# ---------------------------------------------------------------------------- Newton


class DampedNewtonState(NamedTuple):
    """The carry of :func:`damped_newton`: the iterate, its loss, the damping, whether it is frozen
    (``||g|| <= threshold``) and how many steps were kept."""

    theta: jax.Array
    value: jax.Array
    damping: jax.Array
    frozen: jax.Array
    steps: jax.Array


def _damped_newton_step(loss, state: DampedNewtonState, threshold, *, scaled, shrink, grow, strict, slack):
    """One Levenberg-Marquardt iteration (:func:`damped_newton`) of one problem."""
    theta, value, lam = state.theta, state.value, state.damping
    g, H = jax.grad(loss)(theta), jax.hessian(loss)(theta)
    if scaled:  # Marquardt: damp each coordinate by its own curvature (scale-equivariant)
        d = jnp.abs(jnp.diagonal(H))
        top = jnp.max(d)
        d = jnp.where(top > 0, jnp.maximum(d, 1e-12 * top), 1.0)
        delta = -jnp.linalg.solve(H + lam * jnp.diag(d), g)
    else:
        delta = -jnp.linalg.solve(H + lam * jnp.eye(theta.shape[0], dtype=theta.dtype), g)
    new_value = loss(theta + delta)
    bound = value + slack * jnp.abs(value) if slack else value
    lower = (new_value < bound) if strict else (new_value <= bound)
    frozen = _norm(g) <= threshold
    accept = jnp.isfinite(new_value) & lower & jnp.all(jnp.isfinite(delta)) & ~frozen
    return DampedNewtonState(
        theta=jnp.where(accept, theta + delta, theta),
        value=jnp.where(accept, new_value, value),
        damping=jnp.where(frozen, lam, jnp.clip(jnp.where(accept, lam * shrink, lam * grow), 1e-12, 1e12)),
        frozen=frozen,
        steps=state.steps + accept.astype(state.steps.dtype),
    )


def damped_newton(loss, start, num_steps: int, *, args=None, threshold=None, damping: float = 1e-3,
                  scaled: bool = False, shrink: float = 0.1, grow: float = 10.0, strict: bool = False,
                  slack: float = 0.0, observe=None):
    """The damped-Newton (Levenberg-Marquardt) loop, the one behind :func:`newton`,
    :func:`levenberg_marquardt`, the Laplace modes (:mod:`hiermeta.laplace`) and the swirl domain.

    Each iteration takes ``delta = -(H + lam D)^{-1} g`` with the exact gradient and Hessian of
    ``loss``, ``D = I`` or with ``scaled`` Marquardt's ``diag(|H_ii|)`` (invariant to the units of
    each coordinate); the step is kept only if it is finite and lowers the loss (``strict``) or does
    not raise it by more than ``slack * |loss|`` (its rounding error, so that steps near the minimum,
    below rounding, are still taken); then ``lam *= shrink``, else ``lam *= grow`` (clipped to
    [1e-12, 1e12]).  So it descends to a local minimum and cannot diverge, with Newton's quadratic
    convergence near it.  An iterate freezes once ``||g|| <= threshold`` (absolute; None: never).
    ``num_steps`` iterations of a fixed-length ``lax.scan``: jittable, compiled once per shape.

    Two ways to call it:

    * one problem: ``loss(theta)``, ``start`` ``(P,)``; returns ``(state, trace)`` with ``trace``
      ``observe(theta_k)`` stacked for k = 0..num_steps (None without ``observe``); vmappable.
    * a batch: ``loss(theta, arg)`` for each problem, ``start`` ``(T, P)``, ``args`` with a leading
      axis ``T`` and ``threshold`` ``(T,)``; each iteration is vmapped over the problems, and once
      every problem is frozen the remaining iterations are skipped (a ``lax.cond`` on the whole
      batch: a vmapped loop cannot skip a frozen problem's work, a batch can stop early).
      Returns the final :class:`DampedNewtonState` (leading axis ``T``).
    """
    options = dict(scaled=scaled, shrink=shrink, grow=grow, strict=strict, slack=slack)
    if args is None:
        thr = jnp.asarray(-1.0 if threshold is None else threshold, start.dtype)
        step = lambda st: _damped_newton_step(loss, st, thr, **options)
        init = DampedNewtonState(start, loss(start), jnp.asarray(damping, start.dtype), jnp.asarray(False),
                                 jnp.zeros((), jnp.int32))

        def body(st, _):
            st = step(st)
            return st, (observe(st.theta) if observe is not None else None)

        state, records = jax.lax.scan(body, init, None, length=num_steps)
        return state, _stack_trace(observe, start, records)
    T = start.shape[0]
    thr = jnp.broadcast_to(jnp.asarray(-1.0 if threshold is None else threshold, start.dtype), (T,))
    step = jax.vmap(lambda st, arg, t: _damped_newton_step(lambda th: loss(th, arg), st, t, **options))
    init = DampedNewtonState(start, jax.vmap(loss)(start, args), jnp.full((T,), damping, start.dtype),
                             jnp.zeros((T,), bool), jnp.zeros((T,), jnp.int32))

    def batch_body(st, _):
        return jax.lax.cond(jnp.all(st.frozen), lambda s: s, lambda s: step(s, args, thr), st), None

    state, _ = jax.lax.scan(batch_body, init, None, length=num_steps)
    return state


def levenberg_marquardt(loss, start, num_steps: int, *, damping: float = 1e-3, shrink: float = 0.1,
                        grow: float = 10.0, strict: bool = False, scaled: bool = False):
    """:func:`damped_newton` on ``loss(theta)`` from ``start`` for ``num_steps`` iterations, never
    frozen; returns the last kept ``theta`` and its loss."""
    state, _ = damped_newton(loss, start, num_steps, damping=damping, shrink=shrink, grow=grow, strict=strict,
                             scaled=scaled)
    return state.theta, state.value


def newton(max_steps: int = 20, tol: Optional[float] = None, *, damping: float = 1e-3) -> InnerSolver:
    """Newton's method with the exact Hessian, damped so that it cannot diverge.

    Levenberg-Marquardt (:func:`levenberg_marquardt` with Marquardt's scaling, initial damping
    ``damping``): ``delta = -(H + lam diag|H|)^{-1} g``, kept only if it does not raise the loss;
    ``lam`` shrinks tenfold after a kept step and grows tenfold otherwise (a rise within the
    loss's rounding error, 8 eps |L|, is tolerated), so near a minimum the
    steps are Newton's (quadratic convergence; a quadratic loss is solved in a few steps).  Each
    iteration forms the ``P x P`` Hessian (P Hessian-vector products) and solves with it: for up
    to a few hundred parameters.  Iterations stop (the scan freezes) once
    ``||g|| <= tol ||g_0||``.

    Args:
      max_steps: iterations (>= 0).
      tol: relative gradient norm (None: ``eps^(2/3)`` of the dtype).
      damping: initial ``lam`` (> 0).
    """
    K = _check_steps(max_steps, "max_steps", 0)
    tol = _check_tol(tol)
    if not np.isfinite(damping) or damping <= 0:
        raise ValueError(f"damping must be finite and > 0, got {damping!r}")

    def solve(loss, theta0, num_steps=None, observe=None) -> InnerResult:
        n = _budget(K, num_steps)
        g0_norm = jax.lax.stop_gradient(_norm(jax.grad(loss)(theta0)))
        threshold = _freeze_threshold(tol, theta0, g0_norm)
        slack = 8.0 * float(jnp.finfo(theta0.dtype).eps)
        state, trace = damped_newton(loss, theta0, n, threshold=threshold, damping=damping, scaled=True,
                                     slack=slack, observe=observe)
        return _finish(loss, state.theta, loss(theta0), g0_norm, tol, trace, check_rise=False)

    return InnerSolver(f"Newton (at most {K} steps)", K, tol, solve)


# ---------------------------------------------------------------------------- L-BFGS


class _LBFGSState(NamedTuple):
    theta: jax.Array
    value: jax.Array
    grad: jax.Array
    s: jax.Array  # (m, P) parameter differences
    y: jax.Array  # (m, P) gradient differences
    rho: jax.Array  # (m,) 1 / (s . y); 0 marks an empty slot
    newest: jax.Array  # slot of the newest pair
    gamma: jax.Array  # initial inverse-Hessian scale
    done: jax.Array


def _two_loop(state: _LBFGSState, memory: int) -> jax.Array:
    """``H_k g``: the L-BFGS inverse-Hessian approximation times the gradient (Nocedal-Wright 7.4)."""
    order = (state.newest - jnp.arange(memory)) % memory  # newest first

    def backward(q, i):
        a = state.rho[i] * jnp.vdot(state.s[i], q)
        return q - a * state.y[i], a

    q, alphas = jax.lax.scan(backward, state.grad, order)

    def forward(r, ia):
        i, a = ia
        b = state.rho[i] * jnp.vdot(state.y[i], r)
        return r + state.s[i] * (a - b), None

    r, _ = jax.lax.scan(forward, state.gamma * q, (order[::-1], alphas[::-1]))
    return r


def lbfgs(max_steps: int = 100, tol: Optional[float] = None, *, memory: int = 10,
          linesearch_steps: int = 10) -> InnerSolver:
    """Limited-memory BFGS with a backtracking line search, in a fixed-length ``lax.scan``.

    Direction ``d = -H_k g`` by the two-loop recursion over the last ``memory`` pairs
    ``(s, y) = (theta_{k+1} - theta_k, g_{k+1} - g_k)``; a pair is stored only if
    ``s . y > 0`` (curvature condition), so ``H_k`` stays positive definite on non-convex losses.
    The initial scale is ``s . y / y . y`` of the newest pair, and before any pair the exact
    line minimiser along ``-g`` of the local quadratic, ``g . g / g . H g`` (one Hessian-vector
    product), so every step is equivariant to a change of units.  Line search: step 1 first,
    then quadratic-interpolation backtracking (each trial 0.1-0.5 times the last) for
    ``linesearch_steps`` trials until Armijo's sufficient decrease
    ``L(theta + a d) <= L(theta) + 1e-4 a g . d`` holds (up to the loss's rounding error,
    ``8 eps |L|``, as in Hager and Zhang's approximate Wolfe conditions, so that steps near the
    minimum, where the decrease is below rounding, are still taken); when none does, the iterate stays,
    the memory is cleared and the next step is steepest descent at the shortest step tried.
    The loss never rises beyond rounding, so the solve cannot diverge.  Iterations freeze once
    ``||g|| <= tol ||g_0||``.

    Args:
      max_steps: iterations (>= 0); each costs ``linesearch_steps`` loss evaluations and one gradient.
      tol: relative gradient norm (None: ``eps^(2/3)`` of the dtype).
      memory: pairs kept (>= 1).
      linesearch_steps: trials per line search (>= 1).
    """
    K = _check_steps(max_steps, "max_steps", 0)
    tol = _check_tol(tol)
    m = _check_steps(memory, "memory", 1)
    trials = _check_steps(linesearch_steps, "linesearch_steps", 1)
    c1 = 1e-4

    def solve(loss, theta0, num_steps=None, observe=None) -> InnerResult:
        n = _budget(K, num_steps)
        theta0 = jax.lax.stop_gradient(theta0)
        value_and_grad = jax.value_and_grad(loss)
        f0, g0 = value_and_grad(theta0)
        g0_norm = _norm(g0)
        threshold = _freeze_threshold(tol, theta0, g0_norm)
        dtype, P = theta0.dtype, theta0.shape[0]
        slack = 8.0 * float(jnp.finfo(dtype).eps)  # rounding error of the loss
        tiny = jnp.finfo(dtype).tiny
        gHg = jnp.vdot(g0, jax.jvp(jax.grad(loss), (theta0,), (g0,))[1])
        gamma0 = jnp.where(gHg > 0, g0_norm**2 / jnp.where(gHg > 0, gHg, 1.0), 1.0 / jnp.maximum(g0_norm, tiny))
        state = _LBFGSState(theta0, f0, g0, jnp.zeros((m, P), dtype), jnp.zeros((m, P), dtype),
                            jnp.zeros((m,), dtype), jnp.asarray(m - 1), gamma0, g0_norm <= threshold)

        def iteration(st: _LBFGSState, _):
            d = -_two_loop(st, m)
            dg = jnp.vdot(st.grad, d)
            descent = (dg < 0) & jnp.isfinite(dg)
            d = jnp.where(descent, d, -st.gamma * st.grad)  # else steepest descent
            dg = jnp.vdot(st.grad, d)

            def trial(c, _):
                alpha, found, a_ok, f_ok = c
                f_new = loss(st.theta + alpha * d)
                ok = ~found & jnp.isfinite(f_new) & (f_new <= st.value + c1 * alpha * dg + slack * jnp.abs(st.value))
                curvature = 2.0 * (f_new - st.value - alpha * dg)
                a_quad = -dg * alpha**2 / jnp.where(curvature > 0, curvature, 1.0)
                a_quad = jnp.where(jnp.isfinite(f_new) & (curvature > 0), a_quad, 0.5 * alpha)
                a_next = jnp.clip(a_quad, 0.1 * alpha, 0.5 * alpha)
                return (jnp.where(found | ok, alpha, a_next), found | ok,
                        jnp.where(ok, alpha, a_ok), jnp.where(ok, f_new, f_ok)), None

            one = jnp.ones((), dtype)
            (alpha_last, found, alpha, f_new), _ = jax.lax.scan(trial, (one, jnp.asarray(False), one, st.value), None,
                                                                length=trials)
            theta_new = st.theta + alpha * d
            g_new = jax.grad(loss)(theta_new)
            s, y = theta_new - st.theta, g_new - st.grad
            sy = jnp.vdot(s, y)
            store = found & (sy > 1e-10 * _norm(s) * _norm(y)) & jnp.all(jnp.isfinite(g_new))
            slot = (st.newest + 1) % m
            moved = st._replace(
                theta=theta_new, value=f_new, grad=g_new,
                s=jnp.where(store, st.s.at[slot].set(s), st.s),
                y=jnp.where(store, st.y.at[slot].set(y), st.y),
                rho=jnp.where(store, st.rho.at[slot].set(1.0 / jnp.where(store, sy, 1.0)), st.rho),
                newest=jnp.where(store, slot, st.newest),
                gamma=jnp.where(store, sy / jnp.vdot(y, y), st.gamma),
                done=_norm(g_new) <= threshold,
            )
            stuck = st._replace(s=jnp.zeros_like(st.s), y=jnp.zeros_like(st.y), rho=jnp.zeros_like(st.rho),
                                gamma=st.gamma * alpha_last)
            new = jax.tree_util.tree_map(lambda a, b: jnp.where(found, a, b), moved, stuck)
            new = jax.tree_util.tree_map(lambda a, b: jnp.where(st.done, a, b), st, new)
            return new, (observe(new.theta) if observe is not None else None)

        state, records = jax.lax.scan(iteration, state, None, length=n)
        trace = _stack_trace(observe, theta0, records)
        return _finish(loss, state.theta, f0, g0_norm, tol, trace, check_rise=False)

    return InnerSolver(f"L-BFGS (at most {K} steps)", K, tol, solve)


# ---------------------------------------------------------------------------- prior scaling


class PriorScaled(NamedTuple):
    """An inner solver to be run in the prior's own scale (build with :func:`prior_scaled`)."""

    solver: InnerSolver

    def for_prior(self, prior_var) -> InnerSolver:
        """The solver in the coordinates ``u = (theta - theta0) / sqrt(prior_var)`` (per coordinate)."""
        return rescaled(self.solver, jnp.sqrt(prior_var))


def prior_scaled(solver: InnerSolver) -> PriorScaled:
    """Run ``solver`` (e.g. :func:`lbfgs` ``(30)``) in the prior's scale, for the Gaussian-prior learners.

    The inner loss ``L_t = -log p(D_t^tr | theta) + sum_i (theta_i - phi_i)^2 / (2 s_i)`` (s = sigma^2 per
    coordinate) in the coordinates ``u = (theta - phi) / sqrt(s)`` is
    ``-log p(D_t^tr | phi + sqrt(s) u) + ||u||^2 / 2``, with Hessian ``I + S^1/2 H S^1/2`` (H the
    likelihood's): every module has curvature 1 from its prior, whatever its sigma, instead of
    ``1/s``, which can differ by orders of magnitude between a layer the shrinkage shares and a
    free one.  Same minimiser, so the same MAP and hypergradients; a first-order or
    quasi-Newton solver reaches it in far fewer steps.  The learners (Shrinkage, sigma-iMAML,
    iMAML) rebuild the scaling from their current sigma at every meta-step (a correlated block is
    scaled by its standard deviations only).  ``stationarity`` is measured in ``u``.
    """
    if not isinstance(solver, InnerSolver):
        raise ValueError(f"prior_scaled needs an InnerSolver (gradient_steps, newton, lbfgs), got {type(solver).__name__}")
    return PriorScaled(solver)


def rescaled(solver: InnerSolver, scale) -> InnerSolver:
    """``solver`` on ``u -> loss(theta0 + scale * u)`` from ``u = 0``; returns theta (and traces theta).

    ``scale``: positive, a scalar or per coordinate.  Differentiable in ``theta0`` wherever
    ``solver`` is."""

    def solve(loss, theta0, num_steps=None, observe=None) -> InnerResult:
        s = jnp.broadcast_to(jnp.asarray(scale, theta0.dtype), theta0.shape)
        to_theta = lambda u: theta0 + s * u
        result = solver.solve(lambda u: loss(to_theta(u)), jnp.zeros_like(theta0), num_steps,
                              None if observe is None else (lambda u: observe(to_theta(u))))
        return result._replace(theta=to_theta(result.theta))

    return InnerSolver(f"{solver.name} in prior scale", solver.num_steps, solver.tol, solve)


# ---------------------------------------------------------------------------- learners' plumbing


def default_solver(num_params: int) -> InnerSolver:
    """:func:`newton` for up to ``NEWTON_MAX_PARAMS`` (256) parameters, :func:`lbfgs` above."""
    return newton() if num_params <= NEWTON_MAX_PARAMS else lbfgs()


def resolve_inner_solver(inner_solver: Optional[InnerSolver], inner_optimizer, inner_steps, *, num_params: int,
                         tol: Optional[float] = GRADIENT_STEPS_TOL, min_steps: int = 0) -> InnerSolver:
    """A learner's inner solver from its arguments.

    ``inner_solver`` as given; or ``inner_optimizer`` + ``inner_steps`` as K optax steps
    (:func:`gradient_steps` with ``tol``); or ``inner_steps`` alone as K curvature steps; or,
    with none of them, :func:`default_solver`.
    """
    if inner_solver is not None:
        if inner_optimizer is not None or inner_steps is not None:
            raise ValueError("give inner_solver= or inner_optimizer= with inner_steps=, not both")
        if not isinstance(inner_solver, InnerSolver):
            raise ValueError(
                "inner_solver must be a hiermeta.solvers.InnerSolver (gradient_steps, newton, lbfgs), got "
                f"{type(inner_solver).__name__}"
            )
        return inner_solver
    if inner_steps is None:
        if inner_optimizer is not None:
            raise ValueError("inner_optimizer= needs inner_steps= (K, the number of inner steps)")
        return default_solver(num_params)
    _check_steps(inner_steps, "inner_steps", min_steps)
    if inner_optimizer is not None and not isinstance(inner_optimizer, optax.GradientTransformation):
        raise ValueError(
            f"inner_optimizer must be an optax transformation (or, for the Gaussian-prior learners, "
            f"hiermeta.learners.proximal_sgd(rate)), got {type(inner_optimizer).__name__}"
        )
    return gradient_steps(inner_optimizer, inner_steps, tol=tol)


def warn_unconverged(who: str, where: str, worst: float, tol: float, stacklevel: int = 3) -> None:
    """Issue one :class:`ConvergenceWarning`: ``who`` did not converge on ``where`` (e.g. "3 of 18
    tasks"), with the worst relative gradient norm ``worst`` against ``tol``."""
    warnings.warn(
        ConvergenceWarning(
            f"{who}: the inner solve did not converge on {where} (worst relative gradient norm "
            f"{worst:.3g} > tol {tol:.3g}); the adapted theta is not the MAP. Raise the step budget, "
            "or use inner_solver=hiermeta.solvers.newton() (or lbfgs() for many parameters)"
        ),
        stacklevel=stacklevel,
    )
