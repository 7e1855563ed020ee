"""Proper hyperpriors for the full posterior, scaled to the data, and a check of where the posterior sits.

Empirical Bayes needs no hyperprior (phi, sigma and the globals are estimated); NUTS does.  A
prior on the wrong scale is the commonest silent error of a Bayesian analysis: ``N(0, 10)`` on an
intercept whose estimate is 251 drags the posterior to the prior.  :func:`with_priors`
therefore scales its defaults to the data, as rstanarm and bambi do, when it is given the data:

    phi_p   ~ N(phi_ls_p, (2.5 sd(y) / s(Z_p))^2)      centred at the pooled least-squares fit
    sigma_m ~ HalfCauchy(sd(y) / s(Z_m))               (or half-normal; mean of s over the module)
    gamma   ~ N(gamma_ls, (2.5 sd(y) / (s(Z_p) sd(z_q)))^2)
    beta_k  ~ N(beta_ls_k, (2.5 sd(y) / s(X_k))^2)     (unpooled fixed effects)
    noise   ~ Exponential(1 / sd(y))                   (rstanarm's default for the residual sd)
    C_k     ~ LKJ(1)                                   (uniform over correlation matrices)

``s(v)`` is the standard deviation of a design column (its root mean square when it is constant,
e.g. an intercept).  The likelihood supplies these scales (``prior_scales(data, model)``; a
linear-Gaussian likelihood has it); every one can be given explicitly instead.  The choice is
printed (``verbose``) and kept on the model (:func:`prior_summary`).

After sampling, :func:`prior_tail_check` reports every coordinate whose posterior median sits
beyond the 0.1% / 99.9% quantiles of its prior: there the prior, not the data, decides.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any, Mapping, Optional, Sequence

import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist

from .errors import PriorWarning
from .hierarchy import HierarchicalModel
from .starts import data_start

__all__ = ["with_priors", "prior_summary", "prior_tail_check"]

_SIGMA_FAMILIES = {"half_cauchy": dist.HalfCauchy, "half_normal": dist.HalfNormal}


def _vector(value, n, name, positive):
    arr = np.asarray(value, dtype=float)
    if arr.ndim > 1 or (arr.ndim == 1 and arr.shape[0] != n):
        raise ValueError(f"{name} must be a scalar or have {n} entries, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)) or (positive and np.any(arr <= 0)):
        raise ValueError(f"{name} must be finite{' and > 0' if positive else ''}, got {value}")
    return jnp.broadcast_to(jnp.asarray(arr), (n,))


def with_priors(
    model: HierarchicalModel,
    data: Any = None,
    *,
    phi_loc: Optional[float | Sequence[float]] = None,
    phi_scale: Optional[float | Sequence[float]] = None,
    sigma: str = "half_cauchy",
    sigma_scale: Optional[float | Sequence[float]] = None,
    corr_concentration: float = 1.0,
    gamma_prior: Optional[dist.Distribution] = None,
    global_priors: Optional[Mapping[str, dist.Distribution]] = None,
    verbose: bool = False,
) -> HierarchicalModel:
    """The same model with proper hyperpriors, scaled to ``data`` where not given.

    ``phi ~ N(phi_loc, phi_scale^2)`` per coordinate; ``sigma_m ~ HalfCauchy(sigma_scale)``
    (``sigma="half_cauchy"``) or ``HalfNormal(sigma_scale)`` (``"half_normal"``) per module;
    correlated blocks ``LKJ(corr_concentration)``; ``gamma_prior`` and ``global_priors`` (name ->
    distribution) replace the scaled defaults of those sites.  Without ``data``, unset phi and
    sigma scales fall back to unit-scale defaults (``N(0, 10^2)``, scale 5) with a
    :class:`~hiermeta.errors.PriorWarning`: they are right only for data on unit scale.
    ``verbose`` prints the priors chosen (:func:`prior_summary`).
    """
    part = model.partition
    P, M = part.num_params, part.num_modules
    if sigma not in _SIGMA_FAMILIES:
        raise ValueError(f"sigma prior must be one of {sorted(_SIGMA_FAMILIES)}, got {sigma!r}")
    scales: dict = {}
    if data is not None:
        model.likelihood.check(data, "data")
        scaler = getattr(model.likelihood, "prior_scales", None)
        if not callable(scaler):
            raise ValueError(
                f"{type(model.likelihood).__name__} cannot scale priors to data (no prior_scales method): "
                "give phi_loc, phi_scale and sigma_scale (and priors of its global parameters) explicitly"
            )
        scales = dict(scaler(data, model))
    elif phi_scale is None or sigma_scale is None:
        warnings.warn(
            "with_priors without data: the unset scales default to phi ~ N(0, 10^2) and sigma scale 5, "
            "right only for data on unit scale; pass the data (with_priors(model, data)) to scale them",
            PriorWarning, stacklevel=2,
        )
    pick = lambda given, key, default: given if given is not None else scales.get(key, default)
    loc = _vector(pick(phi_loc, "phi_loc", 0.0), P, "phi_loc", False)
    scale = _vector(pick(phi_scale, "phi_scale", 10.0), P, "phi_scale", True)
    s_scale = _vector(pick(sigma_scale, "sigma_scale", 5.0), M, "sigma_scale", True)
    if not (np.isfinite(corr_concentration) and corr_concentration > 0):
        raise ValueError(f"corr_concentration must be finite and > 0, got {corr_concentration}")
    changes = dict(phi_prior=dist.Normal(loc, scale), sigma_prior=_SIGMA_FAMILIES[sigma](s_scale))
    if model.correlation_blocks:
        changes["corr_concentration"] = float(corr_concentration)
    if model.num_task_covariates:
        changes["gamma_prior"] = gamma_prior if gamma_prior is not None else scales.get("gamma_prior")
    chosen = dict(scales.get("global_priors", {}))
    chosen.update(global_priors or {})
    missing = [n for n in model.global_params
               if n not in chosen and (model.global_priors or {}).get(n, model.global_params[n].prior) is None]
    if missing:
        warnings.warn(f"no proper prior for the global parameter(s) {missing}: they keep a flat prior "
                      "(give global_priors= or the data)", PriorWarning, stacklevel=2)
    if chosen:
        changes["global_priors"] = {**(model.global_priors or {}), **chosen}
    out = dataclasses.replace(model, **changes)
    if verbose:
        print(prior_summary(out))
    return out


def _describe(d) -> str:
    if d is None:
        return "flat (improper)"
    params = []
    for name in ("loc", "scale", "rate", "concentration", "df"):
        if hasattr(d, name):
            value = np.asarray(getattr(d, name))
            shown = f"{float(value.ravel()[0]):.4g}" if value.size == 1 or np.ptp(value) == 0 else np.array2string(
                value.ravel(), precision=4, separator=", ")
            params.append(f"{name}={shown}")
    return f"{type(d).__name__}({', '.join(params)})"


def prior_summary(model: HierarchicalModel) -> str:
    """One line per hyperparameter site: the prior NUTS will use."""
    lines = [f"phi    ~ {_describe(model.phi_prior)}", f"sigma  ~ {_describe(model.sigma_prior)}"]
    for k in range(len(model.correlation_blocks)):
        conc = model.corr_concentration
        lines.append(f"corr_chol_{k} ~ " + ("flat (uniform)" if conc is None else f"LKJCholesky(concentration={conc:g})"))
    if model.num_task_covariates:
        lines.append(f"gamma  ~ {_describe(model.gamma_prior)}")
    for name, spec in model.global_params.items():
        lines.append(f"{name} ~ {_describe((model.global_priors or {}).get(name, spec.prior))}")
    return "\n".join(lines)


def _prior_of(model: HierarchicalModel, name: str):
    if name == "phi":
        return model.phi_prior
    if name == "sigma":
        return model.sigma_prior
    if name == "gamma":
        return model.gamma_prior
    if name in model.global_params:
        return (model.global_priors or {}).get(name, model.global_params[name].prior)
    return None


def _quantiles(model, values: Mapping[str, np.ndarray]) -> dict:
    """``{site: (values, prior quantiles, prior)}`` for the sites with a proper prior that has a CDF."""
    out = {}
    for name, value in values.items():
        prior = _prior_of(model, name)
        if prior is None:
            continue
        value = np.asarray(value, dtype=float)
        try:
            q = np.asarray(prior.cdf(jnp.asarray(value)), dtype=float).ravel()
        except (NotImplementedError, AttributeError, TypeError, ValueError):
            continue
        out[name] = (value.ravel(), q, prior)
    return out


def _tail_messages(quantiles: dict, level: float, what: str, estimate: Optional[dict] = None) -> list:
    messages = []
    for name, (value, q, prior) in quantiles.items():
        for i in np.flatnonzero((q < level) | (q > 1 - level))[:5]:
            where = f"{name}[{i}]" if value.size > 1 else name
            head = f"{what} of {where} ({value[i]:.4g}) sits at prior quantile {q[i]:.2g} of {_describe(prior)}: "
            own = (estimate or {}).get(name)
            if own is not None and i < own[1].size and level <= own[1][i] <= 1 - level:
                messages.append(head + f"the data's own estimate ({own[0][i]:.4g}, prior quantile {own[1][i]:.2g}) "
                                "agrees with the prior, so the sampler, not the prior, is off: it did not reach "
                                "the posterior (see r-hat and ESS; start it nearer or run longer)")
            else:
                messages.append(head + "prior and data disagree there (is the prior on the data's scale? "
                                "hiermeta.with_priors(model, data) scales it)")
    return messages


def prior_tail_check(model: HierarchicalModel, samples: Mapping[str, np.ndarray], data: Any = None,
                     level: float = 1e-3) -> list:
    """Prior-data conflicts: values beyond the ``level`` / ``1 - level`` quantiles of their prior.

    Checks (i) each sampled hyperparameter's posterior median (``samples``: site -> draws with
    leading (chain, draw) axes), and (ii) with ``data``, the data's own estimate of phi, gamma and
    the globals from the likelihood's ``initial_values`` (a pooled fit; it catches a prior so
    narrow that it dragged the posterior into itself, which (i) cannot see).  A posterior median
    in the tail of a prior that the data's own estimate sits inside is reported as the sampler's
    failure (it did not reach the posterior), not as a prior-data conflict.  Only sites with a
    proper prior that has a CDF are checked.  Returns messages (empty when all is well).
    """
    medians = {name: np.median(np.reshape(draws, (-1,) + np.shape(draws)[2:]), axis=0)
               for name, draws in samples.items()}
    estimate = _quantiles(model, {k: v for k, v in data_start(model, data, check=False).items() if k != "sigma"})
    messages = _tail_messages(_quantiles(model, medians), level, "the posterior median", estimate)
    return messages + _tail_messages(estimate, level, "the data's own (pooled least-squares) estimate")
