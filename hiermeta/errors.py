"""Every warning and exception class hiermeta raises, in one place.

Warnings: a result should not be trusted as it stands.  Every one of them is also recorded in the
result it concerns (a flag, a diagnostic), so a script can check it without catching warnings; the
warning is there so that nobody misses it.

Exceptions: a run stopped (meta-training, a checkpoint, a step of a multi-process job).  The
modules that raise them import them from here (``hiermeta.solvers.ConvergenceWarning`` and the
like still resolve, as re-exports).
"""

from __future__ import annotations

from typing import Any

__all__ = ["HiermetaWarning", "ConvergenceWarning", "EmpiricalBayesWarning", "PriorWarning", "SamplingWarning",
           "SigmaRunOffWarning", "CheckpointError", "CheckpointExistsError", "DistributedError",
           "MetaTrainingError", "CheckpointWriteError", "ProcessDisagreementError", "ReplicaDivergenceError",
           "DesignWarning", "FormulaError", "DataDefectError", "SeparationWarning", "ApproximationWarning"]


class HiermetaWarning(UserWarning):
    """Base class of hiermeta's warnings."""


class ConvergenceWarning(HiermetaWarning):
    """An inner solve stopped before reaching its tolerance (the result is not the MAP)."""


class EmpiricalBayesWarning(HiermetaWarning):
    """Type-II ML did not converge, or ended on a boundary (a sigma at 0, a correlation at +-1)."""


class PriorWarning(HiermetaWarning):
    """Priors not scaled to the data, or a posterior that sits far out in its prior's tail."""


class SamplingWarning(HiermetaWarning):
    """NUTS did not converge: divergent transitions, r-hat above 1.01, or too few effective draws."""


class SigmaRunOffWarning(HiermetaWarning):
    """A sigma learned by the predictive likelihood ran off: far above the data's scale, or to 0."""


# ---------------------------------------------------------------------------- exceptions


class CheckpointError(ValueError):
    """A checkpoint is missing, corrupt, or does not match what it is loaded into."""


class DistributedError(RuntimeError):
    """Another process failed a step that every process had to complete (its own error says why)."""


class MetaTrainingError(RuntimeError):
    """Meta-training stopped; ``state`` is the last good state and ``history`` the metrics so far."""

    def __init__(self, message: str, state: Any, history: dict):
        super().__init__(message)
        self.state = state  # a hiermeta.learners.MetaState
        self.history = history


class CheckpointWriteError(MetaTrainingError):
    """A checkpoint could not be written; ``state`` and ``history`` are the run's, up to that step."""


class ProcessDisagreementError(ValueError):
    """The processes of a multi-process run were not given the same run (configuration, data or
    initial state); raised in every process before the first meta-step, naming what differs."""


class ReplicaDivergenceError(MetaTrainingError):
    """The replicated meta-state differs between processes after a chunk of meta-steps.

    ``state`` is the last state every process agreed on (also written to the run's checkpoint, if
    it has one) and ``history`` the metrics up to it.
    """


class CheckpointExistsError(FileExistsError):
    """``fit`` was given a checkpoint path that already holds a file, with neither ``resume=True``
    (continue it) nor ``overwrite=True`` (replace it on purpose): nothing is overwritten silently."""


# ---------------------------------------------------------------------------- mixed models (hiermeta.mixed)


class DesignWarning(HiermetaWarning):
    """A mixed model was built differently from how it was written: columns dropped from a
    rank-deficient fixed-effects design (as lme4 does), or a numeric grouping column with
    non-integer values treated as a factor.  The model records what was changed."""


class FormulaError(ValueError):
    """A model formula cannot be read against its data: bad syntax, an unknown column, a term
    hiermeta does not support, a formula without random-effect terms."""


class DataDefectError(ValueError):
    """The data cannot identify or fit the model as written, found before fitting, with the rows or
    columns named: missing or infinite values in a used column, an all-equal response, a
    random-effect term with as many levels as observations beside a residual, a rank-deficient
    fixed design (when asked to refuse one), a response outside the family's range (negative or
    non-integer counts, successes above the trials), complete separation."""


class SeparationWarning(HiermetaWarning):
    """Quasi-complete separation in a GLMM's fixed effects: the likelihood grows without bound
    along a direction of the named columns, so their estimates and standard errors are not finite."""


class ApproximationWarning(HiermetaWarning):
    """An approximate fit (Laplace) is far from a more accurate computation of the same quantity
    (adaptive quadrature, importance sampling, NUTS) against the estimates' standard errors: the
    approximation, not the model, moved the answer."""
