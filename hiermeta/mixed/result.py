"""A fitted mixed model with names: lme4's summary, accessors, predictions, tests and JSON.

:class:`MixedFit` wraps an :class:`~hiermeta.mixed.estimate.Estimate` (any family: the numbers)
with its :class:`~hiermeta.mixed.model.MixedModel` (the names, the data) and derives what a user
reads, as lme4 defines it:

* ``fixef()``, ``vcov()``, ``coef_table()`` (estimate, SE, t value for a Gaussian model; z value
  and its normal p-value otherwise, as lme4's ``glmer``);
* ``varcorr()``: per grouping factor the variances, sds and correlations of ``Sigma_k`` (for a
  Gaussian model ``s^2 T_k T_k'``) and the residual;
* ``ranef(cond_var=True)``: the conditional modes ``b_{k,l}`` with their conditional sds (lme4's
  ``condVar``: given ``theta`` and ``beta``);
* ``predict(newdata, random=True)``: ``x beta + offset (+ z b)``; a level the model has not seen
  gets the population mean (``b = 0``), as lme4's ``allow.new.levels = TRUE``;
* ``loglik``, ``aic = -2 logLik + 2 df``, ``bic = -2 logLik + log(n) df``, ``deviance``
  (``-2 logLik``; for a REML fit that is the REML criterion), ``df`` (fixed effects, covariance
  parameters and the residual sd);
* :func:`anova`: the likelihood-ratio test of nested fits, after refitting REML fits by ML (as
  lme4's ``anova`` does: REML criteria of models with different fixed effects do not compare);
* ``summary()`` (lme4's printed layout) and ``to_dict()`` (JSON-ready: every estimate with its
  name, the variance components, the information criteria, the fit's notes and timings).
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np
import pandas as pd

from .estimate import Estimate
from .terms import covariances, theta_names

__all__ = ["MixedFit", "anova", "AnovaTable"]


def _group_labels(terms) -> list:
    """One label per term: the grouping factor's name, ``name.1`` for its second term (lme4)."""
    seen, out = {}, []
    for t in terms:
        k = seen.get(t.group, 0)
        out.append(t.group if k == 0 else f"{t.group}.{k}")
        seen[t.group] = k + 1
    return out


class MixedFit:
    """A fitted mixed model (module docstring).  ``model``, ``estimate``, ``method`` and timings
    (``build_seconds``, ``fit_seconds``) are attributes; everything else is derived."""

    def __init__(self, model, estimate: Estimate, fit_seconds: float = float("nan")):
        self.model, self.estimate = model, estimate
        self.method = estimate.method
        self.fit_seconds = float(fit_seconds)
        self.build_seconds = float(getattr(model, "build_seconds", float("nan")))
        self.design = model.design
        self.group_labels = _group_labels(self.design.terms)

    # ------------------------------------------------------------------ basics

    @property
    def is_gaussian(self) -> bool:
        return self.estimate.sigma is not None

    @property
    def nobs(self) -> int:
        return self.design.num_rows

    @property
    def ngroups(self) -> dict:
        """Levels per grouping factor."""
        return {label: t.num_levels for label, t in zip(self.group_labels, self.design.terms)}

    @property
    def sigma(self) -> Optional[float]:
        """The residual sd (None for a GLMM)."""
        return self.estimate.sigma

    @property
    def loglik(self) -> float:
        """The maximised log-likelihood (REML: minus half the REML criterion, as lme4's logLik)."""
        return float(self.estimate.loglik)

    @property
    def df(self) -> int:
        """Estimated parameters: fixed effects, covariance parameters and (Gaussian) the residual sd."""
        return int(self.estimate.num_params)

    @property
    def aic(self) -> float:
        return -2.0 * self.loglik + 2.0 * self.df

    @property
    def bic(self) -> float:
        return -2.0 * self.loglik + math.log(self.nobs) * self.df

    @property
    def deviance(self) -> float:
        """``-2 logLik`` (for a REML fit: the REML criterion)."""
        return -2.0 * self.loglik

    @property
    def converged(self) -> bool:
        return bool(self.estimate.converged)

    @property
    def singular(self) -> bool:
        """A boundary fit (a variance at 0 or a correlation at +-1): lme4's ``isSingular``."""
        return bool(self.estimate.singular)

    @property
    def notes(self) -> tuple:
        """Every warning of the model's construction and of the fit, as text."""
        return tuple(self.model.notes) + tuple(self.estimate.notes)

    # ------------------------------------------------------------------ fixed effects

    def fixef(self) -> pd.Series:
        """The fixed effects by name."""
        return pd.Series(np.asarray(self.estimate.beta, dtype=float), index=list(self.design.fixed_names), name="Estimate")

    def vcov(self) -> pd.DataFrame:
        """The fixed effects' covariance matrix (lme4's ``vcov``)."""
        names = list(self.design.fixed_names)
        return pd.DataFrame(np.asarray(self.estimate.beta_cov, dtype=float), index=names, columns=names)

    def coef_table(self) -> pd.DataFrame:
        """Estimate, standard error and t value (Gaussian) or z value and ``Pr(>|z|)`` (GLMM)."""
        beta = np.asarray(self.estimate.beta, dtype=float)
        se = np.sqrt(np.maximum(np.diag(np.asarray(self.estimate.beta_cov, dtype=float)), 0.0)) if beta.size else beta
        stat = beta / se
        table = pd.DataFrame({"Estimate": beta, "Std. Error": se}, index=list(self.design.fixed_names))
        if self.is_gaussian:
            table["t value"] = stat
        else:
            from scipy.special import ndtr  # scipy.stats would cost ~0.4 s of import for one tail area

            table["z value"] = stat
            table["Pr(>|z|)"] = 2.0 * ndtr(-np.abs(stat))
        return table

    # ------------------------------------------------------------------ variance components

    def covariances(self) -> dict:
        """``Sigma_k`` per grouping factor (label -> ``(q_k, q_k)`` DataFrame)."""
        scale = self.sigma if self.is_gaussian else 1.0
        out = {}
        for label, t, S in zip(self.group_labels, self.design.terms,
                               covariances(self.design.terms, self.estimate.theta, scale)):
            out[label] = pd.DataFrame(S, index=list(t.columns), columns=list(t.columns))
        return out

    def varcorr(self) -> pd.DataFrame:
        """lme4's ``as.data.frame(VarCorr(fit))``: one row per variance (``var2`` empty) and per
        covariance; columns ``grp, var1, var2, vcov, sdcor`` (sd, or correlation); the residual last."""
        rows = []
        for label, t, S in zip(self.group_labels, self.design.terms, self.covariances().values()):
            S = S.to_numpy()
            sd = np.sqrt(np.maximum(np.diag(S), 0.0))
            for i, c in enumerate(t.columns):
                rows.append((label, c, None, S[i, i], sd[i]))
            if t.correlated:
                for j in range(len(t.columns)):
                    for i in range(j + 1, len(t.columns)):
                        corr = S[i, j] / (sd[i] * sd[j]) if sd[i] > 0 and sd[j] > 0 else float("nan")
                        rows.append((label, t.columns[j], t.columns[i], S[i, j], corr))
        if self.is_gaussian:
            rows.append(("Residual", None, None, self.sigma ** 2, self.sigma))
        return pd.DataFrame(rows, columns=["grp", "var1", "var2", "vcov", "sdcor"])

    def theta(self) -> pd.Series:
        """The covariance parameters (relative factors' entries, lme4's names and order)."""
        return pd.Series(np.asarray(self.estimate.theta, dtype=float), index=list(theta_names(self.design.terms)))

    # ------------------------------------------------------------------ random effects

    def ranef(self, cond_var: bool = False) -> dict:
        """Conditional modes per grouping factor: label -> DataFrame (levels x the term's columns);
        with ``cond_var`` also ``sd(column)``: their conditional sds (lme4's ``condVar``)."""
        out = {}
        for label, t, b, C in zip(self.group_labels, self.design.terms, self.estimate.b, self.estimate.b_cov):
            frame = pd.DataFrame(np.asarray(b, dtype=float), index=pd.Index(list(t.levels), name=t.group),
                                 columns=list(t.columns))
            if cond_var:
                sd = np.sqrt(np.maximum(np.diagonal(np.asarray(C, dtype=float), axis1=1, axis2=2), 0.0))
                for j, c in enumerate(t.columns):
                    frame[f"sd({c})"] = sd[:, j]
            out[label] = frame
        return out

    def conditional_covariances(self) -> dict:
        """Per grouping factor the ``(L_k, q_k, q_k)`` conditional covariances of the modes."""
        return {label: np.asarray(C) for label, C in zip(self.group_labels, self.estimate.b_cov)}

    # ------------------------------------------------------------------ predictions

    def predict(self, newdata=None, random: bool = True, scale: str = "response") -> np.ndarray:
        """Predictions for ``newdata`` (default: the data fitted).

        ``random``: add the conditional modes of the levels (a new level: 0, the population mean);
        ``scale``: ``"response"`` (the mean) or ``"link"`` (the linear predictor).
        """
        if scale not in ("response", "link"):
            raise ValueError(f"scale must be 'response' or 'link', got {scale!r}")
        beta = np.asarray(self.estimate.beta, dtype=float)
        if newdata is None:
            d = self.design
            eta = d.X @ beta + d.offset
            if random:
                for t, b in zip(d.terms, self.estimate.b):
                    eta = eta + np.einsum("nq,nq->n", t.Z, np.asarray(b)[t.codes])
        else:
            new = self.model.frame.new_data(newdata, self.model.frame.design.terms)
            keep = [self.model.frame.design.fixed_names.index(n) for n in self.design.fixed_names]
            eta = new.X[:, keep] @ beta + new.offset
            if random:
                for codes, Z, b in zip(new.codes, new.Z, self.estimate.b):
                    b = np.asarray(b)
                    effect = np.where(codes[:, None] >= 0, b[np.maximum(codes, 0)], 0.0)
                    eta = eta + np.einsum("nq,nq->n", Z, effect)
        return eta if scale == "link" else self.model.inverse_link(eta)

    def fitted(self) -> np.ndarray:
        return self.predict()

    def residuals(self) -> np.ndarray:
        """Response minus fitted values (response scale)."""
        return np.asarray(self.design.response, dtype=float) - self.fitted()

    # ------------------------------------------------------------------ refits and tests

    def refit(self, method: str):
        """The same model fitted by ``method`` (e.g. ``"ML"`` for a likelihood-ratio test)."""
        return self.model.fit(method=method)

    def anova(self, *others) -> "AnovaTable":
        """Likelihood-ratio tests of this fit against nested ones (:func:`anova`)."""
        return anova(self, *others)

    # ------------------------------------------------------------------ the full posterior

    def nuts(self, **kwargs):
        """NUTS on this model's NumPyro density, started from and scaled by this fit.

        :func:`~hiermeta.mixed.numpyro_model.mixed_nuts` with this fit's design, family and
        estimate (``kwargs``: ``key``, ``num_warmup``, ``num_samples``, ``num_chains``,
        ``progress_bar``, ``priors``, ...); the result is what :func:`~hiermeta.mixed.comparison.compare`
        takes as ``nuts=``.  Imports JAX and NumPyro.
        """
        from .numpyro_model import mixed_nuts

        return mixed_nuts(self.design, self.model.family_spec, self.estimate, **kwargs)

    # ------------------------------------------------------------------ output

    def title(self) -> str:
        if self.is_gaussian:
            by = "REML" if self.method == "REML" else "maximum likelihood"
            return f"Linear mixed model fit by {by} [hiermeta]"
        approx = "Laplace Approximation" if self.method.lower() == "laplace" else \
            f"Adaptive Gauss-Hermite Quadrature, {self.method}"
        return f"Generalized linear mixed model fit by maximum likelihood ({approx}) [hiermeta]"

    def summary(self) -> str:
        """lme4's printed summary (``summary(lmer(...))``)."""
        lines = [self.title()]
        if not self.is_gaussian:
            lines.append(f" Family: {self.model.family} ( {self.model.link} )")
        lines.append(f"Formula: {self.model.formula}")
        if self.model.data_name:
            lines.append(f"   Data: {self.model.data_name}")
        lines.append("")
        if self.is_gaussian and self.method == "REML":
            lines.append(f"REML criterion at convergence: {self.deviance:.4f}")
        else:
            dev_resid = self.nobs - self.df
            lines += _table(["AIC", "BIC", "logLik", "-2*log(L)", "df.resid"],
                            [[f"{self.aic:.4f}", f"{self.bic:.4f}", f"{self.loglik:.4f}", f"{self.deviance:.4f}",
                              str(dev_resid)]], left=())
        if self.is_gaussian:
            r = self.residuals() * np.sqrt(self.design.weights) / self.sigma
            q = np.quantile(r, [0, 0.25, 0.5, 0.75, 1.0])
            lines += ["", "Scaled residuals:"]
            lines += _table(["Min", "1Q", "Median", "3Q", "Max"], [[f"{v:.4f}" for v in q]], left=())
        lines += ["", "Random effects:"]
        rows = []
        for label, t, S in zip(self.group_labels, self.design.terms, self.covariances().values()):
            S = S.to_numpy()
            sd = np.sqrt(np.maximum(np.diag(S), 0.0))
            for i, c in enumerate(t.columns):
                corr = []
                if t.correlated:
                    corr = [f"{S[i, j] / (sd[i] * sd[j]):.3f}" if sd[i] > 0 and sd[j] > 0 else "NaN" for j in range(i)]
                rows.append([label if i == 0 else "", c, f"{S[i, i]:.5g}", f"{sd[i]:.5g}", " ".join(corr)])
        if self.is_gaussian:
            rows.append(["Residual", "", f"{self.sigma ** 2:.5g}", f"{self.sigma:.5g}", ""])
        lines += _table(["Groups", "Name", "Variance", "Std.Dev.", "Corr"], rows, left=(0, 1, 4))
        groups = ", ".join(f"{label}, {n}" for label, n in self.ngroups.items())
        lines.append(f"Number of obs: {self.nobs}, groups:  {groups}")
        lines += ["", "Fixed effects:"]
        table = self.coef_table()
        body = []
        for name, row in table.iterrows():
            cells = [f"{v:.6g}" for v in row.to_numpy()[:3]]
            if not self.is_gaussian:
                cells.append(_format_p(row["Pr(>|z|)"]))
            body.append([name] + cells)
        lines += _table([""] + list(table.columns), body)
        if self.model.dropped_columns:
            lines.append(f"fixed-effect model matrix is rank deficient so dropping {len(self.model.dropped_columns)} "
                         f"column(s): {', '.join(self.model.dropped_columns)}")
        for note in self.estimate.notes:
            lines.append(note)
        if self.converged and not self.estimate.notes:
            lines.append(f"converged ({self.estimate.iterations} evaluations of the criterion)")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()

    def __repr__(self) -> str:
        return (f"<MixedFit {self.method} of {self.model.formula!r}: logLik {self.loglik:.4f}, "
                f"{'converged' if self.converged else 'NOT converged'}{', singular' if self.singular else ''}>")

    def to_dict(self, ranef: bool = True) -> dict:
        """Every estimate with its name, JSON-ready (NaN -> None)."""
        table = self.coef_table()
        fixed = []
        for name, row in table.iterrows():
            entry = {"name": name, "estimate": row["Estimate"], "std_error": row["Std. Error"]}
            if "t value" in row:
                entry["t_value"] = row["t value"]
            else:
                entry["z_value"], entry["p_value"] = row["z value"], row["Pr(>|z|)"]
            fixed.append(entry)
        vc = []
        for _, row in self.varcorr().iterrows():
            if row["grp"] == "Residual":
                vc.append({"group": "Residual", "variance": row["vcov"], "sd": row["sdcor"]})
            elif pd.isna(row["var2"]):
                vc.append({"group": row["grp"], "name": row["var1"], "variance": row["vcov"], "sd": row["sdcor"]})
            else:
                vc.append({"group": row["grp"], "name": row["var1"], "name2": row["var2"], "covariance": row["vcov"],
                           "correlation": row["sdcor"]})
        out = {
            "formula": self.model.formula,
            "family": self.model.family,
            "link": self.model.link,
            "method": self.method,
            "data": self.model.data_name,
            "nobs": self.nobs,
            "ngroups": self.ngroups,
            "terms": [t.label() for t in self.design.terms],
            "fixed_effects": fixed,
            "vcov": {"names": list(self.design.fixed_names), "matrix": np.asarray(self.estimate.beta_cov).tolist()},
            "random_effects": vc,
            "sigma": self.sigma,
            "theta": [{"name": n, "value": v} for n, v in self.theta().items()],
            "loglik": self.loglik,
            "reml_criterion" if self.method == "REML" else "deviance": self.deviance,
            "aic": self.aic,
            "bic": self.bic,
            "df": self.df,
            "converged": self.converged,
            "singular": list(self.estimate.singular),
            "evaluations": self.estimate.iterations,
            "optimizer": self.estimate.message,
            "dropped_columns": list(self.model.dropped_columns),
            "notes": list(self.notes),
            "timings": {"build_seconds": self.build_seconds, "fit_seconds": self.fit_seconds},
        }
        if ranef:
            modes = {}
            for label, frame in self.ranef(cond_var=True).items():
                modes[label] = {"levels": [_jsonable(v) for v in frame.index],
                                **{c: frame[c].to_numpy().tolist() for c in frame.columns}}
            out["conditional_modes"] = modes
        return _clean(out)


class AnovaTable(pd.DataFrame):
    """lme4's ``anova`` table (a DataFrame) with a note on refitting."""

    _metadata = ["note"]

    @property
    def _constructor(self):
        return AnovaTable

    def __str__(self) -> str:
        body = pd.DataFrame.to_string(self)
        return body + (f"\n{self.note}" if getattr(self, "note", "") else "")


def anova(*fits) -> AnovaTable:
    """Likelihood-ratio tests between nested fits of the same data, ordered by ``df`` (lme4's ``anova``).

    REML fits are refitted by ML first (the REML criterion depends on the fixed effects' design,
    so two models with different fixed effects cannot be compared by it), and the table says so.
    Each row after the first: ``Chisq = 2 (logLik - logLik of the previous row)``, ``Df`` the
    difference in parameters, ``Pr(>Chisq)`` from the chi-square distribution (conservative when
    a variance is tested at its boundary 0, as lme4 notes).
    """
    from scipy.special import chdtrc  # the chi-square upper tail (scipy.stats.chi2.sf), without scipy.stats

    if len(fits) < 2:
        raise ValueError("anova compares two or more fits")
    n = {f.nobs for f in fits}
    if len(n) != 1:
        raise ValueError(f"the fits use different numbers of observations {sorted(n)}: they are not nested")
    responses = [np.asarray(f.design.response) for f in fits]
    if any(not np.array_equal(responses[0], r) for r in responses[1:]):
        raise ValueError("the fits have different responses: they are not nested models of the same data")
    refitted = [f.refit("ML") if f.method == "REML" else f for f in fits]
    note = "refitted by ML: " + ", ".join(f.model.formula for f in fits if f.method == "REML") \
        if any(f.method == "REML" for f in fits) else ""
    order = sorted(range(len(fits)), key=lambda i: refitted[i].df)
    rows, prev = [], None
    for i in order:
        f = refitted[i]
        row = {"model": f.model.formula, "npar": f.df, "AIC": f.aic, "BIC": f.bic, "logLik": f.loglik,
               "-2*log(L)": f.deviance, "Chisq": np.nan, "Df": np.nan, "Pr(>Chisq)": np.nan}
        if prev is not None:
            stat = max(2.0 * (f.loglik - prev.loglik), 0.0)
            ddf = f.df - prev.df
            row.update({"Chisq": stat, "Df": ddf, "Pr(>Chisq)": chdtrc(ddf, max(stat, 0.0)) if ddf > 0 else np.nan})
        rows.append(row)
        prev = f
    table = AnovaTable(pd.DataFrame(rows).set_index("model"))
    table.note = note
    return table


# ---------------------------------------------------------------------------- formatting


def _format_p(p: float) -> str:
    return "< 2e-16" if p < 2e-16 else f"{p:.3g}"


def _table(headers, rows, left=(0,)) -> list:
    """Rows of an lme4-like plain table: columns in ``left`` left-aligned, the others right."""
    cols = list(zip(*([headers] + rows))) if rows else [[h] for h in headers]
    widths = [max(len(str(c)) for c in col) for col in cols]
    out = []
    for r in [headers] + rows:
        cells = [str(c).ljust(w) if i in left else str(c).rjust(w) for i, (c, w) in enumerate(zip(r, widths))]
        out.append(" " + " ".join(cells).rstrip())
    return out


def _jsonable(v):
    return v.item() if isinstance(v, np.generic) else v


def _clean(obj):
    """NumPy scalars to Python, NaN/inf to None, recursively."""
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _clean(obj.tolist())
    if isinstance(obj, (np.floating, float)):
        value = float(obj)
        return value if math.isfinite(value) else None
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.bool_):
        return bool(obj)
    return obj
