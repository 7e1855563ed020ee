"""A shrinkage report: per group, no pooling vs empirical Bayes vs the full posterior, and their predictives.

:func:`shrinkage_report` consumes results (no inference happens here): a type-II ML / REML
estimate (:func:`hiermeta.type2_ml`), optionally a NUTS run (:func:`hiermeta.run_nuts`) and the
meta-learners' adapted values, all computed on ``table.support`` (every row when the table has no
split), and the table they came from (:func:`hiermeta.from_table`).  For a linear-Gaussian
likelihood, group t's support rows ``y_t = Z_t theta_t + X_t beta + o_t + e_t``,
``e_t ~ N(0, R_t)``, ``R_t = s^2 diag(c_t^2)`` (``s`` the noise sd, ``c_t`` known relative scales):

* **No pooling**: each group's own weighted least squares, ``y_t - X_t beta_hat - o_t`` on ``Z_t``
  (``beta_hat`` the type-II estimate); a coordinate the group's rows cannot identify (its unit
  vector outside the row space of ``Z_t``) is NaN.
* **Empirical Bayes (EB)**: the posterior of theta_t at the type-II estimates, closed form:
  ``N(mu_t, V_t)`` with ``V_t = (Sigma^-1 + Z_t^T R_t^-1 Z_t)^-1``, ``mu_t = m_t + V_t Z_t^T
  R_t^-1 (y_t - Z_t m_t - X_t beta - o_t)``, ``m_t = phi + z_t gamma`` (the likelihood's
  ``posterior``).  ``mu_t`` is also the MAP, the meta-learners' adapted theta at those values.
* **Full posterior**: NUTS means, sds and central intervals of theta_t.
* **Pooling factors**, per group and coordinate p:
  ``pooling = V_t[p, p] / Sigma[p, p]``, the fraction of the prior variance left after seeing
  the group's data (in [0, 1] always: 0 = no pooling, the data decide; 1 = complete pooling);
  and ``pooling_distance = 1 - (mu_tp - m_tp) / (theta^np_tp - m_tp)``, one minus the fraction
  of the way from the prior mean to the no-pooling estimate that the EB estimate goes.  For a
  random intercept (one coordinate) both equal ``(s^2 / n_t) / (sigma^2 + s^2 / n_t)`` (with
  unit relative scales); with correlated coordinates or unequal designs the distance form can
  leave [0, 1] (one coordinate's data move another's estimate), the variance form cannot.
  ``pooling_posterior`` is the distance form with the NUTS means of theta_t and of m_t.

Held-out scores on the query rows (with a split; groups without query rows are left out), per
group the joint log predictive density of its query rows, reported per observation (mean over
groups, with its standard error), and the coverage of central predictive intervals (levels 50%
and 90% by default: the fraction of query rows whose predictive CDF value F(y) has
``|F(y) - 1/2| <= level / 2``):

* **MAP plug-in**: ``N(Z theta_hat + X beta_hat + o, R)`` row by row, ``theta_hat = mu_t``;
* **EB posterior**: ``N(Z mu_t + X beta_hat + o, Z V_t Z^T + R)`` jointly over the group's query rows;
* **full posterior**: the mixture over NUTS draws d of ``prod_i N(y_i | Z_i theta_td + X_i beta_d
  + o_i, s_d^2 c_i^2)`` (joint density ``logsumexp_d - log D``; CDF the mixture's);
* each set of adapted values: a plug-in like the MAP's.

Outputs: :meth:`ShrinkageReport.table` (pandas when installed, else a list of dicts),
:meth:`~ShrinkageReport.to_string`, :meth:`~ShrinkageReport.to_dict` (JSON-serialisable),
:meth:`~ShrinkageReport.to_xarray` (an ``xarray.Dataset`` with dimensions ``group``,
``coordinate``, ``method``) and :meth:`~ShrinkageReport.plot` (a forest plot per coordinate).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from scipy.special import ndtri

from .hierarchy import HierarchicalModel
from .linear_gaussian import LinearGaussianLikelihood
from .posterior import task_log_likelihood
from .predictive import coverage, score_draws, score_gaussian_mixture
from .regression import LinearDesign
from .printing import format_table, save_figure, to_jsonable

__all__ = ["ShrinkageReport", "shrinkage_report"]


@dataclass(frozen=True, eq=False)
class ShrinkageReport:
    """Per group and coordinate estimates, pooling factors, hyperparameters and held-out scores.

    Attributes:
      groups, coordinates: names from the data.
      estimates: name -> ``(T, P)`` arrays: ``n_support`` (rows per group, ``(T,)``),
        ``no_pooling``, ``no_pooling_se``, ``prior_mean``, ``eb_mean``, ``eb_sd``, ``pooling``,
        ``pooling_distance``; with NUTS ``posterior_mean``, ``posterior_sd``,
        ``posterior_lower``, ``posterior_upper`` (central ``interval``), ``pooling_posterior``;
        per adapted set ``adapted[NAME]``.
      hyperparameters: rows (dicts): ``name``, ``eb`` (the type-II value), ``eb_se`` (fixed
        effects), ``posterior_mean``, ``posterior_sd`` (NUTS).
      predictive: method -> ``{"log_score", "log_score_sem", "coverage" {level: fraction},
        "num_groups", "num_obs", "per_group" (T,) (NaN where no query row)}``.
      interval: level of the posterior intervals (and of the EB intervals in the figure).
      notes: what was computed on what (the data, the type-II method, the NUTS diagnostics).
    """

    groups: tuple
    coordinates: tuple
    estimates: dict
    hyperparameters: list
    predictive: dict
    interval: float
    levels: tuple
    notes: list = field(default_factory=list)

    # ------------------------------------------------------------------ tables
    def rows(self) -> list:
        """One dict per (group, coordinate) with every estimate column."""
        out = []
        for t, g in enumerate(self.groups):
            for p, c in enumerate(self.coordinates):
                row = {"group": g, "coordinate": c, "n_support": int(self.estimates["n_support"][t])}
                for name, arr in self.estimates.items():
                    if name != "n_support":
                        row[name] = float(arr[t, p])
                out.append(row)
        return out

    def predictive_rows(self) -> list:
        out = []
        for method, s in self.predictive.items():
            row = {"method": method, "log_score": s["log_score"], "log_score_sem": s["log_score_sem"]}
            row.update({f"coverage_{int(round(100 * q))}": c for q, c in s["coverage"].items()})
            row.update(num_groups=s["num_groups"], num_obs=s["num_obs"])
            out.append(row)
        return out

    def table(self):
        """The per-group estimates: a pandas DataFrame when pandas is installed, else a list of dicts."""
        return _frame(self.rows())

    def predictive_table(self):
        """The held-out scores per method: a pandas DataFrame when pandas is installed, else a list of dicts."""
        return _frame(self.predictive_rows())

    def to_string(self, digits: int = 2) -> str:
        """Plain-text tables: hyperparameters, per-group estimates, held-out scores."""
        parts = []
        if self.hyperparameters:
            cols = ["name", "eb", "eb_se", "posterior_mean", "posterior_sd"]
            parts.append(format_table(cols, [[r.get(c, float("nan")) for c in cols] for r in self.hyperparameters],
                                      digits + 2))
        cols = ["group", "coordinate", "n_support", "no_pooling", "eb_mean", "eb_sd", "pooling"]
        cols += [c for c in ("posterior_mean", "posterior_sd") if c in self.estimates]
        cols += [c for c in self.estimates if c.startswith("adapted[")]
        parts.append(format_table(cols, [[r[c] for c in cols] for r in self.rows()], digits))
        if self.predictive:
            rows = self.predictive_rows()
            cols = list(rows[0])
            parts.append(format_table(cols, [[r[c] for c in cols] for r in rows], 4))
        return "\n\n".join(parts + ["\n".join(self.notes)])

    def __str__(self) -> str:
        return self.to_string()

    def to_dict(self) -> dict:
        """A JSON-serialisable dict (NaN as None)."""
        return to_jsonable({
            "groups": [str(g) for g in self.groups],
            "coordinates": list(self.coordinates),
            "estimates": self.estimates,
            "hyperparameters": self.hyperparameters,
            "predictive": {m: {**s, "coverage": {str(q): c for q, c in s["coverage"].items()}}
                           for m, s in self.predictive.items()},
            "interval": self.interval,
            "levels": list(self.levels),
            "notes": self.notes,
        })

    def to_xarray(self):
        """An ``xarray.Dataset``: estimates on ``(group, coordinate)``, held-out scores on ``(method,
        group)`` and ``(method, level)``; group names as strings."""
        import xarray as xr

        groups = [str(g) for g in self.groups]
        variables = {}
        for name, arr in self.estimates.items():
            arr = np.asarray(arr, dtype=float)
            variables[name] = (("group",) if arr.ndim == 1 else ("group", "coordinate"), arr)
        coords = {"group": groups, "coordinate": list(self.coordinates)}
        if self.predictive:
            methods = list(self.predictive)
            coords.update(method=methods, level=list(self.levels))
            variables["log_score_per_group"] = (("method", "group"),
                                                np.stack([self.predictive[m]["per_group"] for m in methods]))
            variables["log_score"] = (("method",), np.array([self.predictive[m]["log_score"] for m in methods]))
            variables["coverage"] = (("method", "level"), np.array(
                [[self.predictive[m]["coverage"][q] for q in self.levels] for m in methods]))
        return xr.Dataset(variables, coords=coords, attrs={"interval": self.interval, "notes": "\n".join(self.notes)})

    # ------------------------------------------------------------------ figure
    def plot(self, path=None, max_groups: int = 60):
        """A forest plot per coordinate: each group's no-pooling estimate, EB mean with its central
        ``interval`` (normal), and the NUTS mean with its central interval; the population mean
        (phi, EB) as a line.  Groups sorted by EB mean.  Saved to ``path`` (and closed) when given;
        returns the path, else the figure."""
        import matplotlib.pyplot as plt  # lazy on purpose: matplotlib only for those who draw

        P, T = len(self.coordinates), len(self.groups)
        shown = min(T, max_groups)
        fig, axes = plt.subplots(1, P, figsize=(4.2 * P + 2.4, 1.4 + 0.24 * shown), squeeze=False)
        z = float(ndtri(0.5 + self.interval / 2))
        est = self.estimates
        for p, ax in enumerate(axes[0]):
            order = np.argsort(est["eb_mean"][:, p])[:shown]
            y = np.arange(order.size)
            ax.plot(est["no_pooling"][order, p], y + 0.22, "o", mfc="none", color="0.35", ms=4,
                    label="no pooling")
            m, s = est["eb_mean"][order, p], est["eb_sd"][order, p]
            ax.errorbar(m, y, xerr=z * s, fmt="s", color="C0", ms=3.5, lw=1.2, label=f"EB ({self.interval:.0%})")
            if "posterior_mean" in est:
                pm = est["posterior_mean"][order, p]
                lo, hi = est["posterior_lower"][order, p], est["posterior_upper"][order, p]
                ax.errorbar(pm, y - 0.22, xerr=[pm - lo, hi - pm], fmt="D", color="C3", ms=3, lw=1.0,
                            label=f"full posterior ({self.interval:.0%})")
            for name in [k for k in est if k.startswith("adapted[")]:
                ax.plot(est[name][order, p], y, "x", ms=4, label=name)
            prior = est["prior_mean"][:, p]
            if np.ptp(prior) == 0:
                ax.axvline(prior[0], color="k", lw=0.8, ls=":", label="population mean (EB)")
            else:
                ax.plot(prior[order], y, "|", color="k", ms=8, label="prior mean (EB)")
            ax.set_yticks(y)
            ax.set_yticklabels([str(self.groups[t]) for t in order], fontsize=7)
            ax.set_title(self.coordinates[p])
            ax.grid(axis="x", alpha=0.3)
        axes[0][-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0))
        if shown < T:
            fig.suptitle(f"first {shown} of {T} groups by EB mean")
        return save_figure(fig, path) if path is not None else fig


def _frame(rows):
    try:
        import pandas as pd
    except ImportError:
        return rows
    return pd.DataFrame(rows)


# ---------------------------------------------------------------------------- inputs


def _draws(nuts, name: str):
    """Flat draws ``(D, ...)`` of a site: sampled, or the value it was held at."""
    if name in nuts.samples:
        x = np.asarray(nuts.samples[name], dtype=float)
        return x.reshape((-1,) + x.shape[2:])
    if name in nuts.fixed:
        D = int(np.prod(np.shape(nuts.stats["diverging"])))
        return np.broadcast_to(np.asarray(nuts.fixed[name], dtype=float), (D,) + np.shape(nuts.fixed[name]))
    raise ValueError(f"the NUTS result has no draws of {name!r} (sampled sites: {sorted(nuts.samples)})")


class _Split(NamedTuple):
    """One split of linear-Gaussian data (one scalar per observation) as float64 host arrays, read
    through the likelihood (:meth:`~hiermeta.GaussianLikelihood.mean`, ``sd``) at given globals:
    ``y``, ``mask``, ``Z`` ``(T, N, P)``, ``X`` ``(T, N, K)``, ``fixed`` = ``X beta + offset`` and
    ``sd`` ``(T, N)``."""

    y: np.ndarray
    mask: np.ndarray
    Z: np.ndarray
    X: np.ndarray
    fixed: np.ndarray
    sd: np.ndarray


def _split(model: HierarchicalModel, data, values: Mapping) -> _Split:
    lik = model.likelihood
    g = model.globals_of({k: jnp.asarray(v) for k, v in values.items()}) if model.global_params else None
    design = data.inputs if isinstance(data.inputs, LinearDesign) else LinearDesign(data.inputs)
    T, N = np.shape(data.mask)
    first = lambda a: np.asarray(a, float)[:, :, 0]
    fixed = lik.mean(jnp.zeros((T, model.partition.num_params)), data, g)  # X beta + offset: theta at 0
    return _Split(y=first(data.obs), mask=np.asarray(data.mask, bool), Z=first(design.random),
                  X=np.zeros((T, N, 0)) if design.fixed is None else first(design.fixed), fixed=first(fixed),
                  sd=first(lik.sd(data, g)))


def _noise_value(lik, values: Mapping):
    if lik.noise != "learned":
        return None
    noise = np.asarray(values["noise_sd"], float)
    if noise.size != 1:
        raise ValueError("the shrinkage report handles one noise sd (a scalar response), got shape "
                         f"{noise.shape}")
    return float(noise.ravel()[0])


def _check_fit_data(design: _Split, type2, eb_mean, z, K, Q) -> Optional[float]:
    """Largest |score x SE| of the fixed effects at the type-II estimate on these data.

    At a type-II (ML or REML) optimum the fixed effects are the GLS estimates given the variance
    parameters, so the score of the log marginal in them, ``sum_t Z_t^T R_t^-1 e_t`` (phi),
    ``z_t`` times it (gamma), ``sum_t X_t^T R_t^-1 e_t`` (beta) with ``e_t`` the residual at the EB
    posterior mean, vanishes; times the standard error it is a z-score shift.  None when the result
    has no standard errors."""
    se = dict(getattr(type2, "fixed_effects_se", {}) or {})
    if "phi" not in se:
        return None
    resid = np.where(design.mask, design.y - np.einsum("tnp,tp->tn", design.Z, eb_mean) - design.fixed, 0.0)
    w = resid / design.sd**2
    per_task = np.einsum("tnp,tn->tp", design.Z, w)
    scores = {"phi": per_task.sum(0)}
    if Q:
        scores["gamma"] = z.T @ per_task
    if K:
        scores["beta"] = np.einsum("tnk,tn->k", design.X, w)
    worst = 0.0
    for name, score in scores.items():
        if name in se:
            worst = max(worst, float(np.max(np.abs(score * np.asarray(se[name], float)))))
    return worst


def _check_nuts_data(model: HierarchicalModel, support, nuts, T, P) -> None:
    theta = np.asarray(nuts.samples["theta"]) if "theta" in nuts.samples else None
    if theta is None or theta.ndim != 4 or theta.shape[2:] != (T, P):
        raise ValueError(f"the NUTS result's theta must have shape (chains, draws, {T}, {P}) for this table, got "
                         f"{None if theta is None else theta.shape}")
    ll = np.asarray(nuts.log_likelihood, float)
    if ll.shape[2:] != (T,):
        raise ValueError(f"the NUTS result's log-likelihood has {ll.shape[2:]} tasks, the table {T} groups")
    # the first draw's log-likelihood on these data must be the one NUTS recorded
    g = {name: jnp.asarray(_draws(nuts, name)[:1]) for name in model.global_params}
    here = np.asarray(task_log_likelihood(model, jnp.asarray(theta.reshape((-1, T, P))[:1]), support, g or None))[0]
    recorded = ll.reshape((-1, T))[0]
    if not np.allclose(here, recorded, rtol=1e-6, atol=1e-6 * np.max(np.abs(recorded))):
        raise ValueError("the NUTS result was not run on table.support (its recorded log-likelihood differs from "
                         "the one on these data): run NUTS on the same data as the type-II fit")


# ---------------------------------------------------------------------------- the report


def shrinkage_report(
    model: HierarchicalModel,
    table,
    type2,
    *,
    nuts=None,
    adapted: Optional[Mapping[str, Any]] = None,
    levels: Sequence[float] = (0.5, 0.9),
    interval: float = 0.9,
    fit_tolerance: float = 0.01,
) -> ShrinkageReport:
    """No pooling vs empirical Bayes vs full posterior, per group and coordinate, and held-out scores.

    Args:
      model: the :class:`~hiermeta.HierarchicalModel` the results belong to (``table.model(...)``),
        with a linear-Gaussian likelihood (the EB posterior and predictives are closed form).
      table: the :class:`~hiermeta.GroupedTable` (its support rows are what the fits saw; its
        query rows, if any, are scored).
      type2: the :class:`~hiermeta.Type2MLResult` on ``table.support`` (ML or REML).
      nuts: optionally a :class:`~hiermeta.NUTSResult` of ``model`` (with proper priors) on
        ``table.support``.
      adapted: optionally name -> adapted theta ``(T, P)`` (e.g. a meta-learner's ``adapt`` on the
        support), or name -> ``(theta, values)`` with ``values`` the global parameters it goes with
        (``noise_sd``, ``beta``; default the type-II ones).
      levels: central predictive-interval levels whose coverage is reported.
      interval: the level of the posterior intervals.
      fit_tolerance: the largest |score x SE| of the type-II fixed effects on ``table.support``
        accepted as "fitted on these data" (see the module docstring); above it a ``ValueError``.

    Returns a :class:`ShrinkageReport`.
    """
    lik = model.likelihood
    if not isinstance(lik, LinearGaussianLikelihood):
        raise ValueError(f"shrinkage_report needs a linear-Gaussian likelihood (closed-form EB posterior and "
                         f"predictive), got {type(lik).__name__}")
    if tuple(model.partition.names) != tuple(table.coordinates) or model.partition.num_params != len(table.coordinates):
        raise ValueError(f"the model's coordinates {list(model.partition.names)} are not the table's "
                         f"{list(table.coordinates)}: build the model with table.model(...)")
    if model.likelihood is not table.likelihood:
        raise ValueError("the model's likelihood is not the table's: build the model with table.model(...)")
    if not 0.0 < interval < 1.0:
        raise ValueError(f"interval must be in (0, 1), got {interval}")
    levels = tuple(float(q) for q in levels)
    if any(not 0.0 < q < 1.0 for q in levels):
        raise ValueError(f"levels must lie in (0, 1), got {levels}")
    T, P = table.num_groups, len(table.coordinates)
    K, Q = len(table.fixed_names), len(table.covariate_names)
    part_names = "support" if "support" in table.arrays else "all"
    z = table.arrays["all"].task_covariates

    # ---------------------------------------------------------------- type-II values
    phi = np.asarray(type2.phi, float)
    sigma = np.asarray(type2.sigma, float)
    extra = {k: np.asarray(v, float) for k, v in dict(type2.extra).items()}
    if phi.shape != (P,) or sigma.shape != (model.partition.num_modules,):
        raise ValueError(f"the type-II result has phi {phi.shape} and sigma {sigma.shape}; the model needs "
                         f"({P},) and ({model.partition.num_modules},)")
    missing = sorted(set(model.hyper_sites()) - set(extra))
    if missing:
        raise ValueError(f"the type-II result lacks the model's sites {missing}: fit it with this model")
    _noise_value(lik, extra)
    design = _split(model, table.support, extra)
    prior_mean = np.broadcast_to(np.asarray(model.prior_mean(jnp.asarray(phi), extra, z), float), (T, P))
    L = np.asarray(model.prior_scale_tril(jnp.asarray(sigma), extra), float)
    prior_var = np.diag(L @ L.T)
    eb_mean, eb_cov = (np.asarray(a, float) for a in lik.posterior(table.support, prior_mean, L,
                                                                    model.globals_of(extra)))
    eb_sd = np.sqrt(np.clip(np.diagonal(eb_cov, axis1=1, axis2=2), 0.0, None))
    worst = _check_fit_data(design, type2, eb_mean, z, K, Q)
    notes = [f"estimates on the {part_names} rows ({int(design.mask.sum())} rows, {T} groups); "
             f"type-II {getattr(type2, 'method', 'ML')}: converged={getattr(type2, 'converged', None)}, "
             f"singular={list(getattr(type2, 'singular', ()))}"]
    if worst is not None and worst > fit_tolerance:
        raise ValueError(
            f"the type-II result does not fit table.{part_names}: its fixed effects are not the GLS estimates on "
            f"these rows (largest |score x SE| {worst:.3g} > {fit_tolerance}); fit it with "
            f"hm.type2_ml(model, table.{part_names})" + ("" if getattr(type2, "converged", True) else
                                                         " (and it did not converge)"))

    # ---------------------------------------------------------------- no pooling and pooling factors
    n_support = design.mask.sum(1)
    no_pool, no_pool_se = _no_pooling(design)
    with np.errstate(divide="ignore", invalid="ignore"):
        pooling = np.where(prior_var > 0, eb_sd**2 / np.where(prior_var > 0, prior_var, 1.0), 1.0)
        pooling_distance = 1.0 - (eb_mean - prior_mean) / (no_pool - prior_mean)
    estimates = {
        "n_support": n_support,
        "no_pooling": no_pool,
        "no_pooling_se": no_pool_se,
        "prior_mean": prior_mean,
        "eb_mean": eb_mean,
        "eb_sd": eb_sd,
        "pooling": np.clip(pooling, 0.0, 1.0),
        "pooling_distance": np.where(np.isfinite(pooling_distance), pooling_distance, np.nan),
    }
    hyper = _eb_hyperparameters(model, table, type2, phi, sigma, extra)

    # ---------------------------------------------------------------- full posterior
    draws = None
    if nuts is not None:
        _check_nuts_data(model, table.support, nuts, T, P)
        theta = _draws(nuts, "theta")  # (D, T, P)
        lo, hi = np.quantile(theta, [0.5 - interval / 2, 0.5 + interval / 2], axis=0)
        phi_d = _draws(nuts, "phi")
        m_d = phi_d[:, None, :] + (np.einsum("tq,dqp->dtp", z, _draws(nuts, "gamma")) if Q else 0.0)
        post_mean = theta.mean(0)
        with np.errstate(divide="ignore", invalid="ignore"):
            pp = 1.0 - (post_mean - m_d.mean(0)) / (no_pool - m_d.mean(0))
        estimates.update(posterior_mean=post_mean, posterior_sd=theta.std(0, ddof=1) if theta.shape[0] > 1 else
                         np.zeros((T, P)), posterior_lower=lo, posterior_upper=hi,
                         pooling_posterior=np.where(np.isfinite(pp), pp, np.nan))
        draws = (theta, {name: _draws(nuts, name) for name in model.global_params})
        _posterior_hyperparameters(hyper, nuts)
        diag = dict(getattr(nuts, "diagnostics", {}) or {})
        notes.append(f"NUTS: {theta.shape[0]} draws, max r-hat {diag.get('max_r_hat', float('nan')):.3f}, "
                     f"min ESS {diag.get('min_ess', float('nan')):.0f}, {getattr(nuts, 'num_divergences', 0)} "
                     f"divergences, converged={diag.get('converged')}")

    # ---------------------------------------------------------------- adapted values
    plug_ins = {"MAP plug-in (EB)": (eb_mean, extra)}
    for name, value in dict(adapted or {}).items():
        theta_a, values = (value if isinstance(value, tuple) else (value, {}))
        theta_a = np.asarray(theta_a, float)
        if theta_a.shape != (T, P):
            raise ValueError(f"adapted[{name!r}] must have shape ({T}, {P}) (groups, coordinates), got {theta_a.shape}")
        values = {**extra, **{k: np.asarray(v, float) for k, v in dict(values).items()}}
        for what, arr in (("theta", theta_a), *((f"values[{k!r}]", v) for k, v in values.items())):
            if not np.all(np.isfinite(arr)):
                groups = [table.groups[t] for t in np.flatnonzero(~np.isfinite(arr).all(axis=1))][:5] \
                    if what == "theta" else []
                raise ValueError(f"adapted[{name!r}] {what} holds {int(np.sum(~np.isfinite(arr)))} NaN or infinite "
                                 f"value(s){f' (groups {groups})' if groups else ''}: the adaptation failed or "
                                 "diverged, so its scores and coverage would mean nothing")
        _noise_value(lik, values)
        estimates[f"adapted[{name}]"] = theta_a
        plug_ins[f"plug-in ({name})"] = (theta_a, values)

    # ---------------------------------------------------------------- held-out scores
    predictive = {}
    if "query" in table.arrays:
        scored = np.asarray(table.query.mask).any(axis=1)  # groups with query rows
        take = lambda data: jax.tree_util.tree_map(lambda a: a[scored], data)
        support, query = take(table.support), take(table.query)
        for label, (th, values) in plug_ins.items():
            predictive[label] = _summary(score_draws(model, th[scored][:, None, :], query,
                                                     extra=_globals(model, values)), scored, levels)
            if label == "MAP plug-in (EB)":
                log_pred, _, mean, sd = lik.predictive(support, query, prior_mean[scored], L, model.globals_of(extra))
                predictive["EB posterior"] = _summary(score_gaussian_mixture(
                    log_pred[:, None], mean[:, None], sd[:, None], query), scored, levels)
                if draws is not None:
                    theta_d, globals_d = draws
                    predictive["full posterior (NUTS)"] = _summary(score_draws(
                        model, np.swapaxes(theta_d, 0, 1)[scored], query, extra=globals_d or None), scored, levels)
        n_query = np.asarray(table.query.mask)
        notes.append(f"held-out: {int(n_query.sum())} query rows in {int(scored.sum())} groups (split: {table.split})")
    for r in hyper:
        r.pop("_key")
    return ShrinkageReport(groups=tuple(table.groups), coordinates=tuple(table.coordinates), estimates=estimates,
                           hyperparameters=hyper, predictive=predictive, interval=float(interval), levels=levels,
                           notes=notes)


def _no_pooling(design: _Split):
    """Per-group weighted least squares; NaN for coordinates a group cannot identify."""
    T, _, P = design.Z.shape
    est, se = np.full((T, P), np.nan), np.full((T, P), np.nan)
    target, sd = design.y - design.fixed, design.sd
    for t in range(T):
        rows = design.mask[t]
        A = design.Z[t][rows] / sd[t][rows, None]
        b = target[t][rows] / sd[t][rows]
        pinv = np.linalg.pinv(A)
        null = np.eye(P) - pinv @ A
        ok = np.linalg.norm(null, axis=0) < 1e-8
        est[t, ok] = (pinv @ b)[ok]
        cov = pinv @ pinv.T  # (A^T A)^+ : the covariance of the estimate, identifiable coordinates
        se[t, ok] = np.sqrt(np.diag(cov))[ok]
    return est, se


def _eb_hyperparameters(model, table, type2, phi, sigma, extra) -> list:
    """One row per hyperparameter coordinate: its name from the data, the type-II value and SE."""
    se = dict(getattr(type2, "fixed_effects_se", {}) or {})
    rows = []

    def add(name, key, value, stderr=float("nan")):
        rows.append({"name": name, "eb": float(value), "eb_se": float(stderr), "_key": key})

    for p, c in enumerate(table.coordinates):
        add(f"phi[{c}]", ("phi", p), phi[p], _at(se.get("phi"), p))
    for m, c in enumerate(model.partition.names):
        add(f"sigma[{c}]", ("sigma", m), sigma[m])
    for k, coords in enumerate(model.correlation_blocks):
        Lc = extra[f"corr_chol_{k}"]
        C = Lc @ Lc.T
        for i in range(len(coords)):
            for j in range(i):
                a, b = table.coordinates[coords[j]], table.coordinates[coords[i]]
                add(f"corr[{a},{b}]", (f"corr_chol_{k}", i, j), C[i, j])
    for q, zc in enumerate(table.covariate_names):
        for p, c in enumerate(table.coordinates):
            add(f"gamma[{zc},{c}]", ("gamma", q, p), extra["gamma"][q, p], _at(se.get("gamma"), (q, p)))
    for k, f in enumerate(table.fixed_names):
        add(f"beta[{f}]", ("beta", k), extra["beta"][k], _at(se.get("beta"), k))
    if "noise_sd" in extra:
        add("noise_sd", ("noise_sd",), np.ravel(extra["noise_sd"])[0])
    return rows


def _at(arr, idx):
    return float("nan") if arr is None else float(np.asarray(arr)[idx])


def _posterior_hyperparameters(rows, nuts) -> None:
    """Add the NUTS mean and sd of each hyperparameter row (in place; sites NUTS lacks are skipped)."""
    for r in rows:
        site, *idx = r["_key"]
        try:
            d = _draws(nuts, site)
        except ValueError:
            continue
        if site.startswith("corr_chol_"):  # C[i, j] = L[i] . L[j]
            x = np.einsum("dk,dk->d", d[:, idx[0], :], d[:, idx[1], :])
        else:
            x = d[(slice(None), *idx)] if idx else d.reshape(d.shape[0], -1)[:, 0]
        r["posterior_mean"] = float(np.mean(x))
        r["posterior_sd"] = float(np.std(x, ddof=1)) if x.shape[0] > 1 else 0.0


def _globals(model: HierarchicalModel, values: Mapping) -> Optional[dict]:
    """The likelihood's global parameters among ``values`` (None when it has none)."""
    return {name: np.asarray(values[name], float) for name in model.global_params} or None


def _summary(scores, scored: np.ndarray, levels) -> dict:
    """The report's entry of one method from the library's :class:`~hiermeta.predictive.PredictiveScores`
    on the groups with query rows (``scored``): the log score per query observation, per group (NaN
    for the groups left out), its mean over groups and standard error, and the coverage of the
    central predictive intervals of each level (from the PIT of every query row)."""
    per_scored = np.asarray(scores.per_obs(), float)
    per_group = np.full(scored.shape, np.nan)
    per_group[scored] = per_scored
    return {
        "log_score": float(per_scored.mean()),
        "log_score_sem": float(per_scored.std(ddof=1) / np.sqrt(per_scored.size)) if per_scored.size > 1 else float("nan"),
        "coverage": dict(zip(levels, coverage(scores.pit, levels))),
        "num_groups": int(scored.sum()),
        "num_obs": int(np.sum(scores.num_obs)),
        "per_group": per_group,
    }
