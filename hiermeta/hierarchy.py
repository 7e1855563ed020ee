"""The hierarchical model of Chen et al. (Eq. 1) as one NumPyro model.

    phi      ~ p(phi)                       site "phi",   shape (P,)   (flat by default)
    sigma    ~ p(sigma)                     site "sigma", shape (M,)   (flat on (0, inf) by default)
    theta_t  ~ N(phi, diag(sigma[module]^2)),  t = 1..T   site "theta", shape (T, P), plate "tasks"
    D_t      ~ p(D_t | theta_t)             the domain's task likelihood (observed sites)

Every method reads its densities from this one model: the per-task MAP objective and the
predictive log-likelihood are sums of site log-densities from a NumPyro ``trace`` under
``substitute``; NUTS runs the model as it stands.  Nothing here restates a density by hand.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import jax
import jax.numpy as jnp
import numpyro
import numpyro.distributions as dist
from numpyro.distributions import constraints
from numpyro.handlers import substitute, trace

from .partition import ModulePartition
from .tasks import TaskLikelihood, num_tasks

__all__ = ["HierarchicalModel", "HYPER_SITES"]

HYPER_SITES = ("phi", "sigma")


def _site_log_prob(site) -> jax.Array:
    """Total log-density of one sample site, honouring NumPyro's scale (as ``log_density``)."""
    log_prob = site["fn"].log_prob(site["value"])
    if site["scale"] is not None:
        log_prob = site["scale"] * log_prob
    return jnp.sum(log_prob)


def _expand_task_axis(tree):
    return jax.tree_util.tree_map(lambda a: jnp.asarray(a)[None], tree)


@dataclass(frozen=True, eq=False)
class HierarchicalModel:
    """Eq. 1 over a module partition of the parameters, with a domain's task likelihood.

    Calling the object runs the NumPyro model: ``model(data)`` for data with a leading task
    axis, or ``model(None, num_tasks=T)`` to sample from the prior.

    Args:
      likelihood: the domain's :class:`~hiermeta.tasks.TaskLikelihood`.
      partition: :class:`~hiermeta.partition.ModulePartition` of the task parameters.
      phi_prior: distribution with event shape ``(P,)`` for the central parameters, or None for
        a flat (improper) prior, the empirical-Bayes default.
      sigma_prior: distribution with event shape ``(M,)`` and positive support, or None for a
        flat improper prior on ``(0, inf)``.
    """

    likelihood: TaskLikelihood
    partition: ModulePartition
    phi_prior: Optional[dist.Distribution] = None
    sigma_prior: Optional[dist.Distribution] = None

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
        priors = (("phi_prior", self.phi_prior, (P,)), ("sigma_prior", self.sigma_prior, (M,)))
        for name, prior, shape in priors:
            if prior is not None and tuple(prior.batch_shape + prior.event_shape) != shape:
                raise ValueError(
                    f"{name} must have batch_shape + event_shape == {shape}, got "
                    f"{prior.batch_shape + prior.event_shape}"
                )

    # ------------------------------------------------------------------ the NumPyro model
    def __call__(self, data=None, num_tasks: Optional[int] = None):
        T = self._num_tasks(data, num_tasks)
        P, M = self.partition.num_params, self.partition.num_modules
        phi_prior, sigma_prior = self.phi_prior, self.sigma_prior
        if phi_prior is None:
            phi_prior = dist.ImproperUniform(constraints.real, (), (P,))
        if sigma_prior is None:
            sigma_prior = dist.ImproperUniform(constraints.positive, (), (M,))
        phi = numpyro.sample("phi", phi_prior.to_event())
        sigma = numpyro.sample("sigma", sigma_prior.to_event())
        with numpyro.plate("tasks", T):
            theta = numpyro.sample("theta", dist.Normal(phi, self.partition.expand(sigma)).to_event(1))
            self.likelihood(jax.vmap(self.partition.unravel)(theta), data)

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
    def task_log_densities(self, theta, phi, sigma, data_t):
        """``(log N(theta | phi, sigma^2), log p(data_t | theta))`` for a single task.

        ``theta``, ``phi``: flat ``(P,)``; ``sigma``: ``(M,)``; ``data_t``: one task (no task axis).
        Both terms come from one trace of the model with a task axis of length 1.
        """
        params = {"phi": phi, "sigma": sigma, "theta": theta[None]}
        tr = trace(substitute(self, data=params)).get_trace(_expand_task_axis(data_t))
        log_prior = _site_log_prob(tr["theta"])
        log_lik = self._observed_log_prob(tr)
        return log_prior, log_lik

    def log_likelihood(self, theta, data_t) -> jax.Array:
        """``log p(data_t | theta)`` for one task (``theta`` flat ``(P,)``), from the likelihood's trace."""
        theta_tree = jax.vmap(self.partition.unravel)(theta[None])
        tr = trace(self.likelihood).get_trace(theta_tree, _expand_task_axis(data_t))
        return self._observed_log_prob(tr)

    def inner_objective(self, theta, phi, sigma, data_t) -> jax.Array:
        """``L_t = -log N(theta | phi, sigma^2) - log p(D_t^tr | theta)`` (Eq. 2, to minimise)."""
        log_prior, log_lik = self.task_log_densities(theta, phi, sigma, data_t)
        return -(log_prior + log_lik)

    def generalisation_loss(self, theta, data_t) -> jax.Array:
        """Negative log-likelihood per observation up to its constant (the paper's test loss)."""
        one = _expand_task_axis(data_t)
        log_lik = self.log_likelihood(theta, data_t)
        const = self.likelihood.log_normaliser(one)[0]
        return -(log_lik - const) / self.likelihood.num_observations(one)[0]

    def _observed_log_prob(self, tr) -> jax.Array:
        total = 0.0
        for name, site in tr.items():
            if site["type"] != "sample":
                continue
            if site["is_observed"]:
                total = total + _site_log_prob(site)
            elif name not in ("theta",) + HYPER_SITES:
                raise ValueError(
                    f"task likelihood declares a latent site {name!r}; hiermeta expects every "
                    "task latent to be part of theta (observed sites only in the likelihood)"
                )
        return total
