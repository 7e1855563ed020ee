"""Task data: the support/query split of a batch of tasks, what a task likelihood supplies, and the
checks every kind of task data shares (masks, real arrays, task covariates).

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
    "num_tasks",
    "check_task_batch",
    "merge_splits",
    "boolean_mask",
    "real_array",
    "check_task_covariates",
    "all_finite",
    "distinct",
]


def __getattr__(name: str):
    """``GaussianData`` and ``GaussianLikelihood`` live in :mod:`hiermeta.linear_gaussian` (the one
    home of the Gaussian likelihood); imported from here for the names that used to be here."""
    if name in ("GaussianData", "GaussianLikelihood"):
        import importlib

        return getattr(importlib.import_module(".linear_gaussian", __package__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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


def merge_splits(batch: TaskBatch):
    """All observations of each task, support and query together (for a marginal likelihood): every
    leaf of the two splits concatenated along its observation axis (axis 1), but ``task_covariates``
    (one row per task), taken from the support.  Jittable."""
    train, val = batch
    merged = jax.tree_util.tree_map(lambda a, b: jnp.concatenate([a, b], axis=1), train, val)
    if getattr(train, "task_covariates", None) is not None:
        merged = merged._replace(task_covariates=train.task_covariates)
    return merged


def boolean_mask(mask, shape: tuple, name: str = "mask") -> np.ndarray:
    """The one validator of user masks: ``(T, N)`` booleans, False marking padding.

    None means every entry is observed; a boolean array is taken as it is; a numeric one must
    hold only 0 and 1 (anything else, e.g. 0.5 or 2, is refused, not rounded).  The result must
    have exactly ``shape``."""
    if mask is None:
        return np.ones(tuple(shape), dtype=bool)
    arr = np.asarray(mask)
    if arr.dtype != bool:
        if not np.issubdtype(arr.dtype, np.number) or np.iscomplexobj(arr):
            raise ValueError(f"{name} must hold booleans (or 0 and 1), got dtype {arr.dtype}")
        bad = ~((arr == 0) | (arr == 1))
        if np.any(bad):
            raise ValueError(
                f"{name} must hold booleans (or 0 and 1; False/0 marks padding), but holds "
                f"{np.unique(arr[bad])[:5].tolist()}"
            )
        arr = arr == 1
    if arr.shape != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {arr.shape}")
    return arr


def real_array(values, name: str, shape=None, booleans: bool = True) -> np.ndarray:
    """``values`` as a float NumPy array (of ``shape`` when given); complex or non-numeric input (and
    booleans unless ``booleans``) is refused, not cast."""
    arr = np.asarray(values)
    if np.iscomplexobj(arr):
        raise ValueError(f"{name} is complex ({arr.dtype}); hiermeta's likelihoods take real data")
    if not (np.issubdtype(arr.dtype, np.number) or (booleans and arr.dtype == bool)):
        raise ValueError(f"{name} must be real numbers, got dtype {arr.dtype}")
    arr = arr.astype(float)
    if shape is not None and arr.shape != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {arr.shape}")
    return arr




def distinct(values: np.ndarray) -> np.ndarray:
    """``values`` without its broadcast axes (stride 0: every entry along them the same), e.g. a
    design shared by every task given as ``np.broadcast_to``: what a check needs to read."""
    values = np.asarray(values)
    return values[tuple(slice(0, 1) if stride == 0 and n > 1 else slice(None)
                        for stride, n in zip(values.strides, values.shape))]


def all_finite(values: np.ndarray) -> bool:
    """Every value finite, in one pass without a temporary array of the values' size: a finite sum
    says so (a NaN or infinity makes any sum NaN or infinite); only an overflowing sum is checked
    value by value.  Broadcast axes are read once (:func:`distinct`)."""
    values = distinct(values)
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


