"""``mixed_model(formula, data, family=...)``: a mixed model in lme4's language, checked and ready to fit.

    model = mixed_model("Reaction ~ Days + (Days | Subject)", sleepstudy)
    fit = model.fit()                 # REML, as lme4's lmer; fit.summary(), fit.fixef(), ...
    fit_ml = model.fit(method="ML")

Building the model evaluates the formula (:mod:`~hiermeta.mixed.formula`) and runs the data
checks (:mod:`~hiermeta.mixed.checks`): every error about the data or the formula comes here,
before anything is fitted.  :meth:`MixedModel.fit` dispatches on the family: a Gaussian model is
fitted exactly (:func:`~hiermeta.mixed.lmm.fit_lmm`, ML or REML), the others by the Laplace
approximation or adaptive quadrature (:mod:`hiermeta.mixed.glmm`).  Every fit returns an
:class:`~hiermeta.mixed.estimate.Estimate`, wrapped with the model in a
:class:`~hiermeta.mixed.result.MixedFit`.

A model with one grouping factor is also a model of the meta-learning engine (levels = tasks):
:meth:`MixedModel.to_grouped_table` builds the same tasks with :func:`hiermeta.from_table`.
"""

from __future__ import annotations

import time
import warnings
from typing import Optional

import numpy as np

from .checks import check_design
from .formula import INTERCEPT, model_frame

__all__ = ["MixedModel", "mixed_model", "FAMILIES"]

FAMILIES = ("gaussian", "binomial", "poisson")


def _family_name(family) -> str:
    name = getattr(family, "name", family)
    if not isinstance(name, str) or name.lower() not in FAMILIES + ("bernoulli",):
        raise ValueError(f"family must be one of {list(FAMILIES)}, got {family!r}")
    return "binomial" if name.lower() == "bernoulli" else name.lower()


def _link_name(family, link: Optional[str]) -> Optional[str]:
    """The link a family object carries, or ``link``; refused where they disagree."""
    own = getattr(getattr(family, "link", None), "name", None)
    if own is not None and link is not None and own != link:
        raise ValueError(f"family {family!r} has the link {own!r}, but link={link!r} was given")
    return own or link


class MixedModel:
    """A mixed model: its formula, data, family and checked design (module docstring).

    Attributes:
      formula, data, family (a name), weights.
      link: the link of a GLMM family (its canonical one unless asked: binomial ``"logit"``,
        ``"probit"``, ``"cloglog"``; poisson ``"log"``); None for a Gaussian model.
      frame: the evaluated formula (:class:`~hiermeta.mixed.formula.ModelFrame`).
      design: the checked :class:`~hiermeta.mixed.terms.MixedDesign` (dependent fixed columns dropped).
      dropped_columns: names of the fixed columns dropped for rank deficiency.
      notes: the warnings raised while building the model, as text.
      build_seconds: time to evaluate the formula and check the data.
    """

    def __init__(self, formula: str, data, family="gaussian", weights=None, *, link: Optional[str] = None,
                 rank_deficient: str = "drop", data_name: Optional[str] = None):
        start = time.perf_counter()
        self.family = _family_name(family)
        link = _link_name(family, link)
        if self.family == "gaussian":
            if link not in (None, "identity"):
                raise ValueError(f"a Gaussian mixed model has the identity link, got link={link!r}")
            self.link = None
        else:
            from .family import get_family

            self.link = get_family(self.family, link).link.name  # checks the name for this family
        self.formula, self.weights = formula, weights
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            self.frame = model_frame(formula, data, self.family, weights)
            self.design, self.dropped_columns = check_design(self.frame.design, self.family, rank_deficient)
        self.notes = tuple(str(w.message) for w in caught)
        for w in caught:  # raised again for the caller, who sees them as from this call
            warnings.warn(w.message, w.category, stacklevel=2)
        self.data = self.frame.data
        self.data_name = data_name
        self.build_seconds = time.perf_counter() - start

    # ------------------------------------------------------------------ fitting

    @property
    def is_gaussian(self) -> bool:
        return self.family == "gaussian"

    def fit(self, method: Optional[str] = None, *, approximation: Optional[str] = None, nodes: Optional[int] = None,
            start=None, threads: Optional[int] = 1, warn: bool = True):
        """Fit the model; returns a :class:`~hiermeta.mixed.result.MixedFit`.

        Args:
          method: Gaussian: ``"REML"`` (default, as lme4) or ``"ML"``; other families: ``"ML"`` only.
          approximation: other families: ``"laplace"`` (default, lme4's ``nAGQ = 1``) or ``"agq"``
            (one scalar random-effect term; ``nodes`` Gauss-Hermite nodes).  Gaussian: exact (None).
          start: starting covariance parameters ``theta`` (original scale).
          threads: BLAS threads during the fit (1 is fastest for these sizes on a shared machine).
          warn: warn on a singular or unconverged fit (recorded in the result in any case).
        """
        from .result import MixedFit

        started = time.perf_counter()
        if self.is_gaussian:
            if approximation not in (None, "exact"):
                raise ValueError(f"a Gaussian model is fitted exactly; approximation={approximation!r} does not apply")
            from .lmm import fit_lmm

            estimate = fit_lmm(self.design, method or "REML", start=start, threads=threads, warn=warn)
        else:
            if method is not None and str(method).upper() != "ML":
                raise ValueError(f"method={method!r}: a {self.family} GLMM is fitted by maximum likelihood "
                                 "(method='ML'); REML is defined for Gaussian models only")
            estimate = self._fit_glmm(approximation or "laplace", nodes, start, threads, warn)
        return MixedFit(self, estimate, fit_seconds=time.perf_counter() - started)

    def _fit_glmm(self, approximation: str, nodes: Optional[int], start, threads, warn):
        """The GLMM fit (:mod:`hiermeta.mixed.glmm`): ``fit_glmm(design, family, approximation=,
        num_nodes=, start=, threads=, warn=) -> Estimate``."""
        from .glmm import fit_glmm

        return fit_glmm(self.design, self.family, self.link, approximation=approximation, num_nodes=nodes,
                        start=start, threads=threads, warn=warn)

    @property
    def family_spec(self):
        """The family as an object of :mod:`hiermeta.mixed.family` (its name and link; the Gaussian row too)."""
        from .family import get_family

        return get_family(self.family, self.link)

    def inverse_link(self, eta: np.ndarray) -> np.ndarray:
        """The mean from the linear predictor (identity for a Gaussian model)."""
        if self.is_gaussian:
            return eta
        return self.family_spec.inverse_link(eta)

    # ------------------------------------------------------------------ the meta-learning engine

    def to_grouped_table(self, **kwargs):
        """The same model as the meta-learning engine's tasks: :func:`hiermeta.from_table` with one
        task per level of the (only) grouping factor.

        The term's columns are ``random=`` (their population means ``phi`` are the fixed effects of
        the same columns), the other fixed columns ``fixed=``; a correlated term gives
        ``table.model(correlated="all")``, a diagonal one ``correlated=None``.  Needs exactly one
        random-effect term whose columns are all fixed-effect columns too (Eq. 1's ``phi``), a
        Gaussian family and unit weights.  ``kwargs`` go to ``from_table`` (e.g. a split).
        Returns ``(table, model_kwargs)``: build the model with ``table.model(**model_kwargs)``.
        """
        design = self.design
        if len(design.terms) != 1:
            raise ValueError(f"the meta-learning engine has one grouping factor (tasks); this model has "
                             f"{len(design.terms)} terms {[t.label() for t in design.terms]}: fit it with .fit()")
        if not self.is_gaussian:
            raise ValueError("to_grouped_table converts Gaussian models; pass a likelihood to hm.from_table for others")
        if not np.all(design.weights == 1.0):
            raise ValueError("to_grouped_table needs unit weights")
        term = design.terms[0]
        missing = [c for c in term.columns if c not in design.fixed_names]
        if missing:
            raise ValueError(f"the random-effect column(s) {missing} have no fixed effect: the engine's prior mean "
                             "phi plays that part, so add them to the fixed part")
        from ..table import from_table  # JAX is imported here, not with hiermeta.mixed

        def key(name):
            return "1" if name == INTERCEPT else name

        columns = {design.response_name: design.response, term.group: np.asarray(term.levels, dtype=object)[term.codes]}
        fixed_index = {name: j for j, name in enumerate(design.fixed_names)}
        for name in term.columns:
            if name != INTERCEPT:
                columns[name] = design.X[:, fixed_index[name]]
        others = [n for n in design.fixed_names if n not in term.columns]
        for name in others:
            columns[name] = design.X[:, fixed_index[name]]
        if np.any(design.offset != 0):
            columns["__offset__"] = design.offset
            kwargs.setdefault("offset", "__offset__")
        table = from_table(columns, response=design.response_name, group=term.group,
                           random=[key(c) for c in term.columns], fixed=[key(c) for c in others],
                           groups=list(term.levels), **kwargs)
        return table, {"correlated": "all" if term.correlated else None}

    def __repr__(self) -> str:
        terms = ", ".join(t.label() for t in self.design.terms)
        return (f"MixedModel({self.formula!r}, family={self.family!r}, {self.design.num_rows} rows, "
                f"fixed {list(self.design.fixed_names)}, terms [{terms}])")


def mixed_model(formula: str, data, family="gaussian", weights=None, *, link: Optional[str] = None,
                rank_deficient: str = "drop", data_name: Optional[str] = None) -> MixedModel:
    """A mixed model from an lme4 formula and a data frame (module docstring).

    Args:
      formula: lme4's syntax, e.g. ``"Reaction ~ Days + (Days | Subject)"``,
        ``"diameter ~ 1 + (1 | plate) + (1 | sample)"``, ``"strength ~ 1 + (1 | batch/cask)"``,
        ``"cbind(incidence, size - incidence) ~ C(period) + (1 | herd)"`` (:mod:`~hiermeta.mixed.formula`).
      data: a pandas DataFrame (or a dict of columns).
      family: ``"gaussian"``, ``"binomial"`` (``"bernoulli"``: the same, 0/1 or boolean rows) or
        ``"poisson"``, or a family object of :mod:`hiermeta.mixed.family`.
      link: a GLMM's link (default the canonical one; binomial also ``"probit"``, ``"cloglog"``).
      weights: prior weights (a column name or an array): Gaussian, a row's residual variance is
        ``s^2 / w``; binomial, the number of trials of a proportion response.
      rank_deficient: ``"drop"`` dependent fixed columns with a warning (lme4) or ``"error"``.
      data_name: the data's name in the printed summary.

    Raises :class:`~hiermeta.errors.FormulaError` or :class:`~hiermeta.errors.DataDefectError`
    (both ``ValueError``) before anything is fitted.
    """
    return MixedModel(formula, data, family, weights, link=link, rank_deficient=rank_deficient, data_name=data_name)
