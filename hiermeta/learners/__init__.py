"""Meta-learners, one file per algorithm, all on the :class:`MetaLearner` interface."""

from .base import MetaLearner, MetaState
from .shrinkage import m_shrinkage, shrinkage, shrinkage_params, sigma_of

__all__ = ["MetaLearner", "MetaState", "shrinkage", "m_shrinkage", "shrinkage_params", "sigma_of"]
