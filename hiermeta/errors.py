"""The warnings hiermeta raises when a result should not be trusted as it stands.

Every one of them is also recorded in the result it concerns (a flag, a diagnostic), so a script
can check it without catching warnings; the warning is there so that nobody misses it.
"""

from __future__ import annotations

__all__ = ["HiermetaWarning", "EmpiricalBayesWarning", "PriorWarning", "SamplingWarning", "SigmaRunOffWarning",
           "ProcessDisagreementError", "ReplicaDivergenceError", "CheckpointExistsError"]


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


class ProcessDisagreementError(ValueError):
    """The processes of a multi-process run were not given the same run (configuration, data or
    initial state); raised in every process before the first meta-step, naming what differs."""


class ReplicaDivergenceError(RuntimeError):
    """The replicated meta-state differs between processes after a chunk of meta-steps.

    ``state`` is the last state every process agreed on (also written to the run's checkpoint, if
    it has one) and ``history`` the metrics up to it, as :class:`hiermeta.MetaTrainingError` carries.
    """

    def __init__(self, message: str, state, history: dict):
        super().__init__(message)
        self.state = state
        self.history = history


class CheckpointExistsError(FileExistsError):
    """``fit`` was given a checkpoint path that already holds a file, with neither ``resume=True``
    (continue it) nor ``overwrite=True`` (replace it on purpose): nothing is overwritten silently."""
