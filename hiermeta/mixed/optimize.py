"""Bounded minimisation of a mixed model's criterion over a few parameters, with a convergence check.

lme4 minimises the profiled deviance over ``theta`` without derivatives (BOBYQA, then Nelder-Mead
for GLMMs) and afterwards checks the gradient and Hessian by finite differences.  Here:

1. **COBYQA** (SciPy >= 1.14; Powell's derivative-free trust-region method with quadratic
   models, the successor of lme4's BOBYQA), from the start given (lme4's ``T_k = I`` on the
   standardised scale, :mod:`~hiermeta.mixed.scaling`).  On lme4's data sets it reached the
   optimum to 1e-10 in 50-64 evaluations where L-BFGS-B with forward differences took 60-160
   and stopped 1e-5 short on Pastes under ML, Powell 200-370 and Nelder-Mead 130-310
   (``docs/mixed-models.md``).  Without COBYQA (older SciPy): L-BFGS-B.  COBYQA's own work is
   about 1 ms per evaluation (its trust-region subproblems, in Python), more than a GLMM's
   criterion on data of a few thousand rows, so the GLMM fits (:mod:`~hiermeta.mixed.glmm`) use
   ``method="l-bfgs-b"``: about twice the evaluations (a forward-difference gradient costs ``k + 1``,
   each a PIRLS warm-started ``1e-8`` away: one Newton step), each with no overhead of its own
   (on ohio's random-slope model and grouseticks' three factors about 0.6 of COBYQA's CPU time,
   the same optima to 2e-9 in ``-2 log L``; ``benchmarks/mixed_fit.py`` times the whole fits).
2. **Check** (lme4's ``checkConv``): central-difference gradient ``g`` and Hessian ``H`` at the
   end point (``1 + 2k + k(k - 1)`` evaluations for ``k`` parameters: an off-diagonal entry from
   ``f(x +- (h_i e_i + h_j e_j))`` and the gradient's ``f(x +- h_i e_i)``), over the free coordinates (a coordinate at its lower bound whose gradient pushes
   it further out is on the boundary and is excluded).  Converged when the Newton step
   ``|H^-1 g|`` is below ``step_tol`` in every coordinate (the optimum is within that distance,
   in the standardised units), or, where ``H`` is not positive definite, when ``max |g|`` is
   below ``grad_tol``.
3. If not, **Newton polish**: the step ``-H^-1 g`` (projected on the bounds, halved until the
   criterion decreases), then the check again, up to ``newton_steps`` times (forward-difference
   gradients are too noisy for L-BFGS-B on a criterion that is flat in one direction, e.g. a
   variance component of a few levels under ML; the central differences of the check are not).
4. If still not, **restart**: Nelder-Mead (bounded) from the best point, then L-BFGS-B again,
   then the check once more; a result that still fails is reported as not converged (with the
   check's numbers), never silently accepted.

Objective evaluations are counted; every value returned is the best one evaluated.

**BLAS threads.**  Each evaluation factorises matrices of at most a few thousand rows; with
OpenBLAS's threads on a shared machine (2 cores, several processes) the dense Cholesky of
InstEval's 1128 x 1128 Schur complement took 0.19 s (median) with the default threads and 0.036 s
with one.  :func:`blas_threads` limits them (threadpoolctl, where installed) around a fit.
"""

from __future__ import annotations

import contextlib
from typing import Callable, NamedTuple, Optional

import numpy as np
import scipy.optimize

__all__ = ["Minimum", "minimize_bounded", "check_optimum", "blas_threads"]


def blas_threads(limit: Optional[int] = 1):
    """A context limiting BLAS/LAPACK to ``limit`` threads (``None``: leave them as they are).

    The fits of both engines run their small dense factorisations (and SciPy's optimisers their
    vector operations) under one thread: on a shared or small machine a second thread only contends
    for the cores (InstEval's 1128 x 1128 Cholesky: 0.036 s on one thread, 0.19 s on two here).
    """
    if limit is None:
        return contextlib.nullcontext()
    from threadpoolctl import threadpool_limits  # a core dependency; imported on first use

    return threadpool_limits(limits=int(limit), user_api="blas")


class Minimum(NamedTuple):
    """Result of :func:`minimize_bounded`: the point, the value, the check and the bookkeeping."""

    x: np.ndarray
    value: float
    converged: bool
    evaluations: int
    gradient: np.ndarray  # central differences at x (0 for coordinates held on their bound)
    newton_step: np.ndarray  # H^-1 g over the free coordinates (NaN where H is not positive definite)
    on_bound: np.ndarray  # coordinates at their lower bound with the gradient pushing outwards
    message: str
    hessian: Optional[np.ndarray] = None  # the check's central-difference Hessian at x (NaN off the free coordinates)


class _Counted:
    """The objective with an evaluation counter and a memory of the best point."""

    def __init__(self, fun: Callable):
        self.fun, self.count, self.best_x, self.best = fun, 0, None, np.inf

    def __call__(self, x):
        self.count += 1
        try:
            value = float(self.fun(np.asarray(x, dtype=float)))
        except (np.linalg.LinAlgError, FloatingPointError, ValueError):
            value = np.inf
        if not np.isfinite(value):
            value = np.inf
        if value < self.best:
            self.best, self.best_x = value, np.array(x, dtype=float)
        return value if np.isfinite(value) else 1e300


def check_optimum(fun: Callable, x: np.ndarray, lower: np.ndarray, step: float = 1e-4,
                  step_tol: float = 1e-3, grad_tol: float = 1e-3) -> tuple:
    """``(converged, gradient, newton_step, on_bound)`` at ``x`` by central differences (module docstring).

    Coordinates closer than ``step`` to their lower bound use one-sided differences.
    """
    return _check(fun, x, lower, step, step_tol, grad_tol)[:4]


def _check(fun: Callable, x: np.ndarray, lower: np.ndarray, step: float = 1e-4,
           step_tol: float = 1e-3, grad_tol: float = 1e-3) -> tuple:
    """:func:`check_optimum` and the Hessian ``(k, k)`` (NaN off the free coordinates)."""
    x = np.asarray(x, dtype=float)
    k = x.size
    f0 = fun(x)
    h = step * np.maximum(1.0, np.abs(x))
    near = x - h < lower
    grad, curvature = np.zeros(k), np.zeros(k)
    plus, minus = np.zeros(k), np.zeros(k)  # f(x + h_i e_i), f(x - h_i e_i) (or f(x + 2 h_i e_i) near the bound)
    for i in range(k):
        e = np.zeros(k)
        e[i] = h[i]
        if near[i]:  # one-sided: f(x + h), f(x + 2h)
            f1, f2 = fun(x + e), fun(x + 2 * e)
            plus[i], minus[i] = f1, f2
            grad[i] = (-3 * f0 + 4 * f1 - f2) / (2 * h[i])
            curvature[i] = (f2 - 2 * f1 + f0) / h[i] ** 2
        else:
            fp, fm = fun(x + e), fun(x - e)
            plus[i], minus[i] = fp, fm
            grad[i] = (fp - fm) / (2 * h[i])
            curvature[i] = (fp - 2 * f0 + fm) / h[i] ** 2
    on_bound = near & (x - lower <= h) & (grad > 0)
    free = ~on_bound
    newton = np.full(k, np.nan)
    hessian = np.full((k, k), np.nan)
    if not free.any():
        return True, np.where(free, grad, 0.0), np.zeros(k), on_bound, hessian
    idx = np.flatnonzero(free)
    H = np.zeros((idx.size, idx.size))
    for a, i in enumerate(idx):
        H[a, a] = curvature[i]
        for b, j in enumerate(idx[:a]):
            ei, ej = np.zeros(k), np.zeros(k)
            ei[i], ej[j] = h[i], h[j]
            if near[i] or near[j]:  # forward differences next to the bound
                H[a, b] = (fun(x + ei + ej) - plus[i] - plus[j] + f0) / (h[i] * h[j])
            else:  # central: f(x +- (e_i + e_j)) with the f(x +- e_i), f(x +- e_j) above, O(h^2) as the 4-point rule
                H[a, b] = (fun(x + ei + ej) + fun(x - ei - ej) - plus[i] - minus[i] - plus[j] - minus[j]
                           + 2 * f0) / (2 * h[i] * h[j])
            H[b, a] = H[a, b]
    g = grad[idx]
    hessian[np.ix_(idx, idx)] = H
    try:
        c = np.linalg.cholesky(H)
        step_free = np.linalg.solve(c.T, np.linalg.solve(c, g))
        newton[idx] = step_free
        converged = bool(np.max(np.abs(step_free)) < step_tol)
    except np.linalg.LinAlgError:
        converged = bool(np.max(np.abs(g)) < grad_tol)
    return converged, np.where(free, grad, 0.0), np.where(free, newton, 0.0), on_bound, hessian


def minimize_bounded(fun: Callable, x0, lower, upper=None, *, max_evaluations: int = 10000,
                     ftol: float = 1e-12, gtol: float = 1e-7, newton_steps: int = 3, check: bool = True,
                     method: str = "cobyqa") -> Minimum:
    """Minimise ``fun`` over ``lower <= x <= upper`` (module docstring).

    ``method``: the first stage, ``"cobyqa"`` or ``"l-bfgs-b"`` (forward-difference gradients:
    more evaluations, each with almost no work of its own; module docstring).  ``check=False``: that
    stage alone, for a point that only starts another fit (a GLMM's ``nAGQ = 0`` stage); the result
    is not checked (``converged`` is the method's own success, ``gradient`` NaN).
    """
    if method not in ("cobyqa", "l-bfgs-b"):
        raise ValueError(f"method must be 'cobyqa' or 'l-bfgs-b', got {method!r}")
    x0 = np.asarray(x0, dtype=float)
    lower = np.asarray(lower, dtype=float)
    upper = np.full_like(x0, np.inf) if upper is None else np.asarray(upper, dtype=float)
    bounds = scipy.optimize.Bounds(lower, upper)
    counted = _Counted(fun)
    messages = []

    def lbfgs(start):
        res = scipy.optimize.minimize(counted, start, method="L-BFGS-B", bounds=bounds,
                                      options=dict(maxfun=max_evaluations, ftol=ftol, gtol=gtol, maxls=50))
        messages.append(f"L-BFGS-B: {res.message}")
        return res

    x0 = np.clip(x0, lower, upper)
    res = None
    if method == "l-bfgs-b":
        res = lbfgs(x0)
    else:
        try:
            res = scipy.optimize.minimize(counted, x0, method="COBYQA", bounds=bounds,
                                          options=dict(maxfev=max_evaluations, initial_tr_radius=0.2,
                                                       final_tr_radius=1e-5))
            messages.append(f"COBYQA: {res.message}")
        except ValueError as err:  # SciPy < 1.14: no COBYQA
            if "cobyqa" not in str(err).lower():
                raise
            res = lbfgs(x0)
    if counted.best_x is None:
        return Minimum(x0, np.inf, False, counted.count, np.full_like(x0, np.nan), np.full_like(x0, np.nan),
                       np.zeros(x0.size, dtype=bool), "the criterion is not finite at the start or anywhere tried")
    if not check:
        return Minimum(counted.best_x, counted.best, bool(getattr(res, "success", False)), counted.count,
                       np.full_like(x0, np.nan), np.full_like(x0, np.nan), np.zeros(x0.size, dtype=bool),
                       "; ".join(messages) + " (not checked: a starting point)")
    check = _check(counted, counted.best_x, lower)
    for _ in range(newton_steps):
        if check[0] or not np.all(np.isfinite(check[2])):
            break
        x, step = counted.best_x.copy(), check[2]
        for _halving in range(20):
            trial = np.clip(x - step, lower, upper)
            if counted(trial) < counted.best - 1e-14 * abs(counted.best) or np.all(trial == x):
                break
            step = step / 2
        messages.append("Newton step from the check")
        check = _check(counted, counted.best_x, lower)
    if not check[0]:
        messages.append("check failed (Newton step "
                        f"{np.max(np.abs(np.nan_to_num(check[2], nan=np.inf))):.2g}); restarted with Nelder-Mead")
        start = counted.best_x.copy()
        res = scipy.optimize.minimize(counted, start, method="Nelder-Mead", bounds=bounds,
                                      options=dict(maxfev=max_evaluations, xatol=1e-8, fatol=1e-10, adaptive=True))
        messages.append(f"Nelder-Mead: {res.message}")
        lbfgs(counted.best_x.copy())
        check = _check(counted, counted.best_x, lower)
    converged, grad, newton, on_bound, hessian = check
    messages.append(f"check: max |gradient| {np.max(np.abs(grad)) if grad.size else 0:.2g}, "
                    f"max |Newton step| {np.max(np.abs(np.nan_to_num(newton, nan=np.inf))) if newton.size else 0:.2g}"
                    f"{' (converged)' if converged else ' (NOT converged)'}")
    return Minimum(counted.best_x, counted.best, converged, counted.count, grad, newton, on_bound, "; ".join(messages),
                   hessian)
