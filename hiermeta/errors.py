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
           "SigmaRunOffWarning", "CheckpointError", "DistributedError", "MetaTrainingError", "CheckpointWriteError"]


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
