"""Hyperparameter sites beyond phi and sigma, and their unconstrained parametrisation.

Besides the central parameters ``phi`` and the module scales ``sigma``, the hierarchical model
(:class:`~hiermeta.HierarchicalModel`) may hold:

* **global parameters**, shared by every task and declared by the task likelihood
  (:class:`GlobalParam`): the observation noise of a Gaussian likelihood with unknown noise,
  unpooled fixed effects, a Student-t's degrees of freedom;
* a **correlation matrix** per correlated block of coordinates (site ``corr_chol_k``, its
  Cholesky factor), so that e.g. a random intercept and slope are correlated;
* **group-level coefficients** ``gamma`` ``(Q, P)``: the prior mean of task ``t`` is
  ``phi + z_t @ gamma`` for task covariates ``z_t`` ``(Q,)``.

Learners and type-II maximum likelihood move these sites in an unconstrained space: a site with
constraint ``c`` is ``biject_to(c)(u)`` for a real vector ``u`` (NumPyro's bijections: ``exp``
for positive sites, the stick-breaking map onto Cholesky factors of correlation matrices).
"""

from __future__ import annotations

from typing import Any, Mapping, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
from numpyro.distributions import constraints
from numpyro.distributions.transforms import biject_to

__all__ = ["GlobalParam", "HyperSite", "constrain", "unconstrain", "default_init"]


class GlobalParam(NamedTuple):
    """A parameter shared by every task, declared by a task likelihood.

    Attributes:
      shape: the site's shape, e.g. ``()`` for one noise sd, ``(K,)`` for K fixed effects.
      constraint: its support (``numpyro.distributions.constraints.real``, ``.positive``, ...).
      prior: the prior used by NUTS; ``None`` is a flat (improper) prior on the support, the
        empirical-Bayes default (:func:`hiermeta.with_priors` supplies proper, data-scaled ones).
      init: the starting value (constrained) for learners and type-II ML; default
        :func:`default_init`.
    """

    shape: tuple = ()
    constraint: Any = constraints.real
    prior: Optional[dist.Distribution] = None
    init: Any = None


class HyperSite(NamedTuple):
    """Shape, support and starting value of one extra hyperparameter site of a model."""

    shape: tuple
    constraint: Any
    init: Any  # constrained starting value, shape ``shape``
    kind: str  # "global", "correlation" or "group_coefficients"


def default_init(shape, constraint) -> np.ndarray:
    """Ones on a positive support, the identity for a correlation Cholesky factor, else zeros."""
    shape = tuple(shape)
    if constraint is constraints.corr_cholesky:
        return np.eye(shape[-1])
    if constraint is constraints.positive:
        return np.ones(shape)
    if constraint is constraints.unit_interval:
        return np.full(shape, 0.5)
    if constraint is constraints.real:
        return np.zeros(shape)
    raise ValueError(f"no default starting value for a site with constraint {constraint}; give init=")


def unconstrain(sites: Mapping[str, HyperSite], values: Mapping[str, Any]) -> dict:
    """Unconstrained vectors ``u = biject_to(c).inv(value)`` for each site (a dict of arrays)."""
    out = {}
    for name, site in sites.items():
        value = jnp.asarray(values[name])
        if value.shape != tuple(site.shape):
            raise ValueError(f"{name} must have shape {tuple(site.shape)}, got {value.shape}")
        if not bool(jnp.all(site.constraint.check(value))):
            raise ValueError(f"{name} = {np.asarray(value)} is outside its support {site.constraint}")
        out[name] = biject_to(site.constraint).inv(value)
    return out


def constrain(sites: Mapping[str, HyperSite], unconstrained: Mapping[str, Any]) -> dict:
    """The site values ``biject_to(c)(u)`` from unconstrained vectors (jittable)."""
    return {name: biject_to(site.constraint)(unconstrained[name]) for name, site in sites.items()}


def tree_size(tree) -> int:
    return int(sum(np.size(leaf) for leaf in jax.tree_util.tree_leaves(tree)))
