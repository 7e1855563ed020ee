"""MAP plug-in versus empirical-Bayes posterior versus full posterior, for any mixed model, in one call.

:func:`compare` takes a fit (:class:`~hiermeta.mixed.result.MixedFit`: it carries its model and
data), held-out rows and optionally a NUTS run on the same model
(:func:`~hiermeta.mixed.numpyro_model.mixed_nuts`), and reports

* **per group and term** (every level of every term, every column): no pooling (the level's own
  maximum-likelihood effect with the fixed effects and the other terms' conditional modes held at
  the fit's values; NaN where the level's data cannot identify it, e.g. all-0 binary rows), the EB
  conditional mode and sd (the fit's ``ranef``/``condVar``), the posterior mean and sd (NUTS), and
  the pooling factor ``condVar / Sigma_kk`` (0: the level's data decide; 1: complete pooling);
* **hyperparameters**: fixed effects (estimate and SE; posterior mean and sd), random-effect sds
  and correlations, the residual sd;
* **held-out scores** (:mod:`hiermeta.mixed.heldout`) of (a) the MAP plug-in, (b) the EB posterior
  of the random effects (``eb``: ``"exact"`` for a Gaussian model, ``"quadrature"`` for one scalar
  term, ``"importance"`` or ``"laplace"`` otherwise; ``"auto"`` picks in that order, and the report
  says which; importance sampling per level when the model has one term, jointly otherwise, where its
  effective sample size is reported and usually small: ``"auto"`` then takes ``"laplace"``), (c) NUTS: per unit (the levels of one grouping factor in the held-out rows) the log
  predictive density per observation (mean and standard error over units), the coverage of the
  central 50% and 90% predictive intervals (randomised PIT for counts), the Brier score of 0/1 rows;
  and **paired differences** between the methods, unit by unit, with their standard errors; where
  the model has one grouping factor and a Gaussian likelihood, the paper's PLL learners' plug-in
  scores from a :func:`hiermeta.shrinkage_report` on the same split (``shrinkage=``) as extra rows;
* **the approximation checked**: for a Laplace fit of a GLMM, the log-likelihood at the estimate
  by importance sampling beside Laplace's; with one scalar term, the AGQ(25) refit's estimates
  beside the Laplace ones in units of their standard errors; with NUTS, the posterior means beside
  the estimates in posterior sds.  A fixed effect moved by more than ``0.5`` SE, a random-effect
  sd by more than 10%, or a log-likelihood by more than 1 (and 3 Monte Carlo SEs) is an
  :class:`~hiermeta.errors.ApproximationWarning`: the approximation, not the model, moved the answer.

Provenance: the report records the formula, family, rows, the fit's method, the EB method and the
NUTS settings; a NUTS run on a different model (another response, design, term or correlation
structure) is refused.  Outputs: :meth:`Comparison.to_string`, :meth:`Comparison.to_dict` (JSON),
:meth:`Comparison.plot` (matplotlib, imported there).  :func:`holdout_split` makes the usual
splits (the last ``k`` rows per group by an ordering column, or a random fraction).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np

from ..errors import ApproximationWarning
from ..printing import format_cell, format_table, to_jsonable
from .heldout import (Scores, eb_gaussian_exact, eb_importance, eb_laplace, eb_quadrature, heldout_rows,
                      importance_log_likelihood, nuts_predictive, plug_in, posterior_state, score,
                      score_gaussian_exact)
from .terms import covariances

__all__ = ["Comparison", "compare", "holdout_split", "EB_METHODS"]

EB_METHODS = ("auto", "exact", "quadrature", "importance", "laplace")
SE_SHIFT, SD_SHIFT, LOGLIK_SHIFT = 0.5, 0.10, 1.0


# ---------------------------------------------------------------------------- splits


def holdout_split(data, group, *, last: Optional[int] = None, order: Optional[str] = None,
                  fraction: Optional[float] = None, seed: int = 0) -> tuple:
    """``(train, heldout)`` data frames: the last ``last`` rows of every group by ``order`` (each group keeps
    at least one training row), or a random ``fraction`` of the rows (``seed``)."""
    import pandas as pd

    df = pd.DataFrame(data).reset_index(drop=True)
    group = [group] if isinstance(group, str) else list(group)
    if (last is None) == (fraction is None):
        raise ValueError("give either last=K (with order=COLUMN) or fraction=F")
    if last is not None:
        if order is None or order not in df.columns:
            raise ValueError(f"last={last} needs an ordering column (order=), one of {list(df.columns)}")
        if int(last) != last or last < 1:
            raise ValueError(f"last must be a positive integer, got {last!r}")
        rank = df.groupby(group, sort=False)[order].rank(method="first", ascending=False)
        size = df.groupby(group, sort=False)[order].transform("size")
        held = (rank <= np.minimum(int(last), size - 1)).to_numpy()
    else:
        if not 0.0 < float(fraction) < 1.0:
            raise ValueError(f"fraction must be in (0, 1), got {fraction!r}")
        rng = np.random.default_rng(seed)
        held = np.zeros(len(df), bool)
        held[rng.choice(len(df), max(1, int(round(float(fraction) * len(df)))), replace=False)] = True
    if held.all() or not held.any():
        raise ValueError("the split leaves no training or no held-out rows")
    return df[~held].reset_index(drop=True), df[held].reset_index(drop=True)


# ---------------------------------------------------------------------------- the report


@dataclass(frozen=True, eq=False)
class Comparison:
    """The report of :func:`compare` (module docstring).

    Attributes:
      provenance: what was computed on what (formula, family, rows, the fit's method, the EB
        method, the NUTS settings and diagnostics, the held-out units).
      groups: one dict per (term, level, column).
      hyperparameters: one dict per fixed effect, random-effect sd/correlation and residual sd.
      scores: method -> summary (``lpd_per_obs``, ``lpd_sem``, ``coverage``, ``brier``, ...).
      per_unit: method -> ``(U,)`` log predictive density per observation of each unit.
      paired: one dict per pair of methods (``difference``, ``se``, ``num_units``; Brier too).
      approximation: the checks (module docstring) and ``warnings``.
      units: the held-out units' names; notes: everything else worth knowing.
    """

    provenance: dict
    groups: list
    hyperparameters: list
    scores: dict
    per_unit: dict
    paired: list
    approximation: dict
    units: tuple
    notes: list = field(default_factory=list)

    def to_dict(self) -> dict:
        """Everything, JSON-serialisable (NaN as null)."""
        return to_jsonable({"schema": "hiermeta/mixed-compare/v1", "provenance": self.provenance,
                             "scores": self.scores, "paired": self.paired, "approximation": self.approximation,
                             "hyperparameters": self.hyperparameters, "groups": self.groups,
                             "per_unit": {"units": list(self.units), **self.per_unit}, "notes": self.notes})

    def score_rows(self) -> list:
        rows = []
        for method, s in self.scores.items():
            cov = s.get("interval_coverage") or s.get("coverage") or {}
            rows.append([method, s["lpd_per_obs"], s["lpd_sem"], cov.get(0.5, np.nan), cov.get(0.9, np.nan),
                         s.get("brier"), s["num_units"], s["num_rows"]])
        return rows

    def to_string(self, max_groups: int = 10) -> str:
        p = self.provenance
        out = [f"MAP vs posterior: {p['formula']}  [{p['family']}]",
               f"fit: {p['fit_method']} on {p['train_rows']} rows; held out: {p['heldout_rows']} rows in "
               f"{p['num_units']} units ({p['units_by']}); EB posterior: {p['eb_method']}"]
        if p.get("nuts"):
            n = p["nuts"]
            out.append(f"NUTS: {n['num_chains']} x {n['num_samples']} draws (warm-up {n['num_warmup']}), max r-hat "
                       f"{format_cell(n['max_r_hat'], 3)}, min ESS {format_cell(n['min_ess'], 0)}, "
                       f"{n['num_divergences']} divergences")
        out += ["", "held-out scores (log predictive density per observation, mean over units):",
                format_table(["method", "log score", "se", "cover 50%", "cover 90%", "Brier", "units", "rows"],
                             self.score_rows(), digits=4)]
        if self.paired:
            out += ["", "paired differences (unit by unit; log score: higher is better, Brier: lower is better):",
                    format_table(["difference", "log score", "se", "Brier", "se"],
                                 [[r["pair"], r["difference"], r["se"], r.get("brier_difference", np.nan),
                                   r.get("brier_se", np.nan)] for r in self.paired], digits=4)]
        out += ["", "hyperparameters:",
                format_table(["parameter", "estimate", "se", "posterior mean", "posterior sd"],
                             [[h["name"], h["estimate"], h.get("se", np.nan), h.get("posterior_mean", np.nan),
                               h.get("posterior_sd", np.nan)] for h in self.hyperparameters], digits=4)]
        a = self.approximation
        if a.get("agq"):
            out += ["", f"approximation: Laplace vs AGQ({a['agq']['num_nodes']}):",
                    format_table(["parameter", "Laplace", "AGQ", "difference / SE"],
                                 [[r["name"], r["laplace"], r["agq"], r["shift"]] for r in a["agq"]["rows"]], digits=4)]
        if a.get("importance"):
            i = a["importance"]
            out.append(f"log-likelihood at the estimate: Laplace {i['laplace']:.3f}, importance sampling "
                       f"{i['importance']:.3f} +- {i['importance_se']:.3f} (ESS {i['ess']:.0f} of {i['num_draws']})")
        for w in a.get("warnings", []):
            out.append(f"WARNING: {w}")
        shown = sorted(self.groups, key=lambda r: -abs(_or0(r.get("posterior_mean")) - _or0(r["eb_mode"])))
        shown = shown[:max_groups]
        if shown:
            out += ["", f"groups ({len(self.groups)} rows; {len(shown)} shown, largest |posterior mean - EB mode| first):",
                    format_table(["term", "level", "column", "n", "no pooling", "EB mode", "EB sd", "post. mean", "post. sd",
                                  "pooling"],
                                 [[g["term"], g["level"], g["column"], g["n_train"], g["no_pooling"], g["eb_mode"],
                                   g["eb_sd"], g.get("posterior_mean", np.nan), g.get("posterior_sd", np.nan), g["pooling"]]
                                  for g in shown], digits=3)]
        out += [f"note: {n}" for n in self.notes]
        return "\n".join(out)

    def __str__(self) -> str:
        return self.to_string()

    def plot(self, path=None, max_groups: int = 60):
        """A figure: the first term's first column per level (no pooling, EB mode +- sd, posterior mean
        +- sd) and the methods' held-out log scores with their standard errors.  Returns the figure."""
        import matplotlib

        if path is not None:
            matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt

        rows = [g for g in self.groups if g["term_index"] == 0 and g["column_index"] == 0]
        rows = sorted(rows, key=lambda g: g["eb_mode"])
        if len(rows) > max_groups:
            rows = [rows[int(i)] for i in np.linspace(0, len(rows) - 1, max_groups)]
        fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(12, max(4.0, 0.16 * len(rows) + 1.5)),
                                       gridspec_kw={"width_ratios": [2, 1]})
        y = np.arange(len(rows))
        ax0.plot([g["no_pooling"] for g in rows], y, "x", color="0.5", label="no pooling")
        ax0.errorbar([g["eb_mode"] for g in rows], y - 0.15, xerr=[g["eb_sd"] for g in rows], fmt="o", ms=3,
                     label="EB mode +- sd")
        if rows and "posterior_mean" in rows[0]:
            ax0.errorbar([g["posterior_mean"] for g in rows], y + 0.15, xerr=[g["posterior_sd"] for g in rows],
                         fmt="s", ms=3, label="posterior mean +- sd")
        ax0.set_yticks(y)
        ax0.set_yticklabels([str(g["level"]) for g in rows], fontsize=6)
        if rows:
            ax0.set_xlabel(f"{rows[0]['term']}: {rows[0]['column']}")
        ax0.legend(fontsize=7)
        methods = list(self.scores)
        ax1.errorbar([self.scores[m]["lpd_per_obs"] for m in methods], np.arange(len(methods)),
                     xerr=[self.scores[m]["lpd_sem"] for m in methods], fmt="o")
        ax1.set_yticks(np.arange(len(methods)))
        ax1.set_yticklabels(methods, fontsize=7)
        ax1.set_xlabel("held-out log score per observation")
        fig.suptitle(self.provenance["formula"], fontsize=9)
        fig.tight_layout()
        if path is not None:
            fig.savefig(path, dpi=120)
            plt.close(fig)
        return fig


def _or0(v):
    return 0.0 if v is None or not np.isfinite(v) else v


# ---------------------------------------------------------------------------- provenance


def _check_same_model(fit, nuts) -> None:
    """Refuse a NUTS run on another model than the fit's (module docstring)."""
    a, b = fit.design, nuts.model.design
    if fit.model.family_spec != nuts.model.family:
        raise ValueError(f"the NUTS run's family is {nuts.model.family!r}, the fit's {fit.model.family_spec!r}")
    if a.num_rows != b.num_rows or not np.allclose(a.response, b.response) or not np.allclose(a.weights, b.weights):
        raise ValueError("the NUTS run was on other data than the fit (responses or weights differ)")
    if tuple(a.fixed_names) != tuple(b.fixed_names) or not np.allclose(a.X, b.X):
        raise ValueError(f"the NUTS run's fixed effects {list(b.fixed_names)} differ from the fit's {list(a.fixed_names)}")
    if len(a.terms) != len(b.terms):
        raise ValueError(f"the NUTS run has {len(b.terms)} random-effect terms, the fit {len(a.terms)}")
    for s, t in zip(a.terms, b.terms):
        if s.correlated != t.correlated:
            raise ValueError(f"the NUTS run's {t.label()} and the fit's {s.label()} differ: one has correlations, "
                             "the other none")
        if (s.group, s.columns, s.levels) != (t.group, t.columns, t.levels) or not np.array_equal(s.codes, t.codes) \
                or not np.allclose(s.Z, t.Z):
            raise ValueError(f"the NUTS run's term {t.label()} differs from the fit's {s.label()}")


# ---------------------------------------------------------------------------- pieces


def _no_pooling(fit, max_iter: int = 50) -> list:
    """Per term ``(estimates (L, q), standard errors (L, q))``: each level's own maximum-likelihood effect,
    the fixed effects and the other terms' modes held at the fit's values (Fisher scoring, batched)."""
    est, d = fit.estimate, fit.design
    fam = fit.model.family_spec
    y, w = fam.prepare(d.response, d.weights)
    base = d.X @ np.asarray(est.beta) + d.offset
    modes = [t.Z * np.asarray(b)[t.codes] for t, b in zip(d.terms, est.b)]
    out = []
    for k, t in enumerate(d.terms):
        other = base + sum(np.sum(m, axis=1) for j, m in enumerate(modes) if j != k)
        L, q = t.num_levels, t.num_columns
        b = np.zeros((L, q))
        ok = np.ones(L, bool)
        G = np.zeros((L, q, q))
        for _ in range(1 if fam.has_scale else max_iter):
            eta = other + np.einsum("nq,nq->n", t.Z, b[t.codes])
            mu, dmu = fam.inverse_link(eta), fam.mu_eta(eta)
            W = w * dmu**2 / np.maximum(fam.variance(mu), 1e-300)
            z = (eta - other) + (y - mu) / dmu
            G = np.zeros((L, q, q))
            r = np.zeros((L, q))
            np.add.at(G, t.codes, W[:, None, None] * t.Z[:, :, None] * t.Z[:, None, :])
            np.add.at(r, t.codes, (W * z)[:, None] * t.Z)
            invertible = np.linalg.cond(G) < 1e12
            ok &= invertible
            new = np.where(invertible[:, None], np.linalg.solve(G + np.where(invertible, 0, 1)[:, None, None]
                                                                * np.eye(q), r[..., None])[..., 0], np.nan)
            step = np.nanmax(np.abs(new - b)) if np.isfinite(new).any() else 0.0
            b = np.where(np.isfinite(new), new, 0.0)
            if step < 1e-9:
                break
        if not fam.has_scale:  # beyond 25 on the link scale: the level's data are separated (all 0 or all 1)
            ok &= np.all(np.abs(b) < 25.0, axis=1)
        scale2 = float(est.sigma) ** 2 if est.sigma is not None else 1.0
        se = np.sqrt(np.maximum(np.diagonal(np.linalg.inv(G + np.where(ok, 0, 1)[:, None, None] * np.eye(q)),
                                            axis1=1, axis2=2), 0.0) * scale2)
        out.append((np.where(ok[:, None], b, np.nan), np.where(ok[:, None], se, np.nan)))
    return out


def _groups(fit, nuts) -> list:
    est, d = fit.estimate, fit.design
    covs = covariances(d.terms, est.theta, 1.0 if est.sigma is None else float(est.sigma))
    own = _no_pooling(fit)
    n_train = [np.bincount(t.codes, minlength=t.num_levels) for t in d.terms]
    rows = []
    for k, t in enumerate(d.terms):
        post = nuts.flat("b", k) if nuts is not None else None
        for level in range(t.num_levels):
            for c, col in enumerate(t.columns):
                var = float(est.b_cov[k][level, c, c])
                row = {"term": t.label(), "term_index": k, "level": str(t.levels[level]), "column": col,
                       "column_index": c, "n_train": int(n_train[k][level]),
                       "no_pooling": float(own[k][0][level, c]), "no_pooling_se": float(own[k][1][level, c]),
                       "eb_mode": float(est.b[k][level, c]), "eb_sd": math.sqrt(max(var, 0.0)),
                       "prior_sd": math.sqrt(max(float(covs[k][c, c]), 0.0)),
                       "pooling": var / float(covs[k][c, c]) if covs[k][c, c] > 0 else 1.0}
                if post is not None:
                    row["posterior_mean"] = float(post[:, level, c].mean())
                    row["posterior_sd"] = float(post[:, level, c].std(ddof=1))
                rows.append(row)
    return rows


def _hyperparameters(fit, nuts) -> list:
    est, d = fit.estimate, fit.design
    se = np.sqrt(np.maximum(np.diag(est.beta_cov), 0.0))
    rows = []
    for j, name in enumerate(d.fixed_names):
        row = {"name": name, "estimate": float(est.beta[j]), "se": float(se[j])}
        if nuts is not None:
            draws = nuts.flat("beta")[:, j]
            row.update(posterior_mean=float(draws.mean()), posterior_sd=float(draws.std(ddof=1)))
        rows.append(row)
    covs = covariances(d.terms, est.theta, 1.0 if est.sigma is None else float(est.sigma))
    for k, t in enumerate(d.terms):
        sd = np.sqrt(np.maximum(np.diag(covs[k]), 0.0))
        for c, col in enumerate(t.columns):
            row = {"name": f"sd {t.group}: {col}", "estimate": float(sd[c])}
            if nuts is not None:
                draws = nuts.flat("sd", k)[:, c]
                row.update(posterior_mean=float(draws.mean()), posterior_sd=float(draws.std(ddof=1)))
            rows.append(row)
        if t.correlated and t.num_columns > 1:
            for a in range(t.num_columns):
                for b in range(a):
                    r = covs[k][a, b] / (sd[a] * sd[b]) if sd[a] * sd[b] > 0 else np.nan
                    row = {"name": f"corr {t.group}: {t.columns[a]}, {t.columns[b]}", "estimate": float(r)}
                    if nuts is not None:
                        draws = nuts.flat("corr", k)[:, a, b]
                        row.update(posterior_mean=float(draws.mean()), posterior_sd=float(draws.std(ddof=1)))
                    rows.append(row)
    if est.sigma is not None:
        row = {"name": "residual sd", "estimate": float(est.sigma)}
        if nuts is not None:
            draws = nuts.flat("sigma")
            row.update(posterior_mean=float(draws.mean()), posterior_sd=float(draws.std(ddof=1)))
        rows.append(row)
    return rows


def _summary(scores: Scores, levels: Sequence[float]) -> dict:
    """:class:`hiermeta.predictive.PredictiveScores`' summary, NaN (not 0) where nothing could be scored."""
    from ..predictive import coverage, interval_coverage

    per_obs = scores.log_pred / scores.num_obs
    finite = np.isfinite(per_obs)
    U = int(finite.sum())
    out = {"lpd_per_obs": float(per_obs[finite].mean()) if U else float("nan"),
           "lpd_sem": float(per_obs[finite].std(ddof=1) / np.sqrt(U)) if U > 1 else float("nan"),
           "num_units": int(per_obs.size), "num_rows": int(scores.pit.size), "units_scored": U}
    try:
        out["coverage"] = {float(q): c for q, c in zip(levels, coverage(scores.pit, levels))}
    except ValueError:
        out["coverage"] = {float(q): float("nan") for q in levels}
    if scores.cdf_at is not None:
        try:
            out["interval_coverage"] = {float(q): c for q, c in zip(
                levels, interval_coverage(scores.cdf_below, scores.cdf_at, levels))}
        except ValueError:
            out["interval_coverage"] = {float(q): float("nan") for q in levels}
    return out


def _brier(scores: Scores, y) -> Optional[np.ndarray]:
    return None if scores.p_one is None else (scores.p_one - y) ** 2


def _paired(per_unit: dict, brier: dict, held) -> list:
    names = list(per_unit)
    out = []
    for i, a in enumerate(names):
        for b in names[:i]:
            diff = per_unit[a] - per_unit[b]
            diff = diff[np.isfinite(diff)]
            row = {"pair": f"{a} - {b}", "difference": float(diff.mean()) if diff.size else float("nan"),
                   "se": float(diff.std(ddof=1) / np.sqrt(diff.size)) if diff.size > 1 else float("nan"),
                   "num_units": int(diff.size)}
            if brier.get(a) is not None and brier.get(b) is not None:
                # per unit mean Brier difference, so that the SE respects the units' dependence
                d = (brier[a] - brier[b])
                unit = np.bincount(held.units, weights=np.nan_to_num(d), minlength=held.num_units) / \
                    np.bincount(held.units, minlength=held.num_units)
                unit = unit[np.isfinite(unit)]
                row["brier_difference"] = float(np.nanmean(d))
                row["brier_se"] = float(unit.std(ddof=1) / np.sqrt(unit.size)) if unit.size > 1 else float("nan")
            out.append(row)
    return out


def _approximation(fit, nuts, check: bool, num_draws: int, seed: int) -> dict:
    out = {"warnings": []}
    est = fit.estimate
    family = fit.model.family_spec
    if family.has_scale or not check:
        return out
    if est.method == "Laplace":
        imp = importance_log_likelihood(fit, num_draws=num_draws, seed=seed)
        out["importance"] = imp
        gap = imp["importance"] - imp["laplace"]
        if imp["ess"] < 50:
            out["warnings"].append(f"importance sampling on the Laplace proposal cannot check the approximation here "
                                   f"(effective sample size {imp['ess']:.0f} of {imp['num_draws']}: the effects do "
                                   "not factor by level); compare with NUTS")
        elif abs(gap) > max(LOGLIK_SHIFT, 3 * imp["importance_se"]):
            out["warnings"].append(f"the log-likelihood at the Laplace estimate is {imp['laplace']:.2f} by Laplace and "
                                   f"{imp['importance']:.2f} +- {imp['importance_se']:.2f} by importance sampling: the "
                                   "Laplace approximation is off here (binary or small-count data with few rows per level)")
        d = fit.design
        if len(d.terms) == 1 and d.terms[0].num_columns == 1:
            agq = fit.model.fit(approximation="agq", nodes=25, warn=False).estimate
            se = np.sqrt(np.diag(est.beta_cov))
            rows = [{"name": n, "laplace": float(a), "agq": float(b), "shift": float((a - b) / s)}
                    for n, a, b, s in zip(d.fixed_names, est.beta, agq.beta, se)]
            sd_l, sd_a = float(est.theta[0]), float(agq.theta[0])
            rows.append({"name": f"sd {d.terms[0].group}", "laplace": sd_l, "agq": sd_a,
                         "shift": float("nan"), "relative": sd_l / sd_a - 1 if sd_a > 0 else float("nan")})
            out["agq"] = {"num_nodes": 25, "rows": rows, "loglik_laplace": float(est.loglik),
                          "loglik_agq": float(agq.loglik)}
            moved = [r["name"] for r in rows[:-1] if abs(r["shift"]) > SE_SHIFT]
            if moved:
                out["warnings"].append(f"AGQ(25) moves {moved} by more than {SE_SHIFT} standard errors from the Laplace "
                                       "estimates: the approximation, not the model, moved the answer; prefer "
                                       "approximation='agq'")
            if abs(rows[-1]["relative"]) > SD_SHIFT:
                out["warnings"].append(f"AGQ(25) gives the random-effect sd {sd_a:.3f}, Laplace {sd_l:.3f} "
                                       f"({100 * rows[-1]['relative']:+.0f}%): the Laplace approximation biases it")
    if nuts is not None:
        shift = {}
        for h in _hyperparameters(fit, nuts):
            if h.get("posterior_sd", 0) > 0:
                shift[h["name"]] = (h["posterior_mean"] - h["estimate"]) / h["posterior_sd"]
        out["nuts_minus_estimate_in_posterior_sds"] = shift
    for w in out["warnings"]:
        warnings.warn(w, ApproximationWarning, stacklevel=3)
    return out


# ---------------------------------------------------------------------------- the call


def _learner_rows(shrinkage, held, per_unit: dict) -> dict:
    """The paper's learners' rows (``plug-in (NAME)``) of a :func:`hiermeta.shrinkage_report` on the same
    split, aligned with the held-out units by group name; refused when the groups or rows differ."""
    names = [str(g) for g in shrinkage.groups]
    index = {g: i for i, g in enumerate(names)}
    missing = [u for u in held.unit_names if u not in index]
    if missing:
        raise ValueError(f"the shrinkage report's groups do not include the held-out units {missing[:5]}: "
                         "it was made on another split or grouping")
    rows = {}
    for method, s in shrinkage.predictive.items():
        if not method.startswith("plug-in ("):
            continue
        if s["num_obs"] != held.num_rows:
            raise ValueError(f"the shrinkage report scored {s['num_obs']} held-out rows, this comparison "
                             f"{held.num_rows}: not the same split")
        per = np.array([s["per_group"][index[u]] for u in held.unit_names])
        name = f"{method[len('plug-in ('):-1]} (PLL learner, plug-in)"
        rows[name] = ({"lpd_per_obs": float(s["log_score"]), "lpd_sem": float(s["log_score_sem"]),
                       "coverage": {float(q): float(c) for q, c in s["coverage"].items()},
                       "num_units": int(s["num_groups"]), "num_rows": int(s["num_obs"]),
                       "units_scored": int(np.isfinite(per).sum()), "source": "hiermeta.shrinkage_report"}, per)
    return rows


def compare(fit, heldout, nuts=None, *, eb: str = "auto", unit_term: Optional[int] = 0, num_draws: int = 2000,
            num_nodes: int = 25, seed: int = 0, levels: Sequence[float] = (0.5, 0.9),
            check_approximation: bool = True, shrinkage=None) -> Comparison:
    """MAP plug-in vs EB posterior vs NUTS for ``fit`` on the ``heldout`` rows (module docstring).

    Args:
      fit: a :class:`~hiermeta.mixed.result.MixedFit` (on the training rows).
      heldout: a data frame of held-out rows with the model's columns and response.
      nuts: optional :class:`~hiermeta.mixed.numpyro_model.MixedNUTS` on the same model and rows.
      eb: the EB posterior's computation (:data:`EB_METHODS`; ``"auto"``: exact for a Gaussian model,
        quadrature for one scalar term, importance sampling otherwise).
      unit_term: the term whose grouping factor's levels are the scoring units (None: every row).
      num_draws, num_nodes: Monte Carlo draws (Laplace/importance) and quadrature nodes.
      seed: the draws' and the randomised PIT's seed.
      check_approximation: run the approximation checks (an AGQ refit, importance sampling).
      shrinkage: a :func:`hiermeta.shrinkage_report` of the same model and split (one grouping factor,
        linear-Gaussian; the JAX engine) with the paper's PLL learners' adapted values: their
        plug-in scores become extra rows (``NAME (PLL learner, plug-in)``) of the scores and the paired
        differences.
    """
    if eb not in EB_METHODS:
        raise ValueError(f"eb must be one of {EB_METHODS}, got {eb!r}")
    if nuts is not None:
        _check_same_model(fit, nuts)
    family = fit.model.family_spec
    d = fit.design
    scalar = len(d.terms) == 1 and d.terms[0].num_columns == 1
    if eb == "auto":
        eb = "exact" if family.has_scale else ("quadrature" if scalar and unit_term == 0 else
                                               "importance" if len(d.terms) == 1 else "laplace")
    if family.has_scale and eb != "exact":
        raise ValueError(f"eb={eb!r}: the EB posterior of a Gaussian model is exact (eb='exact')")
    if not family.has_scale and eb == "exact":
        raise ValueError("eb='exact' is for Gaussian models; use 'quadrature', 'importance' or 'laplace'")
    held = heldout_rows(fit, heldout, unit_term)
    state = posterior_state(fit)
    results, notes = {}, []
    results["MAP plug-in"] = score(family, held, plug_in(fit, held), seed)
    if eb == "exact":
        mean, covs = eb_gaussian_exact(fit, held, state)
        results["EB posterior (exact)"] = score_gaussian_exact(held, mean, covs)
        eb_note = "exact (Gaussian)"
    elif eb == "quadrature":
        pred = eb_quadrature(fit, held, num_nodes, state)
        results[pred.method] = score(family, held, pred, seed)
        eb_note = pred.note
    elif eb == "importance":
        pred = eb_importance(fit, held, num_draws, seed, state=state)
        results[pred.method] = score(family, held, pred, seed)
        eb_note = pred.note
        if pred.diagnostics["ess"] < 100:
            notes.append(f"the importance sampler's effective sample size is {pred.diagnostics['ess']:.0f}: its "
                         "EB scores are noisy; raise num_draws")
    else:
        pred = eb_laplace(fit, held, num_draws, seed, state)[0]
        results[pred.method] = score(family, held, pred, seed)
        eb_note = pred.note
    if nuts is not None:
        results["NUTS"] = score(family, held, nuts_predictive(fit, held, nuts, seed), seed)
    binary = family.is_binary(held.w) and np.all((held.y == 0) | (held.y == 1))
    summaries, per_unit, brier = {}, {}, {}
    for name, s in results.items():
        summaries[name] = _summary(s, levels)
        b = _brier(s, held.y) if binary else None
        if b is not None:
            summaries[name]["brier"] = float(np.nanmean(b)) if np.isfinite(b).any() else float("nan")
        per_unit[name] = s.log_pred / s.num_obs
        brier[name] = b
    if shrinkage is not None:
        if len(d.terms) != 1 or not family.has_scale:
            raise ValueError("the paper's learners (a shrinkage report) apply to one grouping factor and a "
                             f"Gaussian likelihood here; this model has {[t.label() for t in d.terms]} ({family.name})")
        for name, (summary, per) in _learner_rows(shrinkage, held, per_unit).items():
            summaries[name], per_unit[name], brier[name] = summary, per, None
    provenance = {"formula": fit.model.formula, "family": family.describe(), "train_rows": d.num_rows,
                  "heldout_rows": held.num_rows, "num_units": held.num_units, "units_by": held.unit_by,
                  "unseen_levels": {t.group: int(max(nc.max(), -1)) + 1 for t, nc in zip(d.terms, held.new_codes)},
                  "fit_method": fit.method, "fit_converged": bool(fit.converged), "eb_method": eb,
                  "eb_note": eb_note, "num_draws": num_draws, "seed": seed}
    if nuts is not None:
        provenance["nuts"] = {**nuts.settings, **{k: nuts.diagnostics.get(k) for k in
                                                  ("max_r_hat", "min_ess", "num_divergences", "converged")},
                              "priors": nuts.priors._asdict()}
        if not nuts.diagnostics.get("converged", True):
            notes.append("NUTS did not pass its convergence checks: " + "; ".join(nuts.diagnostics["messages"]))
    approximation = _approximation(fit, nuts, check_approximation, num_draws, seed)
    return Comparison(provenance=provenance, groups=_groups(fit, nuts), hyperparameters=_hyperparameters(fit, nuts),
                      scores=summaries, per_unit=per_unit, paired=_paired(per_unit, brier, held),
                      approximation=approximation, units=held.unit_names, notes=notes)
