"""Where NUTS starts and the scale it first moves on: the data's own fit, not unit scale.

NumPyro starts each chain at a uniform draw in [-2, 2] of the unconstrained space, with an
identity mass matrix that warm-up then adapts.  That presumes data near unit scale.  On lme4's
Dyestuff with ``Yield`` times 1e6 (phi near 1.5e9, its posterior sd near 2e7) the chains start
1e9 away with steps sized for log sigma, and 500 warm-up iterations leave phi near 8e3 (r-hat
1.96, 1 effective draw), whatever the priors.

Here, per latent site (in NumPyro's unconstrained space ``u``):

* start: the likelihood's pooled fit (its ``initial_values``: phi, gamma, beta, noise, and sigma
  from the residual scale), a site's default where it has none, ``theta`` at its prior mean and
  ``theta_decentered`` at 0; each chain then moves from it by ``unit * U(-1, 1)`` per coordinate,
  so that the chains start apart and r-hat can still see a failure;
* unit: for a real coordinate (phi, gamma, beta, centred theta) the size of an effect that moves
  the response by one standard deviation, ``sd(y) / s(column)`` (the likelihood's
  ``prior_scales``, rstanarm's standardisation, divided by its factor 2.5); 1 for a coordinate
  sampled on a log or other bounded scale (sigma, noise, correlations) and where the likelihood
  cannot say;
* the initial inverse mass matrix is ``unit^2`` (diagonal; the first block of a dense one), which
  warm-up adapts exactly as before.

The sampler is then invariant to the response's unit: Yield times 1e6 gives the posterior of
Yield times 1e6 (``tests/test_posterior.py``).
"""

from __future__ import annotations

import functools
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from numpyro.distributions import constraints
from numpyro.distributions.transforms import biject_to
from numpyro.handlers import condition, seed, substitute, trace
from numpyro.infer.initialization import init_to_uniform

__all__ = ["latent_sites", "sampler_start", "chain_starts", "inverse_mass_matrix"]

_STANDARDISED = 2.5  # the factor rstanarm's (and prior_scales') phi, gamma and beta scales carry


def latent_sites(model, data, fixed_values: Mapping[str, Any], noncentred: bool) -> dict:
    """``{name: (support, shape)}`` of every site NUTS samples: the model traced abstractly (nothing
    runs), once per (model, data shapes, fixed sites), so that a second call traces nothing."""
    def signature(tree):
        leaves, treedef = jax.tree_util.tree_flatten(tree)
        return treedef, tuple(jax.ShapeDtypeStruct(np.shape(a), jnp.result_type(a)) for a in leaves)

    return dict(_latent_sites(model, bool(noncentred), signature(data), signature(dict(fixed_values))))


@functools.lru_cache(maxsize=64)
def _latent_sites(model, noncentred: bool, data_signature, fixed_signature) -> dict:
    sites = {}

    def probe(rng, data, fixed_values):
        sampled = condition(model, fixed_values) if fixed_values else model
        # NumPyro's own initialisation draws the values (improper priors cannot be sampled)
        found = trace(substitute(seed(sampled, rng), substitute_fn=init_to_uniform)).get_trace(
            data, noncentred=noncentred)
        for name, site in found.items():
            if site["type"] == "sample" and not site["is_observed"]:
                sites[name] = (site["fn"].support, tuple(jnp.shape(site["value"])))
        return jnp.zeros(())

    rebuild = lambda signature: jax.tree_util.tree_unflatten(signature[0], signature[1])
    jax.eval_shape(probe, jax.random.PRNGKey(0), rebuild(data_signature), rebuild(fixed_signature))
    return sites


def _real(support) -> bool:
    return support in (constraints.real, constraints.real_vector) or getattr(support, "base_constraint", None) \
        is constraints.real


def _guesses(model, data, fixed_values) -> tuple[dict, dict]:
    """Constrained starting values and real-coordinate units from the likelihood (where it can say)."""
    guess = {name: np.asarray(site.init, float) for name, site in model.hyper_sites().items()}
    units = {}
    lik = model.likelihood
    if callable(getattr(lik, "initial_values", None)):
        guess.update({k: np.asarray(v, float) for k, v in dict(lik.initial_values(data, model)).items()})
    guess.update({k: np.asarray(v, float) for k, v in dict(fixed_values).items()})
    if callable(getattr(lik, "prior_scales", None)):
        scales = dict(lik.prior_scales(data, model))
        units["phi"] = np.asarray(scales["phi_scale"], float) / _STANDARDISED
        priors = {"gamma": scales.get("gamma_prior"), **dict(scales.get("global_priors", {}))}
        for name, prior in priors.items():
            if prior is not None and _real(prior.support) and hasattr(prior, "scale"):
                units[name] = np.asarray(prior.scale, float) / _STANDARDISED
    return guess, units


def sampler_start(model, data, fixed_values: Mapping[str, Any], noncentred: bool) -> tuple[dict, dict]:
    """``(start, unit)``: per latent site, the unconstrained starting value and unit scale (module docstring)."""
    sites = latent_sites(model, data, fixed_values, noncentred)
    guess, units = _guesses(model, data, fixed_values)
    P = model.partition.num_params
    if "theta" in sites and "phi" in guess:
        extra = {k: jnp.asarray(guess[k]) for k in model.hyper_sites() if k in guess}
        z = model.task_covariates(data) if model.num_task_covariates else None
        guess["theta"] = np.broadcast_to(np.asarray(model.prior_mean(jnp.asarray(guess["phi"]), extra, z), float),
                                         sites["theta"][1])
        units["theta"] = np.broadcast_to(units.get("phi", np.ones(P)), sites["theta"][1])
    start, unit = {}, {}
    for name, (support, shape) in sites.items():
        transform = biject_to(support)
        value = guess.get(name)
        ok = value is not None and np.shape(value) == shape and np.all(np.isfinite(value)) \
            and bool(np.all(support.check(jnp.asarray(value))))
        u = np.asarray(transform.inv(jnp.asarray(value)), float) if ok else None
        u_shape = tuple(transform.inverse_shape(shape))
        start[name] = u if u is not None and np.all(np.isfinite(u)) else np.zeros(u_shape)
        scale = units.get(name) if _real(support) else None
        scale = np.broadcast_to(np.asarray(scale if scale is not None else 1.0, float), u_shape)
        unit[name] = np.where(np.isfinite(scale) & (scale > 0), scale, 1.0)
    return start, unit


def chain_starts(key, start: Mapping[str, Any], unit: Mapping[str, Any], num_chains: int) -> dict:
    """Each chain's unconstrained start: ``start + unit * U(-1, 1)`` (a leading chain axis when > 1)."""
    names = sorted(start)
    keys = jax.random.split(key, len(names))
    lead = (num_chains,) if num_chains > 1 else ()
    return {name: start[name] + unit[name] * jax.random.uniform(k, lead + jnp.shape(start[name]), minval=-1.0,
                                                                 maxval=1.0)
            for name, k in zip(names, keys)}


def inverse_mass_matrix(unit: Mapping[str, Any], dense_mass) -> Any:
    """The initial inverse mass matrix ``unit^2`` in the layout NumPyro reads for ``dense_mass``.

    A flat vector over the sites in sorted order for ``dense_mass`` True or False (NumPyro's own
    order); for a list of blocks (tuples of site names), one vector per block and per other site.
    """
    var = {name: jnp.ravel(jnp.asarray(u) ** 2) for name, u in unit.items()}
    if isinstance(dense_mass, bool):
        return jnp.concatenate([var[name] for name in sorted(var)])
    blocks = [tuple(block) for block in dense_mass]
    out = {block: jnp.concatenate([var[name] for name in block]) for block in blocks}
    listed = {name for block in blocks for name in block}
    out.update({(name,): var[name] for name in sorted(var) if name not in listed})
    return out
