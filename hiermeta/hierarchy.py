"""The hierarchical model of Chen et al. (Eq. 1) as one NumPyro model, with its extensions.

    phi        ~ p(phi)                      site "phi",   shape (P,)   (flat by default)
    sigma      ~ p(sigma)                    site "sigma", shape (M,)   (flat on (0, inf) by default)
    corr_chol_k ~ p(C_k)                     per correlated block k     (flat / LKJ)
    gamma      ~ p(gamma)                    site "gamma", shape (Q, P) (only with task covariates)
    g          ~ p(g)                        the likelihood's global parameters (e.g. noise_sd)
    theta_t    ~ N(phi + z_t gamma, Sigma),  t = 1..T   site "theta", shape (T, P), plate "tasks"
    D_t        ~ p(D_t | theta_t, g)         the domain's task likelihood (observed sites)

``Sigma`` is ``diag(sigma[module]^2)`` (Eq. 1: module m's coordinates share sigma_m), except on a
*correlated block* of coordinates B, where ``Sigma_BB = diag(s_B) C_B diag(s_B)`` with ``s_B``
the coordinates' module scales and ``C_B`` a full correlation matrix (lme4's ``(1 + x | g)``).

Every method reads its densities from this one model: the per-task MAP objective and the
predictive log-likelihood are sums of site log-densities from a NumPyro ``trace`` under
``substitute``; NUTS runs the model as it stands.  Nothing here restates a density by hand.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from numpyro.distributions import constraints
from numpyro.handlers import substitute, trace

from .partition import ModulePartition
from .sites import GlobalParam, HyperSite, default_init
from .tasks import TaskLikelihood, num_tasks

__all__ = ["HierarchicalModel", "HYPER_SITES", "task_covariates_of"]

HYPER_SITES = ("phi", "sigma")


def _site_log_prob(site) -> jax.Array:
    """Total log-density of one sample site, honouring NumPyro's scale (as ``log_density``)."""
    log_prob = site["fn"].log_prob(site["value"])
    if site["scale"] is not None:
        log_prob = site["scale"] * log_prob
    return jnp.sum(log_prob)


def _expand_task_axis(tree):
    return jax.tree_util.tree_map(lambda a: jnp.asarray(a)[None], tree)


def task_covariates_of(data) -> Optional[jax.Array]:
    """The ``(T, Q)`` task covariates a data object carries (attribute ``task_covariates``), or None."""
    return getattr(data, "task_covariates", None)


def _global_params(likelihood) -> dict:
    declared = getattr(likelihood, "global_params", None) or {}
    out = {}
    for name, spec in dict(declared).items():
        if not isinstance(spec, GlobalParam):
            raise ValueError(f"the likelihood's global parameter {name!r} must be a hiermeta.GlobalParam")
        out[name] = spec
    return out


@dataclass(frozen=True, eq=False)
class HierarchicalModel:
    """Eq. 1 over a module partition of the parameters, with a domain's task likelihood.

    Calling the object runs the NumPyro model: ``model(data)`` for data with a leading task
    axis, or ``model(None, num_tasks=T)`` to sample from the prior.

    Args:
      likelihood: the domain's :class:`~hiermeta.tasks.TaskLikelihood`; its ``global_params``
        (name -> :class:`~hiermeta.GlobalParam`, if it has any) become sites shared by all tasks.
      partition: :class:`~hiermeta.partition.ModulePartition` of the task parameters.
      phi_prior: distribution with event shape ``(P,)`` for the central parameters, or None for
        a flat (improper) prior, the empirical-Bayes default.
      sigma_prior: distribution with event shape ``(M,)`` and positive support, or None for a
        flat improper prior on ``(0, inf)``.
      correlated: blocks of modules (names or indices) whose coordinates are correlated a priori:
        each block gets a full correlation matrix (site ``corr_chol_k``, its Cholesky factor).
      corr_concentration: LKJ concentration of the correlation priors (NUTS); None is flat.
      num_task_covariates: Q; the prior mean of task t is ``phi + z_t @ gamma``, ``z_t`` the
        ``task_covariates`` ``(T, Q)`` attribute of the task data.
      gamma_prior: distribution with batch + event shape ``(Q, P)`` for gamma; None is flat.
      global_priors: name -> distribution overriding the likelihood's priors of its globals.
    """

    likelihood: TaskLikelihood
    partition: ModulePartition
    phi_prior: Optional[dist.Distribution] = None
    sigma_prior: Optional[dist.Distribution] = None
    correlated: Sequence[Sequence[Any]] = ()
    corr_concentration: Optional[float] = None
    num_task_covariates: int = 0
    gamma_prior: Optional[dist.Distribution] = None
    global_priors: Optional[Mapping[str, dist.Distribution]] = None

    def __post_init__(self):
        if not isinstance(self.partition, ModulePartition):
            raise ValueError("partition must be a hiermeta.ModulePartition")
        missing = [
            name
            for name in ("num_observations", "log_normaliser", "check")
            if not callable(getattr(self.likelihood, name, None))
        ]
        if not callable(self.likelihood) or missing:
            raise ValueError(
                "likelihood must be a TaskLikelihood: a callable NumPyro function with methods "
                f"num_observations, log_normaliser and check (missing: {missing})"
            )
        P, M = self.partition.num_params, self.partition.num_modules
        Q = self.num_task_covariates
        if isinstance(Q, bool) or int(Q) != Q or Q < 0:
            raise ValueError(f"num_task_covariates must be an integer >= 0, got {Q!r}")
        priors = (("phi_prior", self.phi_prior, (P,)), ("sigma_prior", self.sigma_prior, (M,)),
                  ("gamma_prior", self.gamma_prior, (int(Q), P)))
        for name, prior, shape in priors:
            if prior is not None and tuple(prior.batch_shape + prior.event_shape) != shape:
                raise ValueError(
                    f"{name} must have batch_shape + event_shape == {shape}, got "
                    f"{prior.batch_shape + prior.event_shape}"
                )
        if self.gamma_prior is not None and Q == 0:
            raise ValueError("gamma_prior given but num_task_covariates is 0")
        if self.corr_concentration is not None and not (
            np.isfinite(self.corr_concentration) and self.corr_concentration > 0
        ):
            raise ValueError(f"corr_concentration must be finite and > 0, got {self.corr_concentration}")
        object.__setattr__(self, "_blocks", self._coordinate_blocks())
        globals_ = _global_params(self.likelihood)
        reserved = {"phi", "sigma", "theta", "theta_decentered", "gamma"} | {
            f"corr_chol_{k}" for k in range(len(self._blocks))
        }
        clash = sorted(set(globals_) & reserved)
        if clash:
            raise ValueError(f"the likelihood's global parameters {clash} clash with the model's own sites")
        unknown = sorted(set(self.global_priors or {}) - set(globals_))
        if unknown:
            raise ValueError(
                f"global_priors for {unknown}, but the likelihood declares only {sorted(globals_)}"
            )
        for name, prior in (self.global_priors or {}).items():
            shape = tuple(prior.batch_shape + prior.event_shape)
            if shape != tuple(globals_[name].shape):
                raise ValueError(f"the prior of {name} has shape {shape}, the site {tuple(globals_[name].shape)}")
        object.__setattr__(self, "_globals", globals_)
        object.__setattr__(self, "_hyper", self._build_hyper_sites())

    def _coordinate_blocks(self) -> tuple:
        """Each correlated block as the sorted flat coordinates of its modules."""
        part = self.partition
        seen: set = set()
        blocks = []
        if isinstance(self.correlated, (str, bytes)):
            raise ValueError("correlated must be a sequence of blocks (each a sequence of module names)")
        for block in self.correlated:
            if isinstance(block, (str, bytes)) or not isinstance(block, Sequence):
                raise ValueError(
                    f"each correlated block must be a sequence of module names or indices, got {block!r}"
                )
            modules = []
            for label in block:
                if isinstance(label, (int, np.integer)) and not isinstance(label, bool):
                    if not 0 <= int(label) < part.num_modules:
                        raise ValueError(f"correlated module index {label} is out of range 0..{part.num_modules - 1}")
                    modules.append(int(label))
                elif label in part.names:
                    modules.append(part.names.index(label))
                else:
                    raise ValueError(f"correlated block names module {label!r}; the modules are {list(part.names)}")
            if len(set(modules)) != len(modules):
                raise ValueError(f"correlated block {list(block)} names a module twice")
            if seen & set(modules):
                raise ValueError(f"module(s) {sorted(seen & set(modules))} appear in two correlated blocks")
            seen |= set(modules)
            coords = np.flatnonzero(np.isin(part.index, modules))
            if coords.size < 2:
                raise ValueError(f"correlated block {list(block)} holds {coords.size} coordinate; it needs 2 or more")
            blocks.append(coords)
        return tuple(blocks)

    # ------------------------------------------------------------------ extra hyperparameters
    @property
    def correlation_blocks(self) -> tuple:
        """Flat coordinate indices of each correlated block (sorted)."""
        return self._blocks

    @property
    def global_params(self) -> dict:
        """The likelihood's global parameters, name -> :class:`~hiermeta.GlobalParam`."""
        return dict(self._globals)

    def hyper_sites(self) -> dict:
        """Every hyperparameter site besides phi and sigma: name -> :class:`~hiermeta.sites.HyperSite`.

        In order: ``corr_chol_k`` (one per correlated block, ``(d_k, d_k)``), ``gamma``
        ``(Q, P)`` (with task covariates), then the likelihood's globals.  Empty for Eq. 1 as in
        the paper.
        """
        return dict(self._hyper)

    def _build_hyper_sites(self) -> dict:
        sites = {}
        for k, coords in enumerate(self._blocks):
            d = int(coords.size)
            sites[f"corr_chol_{k}"] = HyperSite((d, d), constraints.corr_cholesky, np.eye(d), "correlation")
        Q = int(self.num_task_covariates)
        if Q:
            shape = (Q, self.partition.num_params)
            sites["gamma"] = HyperSite(shape, constraints.real, np.zeros(shape), "group_coefficients")
        for name, spec in self._globals.items():
            init = default_init(spec.shape, spec.constraint) if spec.init is None else np.broadcast_to(
                np.asarray(spec.init, dtype=float), tuple(spec.shape))
            sites[name] = HyperSite(tuple(spec.shape), spec.constraint, np.asarray(init), "global")
        return sites

    def globals_of(self, extra: Optional[Mapping[str, Any]]) -> dict:
        """The likelihood's global parameters out of a dict of extra site values."""
        if not self._globals:
            return {}
        extra = extra or {}
        missing = sorted(set(self._globals) - set(extra))
        if missing:
            raise ValueError(f"values for the global parameters {missing} are needed (pass extra=...)")
        return {name: extra[name] for name in self._globals}

    def task_covariates(self, data) -> Optional[jax.Array]:
        """``(T, Q)`` covariates of the tasks in ``data`` (None when the model has none)."""
        Q = int(self.num_task_covariates)
        if Q == 0:
            return None
        z = task_covariates_of(data)
        if z is None:
            raise ValueError(
                f"the model has {Q} task covariate(s): the task data needs a task_covariates attribute (T, {Q})"
            )
        z = jnp.asarray(z)
        if z.ndim != 2 or z.shape[1] != Q:
            raise ValueError(f"task_covariates must have shape (tasks, {Q}), got {z.shape}")
        return z

    # ------------------------------------------------------------------ the prior of theta
    def prior_mean(self, phi, extra=None, z=None) -> jax.Array:
        """``phi + z @ gamma``: ``(P,)`` without task covariates, ``(T, P)`` with ``z`` ``(T, Q)``."""
        phi = jnp.asarray(phi)
        if not self.num_task_covariates:
            return phi
        if z is None:
            raise ValueError("the model has task covariates: give z")
        return phi + jnp.asarray(z) @ (extra or {})["gamma"]

    def prior_scale_tril(self, sigma, extra=None) -> jax.Array:
        """Lower-triangular ``L`` ``(P, P)`` with ``Sigma = L L^T`` (the dense prior covariance factor).

        Diagonal ``sd = sigma[module]`` outside correlated blocks; ``diag(s_B) L_B`` on block B (its
        coordinates sorted, so ``L`` stays lower triangular).
        """
        sd = self.partition.expand(jnp.asarray(sigma))
        L = jnp.diag(sd)
        for k, coords in enumerate(self._blocks):
            block = sd[coords][:, None] * (extra or {})[f"corr_chol_{k}"]
            L = L.at[np.ix_(coords, coords)].set(block)
        return L

    def prior_cov(self, sigma, extra=None) -> jax.Array:
        """The dense prior covariance ``Sigma`` ``(P, P)`` of a task's theta."""
        L = self.prior_scale_tril(sigma, extra)
        return L @ L.T

    def prior_cov_operator(self, sigma, extra=None):
        """``Sigma`` for the implicit-gradient solvers: the per-coordinate variance ``(P,)`` when it is
        diagonal, else the map ``u -> Sigma u`` (block by block; no P x P matrix)."""
        sd = self.partition.expand(jnp.asarray(sigma))
        if not self._blocks:
            return sd**2
        chols = [sd[coords][:, None] * (extra or {})[f"corr_chol_{k}"] for k, coords in enumerate(self._blocks)]

        def apply(u):
            out = sd**2 * u
            for coords, Lb in zip(self._blocks, chols):
                out = out.at[coords].set(Lb @ (Lb.T @ u[coords]))
            return out

        return apply

    def _theta_distribution(self, mean, sigma, extra):
        if not self._blocks:
            return dist.Normal(mean, self.partition.expand(sigma)).to_event(1)
        return dist.MultivariateNormal(mean, scale_tril=self.prior_scale_tril(sigma, extra))

    # ------------------------------------------------------------------ the NumPyro model
    def __call__(self, data=None, num_tasks: Optional[int] = None, noncentred: bool = False):
        T = self._num_tasks(data, num_tasks)
        P, M = self.partition.num_params, self.partition.num_modules
        phi_prior, sigma_prior = self.phi_prior, self.sigma_prior
        if phi_prior is None:
            phi_prior = dist.ImproperUniform(constraints.real, (), (P,))
        if sigma_prior is None:
            sigma_prior = dist.ImproperUniform(constraints.positive, (), (M,))
        phi = numpyro.sample("phi", phi_prior.to_event())
        sigma = numpyro.sample("sigma", sigma_prior.to_event())
        extra = {}
        for k, coords in enumerate(self._blocks):
            d = int(coords.size)
            prior = (dist.ImproperUniform(constraints.corr_cholesky, (), (d, d))
                     if self.corr_concentration is None else dist.LKJCholesky(d, self.corr_concentration))
            extra[f"corr_chol_{k}"] = numpyro.sample(f"corr_chol_{k}", prior)
        Q = int(self.num_task_covariates)
        if Q:
            prior = self.gamma_prior or dist.ImproperUniform(constraints.real, (), (Q, P))
            extra["gamma"] = numpyro.sample("gamma", prior.to_event())
        for name, spec in self._globals.items():
            prior = (self.global_priors or {}).get(name, spec.prior)
            if prior is None:
                prior = dist.ImproperUniform(spec.constraint, (), tuple(spec.shape))
            extra[name] = numpyro.sample(name, prior.to_event())
        mean = self.prior_mean(phi, extra, self.task_covariates(data) if Q else None)
        with numpyro.plate("tasks", T):
            if noncentred:  # theta = mean + L z, z ~ N(0, I): no funnel when sigma is small
                z = numpyro.sample("theta_decentered", dist.Normal(jnp.zeros(P), 1.0).to_event(1))
                if self._blocks:
                    shift = z @ self.prior_scale_tril(sigma, extra).T
                else:
                    shift = z * self.partition.expand(sigma)
                theta = numpyro.deterministic("theta", mean + shift)
            else:
                theta = numpyro.sample("theta", self._theta_distribution(jnp.broadcast_to(mean, (T, P)), sigma, extra))
            self._call_likelihood(jax.vmap(self.partition.unravel)(theta), data, extra)

    def _call_likelihood(self, theta_tree, data, extra):
        if self._globals:
            return self.likelihood(theta_tree, data, self.globals_of(extra))
        return self.likelihood(theta_tree, data)

    @staticmethod
    def _num_tasks(data, T):
        if data is not None:
            n = num_tasks(data)
            if T is not None and T != n:
                raise ValueError(f"num_tasks={T} but data holds {n} tasks")
            return n
        if T is None:
            raise ValueError("give data or num_tasks")
        return T

    # ------------------------------------------------------------------ per-task densities
    def task_log_densities(self, theta, phi, sigma, data_t, extra=None):
        """``(log N(theta | prior mean, Sigma), log p(data_t | theta, g))`` for a single task.

        ``theta``, ``phi``: flat ``(P,)``; ``sigma``: ``(M,)``; ``data_t``: one task (no task axis);
        ``extra``: values of the other hyperparameter sites (:meth:`hyper_sites`), if the model has any.
        Both terms come from one trace of the model with a task axis of length 1.
        """
        params = {"phi": phi, "sigma": sigma, "theta": theta[None], **self._extra_values(extra)}
        tr = trace(substitute(self, data=params)).get_trace(_expand_task_axis(data_t))
        log_prior = _site_log_prob(tr["theta"])
        log_lik = self._observed_log_prob(tr)
        return log_prior, log_lik

    def _extra_values(self, extra) -> dict:
        names = self._hyper.keys()
        extra = extra or {}
        missing = [n for n in names if n not in extra]
        if missing:
            raise ValueError(f"this model needs values for its hyperparameter sites {missing} (pass extra=...)")
        return {n: extra[n] for n in names}

    def log_likelihood(self, theta, data_t, extra=None) -> jax.Array:
        """``log p(data_t | theta, g)`` for one task (``theta`` flat ``(P,)``), from the likelihood's trace."""
        theta_tree = jax.vmap(self.partition.unravel)(theta[None])
        tr = trace(self._call_likelihood).get_trace(theta_tree, _expand_task_axis(data_t), extra)
        return self._observed_log_prob(tr)

    def inner_objective(self, theta, phi, sigma, data_t, extra=None) -> jax.Array:
        """``L_t = -log N(theta | prior mean, Sigma) - log p(D_t^tr | theta)`` (Eq. 2, to minimise)."""
        log_prior, log_lik = self.task_log_densities(theta, phi, sigma, data_t, extra)
        return -(log_prior + log_lik)

    def generalisation_loss(self, theta, data_t, extra=None) -> jax.Array:
        """Negative log-likelihood per observation up to its constant (the paper's test loss)."""
        one = _expand_task_axis(data_t)
        log_lik = self.log_likelihood(theta, data_t, extra)
        const = self.likelihood.log_normaliser(one)[0]
        return -(log_lik - const) / self.likelihood.num_observations(one)[0]

    def _observed_log_prob(self, tr) -> jax.Array:
        total = 0.0
        own = {"theta", "theta_decentered", *HYPER_SITES, *self._hyper}
        for name, site in tr.items():
            if site["type"] != "sample":
                continue
            if site["is_observed"]:
                total = total + _site_log_prob(site)
            elif name not in own:
                raise ValueError(
                    f"task likelihood declares a latent site {name!r}; hiermeta expects every "
                    "task latent to be part of theta and every shared parameter to be a global "
                    "parameter (hiermeta.GlobalParam in the likelihood's global_params)"
                )
        return total
