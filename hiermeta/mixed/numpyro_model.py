"""A mixed model as one NumPyro model, and NUTS on it started from and scaled by a fit.

The model of :mod:`hiermeta.mixed.terms` with priors, on the standardised scale of
:mod:`hiermeta.mixed.scaling` (fixed-effect columns centred and scaled, random-effect
columns scaled to unit root-mean-square; a Gaussian response centred, when there is an intercept,
and divided by its sd ``s_y``):

    beta_s ~ N(m, (c_beta)^2 I)            m: the link of the mean response on the intercept, 0 elsewhere
    sd_k  ~ HalfNormal(c_sd)^{q_k}         (the sds of term k's standardised columns)
    R_k   ~ LKJ(c_lkj) as its Cholesky factor L_k (correlated terms with q_k > 1; else R_k = I)
    z_kl  ~ N(0, I_{q_k}),  b_kl = T_k z_kl,  T_k = diag(sd_k) L_k    (one plate per term; non-centred)
    eta   = X_s beta_s + offset + sum_k Z_k,s[i] . b_{k, g_k(i)}
    y_i   ~ family(eta_i)  (Gaussian: N(eta_i, sigma_s^2 / w_i), sigma_s ~ HalfNormal(c_sigma))

Defaults ``c_beta = 5``, ``c_sd = 2.5``, ``c_sigma = 2.5``, ``c_lkj = 2`` (:class:`Priors`): weakly
informative in the standardised units (log-odds, log-rate, or response sds).  Every map to the
original scale is linear (``beta = s_y A beta_s (+ the response's centre on the intercept)``,
``b_k = s_y D_k^-1 b_k,s``, ``sigma = s_y sigma_s``), so the posterior of a response multiplied by
``c`` is the posterior times ``c`` (the run itself is the same numbers), and the NumPyro log
density differs from the host engine's log joint (:func:`hiermeta.mixed.glmm.log_joint`) by the
constant log-Jacobian of those maps (:meth:`MixedNumPyroModel.log_jacobian`).

:func:`mixed_nuts` runs NumPyro's NUTS from the fit's values (conditional modes as ``z``, the
fit's sds and correlations; a boundary sd starts at 0.05 standardised units), several chains,
NumPyro's progress bar, and reads the diagnostics (split r-hat, bulk ESS, divergences) of
:func:`hiermeta.posterior.sampling_diagnostics`, each failure a
:class:`~hiermeta.errors.SamplingWarning`; a posterior median in the outer 0.1% of its prior is a
:class:`~hiermeta.errors.PriorWarning`.  JAX and NumPyro are imported by this module only
(``import hiermeta.mixed`` does not import it).
"""

from __future__ import annotations

import functools
import warnings
from typing import Any, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from jax.scipy.special import ndtr
from scipy import special, stats

from ..errors import PriorWarning, SamplingWarning
from ..utils import default_compilation_cache  # noqa: F401  (importing hiermeta.utils turns hiermeta's
# default persistent compilation cache on, as for every other hiermeta module that needs JAX)
from .estimate import Estimate
from .family import _PROBIT_BOUND, Family, get_family
from .scaling import standardize
from .terms import MixedDesign, covariances

__all__ = ["Priors", "MixedNumPyroModel", "MixedNUTS", "mixed_nuts"]


class Priors(NamedTuple):
    """Prior scales on the standardised scale (module docstring)."""

    beta: float = 5.0
    sd: float = 2.5
    sigma: float = 2.5
    lkj: float = 2.0


class _Spec(NamedTuple):
    """The static structure of the NumPyro model (hashable: it fixes the traced program)."""

    family: str
    link: str
    terms: tuple  # (num_levels, num_columns, correlated) per term
    weighted: bool
    priors: Priors


def _model(data: dict, spec: _Spec, centred: bool = False):
    """The NumPyro model (module docstring); ``data`` holds the standardised arrays."""
    X, offset = data["X"], data["offset"]
    p = X.shape[1]
    beta = numpyro.sample("beta", dist.Normal(data["beta_loc"], spec.priors.beta * jnp.ones(p)).to_event(1))
    eta = offset + X @ beta
    for k, (L, q, correlated) in enumerate(spec.terms):
        sd = numpyro.sample(f"sd_{k}", dist.HalfNormal(spec.priors.sd * jnp.ones(q)).to_event(1))
        if correlated and q > 1:
            chol = numpyro.sample(f"corr_{k}", dist.LKJCholesky(q, spec.priors.lkj))
            T = sd[:, None] * chol
        else:
            T = jnp.diag(sd)
        with numpyro.plate(f"levels_{k}", L):
            if centred:
                b = numpyro.sample(f"b_{k}", dist.MultivariateNormal(jnp.zeros(q), scale_tril=T))
            else:
                z = numpyro.sample(f"z_{k}", dist.Normal(0.0, 1.0).expand([q]).to_event(1))
                b = numpyro.deterministic(f"b_{k}", z @ T.T)
        eta = eta + jnp.sum(data[f"Z_{k}"] * b[data[f"codes_{k}"]], axis=-1)
    y, w = data["y"], data["w"]
    if spec.family == "gaussian":  # a global site: outside the rows' plate
        sigma = numpyro.sample("sigma", dist.HalfNormal(spec.priors.sigma))
    with numpyro.plate("rows", y.shape[0]):
        if spec.family in ("binomial", "bernoulli"):
            if spec.link == "logit":
                likelihood = dist.Binomial(total_count=w, logits=eta)
            elif spec.link == "probit":  # bounded as the host's links (hiermeta.mixed.family)
                likelihood = dist.Binomial(total_count=w, probs=ndtr(jnp.clip(eta, -_PROBIT_BOUND, _PROBIT_BOUND)))
            else:  # cloglog
                eps = jnp.finfo(eta.dtype).eps
                probs = jnp.clip(-jnp.expm1(-jnp.exp(jnp.minimum(eta, 700.0))), eps, 1 - eps)
                likelihood = dist.Binomial(total_count=w, probs=probs)
            numpyro.sample("y", likelihood, obs=data["counts"])
        elif spec.family == "poisson":
            with numpyro.handlers.scale(scale=w if spec.weighted else 1.0):
                numpyro.sample("y", dist.Poisson(jnp.exp(eta)), obs=y)
        else:  # gaussian
            numpyro.sample("y", dist.Normal(eta, sigma / jnp.sqrt(w)), obs=y)


class MixedNumPyroModel:
    """A :class:`~hiermeta.mixed.terms.MixedDesign` and a family as one NumPyro model (module docstring).

    ``model(data)`` (non-centred, for NUTS) and ``model.centred`` (``b_k`` sampled directly) are
    NumPyro model functions; ``data`` (:attr:`data`) holds the standardised arrays.
    """

    def __init__(self, design: MixedDesign, family: Union[str, Family] = "gaussian", priors: Optional[Priors] = None):
        self.design = design
        self.family = get_family(family)
        y, w = self.family.prepare(design.response, design.weights)
        std, self.scaling = standardize(design)
        self.std = std
        p = std.X.shape[1]
        intercept = [j for j in range(p) if np.allclose(std.X[:, j], 1.0)]
        self.intercept = intercept[0] if intercept else None
        if self.family.has_scale:
            self.y_centre = float(np.mean(y)) if self.intercept is not None else 0.0
            self.y_scale = float(np.std(y)) or 1.0
        else:
            self.y_centre, self.y_scale = 0.0, 1.0
        beta_loc = np.zeros(p)
        if self.intercept is not None and not self.family.has_scale:
            mean = float(np.sum(w * y) / np.sum(w))
            mean = min(max(mean, 1e-3), 1 - 1e-3) if self.family.name in ("binomial", "bernoulli") else max(mean, 1e-3)
            beta_loc[self.intercept] = float(self.family.link.link(np.array(mean)))
        self.priors = Priors() if priors is None else Priors(**dict(priors._asdict() if isinstance(priors, Priors)
                                                                   else priors))
        offset = np.zeros(design.num_rows) if design.offset is None else np.asarray(design.offset, dtype=float)
        data = {"X": std.X, "offset": offset / self.y_scale,
                "y": (y - self.y_centre) / self.y_scale, "w": w,
                "counts": (y - self.y_centre) / self.y_scale if self.family.has_scale else self.family.counts(y, w),
                "beta_loc": beta_loc}
        for k, t in enumerate(std.terms):
            data[f"Z_{k}"], data[f"codes_{k}"] = t.Z, t.codes
        self.data = {k: jnp.asarray(v) for k, v in data.items()}
        self.spec = _Spec(self.family.name, self.family.link.name,
                          tuple((t.num_levels, t.num_columns, bool(t.correlated)) for t in design.terms),
                          bool(np.any(w != 1)), self.priors)
        self.model = functools.partial(_model, spec=self.spec, centred=False)
        self.centred = functools.partial(_model, spec=self.spec, centred=True)

    # ------------------------------------------------------------------ scale maps
    def _shift(self) -> np.ndarray:
        """The response's centre on the intercept (Gaussian), 0 elsewhere (original scale)."""
        shift = np.zeros(self.std.X.shape[1])
        if self.intercept is not None:
            shift[self.intercept] = self.y_centre
        return shift

    def beta(self, beta_s) -> np.ndarray:
        """``beta = s_y A beta_s + centre`` (draws on the last axis)."""
        return self.y_scale * np.asarray(beta_s) @ self.scaling.A.T + self._shift()

    def beta_s(self, beta) -> np.ndarray:
        return self.scaling.beta_s((np.asarray(beta, dtype=float) - self._shift()) / self.y_scale)

    def effects(self, k: int, b_s) -> np.ndarray:
        """Term ``k``'s ``b = s_y D^-1 b_s`` (columns on the last axis)."""
        return self.y_scale * np.asarray(b_s) / self.scaling.column_scales[k]

    def sds(self, k: int, sd_s) -> np.ndarray:
        return self.y_scale * np.asarray(sd_s) / self.scaling.column_scales[k]

    def log_jacobian(self) -> float:
        """``log p_standardised - log p_original`` of the observations and the random effects (a constant)."""
        n = self.design.num_rows
        total = 0.0
        if self.family.has_scale:
            total += n * np.log(self.y_scale)
        for t, d in zip(self.design.terms, self.scaling.column_scales):
            total -= t.num_levels * float(np.sum(np.log(d / self.y_scale)))
        return total

    # ------------------------------------------------------------------ sites from a fit
    def sites_from(self, beta, covs, b, sigma: Optional[float] = None, centred: bool = False,
                   min_sd: float = 0.05) -> dict:
        """NumPyro site values (standardised scale) from original-scale ``beta``, ``Sigma_k``, ``b_k``, ``sigma``.

        Non-centred: ``z_kl = T_k^-1 b_kl,s`` (an sd below ``min_sd`` standardised units is raised to it).
        """
        out = {"beta": jnp.asarray(self.beta_s(beta))}
        if self.family.has_scale:
            out["sigma"] = jnp.asarray(max(float(sigma) / self.y_scale, 1e-3))
        for k, (t, S, bk) in enumerate(zip(self.design.terms, covs, b)):
            d = self.scaling.column_scales[k] / self.y_scale
            S_s = np.asarray(S) * np.outer(d, d)
            sd = np.sqrt(np.maximum(np.diag(S_s), 0.0))
            b_s = np.asarray(bk) * d
            if not centred:
                sd = np.maximum(sd, min_sd)
            R = S_s / np.outer(np.maximum(sd, 1e-300), np.maximum(sd, 1e-300))
            out[f"sd_{k}"] = jnp.asarray(sd)
            if t.correlated and t.num_columns > 1:
                R = 0.5 * (R + R.T)
                np.fill_diagonal(R, 1.0)
                evals, evecs = np.linalg.eigh(R)
                R = (evecs * np.clip(evals, 1e-6, None)) @ evecs.T
                R = R / np.sqrt(np.outer(np.diag(R), np.diag(R)))
                chol = np.linalg.cholesky(R)
                out[f"corr_{k}"] = jnp.asarray(chol)
                T = sd[:, None] * chol
            else:
                T = np.diag(sd)
            if centred:
                out[f"b_{k}"] = jnp.asarray(b_s)
            else:
                out[f"z_{k}"] = jnp.asarray(np.linalg.solve(T, b_s.T).T)
        return out

    def sites_from_estimate(self, estimate: Estimate) -> dict:
        """Starting values for NUTS from a fit (:class:`~hiermeta.mixed.estimate.Estimate`)."""
        scale = 1.0 if estimate.sigma is None else float(estimate.sigma)
        covs = covariances(self.design.terms, estimate.theta, scale)
        return self.sites_from(estimate.beta, covs, estimate.b, estimate.sigma)

    def log_density(self, sites: dict, centred: bool = True) -> float:
        """NumPyro's log joint of the observations and the random effects at ``sites`` (no hyperpriors)."""
        from numpyro.handlers import substitute, trace

        fn = self.centred if centred else self.model
        tr = trace(substitute(fn, data=sites)).get_trace(self.data)
        total = 0.0
        for name, site in tr.items():
            if site["type"] != "sample":
                continue
            if name == "y" or name.startswith("b_") or name.startswith("z_"):
                lp = site["fn"].log_prob(site["value"])
                total = total + jnp.sum(lp if site["scale"] is None else site["scale"] * lp)
        return float(total)


class MixedNUTS(NamedTuple):
    """Draws of a mixed model's posterior on the original scale, with their provenance and diagnostics.

    Attributes:
      beta: ``(C, S, p)``; sd: per term ``(C, S, q_k)``; corr: per term ``(C, S, q_k, q_k)``
        correlation matrices; b: per term ``(C, S, L_k, q_k)``; sigma: ``(C, S)`` or None.
      stats: sampler statistics ``(C, S)`` (``diverging``, ``n_steps``, ``acceptance_rate``).
      diagnostics: ``max_r_hat``, ``min_ess``, ``num_divergences``, ``converged``, ``messages``,
        ``prior_conflicts``.
      model: the :class:`MixedNumPyroModel` (its design and family: the provenance).
      priors, settings: the priors and the NUTS settings used.
    """

    beta: np.ndarray
    sd: list
    corr: list
    b: list
    sigma: Optional[np.ndarray]
    stats: dict
    diagnostics: dict
    model: Any
    priors: Priors
    settings: dict

    @property
    def num_draws(self) -> int:
        return int(self.beta.shape[0] * self.beta.shape[1])

    def flat(self, name: str, k: Optional[int] = None) -> np.ndarray:
        """Draws with the chains merged: ``flat("beta")``, ``flat("b", k)``, ``flat("sd", k)``, ``flat("sigma")``."""
        x = getattr(self, name)
        x = x[k] if k is not None else x
        return None if x is None else np.reshape(x, (-1,) + np.shape(x)[2:])

    def covariance(self, k: int) -> np.ndarray:
        """Draws of ``Sigma_k`` ``(C * S, q_k, q_k)``."""
        sd, R = self.flat("sd", k), self.flat("corr", k)
        return R * sd[:, :, None] * sd[:, None, :]


def _prior_conflicts(model: MixedNumPyroModel, values: dict, what: str, level: float = 1e-3) -> list:
    """Hyperparameters (``values``: site -> value, standardised scale) beyond the ``level`` quantiles of their priors."""
    pri = model.priors
    out = []
    z = np.abs(np.asarray(values["beta"]) - np.asarray(model.data["beta_loc"])) / pri.beta
    for j in np.flatnonzero(z > stats.norm.ppf(1 - level)):
        out.append(f"{what} of {model.design.fixed_names[j]} sits beyond the {1 - level:.1%} quantile of its prior "
                   f"(N(m, {pri.beta}^2) on the standardised scale): the prior is too narrow for these data")
    names = [(f"sd_{k}", f"the sd of {t.label()}", pri.sd) for k, t in enumerate(model.design.terms)]
    if model.family.has_scale:
        names.append(("sigma", "sigma", pri.sigma))
    for site, label, scale in names:
        if np.any(special.erf(np.atleast_1d(np.asarray(values[site])) / (scale * np.sqrt(2))) > 1 - level):
            out.append(f"{what} of {label} sits beyond the {1 - level:.1%} quantile of its prior HalfNormal({scale}) "
                       "on the standardised scale: the prior is too narrow for these data")
    return out


def mixed_nuts(design: MixedDesign, family: Union[str, Family], estimate: Optional[Estimate] = None, *,
               key: Union[int, jax.Array] = 0, num_warmup: int = 1000, num_samples: int = 1000,
               num_chains: int = 4, progress_bar: bool = True, target_accept: float = 0.8,
               max_tree_depth: int = 10, dense_mass: bool = False, priors: Optional[Priors] = None,
               chain_method: Optional[str] = None) -> MixedNUTS:
    """NUTS on the mixed model's NumPyro density (module docstring), started from ``estimate``.

    Args:
      design, family: the model; estimate: a fit of it (ML, REML, Laplace or AGQ) to start from
        (None: NumPyro's default start, the prior medians).
      key: PRNG key or seed; num_warmup, num_samples, num_chains, target_accept, max_tree_depth,
        dense_mass: NumPyro's NUTS settings; chain_method: ``"vectorized"`` (default on one
        device), ``"parallel"`` (one chain per device, the default when there are enough) or
        ``"sequential"``.
      progress_bar: NumPyro's progress bar (its own loop).
      priors: :class:`Priors` (or a dict of its fields).
    """
    from numpyro.infer import MCMC, NUTS, init_to_value

    from ..posterior import sampling_diagnostics

    for name, value, least in [("num_warmup", num_warmup, 0), ("num_samples", num_samples, 1),
                               ("num_chains", num_chains, 1)]:
        if int(value) != value or value < least:
            raise ValueError(f"{name} must be an integer >= {least}, got {value!r}")
    if not 0.0 < target_accept < 1.0:
        raise ValueError(f"target_accept must be in (0, 1), got {target_accept}")
    model = MixedNumPyroModel(design, family, priors)
    if isinstance(key, (int, np.integer)):
        key = jax.random.PRNGKey(int(key))
    init = init_to_value(values=model.sites_from_estimate(estimate)) if estimate is not None else None
    kernel = NUTS(model.model, target_accept_prob=target_accept, max_tree_depth=max_tree_depth,
                  dense_mass=dense_mass, **({"init_strategy": init} if init is not None else {}))
    if chain_method is None:
        chain_method = "parallel" if jax.local_device_count() >= num_chains > 1 else "vectorized"
    mcmc = MCMC(kernel, num_warmup=int(num_warmup), num_samples=int(num_samples), num_chains=int(num_chains),
                chain_method=chain_method, progress_bar=bool(progress_bar), jit_model_args=True)
    mcmc.run(key, model.data, extra_fields=("diverging", "num_steps", "accept_prob"))
    draws = {k: np.asarray(v) for k, v in mcmc.get_samples(group_by_chain=True).items()}
    extra = mcmc.get_extra_fields(group_by_chain=True)
    sampler_stats = {"diverging": np.asarray(extra["diverging"]), "n_steps": np.asarray(extra["num_steps"]),
                     "acceptance_rate": np.asarray(extra["accept_prob"])}
    sampled = {k: v for k, v in draws.items() if not k.startswith("b_")}
    diagnostics = sampling_diagnostics(None, sampled, sampler_stats)
    medians = {k: np.median(np.reshape(v, (-1,) + v.shape[2:]), axis=0) for k, v in draws.items()}
    conflicts = _prior_conflicts(model, medians, "the posterior median")
    if estimate is not None:  # a prior so narrow that it dragged the posterior into itself
        conflicts += _prior_conflicts(model, model.sites_from_estimate(estimate), f"the {estimate.method} estimate")
    diagnostics["prior_conflicts"] = conflicts
    for message in diagnostics["messages"]:
        warnings.warn(message, SamplingWarning, stacklevel=2)
    for message in diagnostics["prior_conflicts"]:
        warnings.warn(message, PriorWarning, stacklevel=2)
    sd, corr, b = [], [], []
    C, S = draws["beta"].shape[:2]
    for k, t in enumerate(design.terms):
        sd.append(model.sds(k, draws[f"sd_{k}"]))
        if f"corr_{k}" in draws:
            L = draws[f"corr_{k}"]
            corr.append(np.einsum("csij,cskj->csik", L, L))
        else:
            corr.append(np.broadcast_to(np.eye(t.num_columns), (C, S, t.num_columns, t.num_columns)).copy())
        b.append(model.effects(k, draws[f"b_{k}"]))
    sigma = model.y_scale * draws["sigma"] if "sigma" in draws else None
    settings = dict(num_warmup=int(num_warmup), num_samples=int(num_samples), num_chains=int(num_chains),
                    target_accept=float(target_accept), max_tree_depth=int(max_tree_depth),
                    dense_mass=bool(dense_mass), chain_method=chain_method,
                    started_from=(estimate.method if estimate is not None else "prior"))
    return MixedNUTS(beta=model.beta(draws["beta"]), sd=sd, corr=corr, b=b, sigma=sigma, stats=sampler_stats,
                     diagnostics=diagnostics, model=model, priors=model.priors, settings=settings)
