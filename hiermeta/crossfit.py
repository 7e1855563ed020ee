"""Cross-fitting for the predictive-likelihood (PLL) learners, and checks on the sigma they learn.

The paper's estimator of sigma maximises the PLL of one support/query split,

    PLL(meta) = sum_t log p(D_t^val | theta_hat_t(D_t^tr; meta)).

With tens of groups it is erratic: which rows each group happens to hold out moves the maximiser
by orders of magnitude (lme4's sleepstudy, 18 subjects: sigma of the intercept from 8 to 1e9 over
four random splits with Eq. 4, issue 11).  *Cross-fitting* replaces the one split by its average
over random splits,

    PLL_cf(meta) = E_S [ sum_t log p(D_t^{val,S} | theta_hat_t(D_t^{tr,S}; meta)) ],

S a random split of every group's rows (a fraction ``query_fraction`` of each group held out):
repeated random-subsampling cross-validation of the plug-in predictive.  A meta-step draws fresh
splits (``num_splits`` per group, as that many copies of the group in the batch, so the learners'
mean over the batch averages the hypergradient over them); the outer optimiser averages over
meta-steps.  The estimate no longer depends on one split; what is left is the sampling error of
the groups themselves.  Every row serves as support and as query.

:func:`crossfit_sampler` is a ``sample_tasks(key)`` for :func:`hiermeta.fit`; :func:`resplit` the
split itself; :func:`sigma_spread` reads the spread of sigma over the last meta-steps of a
history; :func:`check_sigma` reports (and warns, :class:`~hiermeta.errors.SigmaRunOffWarning`)
when a learned sigma ran off: far above the data's scale, or down to the float floor.
"""

from __future__ import annotations

import warnings
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from .errors import SigmaRunOffWarning
from .learners.bilevel import sigma_of
from .starts import data_start
from .tasks import TaskBatch, num_tasks
from .utils import check_count

__all__ = ["resplit", "crossfit_sampler", "SigmaSpread", "sigma_spread", "SigmaCheck", "check_sigma", "run_off"]


def _check_fraction(query_fraction) -> float:
    if isinstance(query_fraction, bool) or not np.isfinite(query_fraction) or not 0.0 < query_fraction < 1.0:
        raise ValueError(f"query_fraction must be in (0, 1), got {query_fraction!r}")
    return float(query_fraction)


def resplit(data, key: jax.Array, query_fraction: float) -> TaskBatch:
    """A random support/query split of every task's observed rows (jittable).

    ``data``: tasks with a leading task axis and a ``(T, N)`` boolean ``mask`` (every hiermeta data
    type: :class:`~hiermeta.GaussianData`, the families' data).  Task t holds out
    ``clip(round(query_fraction * n_t), 1, n_t - 1)`` of its ``n_t`` rows, chosen uniformly at random;
    both parts are ``data`` with the mask restricted, so shapes never change (one compilation).
    """
    mask = jnp.asarray(data.mask)
    n = jnp.sum(mask, axis=1)
    n_query = jnp.clip(jnp.round(query_fraction * n), 1, n - 1)
    u = jnp.where(mask, jax.random.uniform(key, mask.shape), 2.0)  # padding ranks last
    rank = jnp.argsort(jnp.argsort(u, axis=1), axis=1)
    is_query = (rank < n_query[:, None]) & mask
    return TaskBatch(data._replace(mask=mask & ~is_query), data._replace(mask=is_query))


def crossfit_sampler(data, *, query_fraction: float = 0.25, num_splits: int = 4,
                     batch_size: Optional[int] = None):
    """``sample_tasks(key)`` for :func:`hiermeta.fit`: fresh random splits at every meta-step.

    Args:
      data: every task's rows (e.g. ``table.data``, or ``table.support`` to keep a held-out part);
        each task needs 2 rows or more.
      query_fraction: the share of each task's rows held out as query (in (0, 1)).
      num_splits: K, independent splits of each task per meta-step (the batch holds K copies of
        each task, so the hypergradient is averaged over them).
      batch_size: tasks drawn per meta-step (without replacement); default all of them.
    Returns:
      ``sample(key) -> TaskBatch`` of ``batch_size * num_splits`` tasks.
    Raises:
      ValueError: a bad fraction or count, data without a ``(T, N)`` mask, or a task with fewer
        than 2 rows (it cannot be split).
    """
    query_fraction = _check_fraction(query_fraction)
    num_splits = check_count(num_splits, "num_splits", 1)
    mask = getattr(data, "mask", None)
    T = num_tasks(data)
    if mask is None or np.ndim(mask) != 2 or np.shape(mask)[0] != T:
        raise ValueError("cross-fitting needs task data with a (tasks, rows) boolean mask")
    counts = np.asarray(mask).sum(axis=1)
    few = np.flatnonzero(counts < 2)
    if few.size:
        raise ValueError(f"task(s) {few[:10].tolist()} have fewer than 2 rows: they cannot be split into "
                         "support and query")
    batch_size = T if batch_size is None else check_count(batch_size, "batch_size", 1)
    if batch_size > T:
        raise ValueError(f"batch_size must be between 1 and the {T} tasks available, got {batch_size}")
    data = jax.tree_util.tree_map(jnp.asarray, data)

    def sample(key):
        k_tasks, k_split = jax.random.split(key)
        if batch_size == T:
            idx = jnp.arange(T)
        else:
            idx = jax.random.choice(k_tasks, T, (batch_size,), replace=False)
        idx = jnp.repeat(idx, num_splits)
        return resplit(jax.tree_util.tree_map(lambda a: a[idx], data), k_split, query_fraction)

    return sample


# ---------------------------------------------------------------------------- the learned sigma


class SigmaSpread(NamedTuple):
    """sigma over the last ``last`` meta-steps of a history, per module ``(M,)``.

    ``ratio = high / low``: 1 for a settled estimate; cross-fitting's steps wander by the
    hypergradient's split-to-split noise, a run-off one by orders of magnitude.
    """

    last: int
    low: np.ndarray
    high: np.ndarray
    median: np.ndarray
    ratio: np.ndarray

    def to_dict(self) -> dict:
        return {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in self._asdict().items()}


def sigma_spread(history: dict, last: int = 100, key: str = "sigma") -> SigmaSpread:
    """Range of ``history[key]`` (``(steps, M)``, e.g. from :func:`hiermeta.fit`) over its last ``last`` steps."""
    if key not in history:
        raise ValueError(f"the history has no {key!r} (it has {sorted(history)}); is it a PLL learner's?")
    last = check_count(last, "last", 1)
    values = np.asarray(history[key], dtype=float)
    if values.ndim == 1:
        values = values[:, None]
    if values.shape[0] == 0:
        raise ValueError("the history is empty")
    tail = values[-last:]
    low, high = tail.min(axis=0), tail.max(axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(low > 0, high / low, np.inf)
    return SigmaSpread(int(tail.shape[0]), low, high, np.median(tail, axis=0), ratio)


class SigmaCheck(NamedTuple):
    """Whether a learned sigma ran off (:func:`check_sigma`).

    Attributes:
      sigma: ``(M,)`` the learned sigma; scale: ``(M,)`` the data's scale it is judged against.
      too_large: sigma above ``factor * scale`` (or not finite); at_floor: sigma at or below
        ``scale * sqrt(eps)`` (``sigma^2`` at the float resolution of the data's scale).
      ran_off: either, per module; spread: :class:`SigmaSpread` of the history's tail, if given.
    """

    sigma: np.ndarray
    scale: np.ndarray
    too_large: np.ndarray
    at_floor: np.ndarray
    ran_off: np.ndarray
    spread: Optional[SigmaSpread] = None

    def to_dict(self) -> dict:
        out = {k: np.asarray(v).tolist() for k, v in self._asdict().items() if k != "spread"}
        out["spread"] = None if self.spread is None else self.spread.to_dict()
        return out


def run_off(sigma, scale, factor: float = 100.0) -> tuple[np.ndarray, np.ndarray]:
    """``(too_large, at_floor)``: sigma above ``factor * scale`` (or not finite), and sigma at or below
    ``scale * sqrt(eps)`` (its square at the float resolution of the scale's square); elementwise."""
    sigma, scale = np.asarray(sigma, dtype=float), np.asarray(scale, dtype=float)
    floor = scale * np.sqrt(np.finfo(sigma.dtype).eps)
    too_large = ~np.isfinite(sigma) | (sigma > factor * scale)
    return too_large, np.isfinite(sigma) & (sigma <= floor)


def check_sigma(learner, state, *, data: Any = None, scale=None, history: Optional[dict] = None,
                last: int = 100, factor: float = 100.0, warn: bool = True) -> SigmaCheck:
    """Judge the sigma a PLL learner learned against the data's scale; warn if it ran off.

    The scale of module m is, unless given (``scale``, scalar or ``(M,)``), the likelihood's
    data-scaled start (``initial_values(data)``: the residual sd of a pooled fit over the rms of
    the module's design column, the size of an effect that moves the response by one residual
    sd).  sigma has *run off* when it exceeds ``factor`` times that (the groups are treated as
    unrelated: the PLL's maximiser went to infinity) or falls to ``scale * sqrt(eps)`` (to zero).
    Both are reported in the result, and by a :class:`~hiermeta.errors.SigmaRunOffWarning`.
    """
    model = learner.model
    M = model.partition.num_modules
    sigma = np.asarray(sigma_of(state.params, M), dtype=float)
    if scale is None:
        start = data_start(model, data)
        if "sigma" not in start:
            raise ValueError("check_sigma needs scale=, or data= whose likelihood offers initial_values")
        scale = start["sigma"]
    scale = np.broadcast_to(np.asarray(scale, dtype=float), (M,)).copy()
    if not np.all(np.isfinite(scale)) or np.any(scale <= 0):
        raise ValueError(f"scale must be finite and > 0, got {scale}")
    if not np.isfinite(factor) or factor <= 1:
        raise ValueError(f"factor must be finite and > 1, got {factor}")
    too_large, at_floor = run_off(sigma, scale, factor)
    ran_off = too_large | at_floor
    spread = None if history is None else sigma_spread(history, last)
    if warn and np.any(ran_off):
        names = model.partition.names
        parts = [f"{names[m]}: sigma {sigma[m]:.3g} " + (f"> {factor:g} x the data's scale {scale[m]:.3g}"
                 if too_large[m] else f"at the float floor of the data's scale {scale[m]:.3g}")
                 for m in np.flatnonzero(ran_off)]
        warnings.warn(
            f"{learner.name}: the learned sigma ran off ({'; '.join(parts)}). The PLL of one support/query "
            "split is erratic at tens of groups: meta-train with hiermeta.crossfit.crossfit_sampler, or "
            "compare with hiermeta.type2_ml", SigmaRunOffWarning, stacklevel=2)
    return SigmaCheck(sigma, scale, too_large, at_floor, ran_off, spread)
