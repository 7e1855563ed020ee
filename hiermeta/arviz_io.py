"""NUTS draws as an ArviZ object whose labels match the draws on ArviZ 0.x and 1.x.

ArviZ 0.x holds the groups of a run in an ``arviz.InferenceData``; ArviZ >= 1 (arviz-base,
-stats, -plots) in an ``xarray.DataTree`` with the same groups.  :func:`to_arviz` builds either.

Dimension order is chosen so that ArviZ 1.x labels its rows correctly.  ``az.summary`` there
stacks the variables with ``xarray.Dataset.to_stacked_array``, which orders the stacked dimensions
by their first appearance over the selected variables, and labels the rows by each variable's own
dimension order; the two agree only if every variable lists its dimensions in one common order.
``phi`` is ``(param,)`` and is often selected before ``theta``, so ``param`` comes first
everywhere: ``theta[param, task]``.  For the same reason the posterior group carries no
coordinate that only some of its variables have (``az.summary(idata)`` refuses to stack them):
the module of each coordinate, ``param_module``, is a variable of ``constant_data``.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

import jax
import numpy as np

from .hierarchy import HierarchicalModel
from .partition import ModulePartition
from .tasks import GaussianData

__all__ = ["to_arviz", "summary", "param_names", "SUMMARY_COLUMNS"]

# the az.summary columns shared by ArviZ 0.x and 1.x (their interval columns differ)
SUMMARY_COLUMNS = ("mean", "sd", "mcse_mean", "mcse_sd", "ess_bulk", "ess_tail", "r_hat")

# dimensions after (chain, draw) of the sites run_nuts returns, with their axis in the draws
_SITE_DIMS = {
    "phi": ("param",),
    "sigma": ("module",),
    "theta": ("param", "task"),
    "theta_decentered": ("param", "task"),
    "gamma": ("param", "covariate"),
}
# draws of these sites are (..., T, P) (gamma: (..., Q, P)): moved to (..., P, T) so that param
# comes first; other sites (correlation factors, the likelihood's globals) get dims <name>_dim_i
_TASK_BY_PARAM = ("theta", "theta_decentered", "gamma")


def _use_datatree() -> bool:
    """True on ArviZ >= 1 (``xarray.DataTree``), False on ArviZ 0.x (``InferenceData``)."""
    import arviz as az

    major = str(getattr(az, "__version__", "0")).split(".")[0]
    return int(major) >= 1 if major.isdigit() else False


def _key_name(key) -> str:
    for attr in ("key", "name", "idx"):  # DictKey, GetAttrKey, SequenceKey / FlattenedIndexKey
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def param_names(partition: ModulePartition) -> list:
    """A readable name for each flat coordinate, in the order of ``ravel_pytree``.

    ``{"Intercept": 0.0, "Days": 0.0}`` gives ``["Days", "Intercept"]`` (JAX sorts dict keys);
    ``{"w": zeros((2, 2)), "b": 0.0}`` gives ``["b", "w[0,0]", "w[0,1]", "w[1,0]", "w[1,1]"]``;
    a bare array gives the flat indices ``0 .. P-1``.  Falls back to the indices if two
    coordinates would share a name.
    """
    paths_leaves, _ = jax.tree_util.tree_flatten_with_path(partition.template)
    if len(paths_leaves) == 1 and not paths_leaves[0][0]:
        return list(range(partition.num_params))
    names: list = []
    for path, leaf in paths_leaves:
        base = ".".join(_key_name(k) for k in path)
        shape = np.shape(leaf)
        if not shape:
            names.append(base)
        else:
            names.extend(f"{base}[{','.join(map(str, idx))}]" for idx in np.ndindex(*shape))
    if len(names) != partition.num_params or len(set(names)) != len(names):
        return list(range(partition.num_params))
    return names


def _dims(name: str, ndim: int, table: Mapping[str, tuple]) -> tuple:
    dims = table.get(name)
    if dims is None or len(dims) != ndim:
        dims = tuple(f"{name}_dim_{i}" for i in range(ndim))
    return dims


def _as_param_by_task(name: str, arr: np.ndarray, sample_ndim: int) -> np.ndarray:
    """``(..., T, P)`` draws of theta (``(..., Q, P)`` of gamma) as ``(..., P, T)``; other sites unchanged."""
    if name in _TASK_BY_PARAM and arr.ndim == sample_ndim + 2:
        return np.swapaxes(arr, -1, -2)
    return arr


def to_arviz(
    samples: Mapping[str, np.ndarray],
    model: HierarchicalModel,
    *,
    log_likelihood: Optional[np.ndarray] = None,
    stats: Optional[Mapping[str, np.ndarray]] = None,
    data: Any = None,
    constant: Optional[Mapping[str, np.ndarray]] = None,
    task_names: Optional[Sequence] = None,
    datatree: Optional[bool] = None,
):
    """Draws grouped by chain (site -> ``(C, S, ...)``, theta ``(C, S, T, P)`` as in
    :class:`~hiermeta.posterior.NUTSResult`) as an ArviZ object with named dimensions.

    Groups:

    * ``posterior``: ``phi[param]``, ``sigma[module]``, ``theta[param, task]`` (and
      ``theta_decentered[param, task]``), ``gamma[param, covariate]`` with task covariates, and
      the other sampled sites (correlation factors ``corr_chol_k``, the likelihood's globals
      such as ``noise_sd``) with dimensions ``<site>_dim_i``;
    * ``log_likelihood``: ``obs[task]``, the task likelihood per task (LOO over tasks);
    * ``sample_stats``: the sampler statistics;
    * ``observed_data``: ``obs[task, observation, dim]`` for :class:`~hiermeta.GaussianData`;
    * ``constant_data``: ``param_module[param]`` (the module name of each coordinate) and the
      sites held fixed (``sigma[module]``, ``phi[param]``, ``theta[param, task]``).

    Coordinates: ``param`` (:func:`param_names`), ``module`` (the partition's module names),
    ``task`` (``task_names``, default ``0 .. T-1``), so rows read ``theta[Days, 3]``.
    Returns ``arviz.InferenceData`` on ArviZ 0.x and ``xarray.DataTree`` on ArviZ >= 1
    (``datatree`` overrides the choice).
    """
    import xarray as xr

    part = model.partition
    sites = {k: np.asarray(v) for k, v in samples.items()}
    if not sites:
        raise ValueError("no draws to convert")
    C, S = next(iter(sites.values())).shape[:2]
    T = None
    for name in _TASK_BY_PARAM:
        if name in sites:
            T = sites[name].shape[2]
    if T is None and log_likelihood is not None:
        T = np.shape(log_likelihood)[2]
    if T is None and constant and "theta" in constant:
        T = np.shape(constant["theta"])[0]
    if task_names is not None and T is not None and len(task_names) != T:
        raise ValueError(f"task_names has {len(task_names)} names for {T} tasks")
    coords = {
        "chain": np.arange(C),
        "draw": np.arange(S),
        "param": param_names(part),
        "module": list(part.names),
    }
    if T is not None:
        coords["task"] = list(task_names) if task_names is not None else list(range(T))
    if getattr(model, "num_task_covariates", 0):
        coords["covariate"] = list(range(model.num_task_covariates))

    def dataset(arrays: Mapping[str, np.ndarray], sample_dims=("chain", "draw"), dims_table=_SITE_DIMS):
        variables = {}
        for name, arr in arrays.items():
            arr = _as_param_by_task(name, np.asarray(arr), len(sample_dims))
            dims = tuple(sample_dims) + _dims(name, arr.ndim - len(sample_dims), dims_table)
            variables[name] = (dims, arr)
        used = {d for dims, _ in variables.values() for d in dims}
        return xr.Dataset(variables, coords={k: v for k, v in coords.items() if k in used})

    groups = {"posterior": dataset(sites)}
    if log_likelihood is not None:
        groups["log_likelihood"] = dataset({"obs": log_likelihood}, dims_table={"obs": ("task",)})
    if stats:
        groups["sample_stats"] = dataset(dict(stats))
    if isinstance(data, GaussianData):
        groups["observed_data"] = dataset({"obs": np.asarray(data.obs)}, sample_dims=(),
                                          dims_table={"obs": ("task", "observation", "dim")})
    fixed = {"param_module": np.asarray([part.names[i] for i in part.index])}
    fixed.update({k: np.asarray(v) for k, v in (constant or {}).items()})
    groups["constant_data"] = dataset(fixed, sample_dims=(), dims_table={**_SITE_DIMS, "param_module": ("param",)})
    if datatree if datatree is not None else _use_datatree():
        return xr.DataTree.from_dict(groups)
    import arviz as az

    return az.InferenceData(**groups)


def summary(result_or_data, var_names: Optional[Sequence[str]] = None):
    """``az.summary`` unrounded, restricted to the columns ArviZ 0.x and 1.x share
    (:data:`SUMMARY_COLUMNS`); rows labelled ``phi[<param>]``, ``sigma[<module>]``,
    ``theta[<param>, <task>]``.

    ``result_or_data`` is a :class:`~hiermeta.posterior.NUTSResult` or its ``inference_data``;
    ``var_names`` defaults to those of ``phi`` and ``sigma`` that were sampled.
    """
    import arviz as az

    idata = getattr(result_or_data, "inference_data", result_or_data)
    available = list(idata["posterior"].data_vars)
    if var_names is None:
        var_names = [v for v in ("phi", "sigma") if v in available]
    var_names = [var_names] if isinstance(var_names, str) else list(var_names)
    missing = [v for v in var_names if v not in available]
    if missing or not var_names:
        raise ValueError(f"no posterior draws of {missing or 'any variable'}; the posterior holds {available}"
                         " (sites held fixed are in constant_data)")
    table = az.summary(idata, var_names=var_names, round_to="none")
    return table[[c for c in SUMMARY_COLUMNS if c in table.columns]]
