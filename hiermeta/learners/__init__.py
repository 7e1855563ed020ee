"""Meta-learners, one file per algorithm, all on the :class:`MetaLearner` interface."""

from .base import MetaLearner, MetaState
from .info import BilevelInfo, MAMLInfo, ProtoNetInfo, ReptileInfo, ShrinkageMAPInfo, StepInfo, step_metrics
from .bilevel import gaussian_prior_learner, phi_sigma_optimizer, proximal_sgd
from .minibatch import minibatch_steps
from .runoff import check_run_off
from .shrinkage import m_shrinkage, shrinkage, shrinkage_params, sigma_of

__all__ = ["MetaLearner", "MetaState", "StepInfo", "BilevelInfo", "ShrinkageMAPInfo", "MAMLInfo", "ReptileInfo",
           "ProtoNetInfo", "step_metrics", "shrinkage", "m_shrinkage", "shrinkage_params", "sigma_of", "proximal_sgd",
           "gaussian_prior_learner", "phi_sigma_optimizer", "minibatch_steps", "check_run_off"]

# exact implicit hypergradients
from .imaml import imaml  # noqa: E402
from .sigma_imaml import m_sigma_imaml, sigma_imaml  # noqa: E402
from .sigma_reptile import m_sigma_reptile, sigma_reptile  # noqa: E402

__all__ += ["imaml", "sigma_imaml", "m_sigma_imaml", "sigma_reptile", "m_sigma_reptile"]

# baselines
from .maml import fo_m_maml, fomaml, m_maml, maml, maml_params, rates_of  # noqa: E402
from .reptile import reptile  # noqa: E402
from .shrinkage_map import m_shrinkage_map, shrinkage_map  # noqa: E402

__all__ += ["maml", "m_maml", "fomaml", "fo_m_maml", "maml_params", "rates_of", "reptile",
            "shrinkage_map", "m_shrinkage_map"]

from .protonet import protonet  # noqa: E402

__all__ += ["protonet"]

# the lecture's other families: black-box parameter prediction and a learned optimiser (issue 24)
from .learned_optimizer import learned_optimizer, learned_solver  # noqa: E402
from .param_predict import class_weight_predictor, set_encoder  # noqa: E402

__all__ += ["class_weight_predictor", "set_encoder", "learned_optimizer", "learned_solver"]
