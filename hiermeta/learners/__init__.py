"""Meta-learners, one file per algorithm, all on the :class:`MetaLearner` interface."""

from .base import MetaLearner, MetaState
from .shrinkage import m_shrinkage, shrinkage, shrinkage_params, sigma_of

__all__ = ["MetaLearner", "MetaState", "shrinkage", "m_shrinkage", "shrinkage_params", "sigma_of"]

# exact implicit hypergradients (issue 3)
from .imaml import imaml  # noqa: E402
from .sigma_imaml import m_sigma_imaml, sigma_imaml  # noqa: E402

__all__ += ["imaml", "sigma_imaml", "m_sigma_imaml"]
