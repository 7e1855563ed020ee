"""hiermeta: hierarchical-Bayes meta-learning (Chen et al., "Modular Meta-Learning with Shrinkage").

The model (Eq. 1): theta_{m,t} ~ N(phi_m, sigma_m^2 I) per module m, D_t ~ p(D | theta_t), written
once as a NumPyro model (:class:`HierarchicalModel`); meta-learners (:mod:`hiermeta.learners`)
share one interface (``init``, ``step``, ``inner_problem``, ``adapt``) and read every density
from that model; :mod:`hiermeta.solvers` says how each task's MAP is solved and how close it got.
"""

from .evaluate import LossCurve, adapt, evaluate, loss_curve
from .hierarchy import HierarchicalModel
from .sites import GlobalParam
from .linear_gaussian import LinearDesign, LinearGaussianLikelihood, linear_gaussian
from . import empirical_bayes, families, marginal
from .empirical_bayes import EmpiricalBayesWarning, Type2MLResult, type2_ml
from .inner import Adaptation, InnerProblem, InnerResult, run_inner
from . import solvers
from .solvers import InnerSolver
from .learners import MetaLearner, MetaState, m_shrinkage, shrinkage, sigma_of
from .learners import imaml, m_sigma_imaml, sigma_imaml
from .partition import ModulePartition
from .tasks import GaussianData, GaussianLikelihood, TaskBatch, TaskLikelihood
from .train import fit, sample_from
from .utils import enable_compilation_cache
from .posterior import NUTSResult, run_nuts, with_priors
from .priors import prior_summary
from .errors import (CheckpointError, CheckpointWriteError, ConvergenceWarning, HiermetaWarning,
                     MetaTrainingError, PriorWarning, SamplingWarning)
from .laplace import LaplaceResult
from .predictive import PredictiveScores, score_draws
from .learners import fo_m_maml, fomaml, m_maml, m_shrinkage_map, maml, reptile, shrinkage_map
from .learners import protonet
from .learners.bilevel import proximal_sgd
from . import checkpoint, empirical_bayes, sharding
from .checkpoint import load_checkpoint, save_checkpoint
from .sharding import task_mesh
from .table import GroupedTable, from_table
from .shrinkage_report import ShrinkageReport, shrinkage_report

from . import crossfit
from .crossfit import check_sigma, crossfit_sampler, sigma_spread
from .errors import SigmaRunOffWarning

__version__ = "0.1.0"

__all__ = [
    "HierarchicalModel",
    "GlobalParam",
    "LinearDesign",
    "LinearGaussianLikelihood",
    "linear_gaussian",
    "empirical_bayes",
    "families",
    "marginal",
    "type2_ml",
    "Type2MLResult",
    "EmpiricalBayesWarning",
    "ModulePartition",
    "TaskBatch",
    "TaskLikelihood",
    "GaussianData",
    "GaussianLikelihood",
    "InnerProblem",
    "InnerResult",
    "run_inner",
    "solvers",
    "InnerSolver",
    "ConvergenceWarning",
    "Adaptation",
    "adapt",
    "MetaLearner",
    "MetaState",
    "shrinkage",
    "m_shrinkage",
    "fit",
    "sample_from",
    "MetaTrainingError",
    "CheckpointWriteError",
    "sigma_of",
    "evaluate",
    "loss_curve",
    "LossCurve",
    "enable_compilation_cache",
    "maml",
    "m_maml",
    "fomaml",
    "fo_m_maml",
    "reptile",
    "shrinkage_map",
    "m_shrinkage_map",
    "imaml",
    "sigma_imaml",
    "m_sigma_imaml",
    "protonet",
    "proximal_sgd",
    "run_nuts",
    "with_priors",
    "prior_summary",
    "HiermetaWarning",
    "PriorWarning",
    "SamplingWarning",
    "NUTSResult",
    "LaplaceResult",
    "PredictiveScores",
    "score_draws",
    "checkpoint",
    "empirical_bayes",
    "sharding",
    "CheckpointError",
    "save_checkpoint",
    "load_checkpoint",
    "task_mesh",
    "from_table",
    "GroupedTable",
    "shrinkage_report",
    "ShrinkageReport",
    "crossfit",
    "crossfit_sampler",
    "sigma_spread",
    "check_sigma",
    "SigmaRunOffWarning",
]
