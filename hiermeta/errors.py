"""The warnings hiermeta raises when a result should not be trusted as it stands.

Every one of them is also recorded in the result it concerns (a flag, a diagnostic), so a script
can check it without catching warnings; the warning is there so that nobody misses it.
"""

from __future__ import annotations

__all__ = ["HiermetaWarning", "EmpiricalBayesWarning", "PriorWarning", "SamplingWarning", "SigmaRunOffWarning",
           "DataDefectError", "SeparationWarning"]


class HiermetaWarning(UserWarning):
    """Base class of hiermeta's warnings."""


class EmpiricalBayesWarning(HiermetaWarning):
    """Type-II ML did not converge, or ended on a boundary (a sigma at 0, a correlation at +-1)."""


class PriorWarning(HiermetaWarning):
    """Priors not scaled to the data, or a posterior that sits far out in its prior's tail."""


class SamplingWarning(HiermetaWarning):
    """NUTS did not converge: divergent transitions, r-hat above 1.01, or too few effective draws."""


class SigmaRunOffWarning(HiermetaWarning):
    """A sigma learned by the predictive likelihood ran off: far above the data's scale, or to 0."""


# ---------------------------------------------------------------------------- mixed models (GLMMs)


class DataDefectError(ValueError):
    """The data cannot be fitted as given: a response outside the family's range (negative or
    non-integer counts, successes above the trials), an all-equal binary response, or complete
    separation; found before anything is fitted, with the rows or columns named."""


class SeparationWarning(HiermetaWarning):
    """Quasi-complete separation in a GLMM's fixed effects: the likelihood grows without bound
    along a direction of the named columns, so their estimates and standard errors are not finite."""
