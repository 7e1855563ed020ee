"""The full posterior of Eq. 1 by NUTS, from the same NumPyro model the meta-learners use.

    p(phi, sigma, theta_{1..T} | D)  propto  p(phi) p(sigma) prod_t N(theta_t | phi, sigma^2) p(D_t | theta_t)

:func:`run_nuts` runs NumPyro's NUTS on a :class:`~hiermeta.HierarchicalModel` as it stands
(optionally with some sites held fixed by ``numpyro.handlers.condition``, e.g. sigma, or phi and
sigma for the posterior of new tasks' theta under empirical-Bayes values), optionally
non-centred (``theta = mean + L z``, ``z ~ N(0, I)``, ``L L^T`` the prior covariance), with several chains
(parallel over devices when there are enough, vectorised on one device otherwise).  The result
holds the draws grouped by chain, the sampler statistics, the per-task log-likelihood, and an
ArviZ object (``InferenceData`` on ArviZ 0.x, ``xarray.DataTree`` on ArviZ >= 1) whose
dimensions are named: ``param`` (flat coordinates of theta / phi), ``module`` (sigma), ``task``
(built in :mod:`hiermeta.arviz_io`, re-exported here: :func:`to_arviz`, :func:`summary`).

NUTS needs a proper posterior: give the model proper priors (:func:`with_priors`: a wide normal
on phi, a half-Cauchy or half-normal on sigma) unless the sites are held fixed.  The chains start
near the data's pooled fit and move on the data's scale (:mod:`hiermeta.nuts_start`), so a
response far from unit scale samples as a standardised one does.

Time to result.  Without a progress bar, and unless the chains run in parallel over devices, the
whole run is one compiled program, built once per (model, configuration, data shapes) and
reused by every later call: NumPyro's initialisation (finding valid starting points, the
adaptation's initial state), warm-up, sampling, the constrained draws and the per-task
log-likelihood of every draw.  Run eagerly, NumPyro's initialisation compiles a few hundred
single-operation programs on a cold start and a new ``MCMC`` object retraces its sampling loop on
every call; inside one ``jax.jit`` there is a single compilation (a cache hit in JAX's persistent
cache on the next process) and none on a second call with data of the same shapes.
"""

from __future__ import annotations

import dataclasses
import functools
import time
import warnings
from typing import Any, Mapping, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
from numpyro.distributions import constraints
from numpyro.diagnostics import effective_sample_size, split_gelman_rubin
from numpyro.handlers import condition, trace
from numpyro.infer import MCMC, NUTS

from .arviz_io import SUMMARY_COLUMNS, _use_datatree, param_names, summary, to_arviz  # noqa: F401  (re-exported)
from .errors import PriorWarning, SamplingWarning
from .hierarchy import HierarchicalModel
from .nuts_start import chain_starts, inverse_mass_matrix, sampler_start
from .priors import prior_tail_check, with_priors
from .tasks import num_tasks
from .utils import check_count, check_memory

__all__ = [
    "with_priors",
    "NUTSResult",
    "run_nuts",
    "task_log_likelihood",
    "sampling_diagnostics",
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
      diagnostics: ``max_r_hat`` (split r-hat, worst coordinate of the sampled hyperparameters
        and theta; NaN with one chain), ``min_ess`` (bulk effective sample size, worst
        coordinate), ``num_divergences``, ``converged`` (r-hat <= 1.01, ESS >= 100 per chain, no
        divergence), ``messages`` (what failed; each also a :class:`~hiermeta.errors.SamplingWarning`)
        and ``prior_conflicts``: hyperparameters whose posterior, or the data's own estimate, sits
        in the tail of their prior (:func:`hiermeta.priors.prior_tail_check`; each also a
        :class:`~hiermeta.errors.PriorWarning`).
    """

    samples: dict
    fixed: dict
    log_likelihood: np.ndarray
    stats: dict
    num_divergences: int
    inference_data: Any
    diagnostics: dict = {}

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
    shapes.update({name: tuple(site.shape) for name, site in model.hyper_sites().items()})
    supports = {name: site.constraint for name, site in model.hyper_sites().items()}
    supports["sigma"] = constraints.positive
    out = {}
    for name, value in fixed.items():
        if name not in shapes:
            raise ValueError(f"can only hold fixed the sites {sorted(shapes)}, got {name!r}")
        arr = np.asarray(value, dtype=float)
        if arr.ndim == 0 and shapes[name] and supports.get(name) is not constraints.corr_cholesky:
            arr = np.full(shapes[name], float(arr))
        if arr.shape != shapes[name]:
            raise ValueError(f"fixed {name} must have shape {shapes[name]}, got {arr.shape}")
        if not np.all(np.isfinite(arr)):
            raise ValueError(f"fixed {name} must be finite")
        if name in supports and not bool(np.all(supports[name].check(jnp.asarray(arr)))):
            need = "finite and > 0" if supports[name] is constraints.positive else f"in {supports[name]}"
            raise ValueError(f"fixed {name} must be {need}, got {arr}")
        out[name] = jnp.asarray(arr)
    return out


def _flat_hyperpriors(model: HierarchicalModel, fixed_values: dict) -> list:
    """Sampled sites whose prior is flat on an unbounded support (a posterior may then be improper)."""
    flat = [name for name, prior in (("phi", model.phi_prior), ("sigma", model.sigma_prior))
            if prior is None and name not in fixed_values]
    if model.num_task_covariates and model.gamma_prior is None and "gamma" not in fixed_values:
        flat.append("gamma")
    for name, spec in model.global_params.items():
        if name not in fixed_values and (model.global_priors or {}).get(name, spec.prior) is None:
            flat.append(name)
    return flat


def task_log_likelihood(model: HierarchicalModel, theta: jax.Array, data, extra=None) -> jax.Array:
    """``log p(D_t | theta_t, g)`` for every task: ``theta`` ``(..., T, P)`` -> ``(..., T)``.

    Read off a trace of the model's task likelihood (the observed sites' log-densities with the
    task axis kept), so it is the density NUTS and the meta-learners use.  ``extra``: values of
    the model's global parameters with the same leading (draw) axes ``...`` as ``theta``.
    """

    def one(args):
        th, g = args
        tr = trace(model._call_likelihood).get_trace(jax.vmap(model.partition.unravel)(th), data, g)
        total = 0.0
        for site in tr.values():
            if site["type"] == "sample" and site["is_observed"]:
                lp = site["fn"].log_prob(site["value"])
                total = total + (lp if site["scale"] is None else site["scale"] * lp)
        return total

    batch = theta.shape[:-2]
    flat = theta.reshape((-1,) + theta.shape[-2:])
    g = model.globals_of(extra) if model.global_params else {}
    g = {k: jnp.reshape(jnp.broadcast_to(jnp.asarray(v), batch + jnp.shape(v)[len(batch):]),
                        (flat.shape[0],) + jnp.shape(v)[len(batch):]) for k, v in g.items()}
    return jax.lax.map(one, (flat, g)).reshape(batch + (theta.shape[-2],))


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
    progress_bar: bool = False,
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
      noncentred: sample ``z = L^-1 (theta - prior mean)`` (site ``theta_decentered``) instead of ``theta``
        (as NumPyro's ``LocScaleReparam(0)``, also with correlated blocks;
        ``theta`` is then a deterministic site), which removes the funnel when sigma is small.
      chain_method: ``"parallel"`` (one chain per device), ``"vectorized"`` (one device) or
        ``"sequential"``; default parallel when there are enough devices, else vectorised.
      progress_bar: NumPyro's progress bar.  Off (the default), a vectorised or sequential run
        is one compiled program, cached and reused across calls (see the module's notes); on,
        NumPyro's own loop runs, one dispatch per iteration, traced anew on every call.
      task_names: coordinates of the ``task`` dimension in the ArviZ object.

    ``result.diagnostics["seconds"]`` records where the time went: ``sampling`` (NUTS, with the
    log-likelihood when compiled together), ``log_likelihood``, ``arviz``, ``diagnostics``.
    """
    T = _check_data(model, data)
    depths = max_tree_depth if isinstance(max_tree_depth, tuple) else (max_tree_depth,)  # NumPyro: d or (d1, d2)
    for name, value, least in [("num_warmup", num_warmup, 0), ("num_samples", num_samples, 1),
                               ("num_chains", num_chains, 1)] + [("max_tree_depth", d, 1) for d in depths]:
        check_count(value, name, least)
    if not 0.0 < target_accept < 1.0:
        raise ValueError(f"target_accept must be in (0, 1), got {target_accept}")
    P, M = model.partition.num_params, model.partition.num_modules
    per_draw = T * P * (2 if noncentred else 1) + T + P + M + len(_EXTRA_FIELDS) + sum(
        int(np.prod(site.shape)) for site in model.hyper_sites().values())
    check_memory(8.0 * per_draw * num_chains * num_samples, f"{num_chains} chain(s) of num_samples={num_samples} "
                                                            f"draws ({per_draw} numbers each)")
    if task_names is not None and len(task_names) != T:
        raise ValueError(f"task_names has {len(task_names)} names for {T} tasks")
    fixed_values = _conditioned_values(model, fixed, T)
    improper = _flat_hyperpriors(model, fixed_values)
    if improper and not (improper == ["phi"] and "sigma" in fixed_values):  # a flat phi with sigma fixed is proper
        warnings.warn(
            f"NUTS with a flat improper prior on {improper}: the posterior may be improper; "
            "use hiermeta.posterior.with_priors for proper hyperpriors",
            stacklevel=2,
        )
    if chain_method is None:
        chain_method = "parallel" if jax.local_device_count() >= num_chains > 1 else "vectorized"

    config = _SamplerConfig(bool(noncentred), tuple(sorted(fixed_values)), int(num_warmup), int(num_samples),
                            int(num_chains), chain_method, float(target_accept), _hashable(max_tree_depth),
                            _hashable(dense_mass))
    seconds = {}
    clock = time.perf_counter()
    start = sampler_start(model, data, fixed_values, bool(noncentred))  # the data's own fit and scale
    if progress_bar or chain_method == "parallel":  # NumPyro's own loop (a bar; pmap over devices)
        mcmc = _run_mcmc(model, config, fixed_values, progress_bar, key, data, start)
        draws, extra = mcmc.get_samples(group_by_chain=True), mcmc.get_extra_fields(group_by_chain=True)
        jax.block_until_ready((draws, extra))
        seconds["sampling"] = time.perf_counter() - clock
        clock = time.perf_counter()
        log_lik = _log_likelihood_program(model)(draws, extra, data, fixed_values)
        jax.block_until_ready(log_lik)
        seconds["log_likelihood"] = time.perf_counter() - clock
    else:  # one compiled program: initialisation, warm-up, sampling and the log-likelihood
        draws, extra, log_lik = _compiled_run(model, config)(key, data, fixed_values, start)
        jax.block_until_ready(log_lik)
        seconds["sampling"], seconds["log_likelihood"] = time.perf_counter() - clock, 0.0
    clock = time.perf_counter()
    samples = {k: np.asarray(v) for k, v in draws.items() if k not in fixed_values}
    stats = {_STAT_NAMES[k]: np.asarray(v) for k, v in extra.items()}
    stats["lp"] = -stats["lp"]
    log_lik = np.asarray(log_lik)
    idata = to_arviz(samples, model, log_likelihood=log_lik, stats=stats, data=data,
                     constant={k: np.asarray(v) for k, v in fixed_values.items()}, task_names=task_names)
    seconds["arviz"] = time.perf_counter() - clock
    clock = time.perf_counter()
    diagnostics = sampling_diagnostics(model, samples, stats, data)
    seconds["diagnostics"] = time.perf_counter() - clock
    diagnostics["seconds"] = seconds
    for message in diagnostics["messages"]:
        warnings.warn(message, SamplingWarning, stacklevel=2)
    for message in diagnostics["prior_conflicts"]:
        warnings.warn(message, PriorWarning, stacklevel=2)
    return NUTSResult(
        samples=samples,
        fixed={k: np.asarray(v) for k, v in fixed_values.items()},
        log_likelihood=log_lik,
        stats=stats,
        num_divergences=int(np.sum(stats["diverging"])),
        inference_data=idata,
        diagnostics=diagnostics,
    )


class _SamplerConfig(NamedTuple):
    """Everything about a NUTS run that fixes its compiled program (with the model and data shapes)."""

    noncentred: bool
    fixed_names: tuple
    num_warmup: int
    num_samples: int
    num_chains: int
    chain_method: str
    target_accept: float
    max_tree_depth: Any
    dense_mass: Any


def _hashable(value):
    """``max_tree_depth`` / ``dense_mass`` as a cache key (lists of site tuples become tuples)."""
    return tuple(_hashable(v) for v in value) if isinstance(value, (list, tuple)) else value


def _unhashable(value):
    """Back to the form NumPyro takes: ``dense_mass`` a bool or a list of tuples of site names."""
    return [tuple(v) for v in value] if isinstance(value, tuple) and all(isinstance(v, tuple) for v in value) \
        else value


def _run_mcmc(model: HierarchicalModel, config: _SamplerConfig, fixed_values: dict, progress_bar: bool, key,
              data, start: tuple) -> MCMC:
    """NumPyro's ``MCMC.run``, each chain started near the data's fit, on its scale (``start``:
    :func:`hiermeta.nuts_start.sampler_start`)."""
    key, key_start = jax.random.split(key)
    mcmc = _make_mcmc(model, config, fixed_values, progress_bar, start[1])
    mcmc.run(key, data, extra_fields=_EXTRA_FIELDS, init_params=chain_starts(key_start, *start, config.num_chains))
    return mcmc


def _make_mcmc(model: HierarchicalModel, config: _SamplerConfig, fixed_values: dict, progress_bar: bool,
               unit: Optional[dict] = None) -> MCMC:
    sampled_model = functools.partial(model, noncentred=True) if config.noncentred else model
    if fixed_values:
        sampled_model = condition(sampled_model, fixed_values)
    dense_mass = _unhashable(config.dense_mass)
    kernel = NUTS(sampled_model, target_accept_prob=config.target_accept, max_tree_depth=config.max_tree_depth,
                  dense_mass=dense_mass, inverse_mass_matrix=None if unit is None else inverse_mass_matrix(unit, dense_mass))
    return MCMC(kernel, num_warmup=config.num_warmup, num_samples=config.num_samples,
                num_chains=config.num_chains, chain_method=config.chain_method, progress_bar=progress_bar,
                jit_model_args=True)


def _draws_log_likelihood(model: HierarchicalModel, draws: dict, extra: dict, data, fixed_values: dict) -> jax.Array:
    """``(C, S, T)`` log p(D_t | theta_t, g) of every draw (fixed sites broadcast over the draws)."""
    lead = jnp.shape(extra["potential_energy"])  # (C, S)

    def of(name):
        if name in fixed_values:
            value = jnp.asarray(fixed_values[name])
            return jnp.broadcast_to(value, lead + jnp.shape(value))
        return draws[name]

    return task_log_likelihood(model, of("theta"), data, {name: of(name) for name in model.global_params})


@functools.lru_cache(maxsize=32)
def _log_likelihood_program(model: HierarchicalModel):
    """The jitted :func:`_draws_log_likelihood` of ``model``, built once (not per call)."""
    return jax.jit(functools.partial(_draws_log_likelihood, model))


@functools.lru_cache(maxsize=32)
def _compiled_run(model: HierarchicalModel, config: _SamplerConfig):
    """``(key, data, fixed_values, start) -> (draws, sampler fields, log-likelihood)`` as one jitted program.

    NumPyro's ``MCMC.run`` traced inside ``jax.jit``: its initialisation, which it otherwise runs
    eagerly operation by operation (hundreds of tiny compilations on a cold start), the warm-up and
    sampling loop and the postprocessing (constrained and deterministic sites) become one program,
    together with the per-task log-likelihood of every draw.  The sites held fixed are traced
    arguments, so other fixed values reuse the program, as are the chains' start and unit scales
    (``start``, :func:`hiermeta.nuts_start.sampler_start`).  Built once per (model, configuration).
    """

    def run(key, data, fixed_values, start):
        mcmc = _run_mcmc(model, config, fixed_values, False, key, data, start)
        draws, extra = mcmc.get_samples(group_by_chain=True), mcmc.get_extra_fields(group_by_chain=True)
        return draws, extra, _draws_log_likelihood(model, draws, extra, data, fixed_values)

    return jax.jit(run)


def sampling_diagnostics(model: Optional[HierarchicalModel], samples: Mapping[str, np.ndarray], stats: Mapping,
                         data: Any = None) -> dict:
    """Convergence of a NUTS run: split r-hat, bulk ESS, divergences, and the prior-tail check.

    ``model`` None (a model that is not a :class:`~hiermeta.HierarchicalModel`, e.g. the mixed-model
    engine's NumPyro model): no prior-tail check here (``prior_conflicts`` empty; the caller checks).
    """
    C, S = np.shape(stats["diverging"])
    r_hat, ess, worst = -np.inf, np.inf, {}
    for name, draws in samples.items():
        draws = np.asarray(draws, dtype=float)
        if draws.size == 0 or not np.all(np.isfinite(draws)):
            continue
        if name.startswith("corr_chol_"):  # the diagonal of a Cholesky factor is not free
            d = draws.shape[-1]
            draws = draws[..., np.tril_indices(d, -1)[0], np.tril_indices(d, -1)[1]]
        flat = draws.reshape(C, S, -1)
        varying = np.ptp(flat, axis=(0, 1)) > 0
        if not varying.any():
            continue
        flat = flat[..., varying]
        if C >= 2 and S >= 4:
            rh = np.asarray(split_gelman_rubin(flat))
            if np.nanmax(rh) > r_hat:
                r_hat, worst["r_hat"] = float(np.nanmax(rh)), name
        if S >= 4:
            e = np.asarray(effective_sample_size(flat))
            if np.nanmin(e) < ess:
                ess, worst["ess"] = float(np.nanmin(e)), name
    divergences = int(np.sum(stats["diverging"]))
    messages = []
    if divergences:
        messages.append(f"NUTS: {divergences} divergent transition(s) after warm-up: the posterior has regions "
                        "the sampler cannot explore (try noncentred=True or a higher target_accept)")
    if np.isfinite(r_hat) and r_hat > 1.01:
        messages.append(f"NUTS: r-hat {r_hat:.3f} > 1.01 (worst: {worst['r_hat']}): the chains disagree, "
                        "run longer or reparametrise")
    if np.isfinite(ess) and ess < 100 * C:
        messages.append(f"NUTS: bulk ESS {ess:.0f} < {100 * C} (100 per chain; worst: {worst['ess']}): "
                        "too few effective draws for reliable summaries")
    tail = prior_tail_check(model, samples, data) if model is not None else []  # None: the caller checks its priors
    return {
        "max_r_hat": r_hat if np.isfinite(r_hat) else float("nan"),
        "min_ess": ess if np.isfinite(ess) else float("nan"),
        "num_divergences": divergences,
        "converged": not messages,
        "messages": messages,
        "prior_conflicts": tail,
    }
