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
(PIRLS, Laplace, adaptive quadrature), :mod:`~hiermeta.mixed.numpyro_model` the same model for
NUTS, :mod:`~hiermeta.mixed.heldout` and :mod:`~hiermeta.mixed.comparison` the MAP-vs-posterior
report.  Importing this package imports nothing else: each name below loads its module on first
use (PEP 562), so the Gaussian path never pays for the GLMM families or SciPy's statistics, and
nothing here imports JAX, NumPyro, ArviZ or matplotlib.  No name here is also a submodule's name
(importing a submodule binds its name on the package, which would shadow a function of that name).
"""

import importlib

# name -> (module relative to hiermeta.mixed, attribute)
_LAZY = {
    "mixed_model": (".model", "mixed_model"),
    "MixedModel": (".model", "MixedModel"),
    "FAMILIES": (".model", "FAMILIES"),
    "MixedFit": (".result", "MixedFit"),
    "anova": (".result", "anova"),
    "AnovaTable": (".result", "AnovaTable"),
    "Estimate": (".estimate", "Estimate"),
    "get_family": (".family", "get_family"),
    "fit_glmm": (".glmm", "fit_glmm"),
    "compare": (".comparison", "compare"),
    "holdout_split": (".comparison", "holdout_split"),
    "Comparison": (".comparison", "Comparison"),
    "mixed_nuts": (".numpyro_model", "mixed_nuts"),  # imports JAX and NumPyro when first used
}

__all__ = list(_LAZY)


def __getattr__(name: str):
    try:
        module, attribute = _LAZY[name]
    except KeyError:
        raise AttributeError(f"module 'hiermeta.mixed' has no attribute {name!r}") from None
    value = getattr(importlib.import_module(module, __name__), attribute)
    globals()[name] = value
    return value


def __dir__() -> list:
    return sorted(set(__all__) | {n for n in globals() if n.startswith("__")})
