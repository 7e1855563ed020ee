"""hiermeta: hierarchical-Bayes meta-learning (Chen et al., "Modular Meta-Learning with Shrinkage").

The model (Eq. 1): theta_{m,t} ~ N(phi_m, sigma_m^2 I) per module m, D_t ~ p(D | theta_t), written
once as a NumPyro model (:class:`HierarchicalModel`); meta-learners (:mod:`hiermeta.learners`)
share one interface (``init``, ``step``, ``inner_problem``, ``adapt``) and read every density
from that model; :mod:`hiermeta.solvers` says how each task's MAP is solved and how close it got.

The top level holds the verbs of the user paths and the core types; everything else lives in
its module (``hm.solvers.newton``, ``hm.errors.ConvergenceWarning``, ``hm.predictive.score_draws``),
as in optax and NumPyro.  Names are resolved on first use (PEP 562): ``import hiermeta`` imports
neither JAX nor NumPyro, ArviZ, matplotlib or pandas; the first name that needs one imports it.

JAX's persistent compilation cache is on by default, in ``~/.cache/hiermeta/jax``, from the moment
hiermeta first needs JAX; ``HIERMETA_COMPILATION_CACHE=off`` turns it off and
``HIERMETA_COMPILATION_CACHE=DIR`` moves it; a cache directory you configured yourself
(``$JAX_COMPILATION_CACHE_DIR``, ``jax.config``) is left alone
(:func:`hiermeta.utils.default_compilation_cache`).
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import os
import sys
import types
from typing import TYPE_CHECKING

__version__ = "0.1.0"

# name -> (module relative to hiermeta, attribute; None: the module itself)
_LAZY: dict[str, tuple[str, str | None]] = {
    # ---- the model and its data: core types and their builders
    "HierarchicalModel": (".hierarchy", "HierarchicalModel"),
    "ModulePartition": (".partition", "ModulePartition"),
    "GlobalParam": (".sites", "GlobalParam"),
    "TaskBatch": (".tasks", "TaskBatch"),
    "GaussianData": (".linear_gaussian", "GaussianData"),
    "GaussianLikelihood": (".linear_gaussian", "GaussianLikelihood"),
    "LinearDesign": (".regression", "LinearDesign"),
    "linear_gaussian": (".linear_gaussian", "linear_gaussian"),
    "from_table": (".table", "from_table"),
    "GroupedTable": (".table", "GroupedTable"),
    # ---- a statistician's grouped data: type-II ML, priors, NUTS, the report, cross-fitted sigma
    "type2_ml": (".empirical_bayes", "type2_ml"),
    "Type2MLResult": (".empirical_bayes", "Type2MLResult"),
    "with_priors": (".priors", "with_priors"),
    "prior_summary": (".priors", "prior_summary"),
    "run_nuts": (".posterior", "run_nuts"),
    "NUTSResult": (".posterior", "NUTSResult"),
    "shrinkage_report": (".shrinkage_report", "shrinkage_report"),
    "ShrinkageReport": (".shrinkage_report", "ShrinkageReport"),
    "crossfit_sampler": (".crossfit", "crossfit_sampler"),
    "check_sigma": (".crossfit", "check_sigma"),
    # ---- meta-learning: the learners (the paper's names), training and evaluation
    "shrinkage": (".learners", "shrinkage"),
    "m_shrinkage": (".learners", "m_shrinkage"),
    "shrinkage_map": (".learners", "shrinkage_map"),
    "m_shrinkage_map": (".learners", "m_shrinkage_map"),
    "sigma_imaml": (".learners", "sigma_imaml"),
    "m_sigma_imaml": (".learners", "m_sigma_imaml"),
    "imaml": (".learners", "imaml"),
    "maml": (".learners", "maml"),
    "m_maml": (".learners", "m_maml"),
    "fomaml": (".learners", "fomaml"),
    "fo_m_maml": (".learners", "fo_m_maml"),
    "reptile": (".learners", "reptile"),
    "sigma_reptile": (".learners", "sigma_reptile"),
    "m_sigma_reptile": (".learners", "m_sigma_reptile"),
    "protonet": (".learners", "protonet"),
    "MetaLearner": (".learners", "MetaLearner"),
    "MetaState": (".learners", "MetaState"),
    "sigma_of": (".learners", "sigma_of"),
    "fit": (".train", "fit"),
    "sample_from": (".train", "sample_from"),
    "evaluate": (".evaluate", "evaluate"),
    "adapt": (".evaluate", "adapt"),
    "LossCurve": (".evaluate", "LossCurve"),
    # ---- runtime
    "enable_compilation_cache": (".utils", "enable_compilation_cache"),
    # ---- mixed models in lme4's language (hiermeta.mixed; NumPy/SciPy only, no JAX)
    "mixed_model": (".mixed", "mixed_model"),
    "MixedModel": (".mixed", "MixedModel"),
    "MixedFit": (".mixed", "MixedFit"),
    "anova": (".mixed", "anova"),
    "compare": (".mixed", "compare"),
    "holdout_split": (".mixed", "holdout_split"),
    # ---- modules
    "errors": (".errors", None),
    "mixed": (".mixed", None),
    "families": (".families", None),
    "learners": (".learners", None),
    "solvers": (".solvers", None),
    "inner": (".inner", None),
    "implicit": (".implicit", None),
    "empirical_bayes": (".empirical_bayes", None),
    "marginal": (".marginal", None),
    "laplace": (".laplace", None),
    "posterior": (".posterior", None),
    "predictive": (".predictive", None),
    "priors": (".priors", None),
    "crossfit": (".crossfit", None),
    "checkpoint": (".checkpoint", None),
    "sharding": (".sharding", None),
    "distributed": (".distributed", None),
}

__all__ = list(_LAZY)


def __getattr__(name: str):
    try:
        module, attribute = _LAZY[name]
    except KeyError:
        raise AttributeError(f"module 'hiermeta' has no attribute {name!r}") from None
    value = importlib.import_module(module, __name__)
    if attribute is not None:
        value = getattr(value, attribute)
    globals()[name] = value  # resolved once: later lookups do not come back here
    return value


def __dir__() -> list[str]:
    return sorted(set(__all__) | {"__version__"} | {name for name in globals() if name.startswith("__")})


class _Namespace(types.ModuleType):
    """The package's module type: a submodule does not shadow the top-level name it shares.

    Python binds ``hiermeta.evaluate`` to the submodule when ``hiermeta/evaluate.py`` is first
    imported (by anyone, e.g. ``hm.fit``'s module); ``hm.evaluate`` is the function, so that
    binding is refused for the names in ``_LAZY`` that are not modules (``evaluate``,
    ``linear_gaussian``, ``shrinkage_report``).  The submodules stay importable by their full names.
    """

    def __setattr__(self, name, value):
        if isinstance(value, types.ModuleType) and _LAZY.get(name, ("", None))[1] is not None:
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Namespace

# Submodules that need no JAX (importing them leaves the compilation cache alone; the command line
# fits mixed models on NumPy/SciPy, and hiermeta.mixed.numpyro_model turns the cache on when it imports JAX).
_JAX_FREE = ("hiermeta.errors", "hiermeta.printing", "hiermeta.mixed", "hiermeta.cli", "hiermeta.__main__")


class _CompilationCacheOnFirstUse(importlib.abc.MetaPathFinder):
    """Turns on the default compilation cache just before hiermeta first imports a JAX module.

    It sits first on ``sys.meta_path`` from ``import hiermeta`` until the first ``hiermeta.*``
    submodule that needs JAX is imported (through ``hm.NAME``, ``import hiermeta.X`` or ``from
    hiermeta.X import Y`` alike); it then removes itself, calls
    :func:`hiermeta.utils.default_compilation_cache`, and finds nothing, so the import proceeds
    as usual.  Other packages' imports pass it untouched.
    """

    def find_spec(self, fullname, path=None, target=None):
        if fullname.startswith(__name__ + ".") and not fullname.startswith(_JAX_FREE):
            try:
                sys.meta_path.remove(self)
            except ValueError:  # another thread got here first
                return None
            from .utils import default_compilation_cache

            default_compilation_cache()
        return None


if not any(isinstance(finder, _CompilationCacheOnFirstUse) for finder in sys.meta_path):
    sys.meta_path.insert(0, _CompilationCacheOnFirstUse())

# The paper's domains: the repository's models/ folder, installed as hiermeta.models (pyproject.toml
# maps it; normal and editable installs alike).  In a source checkout used without installing it
# (hiermeta/ and models/ side by side, on PYTHONPATH), this finder gives hiermeta.models the same
# folder, so such a checkout never imports the models of another installed copy.
_CHECKOUT_MODELS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "models")


class _CheckoutModels(importlib.abc.MetaPathFinder):
    """``hiermeta.models`` -> the checkout's ``models/`` folder (only when hiermeta has no models/ of its own)."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != __name__ + ".models":
            return None
        return importlib.util.spec_from_file_location(fullname, os.path.join(_CHECKOUT_MODELS, "__init__.py"),
                                                      submodule_search_locations=[_CHECKOUT_MODELS])


if (os.path.isfile(os.path.join(_CHECKOUT_MODELS, "__init__.py"))
        and not os.path.isdir(os.path.join(os.path.dirname(os.path.abspath(__file__)), "models"))
        and not any(isinstance(finder, _CheckoutModels) for finder in sys.meta_path)):
    sys.meta_path.insert(0, _CheckoutModels())


if TYPE_CHECKING:  # static analysers and IDEs see every name eagerly
    from . import (checkpoint, distributed, empirical_bayes, errors, families, implicit, inner, laplace,  # noqa: F401
                   learners, marginal, posterior, predictive, priors, sharding, solvers)
    from . import crossfit  # noqa: F401
    from .crossfit import check_sigma, crossfit_sampler  # noqa: F401
    from .empirical_bayes import Type2MLResult, type2_ml  # noqa: F401
    from .evaluate import LossCurve, adapt, evaluate  # noqa: F401
    from .hierarchy import HierarchicalModel  # noqa: F401
    from .learners import (MetaLearner, MetaState, fo_m_maml, fomaml, imaml, m_maml, m_shrinkage,  # noqa: F401
                           m_shrinkage_map, m_sigma_imaml, m_sigma_reptile, maml, protonet, reptile, shrinkage,
                           shrinkage_map, sigma_imaml, sigma_of, sigma_reptile)
    from .linear_gaussian import GaussianData, GaussianLikelihood, linear_gaussian  # noqa: F401
    from .regression import LinearDesign  # noqa: F401
    from . import mixed  # noqa: F401
    from .mixed import MixedFit, MixedModel, anova, compare, holdout_split, mixed_model  # noqa: F401
    from .partition import ModulePartition  # noqa: F401
    from .posterior import NUTSResult, run_nuts  # noqa: F401
    from .priors import prior_summary, with_priors  # noqa: F401
    from .shrinkage_report import ShrinkageReport, shrinkage_report  # noqa: F401
    from .sites import GlobalParam  # noqa: F401
    from .table import GroupedTable, from_table  # noqa: F401
    from .tasks import TaskBatch  # noqa: F401
    from .train import fit, sample_from  # noqa: F401
    from .utils import enable_compilation_cache  # noqa: F401
