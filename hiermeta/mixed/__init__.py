"""Mixed models in lme4's language: several grouping factors, crossed and nested, on NumPy/SciPy.

    from hiermeta.mixed import mixed_model
    fit = mixed_model("Reaction ~ Days + (Days | Subject)", sleepstudy).fit()   # REML
    print(fit.summary()); fit.fixef(); fit.varcorr(); fit.ranef(cond_var=True)

:mod:`~hiermeta.mixed.terms` holds the model (random-effect terms and their covariance
parameters), :mod:`~hiermeta.mixed.linalg` the penalised least-squares system every fit solves,
:mod:`~hiermeta.mixed.formula` reads lme4's formulas, :mod:`~hiermeta.mixed.checks` refuses data
that cannot identify the model, :mod:`~hiermeta.mixed.lmm` fits Gaussian models exactly (ML,
REML), :mod:`~hiermeta.mixed.model` and :mod:`~hiermeta.mixed.result` are the user's objects,
:mod:`~hiermeta.mixed.family` the GLM families and :mod:`~hiermeta.mixed.glmm` the GLMM fits
(PIRLS, Laplace, adaptive quadrature).  Importing this package never imports JAX, NumPyro, ArviZ or matplotlib.
"""

from .estimate import Estimate
from .family import get_family
from .glmm import fit_glmm
from .model import FAMILIES, MixedModel, mixed_model
from .result import AnovaTable, MixedFit, anova

__all__ = ["mixed_model", "MixedModel", "MixedFit", "Estimate", "anova", "AnovaTable", "FAMILIES", "get_family", "fit_glmm"]
