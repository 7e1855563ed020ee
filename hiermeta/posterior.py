"""The full posterior of Eq. 1 by NUTS, from the same NumPyro model the meta-learners use.

    p(phi, sigma, theta_{1..T} | D)  propto  p(phi) p(sigma) prod_t N(theta_t | phi, sigma^2) p(D_t | theta_t)

:func:`run_nuts` runs NumPyro's NUTS on a :class:`~hiermeta.HierarchicalModel` as it stands
(optionally with some sites held fixed by ``numpyro.handlers.condition``, e.g. sigma, or phi and
sigma for the posterior of new tasks' theta under empirical-Bayes values), optionally
non-centred (``theta = phi + sigma * z`` by NumPyro's ``LocScaleReparam``), with several chains
(parallel over devices when there are enough, vectorised on one device otherwise).  The result
holds the draws grouped by chain, the sampler statistics, the per-task log-likelihood, and an
ArviZ object (``InferenceData`` on ArviZ 0.x, ``xarray.DataTree`` on ArviZ >= 1) whose
dimensions are named: ``param`` (flat coordinates of theta / phi), ``module`` (sigma), ``task``
(built in :mod:`hiermeta.arviz_io`, re-exported here: :func:`to_arviz`, :func:`summary`).

NUTS needs a proper posterior: give the model proper priors (:func:`with_priors`: a wide normal
on phi, a half-Cauchy or half-normal on sigma) unless the sites are held fixed.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any, Mapping, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
from numpyro.handlers import condition, reparam, trace
from numpyro.infer import MCMC, NUTS
from numpyro.infer.reparam import LocScaleReparam

from .arviz_io import SUMMARY_COLUMNS, _use_datatree, param_names, summary, to_arviz  # noqa: F401  (re-exported)
from .hierarchy import HierarchicalModel
from .tasks import num_tasks

__all__ = [
    "with_priors",
    "NUTSResult",
    "run_nuts",
    "task_log_likelihood",
    "to_arviz",
    "summary",
    "param_names",
    "SUMMARY_COLUMNS",
]

_EXTRA_FIELDS = ("diverging", "num_steps", "accept_prob", "energy", "potential_energy", "adapt_state.step_size")
_STAT_NAMES = {  # NumPyro field -> ArviZ sample_stats name
    "diverging": "diverging",
    "num_steps": "n_steps",
    "accept_prob": "acceptance_rate",
    "energy": "energy",
    "potential_energy": "lp",  # negated below: lp = log density
    "adapt_state.step_size": "step_size",
}


def with_priors(
    model: HierarchicalModel,
    *,
    phi_loc: float | Sequence[float] = 0.0,
    phi_scale: float | Sequence[float] = 10.0,
    sigma: str = "half_cauchy",
    sigma_scale: float | Sequence[float] = 5.0,
) -> HierarchicalModel:
    """The same model with proper hyperpriors: ``phi ~ N(phi_loc, phi_scale^2)`` per coordinate,
    ``sigma_m ~ HalfCauchy(sigma_scale)`` (``sigma="half_cauchy"``) or ``HalfNormal(sigma_scale)``
    (``sigma="half_normal"``) per module."""
    part = model.partition
    P, M = part.num_params, part.num_modules

    def vector(value, n, name, positive):
        arr = np.broadcast_to(np.asarray(value, dtype=float), np.shape(value))
        if arr.ndim > 1 or (arr.ndim == 1 and arr.shape[0] != n):
            raise ValueError(f"{name} must be a scalar or have {n} entries, got shape {arr.shape}")
        if not np.all(np.isfinite(arr)) or (positive and np.any(arr <= 0)):
            raise ValueError(f"{name} must be finite{' and > 0' if positive else ''}, got {value}")
        return jnp.broadcast_to(jnp.asarray(arr), (n,))

    loc, scale = vector(phi_loc, P, "phi_loc", False), vector(phi_scale, P, "phi_scale", True)
    s_scale = vector(sigma_scale, M, "sigma_scale", True)
    families = {"half_cauchy": dist.HalfCauchy, "half_normal": dist.HalfNormal}
    if sigma not in families:
        raise ValueError(f"sigma prior must be one of {sorted(families)}, got {sigma!r}")
    return dataclasses.replace(model, phi_prior=dist.Normal(loc, scale), sigma_prior=families[sigma](s_scale))


class NUTSResult(NamedTuple):
    """Draws and diagnostics of one NUTS run.

    Attributes:
      samples: site -> array ``(chains, draws, ...)``: ``phi`` ``(C, S, P)``, ``sigma`` ``(C, S, M)``,
        ``theta`` ``(C, S, T, P)`` (and ``theta_decentered`` when non-centred), minus fixed sites.
      fixed: the sites held fixed (``condition``), site -> value.
      log_likelihood: ``(C, S, T)`` log p(D_t | theta_t) per draw and task.
      stats: sampler statistics, ArviZ names -> ``(C, S)``: ``diverging``, ``n_steps``,
        ``acceptance_rate``, ``energy``, ``lp``, ``step_size``.
      num_divergences: total divergent transitions after warm-up.
      inference_data: the ArviZ object (see :func:`to_arviz`).
    """

    samples: dict
    fixed: dict
    log_likelihood: np.ndarray
    stats: dict
    num_divergences: int
    inference_data: Any

    def flat(self, site: str) -> np.ndarray:
        """Draws of ``site`` with chains merged: ``(C * S, ...)``."""
        x = self.samples[site]
        return x.reshape((-1,) + x.shape[2:])


def _check_data(model: HierarchicalModel, data) -> int:
    model.likelihood.check(data, "data")
    return num_tasks(data)


def _conditioned_values(model: HierarchicalModel, fixed: Optional[Mapping[str, Any]], T: int) -> dict:
    if not fixed:
        return {}
    part = model.partition
    shapes = {"phi": (part.num_params,), "sigma": (part.num_modules,), "theta": (T, part.num_params)}
    out = {}
    for name, value in fixed.items():
        if name not in shapes:
            raise ValueError(f"can only hold fixed the sites {sorted(shapes)}, got {name!r}")
        arr = np.asarray(value, dtype=float)
        if name == "sigma" and arr.ndim == 0:
            arr = np.full(shapes[name], float(arr))
        if arr.shape != shapes[name]:
            raise ValueError(f"fixed {name} must have shape {shapes[name]}, got {arr.shape}")
        if not np.all(np.isfinite(arr)) or (name == "sigma" and np.any(arr <= 0)):
            raise ValueError(f"fixed {name} must be finite{' and > 0' if name == 'sigma' else ''}")
        out[name] = jnp.asarray(arr)
    return out


def task_log_likelihood(model: HierarchicalModel, theta: jax.Array, data) -> jax.Array:
    """``log p(D_t | theta_t)`` for every task: ``theta`` ``(..., T, P)`` -> ``(..., T)``.

    Read off a trace of the model's task likelihood (the observed sites' log-densities with the
    task axis kept), so it is the density NUTS and the meta-learners use.
    """

    def one(th):
        tr = trace(model.likelihood).get_trace(jax.vmap(model.partition.unravel)(th), data)
        total = 0.0
        for site in tr.values():
            if site["type"] == "sample" and site["is_observed"]:
                lp = site["fn"].log_prob(site["value"])
                total = total + (lp if site["scale"] is None else site["scale"] * lp)
        return total

    batch = theta.shape[:-2]
    flat = theta.reshape((-1,) + theta.shape[-2:])
    return jax.lax.map(one, flat).reshape(batch + (theta.shape[-2],))


def run_nuts(
    model: HierarchicalModel,
    data,
    key: jax.Array,
    *,
    num_warmup: int = 1000,
    num_samples: int = 1000,
    num_chains: int = 4,
    fixed: Optional[Mapping[str, Any]] = None,
    noncentred: bool = False,
    target_accept: float = 0.8,
    max_tree_depth: int = 10,
    dense_mass: bool = False,
    chain_method: Optional[str] = None,
    progress_bar: bool = True,
    task_names: Optional[Sequence[str]] = None,
) -> NUTSResult:
    """NUTS on ``model(data)``: the posterior of ``phi``, ``sigma`` and every task's ``theta``.

    Args:
      model: the hierarchical model; its priors must make the posterior proper (see
        :func:`with_priors`); a flat prior on a site that is sampled raises a warning.
      data: the tasks' data (every observation of each task, e.g. support and query merged).
      key: PRNG key.
      fixed: sites held at given values (``numpyro.handlers.condition``): ``sigma`` (scalar or
        ``(M,)``), ``phi`` ``(P,)``.  E.g. ``{"phi": phi_hat, "sigma": sigma_hat}`` samples each
        task's ``theta`` from its posterior under empirical-Bayes values.
      noncentred: sample ``z = (theta - phi) / sigma`` instead of ``theta`` (``LocScaleReparam(0)``;
        ``theta`` is then a deterministic site), which removes the funnel when sigma is small.
      chain_method: ``"parallel"`` (one chain per device), ``"vectorized"`` (one device) or
        ``"sequential"``; default parallel when there are enough devices, else vectorised.
      task_names: coordinates of the ``task`` dimension in the ArviZ object.
    """
    T = _check_data(model, data)
    for name, value in (("num_warmup", num_warmup), ("num_samples", num_samples), ("num_chains", num_chains)):
        if int(value) < (0 if name == "num_warmup" else 1):
            raise ValueError(f"{name} must be >= {0 if name == 'num_warmup' else 1}, got {value}")
    if not 0.0 < target_accept < 1.0:
        raise ValueError(f"target_accept must be in (0, 1), got {target_accept}")
    if task_names is not None and len(task_names) != T:
        raise ValueError(f"task_names has {len(task_names)} names for {T} tasks")
    fixed_values = _conditioned_values(model, fixed, T)
    improper = [
        name
        for name, prior in (("phi", model.phi_prior), ("sigma", model.sigma_prior))
        if prior is None and name not in fixed_values
    ]
    if improper and "sigma" not in fixed_values:  # a flat phi with sigma fixed is proper
        warnings.warn(
            f"NUTS with a flat improper prior on {improper}: the posterior may be improper; "
            "use hiermeta.posterior.with_priors for proper hyperpriors",
            stacklevel=2,
        )
    if chain_method is None:
        chain_method = "parallel" if jax.local_device_count() >= num_chains > 1 else "vectorized"

    sampled_model = condition(model, fixed_values) if fixed_values else model
    if noncentred:
        sampled_model = reparam(sampled_model, config={"theta": LocScaleReparam(centered=0)})
    kernel = NUTS(sampled_model, target_accept_prob=target_accept, max_tree_depth=max_tree_depth,
                  dense_mass=dense_mass)
    mcmc = MCMC(kernel, num_warmup=int(num_warmup), num_samples=int(num_samples), num_chains=int(num_chains),
                chain_method=chain_method, progress_bar=progress_bar, jit_model_args=True)
    mcmc.run(key, data, extra_fields=_EXTRA_FIELDS)

    samples = {k: np.asarray(v) for k, v in mcmc.get_samples(group_by_chain=True).items() if k not in fixed_values}
    extra = mcmc.get_extra_fields(group_by_chain=True)
    stats = {_STAT_NAMES[k]: np.asarray(v) for k, v in extra.items()}
    stats["lp"] = -stats["lp"]
    theta = samples["theta"] if "theta" in samples else np.broadcast_to(
        np.asarray(fixed_values["theta"]), stats["lp"].shape + (T, model.partition.num_params))
    log_lik = np.asarray(jax.jit(lambda th, d: task_log_likelihood(model, th, d))(jnp.asarray(theta), data))
    idata = to_arviz(samples, model, log_likelihood=log_lik, stats=stats, data=data,
                     constant={k: np.asarray(v) for k, v in fixed_values.items()}, task_names=task_names)
    return NUTSResult(
        samples=samples,
        fixed={k: np.asarray(v) for k, v in fixed_values.items()},
        log_likelihood=log_lik,
        stats=stats,
        num_divergences=int(np.sum(stats["diverging"])),
        inference_data=idata,
    )
