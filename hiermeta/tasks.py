"""Task data: the support/query split of a batch of tasks, and the Gaussian observation model.

Every data leaf carries a leading task axis ``T``.  A task likelihood is a NumPyro function
``likelihood(theta, data)`` called inside ``plate("tasks", T)`` with the task parameters
``theta`` (a pytree whose leaves have a leading task axis) and that task data; it declares the
observed sites.  For evaluation it also says how many observations each task holds and the
constant part of its log density (so losses are reported "up to a constant", as in the paper).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, NamedTuple, Optional, Protocol, runtime_checkable

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from numpyro.distributions import constraints

from .sites import GlobalParam

__all__ = [
    "TaskBatch",
    "TaskLikelihood",
    "GaussianData",
    "GaussianLikelihood",
    "num_tasks",
    "check_task_batch",
]


class TaskBatch(NamedTuple):
    """A batch of tasks split into support (``train``, fits theta) and query (``val``) data."""

    train: Any
    val: Any


@runtime_checkable
class TaskLikelihood(Protocol):
    """What a domain supplies: the NumPyro likelihood of a batch of tasks and its bookkeeping.

    ``likelihood(theta, data)`` is called inside ``numpyro.plate("tasks", T)`` with ``theta`` the
    task parameters (a pytree whose leaves have a leading task axis) and ``data`` the tasks' data
    (every leaf with a leading task axis); it declares the *observed* sites only (task latents
    belong in theta).  A likelihood with parameters shared by all tasks (e.g. an unknown noise
    scale) lists them in an attribute ``global_params`` (name -> :class:`~hiermeta.GlobalParam`);
    the model samples them once, outside the plate, and calls ``likelihood(theta, data, g)``
    with ``g`` the dict of their values.  Data may carry ``task_covariates`` ``(T, Q)``.

    The three methods below are required (:class:`~hiermeta.HierarchicalModel` refuses a
    likelihood without them).  Everything else a likelihood may offer is optional; the library
    asks for it by name and says so when it is missing:

    ==============================================  ==============================================
    attribute (who reads it)                        what it is
    ==============================================  ==============================================
    ``global_params`` (HierarchicalModel)           name -> :class:`~hiermeta.GlobalParam`, the
                                                    parameters shared by every task
    ``linear_globals`` (type-II ML)                 names of globals entering the mean linearly
                                                    (profiled with phi, e.g. ``beta``)
    ``initial_values(data, model)`` (learners,      constrained starts on the data's scale (a
    type-II ML, cross-fitting)                      pooled fit): ``phi``, ``sigma``, globals
    ``prior_scales(data, model)`` (``with_priors``) the data's scales of phi, sigma and globals
    ``log_marginal(...)`` (type-II ML ``exact``)    the closed-form marginal likelihood
    ``sufficient_statistics``,                      per-task statistics, so that type-II ML reads
    ``log_marginal_from_statistics``,               them instead of the rows
    ``noise_groups`` (type-II ML)
    ``cdf``, ``discrete``, ``binary``               the predictive CDF of an observation and its
    (``predictive.score_draws``)                    kind (randomised PIT for discrete responses)
    ``mean``, ``sd`` (predictive scores)            Gaussian moments of an observation
    ``make_data``, ``num_fixed`` (``from_table``)   build checked task data from table columns
    ``num_classes`` (ProtoNet)                      classes of a categorical likelihood
    ==============================================  ==============================================

    The GLM families implement these for their link and response
    (:class:`~hiermeta.families.base.GLMLikelihood`: a family supplies its distribution, CDF,
    checks and pooled fit through a few hooks listed there).
    """

    def __call__(self, theta: Any, data: Any) -> None: ...

    def num_observations(self, data: Any) -> jax.Array:
        """``(T,)`` number of observations in each task."""

    def log_normaliser(self, data: Any) -> jax.Array:
        """``(T,)`` part of ``log p(data | theta)`` that depends on neither theta nor the globals."""

    def check(self, data: Any, where: str) -> None:
        """Raise ``ValueError`` naming the problem if concrete ``data`` is malformed."""


def num_tasks(data) -> int:
    """Length of the leading task axis shared by every leaf of ``data``."""
    leaves = [leaf for leaf in jax.tree_util.tree_leaves(data)]
    if not leaves:
        raise ValueError("task data has no arrays")
    sizes = {int(np.shape(leaf)[0]) if np.ndim(leaf) else -1 for leaf in leaves}
    if len(sizes) != 1 or -1 in sizes:
        raise ValueError(
            f"every task-data array needs the same leading task axis; got leading sizes {sorted(sizes)}"
        )
    return sizes.pop()


def check_task_batch(likelihood: TaskLikelihood, batch: TaskBatch) -> int:
    """Validate a concrete batch (both splits, same tasks); return the number of tasks."""
    if not isinstance(batch, TaskBatch):
        raise ValueError(f"expected a TaskBatch(train, val), got {type(batch).__name__}")
    likelihood.check(batch.train, "train split")
    likelihood.check(batch.val, "val split")
    t_train, t_val = num_tasks(batch.train), num_tasks(batch.val)
    if t_train != t_val:
        raise ValueError(f"train split has {t_train} tasks but val split has {t_val}")
    return t_train


# ---------------------------------------------------------------------------- Gaussian data


class GaussianData(NamedTuple):
    """Observations of a batch of tasks with known Gaussian noise.

    Attributes:
      obs: ``(T, N, D)`` observations (zero where ``mask`` is False).
      noise_sd: ``(T, N, D)`` known observation noise standard deviations (> 0).
      mask: ``(T, N)`` booleans; False marks padding, so tasks may hold unequal numbers of
        observations.
      inputs: optional pytree with leaves of leading shape ``(T, N, ...)`` (covariates, design
        rows) passed to the mean function.
      task_covariates: optional ``(T, Q)`` covariates of each task (group-level predictors: the
        prior mean of task t is ``phi + z_t @ gamma`` in a model with ``num_task_covariates=Q``).

    With a likelihood of unknown noise (``GaussianLikelihood(..., noise="learned")``),
    ``noise_sd`` holds known *relative* scales (1 by default) multiplying the learned noise sd.
    """

    obs: jax.Array
    noise_sd: jax.Array
    mask: jax.Array
    inputs: Any = None
    task_covariates: Any = None

    @classmethod
    def create(cls, obs, noise_sd=1.0, inputs=None, mask=None, task_covariates=None) -> "GaussianData":
        """Validate and broadcast user data (NumPy in, checked before anything is compiled).

        ``noise_sd`` broadcasts against ``obs`` ``(T, N, D)`` (e.g. ``(D,)`` shared, ``(T, 1, D)``
        per task).  ``mask`` may be boolean or hold only 0 and 1 (any numeric dtype); padded
        entries (``mask`` False) may hold anything, NaN included, and are replaced by finite values.
        """
        obs = _real_array(obs, "obs")
        if obs.ndim != 3:
            raise ValueError(f"obs must have shape (tasks, observations, dims), got {obs.shape}")
        mask = np.ones(obs.shape[:2], dtype=bool) if mask is None else _boolean_mask(mask, "mask")
        if mask.shape != obs.shape[:2]:
            raise ValueError(f"mask must have shape {obs.shape[:2]}, got {mask.shape}")
        noise = _real_array(noise_sd, "noise_sd")
        try:
            noise = np.broadcast_to(noise, obs.shape)
        except ValueError:
            raise ValueError(
                f"noise_sd of shape {np.shape(noise_sd)} does not broadcast to obs {obs.shape}"
            ) from None
        # padding never reaches a density, but keep it finite so no NaN leaks into gradients
        obs = np.where(mask[..., None], obs, 0.0)
        noise = np.where(mask[..., None], noise, 1.0)
        if task_covariates is not None:
            task_covariates = np.asarray(task_covariates, dtype=float)
        data = cls(obs=obs, noise_sd=noise, mask=mask, inputs=inputs, task_covariates=task_covariates)
        _check_gaussian(data, "data")
        return cls(
            obs=jnp.asarray(obs),
            noise_sd=jnp.asarray(noise),
            mask=jnp.asarray(mask),
            inputs=jax.tree_util.tree_map(jnp.asarray, inputs),
            task_covariates=None if task_covariates is None else jnp.asarray(task_covariates),
        )


def _real_array(values, name: str) -> np.ndarray:
    """``values`` as a float NumPy array; complex or non-numeric input is refused, not cast."""
    arr = np.asarray(values)
    if np.iscomplexobj(arr):
        raise ValueError(f"{name} is complex ({arr.dtype}); hiermeta's Gaussian likelihood takes real data")
    if not (np.issubdtype(arr.dtype, np.number) or arr.dtype == bool):
        raise ValueError(f"{name} must be numeric, got dtype {arr.dtype}")
    return arr.astype(float)


def _boolean_mask(mask, name: str) -> np.ndarray:
    """A mask as booleans: boolean already, or numeric holding only 0 and 1 (else refused)."""
    arr = np.asarray(mask)
    if arr.dtype == bool:
        return arr
    if not np.issubdtype(arr.dtype, np.number) or np.iscomplexobj(arr):
        raise ValueError(f"{name} must hold booleans (or 0 and 1), got dtype {arr.dtype}")
    bad = ~((arr == 0) | (arr == 1))
    if np.any(bad):
        raise ValueError(
            f"{name} must hold booleans (or 0 and 1; False/0 marks padding), but holds "
            f"{np.unique(arr[bad])[:5].tolist()}"
        )
    return arr == 1


def _check_gaussian(data: GaussianData, where: str) -> None:
    """Validate concrete Gaussian data over every task; raise ``ValueError`` naming the problem.

    Checked: shapes; a boolean mask (a directly built ``GaussianData`` with a 0/1 mask of another
    dtype is refused: :meth:`GaussianData.create` converts it); finite observed values (padded
    ``obs`` may hold NaN: the likelihood never reads it); finite positive noise everywhere
    (padding included: it reaches the gradients); every task observed; real, finite inputs; and
    that the squared standardised residuals cannot overflow the floating type JAX will compute in.
    """
    if not isinstance(data, GaussianData):
        raise ValueError(f"{where}: expected GaussianData, got {type(data).__name__}")
    obs, noise, mask = np.asarray(data.obs), np.asarray(data.noise_sd), np.asarray(data.mask)
    for name, arr in (("obs", obs), ("noise_sd", noise)):
        if np.iscomplexobj(arr) or not np.issubdtype(arr.dtype, np.floating):
            raise ValueError(f"{where}: {name} must hold real floating-point numbers, got dtype {arr.dtype}")
    if obs.ndim != 3:
        raise ValueError(f"{where}: obs must have shape (tasks, observations, dims), got {obs.shape}")
    T, N, D = obs.shape
    if T == 0:
        raise ValueError(f"{where} is empty: it holds no tasks")
    if N == 0 or D == 0:
        raise ValueError(f"{where} is empty: obs has shape {obs.shape}")
    if noise.shape != obs.shape:
        raise ValueError(f"{where}: noise_sd has shape {noise.shape}, obs has {obs.shape}")
    if mask.shape != (T, N):
        raise ValueError(f"{where}: mask has shape {mask.shape}, expected {(T, N)}")
    if mask.dtype != bool:
        raise ValueError(
            f"{where}: mask must be boolean (False marks padding), got dtype {mask.dtype}; "
            "GaussianData.create converts a 0/1 mask"
        )
    observed = np.broadcast_to(mask[..., None], obs.shape)
    bad = ~np.isfinite(obs) & observed
    if np.any(bad):
        tasks = np.flatnonzero(bad.any(axis=(1, 2)))
        raise ValueError(
            f"{where}: obs holds {int(bad.sum())} NaN or infinite observed value(s), in task(s) "
            f"{tasks[:10].tolist()}"
        )
    bad = ~(np.isfinite(noise) & (noise > 0))
    if np.any(bad):
        tasks = np.flatnonzero(bad.any(axis=(1, 2)))
        padding = " (in padding too: it reaches the gradients; GaussianData.create fills it)"
        raise ValueError(
            f"{where}: noise_sd must be finite and > 0 everywhere{padding if np.any(bad & ~observed) else ''}; "
            f"{int(bad.sum())} value(s) are not, in task(s) {tasks[:10].tolist()}"
        )
    empty = np.flatnonzero(mask.sum(axis=1) == 0)
    if empty.size:
        raise ValueError(
            f"{where}: task(s) {empty[:10].tolist()} hold no observations (every task needs one)"
        )
    for leaf in jax.tree_util.tree_leaves(data.inputs):
        leaf = np.asarray(leaf)
        if leaf.shape[:2] != (T, N):
            raise ValueError(f"{where}: inputs leaves must have leading shape {(T, N)}, got {leaf.shape}")
        if np.iscomplexobj(leaf):
            raise ValueError(f"{where}: inputs are complex; hiermeta's Gaussian likelihood takes real data")
        if np.issubdtype(leaf.dtype, np.floating) and not all_finite(leaf):
            raise ValueError(f"{where}: inputs hold NaN or infinite values")
    check_task_covariates(getattr(data, "task_covariates", None), T, where)
    _check_overflow(obs, noise, observed, where)


def all_finite(values: np.ndarray) -> bool:
    """Every value finite, in one pass without a temporary array of the values' size: a finite sum
    says so (a NaN or infinity makes any sum NaN or infinite); only an overflowing sum is checked
    value by value."""
    values = np.asarray(values)
    with np.errstate(over="ignore", invalid="ignore"):
        if np.isfinite(np.sum(values)):
            return True
    return bool(np.all(np.isfinite(values)))


def check_task_covariates(z, T: int, where: str) -> None:
    """``z`` is None or a finite ``(T, Q)`` real array."""
    if z is None:
        return
    arr = np.asarray(z)
    if arr.ndim != 2 or arr.shape[0] != T:
        raise ValueError(f"{where}: task_covariates must have shape ({T}, Q), got {arr.shape}")
    if not np.issubdtype(arr.dtype, np.number) or np.iscomplexobj(arr) or not np.all(np.isfinite(arr)):
        raise ValueError(f"{where}: task_covariates must be finite real numbers")


def _check_overflow(obs, noise, observed, where: str) -> None:
    """Refuse data whose Gaussian log-likelihood overflows the floating type JAX computes in.

    The loss of a task is ``1/2 sum ((x - mu) / xi)^2`` and its curvature ``1/xi^2``; with
    ``mu`` near 0 (a fresh phi) the first is about ``1/2 sum (x / xi)^2``.  Both must stay well
    inside the type's range (float32 unless x64 is enabled), else the loss is infinite and the
    failure would look like a diverging inner loop.
    """
    dtype = jax.dtypes.canonicalize_dtype(obs.dtype)
    finfo = np.finfo(dtype)
    largest, ratio, smallest = 0.0, 0.0, np.inf
    step = max(1, (1 << 16) // max(1, obs.shape[1] * obs.shape[2]))  # tasks per block: temporaries stay small
    for lo in range(0, obs.shape[0], step):
        keep = observed[lo:lo + step]
        x = np.abs(np.where(keep, obs[lo:lo + step], 0.0)).astype(np.float64)
        xi = np.where(keep, noise[lo:lo + step], np.inf).astype(np.float64)
        largest, ratio, smallest = max(largest, x.max()), max(ratio, np.max(x / xi)), min(smallest, xi.min())
    precision = "float32 (enable float64 with jax.config.update('jax_enable_x64', True), or rescale the data)"
    if dtype != np.float32:
        precision = f"{dtype} (rescale the data)"
    if largest > finfo.max:
        raise ValueError(f"{where}: obs values up to {largest:.3g} overflow {precision}")
    limit = float(finfo.max) * 1e-3  # headroom for sums over observations and tasks
    per_task = obs.shape[1] * obs.shape[2]
    z = float(ratio)
    if z * z * per_task > limit:
        raise ValueError(
            f"{where}: |obs| / noise_sd reaches {z:.3g}; the squared residuals of the "
            f"log-likelihood overflow {precision}"
        )
    if float(smallest) ** -2 * per_task > limit:
        raise ValueError(
            f"{where}: noise_sd as small as {smallest:.3g} makes 1 / noise_sd^2 overflow {precision}"
        )


class GaussianLikelihood:
    """``x_{t,n} ~ N(mean_fn(theta_t, inputs_t)_n, diag(sd_{t,n}^2))``, the noise known or learned.

    ``mean_fn(theta_t, inputs_t)`` sees one task: ``theta_t`` the parameter pytree of that task
    and ``inputs_t`` its inputs (leading axis ``N``, or None); it returns the mean ``(N, D)`` or a
    mean ``(D,)`` shared by the task's observations.  It is vmapped over tasks here.  With
    ``globals`` (name -> :class:`~hiermeta.GlobalParam`, e.g. unpooled coefficients) it is called
    ``mean_fn(theta_t, inputs_t, g)`` with ``g`` the dict of their values.

    Args:
      noise: ``"known"``: ``sd = data.noise_sd``; ``"learned"``: ``sd = noise_sd * data.noise_sd``
        with ``noise_sd`` a global parameter of shape ``noise_shape`` (``()`` one sd for every
        observation dim, ``(D,)`` one per dim), ``data.noise_sd`` then being known relative scales.
      noise_prior: the noise sd's prior under NUTS (default flat; see :func:`hiermeta.with_priors`).
      noise_init: the noise sd's starting value for learners and type-II ML (default 1).
    """

    def __init__(
        self,
        mean_fn: Callable[..., jax.Array],
        site: str = "obs",
        *,
        noise: str = "known",
        noise_shape: tuple = (),
        noise_prior=None,
        noise_init=None,
        globals: Optional[Mapping[str, GlobalParam]] = None,
    ):
        if noise not in ("known", "learned"):
            raise ValueError(f"noise must be 'known' or 'learned', got {noise!r}")
        self.mean_fn = mean_fn
        self.site = site
        self.noise = noise
        declared = dict(globals or {})
        if noise == "learned":
            if "noise_sd" in declared:
                raise ValueError("'noise_sd' is the learned noise's site; give other names to globals")
            declared["noise_sd"] = GlobalParam(tuple(noise_shape), constraints.positive, noise_prior, noise_init)
        self.global_params = declared
        self._mean_globals = tuple(name for name in declared if name != "noise_sd")

    def mean(self, theta, data: GaussianData, g: Optional[Mapping[str, Any]] = None) -> jax.Array:
        if self._mean_globals:
            shared = {name: g[name] for name in self._mean_globals}
            mean_fn = lambda th, x: self.mean_fn(th, x, shared)
        else:
            mean_fn = self.mean_fn
        if data.noise_sd.shape[0] == 1:  # one task (the per-task densities): no size-1 batch axis in XLA
            one = lambda tree: jax.tree_util.tree_map(lambda a: a[0], tree)
            mu = mean_fn(one(theta), one(data.inputs))[None]
        else:
            mu = jax.vmap(mean_fn)(theta, data.inputs)
        if mu.ndim == 2:
            mu = mu[:, None, :]
        return jnp.broadcast_to(mu, data.noise_sd.shape)  # obs may be None (prior predictive)

    def sd(self, data: GaussianData, g: Optional[Mapping[str, Any]] = None) -> jax.Array:
        """Observation sd ``(T, N, D)``: the known one, or the learned one times the relative scales."""
        if self.noise == "learned":
            return data.noise_sd * g["noise_sd"]
        return data.noise_sd

    def __call__(self, theta, data: GaussianData, g: Optional[Mapping[str, Any]] = None) -> None:
        mu = self.mean(theta, data, g)
        fn = dist.Normal(mu, self.sd(data, g)).mask(data.mask[..., None]).to_event(2)
        numpyro.sample(self.site, fn, obs=data.obs)

    def num_observations(self, data: GaussianData) -> jax.Array:
        return jnp.sum(data.mask, axis=-1)

    def log_normaliser(self, data: GaussianData) -> jax.Array:
        """``-sum_{n,d} (log xi + log(2 pi) / 2)`` with ``xi = data.noise_sd`` (the known sd, or the
        known relative scale with learned noise): loss = 1/2 sum (x - mu)^2 / sd^2 (+ sum log noise_sd)."""
        per_obs = jnp.log(data.noise_sd) + 0.5 * jnp.log(2 * jnp.pi)
        return -jnp.sum(jnp.where(data.mask[..., None], per_obs, 0.0), axis=(-2, -1))

    def check(self, data: GaussianData, where: str) -> None:
        _check_gaussian(data, where)
