"""Is a learned sigma running off?  Judged from its own trajectory, without a data scale.

:func:`hiermeta.crossfit.check_sigma` compares a sigma with the data's scale, which a network
(a categorical likelihood over images) does not offer.  What needs no scale is the trajectory
itself: a change of ``log sigma`` is dimensionless.  Over the last ``W`` meta-steps of a run
(``W = max(20, steps / 5)``) module m's sigma is **running off** when

    |log sigma_m(end) - log sigma_m(end - W)| > log(factor)           (it moved by more than x factor)
    and at least ``consistency`` of those steps moved it the same way  (a drift, not noise),

with ``factor = 2`` and ``consistency = 0.8`` by default.  A sigma settled at an optimum of the
predictive likelihood wanders both ways (about half its steps each way); one that the
hypergradient pushes without a stationary point moves one way at the outer optimiser's rate
(Adam: about its learning rate per step in log sigma^2).  A sigma still travelling from a poor
start is flagged too, rightly: it has not settled.  The sigma step's linear-solve residual
(``sigma_residual``; for Eq. 4 ``||H Sigma g - g|| / ||g||``, how far the prior is from the inner
Hessian) is reported beside it: above 1, Eq. 4's direction says nothing about the PLL's.

:func:`hiermeta.fit` calls :func:`check_run_off` on every run of a learner that learns sigma
(its step metrics carry ``sigma_growth``), and warns with
:class:`~hiermeta.errors.SigmaRunOffWarning`.
"""

from __future__ import annotations

import math
import warnings
from typing import NamedTuple, Optional, Sequence

import numpy as np

from ..errors import SigmaRunOffWarning

__all__ = ["RunOffCheck", "check_run_off", "MIN_WINDOW"]

MIN_WINDOW = 20  # fewer meta-steps than this are not judged


class RunOffCheck(NamedTuple):
    """What :func:`check_run_off` found (per module arrays ``(M,)``).

    Attributes:
      window: meta-steps judged (the last ones of the run); 0 when the run was too short.
      growth: ``sigma(end) / sigma(end - window)``.
      consistency: the fraction of the window's steps that moved sigma the way it went overall.
      ran_off: moved by more than ``factor`` (either way) with ``consistency`` at least the threshold,
        or not finite.
      sigma_residual: the median over the window of the sigma step's solve residual (NaN if not recorded).
    """

    window: int
    growth: np.ndarray
    consistency: np.ndarray
    ran_off: np.ndarray
    sigma_residual: float

    def to_dict(self) -> dict:
        return {k: (np.asarray(v).tolist() if isinstance(v, np.ndarray) else v) for k, v in self._asdict().items()}


def check_run_off(history: dict, *, names: Optional[Sequence[str]] = None, who: str = "", factor: float = 2.0,
                  consistency: float = 0.8, warn: bool = True, stacklevel: int = 2) -> RunOffCheck:
    """Judge the last meta-steps of a run's ``history`` (:func:`hiermeta.fit`'s; it needs
    ``sigma_growth``, ``(steps, M)``) and warn (:class:`~hiermeta.errors.SigmaRunOffWarning`) for every
    module whose sigma is running off (module docstring)."""
    if "sigma_growth" not in history:
        raise ValueError("check_run_off needs history['sigma_growth'] (the step metrics of a learner that learns sigma)")
    if not (np.isfinite(factor) and factor > 1):
        raise ValueError(f"factor must be finite and > 1, got {factor}")
    if not 0.5 < consistency <= 1:
        raise ValueError(f"consistency must lie in (0.5, 1], got {consistency}")
    growth_steps = np.asarray(history["sigma_growth"], dtype=float)
    if growth_steps.ndim == 1:
        growth_steps = growth_steps[:, None]
    steps, M = growth_steps.shape
    shared = M > 1 and bool(np.all(growth_steps == growth_steps[:, :1]))  # one sigma shared by every module
    window = min(steps, max(MIN_WINDOW, steps // 5))
    if steps < MIN_WINDOW:
        return RunOffCheck(0, np.ones(M), np.zeros(M), np.zeros(M, bool), math.nan)
    recent = growth_steps[-window:]
    total = recent.sum(axis=0)
    direction = np.sign(total)
    agree = np.mean(np.sign(recent) == direction, axis=0)
    ran_off = ~np.isfinite(total) | ((np.abs(total) > math.log(factor)) & (agree >= consistency))
    residual = math.nan
    if "sigma_residual" in history:
        residual = float(np.median(np.asarray(history["sigma_residual"], dtype=float)[-window:]))
    check = RunOffCheck(window, np.exp(total), agree, ran_off, residual)
    if warn and np.any(ran_off):
        labels = list(names) if names is not None and len(names) == M else [f"module {m}" for m in range(M)]
        if shared:
            labels, ran_off = ["every module (one shared sigma)"] + labels[1:], ran_off & (np.arange(M) == 0)
        parts = [f"{labels[m]}: sigma {'rose' if total[m] > 0 else 'fell'} by a factor "
                 f"{math.exp(abs(total[m])) if np.isfinite(total[m]) else math.inf:.3g} "
                 f"({100 * agree[m]:.0f}% of the steps the same way)" for m in np.flatnonzero(ran_off)]
        cause = ""
        if np.isfinite(residual) and residual > 1:
            cause = (f" The sigma step's linear solve H v = g had a median relative residual of {residual:.3g} over "
                     "those steps, so its direction need not be the PLL gradient's (with Eq. 4: the prior is far from "
                     "the inner Hessian, sigma_step='exact' solves it by CG; with CG: too few iterations, or an "
                     "inner solve far from stationary).")
        warnings.warn(
            f"{who + ': ' if who else ''}the learned sigma is running off (or has not settled) over the last "
            f"{window} meta-steps: {'; '.join(parts)}.{cause} Check the accuracy against a fixed-sigma run before "
            "trusting it.", SigmaRunOffWarning, stacklevel=stacklevel)
    return check
