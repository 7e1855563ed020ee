"""The warnings hiermeta raises when a result should not be trusted as it stands.

Every one of them is also recorded in the result it concerns (a flag, a diagnostic), so a script
can check it without catching warnings; the warning is there so that nobody misses it.
"""

from __future__ import annotations

__all__ = ["HiermetaWarning", "EmpiricalBayesWarning", "PriorWarning", "SamplingWarning", "SigmaRunOffWarning",
           "DesignWarning", "FormulaError", "DataDefectError"]


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


# ---------------------------------------------------------------------------- mixed models (hiermeta.mixed)


class DesignWarning(HiermetaWarning):
    """A mixed model was built differently from how it was written: columns dropped from a
    rank-deficient fixed-effects design (as lme4 does), or a numeric grouping column with
    non-integer values treated as a factor.  The model records what was changed."""


class FormulaError(ValueError):
    """A model formula cannot be read against its data: bad syntax, an unknown column, a term
    hiermeta does not support, a formula without random-effect terms."""


class DataDefectError(ValueError):
    """The data cannot identify the model as written, found before fitting: missing or infinite
    values in a used column, an all-equal response, a random-effect term with as many levels as
    observations beside a residual, a rank-deficient fixed design (when asked to refuse one)."""
