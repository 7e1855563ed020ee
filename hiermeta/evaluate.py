"""Held-out evaluation: adapt to new tasks and score fresh query data at every adaptation step.

The generalisation loss of task t after k steps is the negative log-likelihood per observation of
its query data up to the likelihood's constant (for Gaussian noise: 1/2 sum_d (x_d - mu_d)^2 /
xi_d^2), evaluated at theta_{t,k}, the k-th iterate of the learner's own inner loop from its
meta-state.  Reported: the mean over tasks, its standard error, and the central 68% interval of
the per-task losses (16th to 84th percentile).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import numpy as np

from .inner import run_inner
from .learners.base import MetaLearner, MetaState
from .tasks import TaskBatch, check_task_batch
from .utils import check_count

__all__ = ["LossCurve", "evaluate", "loss_curve"]


class LossCurve(NamedTuple):
    """Generalisation loss against adaptation steps ``0..K`` over a set of tasks."""

    steps: np.ndarray  # (K+1,)
    mean: np.ndarray  # (K+1,)
    sem: np.ndarray  # (K+1,) standard error of the mean over tasks
    lower: np.ndarray  # (K+1,) 16th percentile over tasks
    upper: np.ndarray  # (K+1,) 84th percentile over tasks
    per_task: np.ndarray  # (T, K+1)

    def at(self, step: int) -> float:
        return float(self.mean[step])

    def to_dict(self) -> dict:
        return {
            "steps": self.steps.tolist(),
            "mean": self.mean.tolist(),
            "sem": self.sem.tolist(),
            "lower": self.lower.tolist(),
            "upper": self.upper.tolist(),
        }


def loss_curve(per_task: np.ndarray) -> LossCurve:
    """Summarise a ``(T, K+1)`` array of per-task losses."""
    per_task = np.asarray(per_task, dtype=float)
    T = per_task.shape[0]
    lower, upper = np.percentile(per_task, [16.0, 84.0], axis=0)
    return LossCurve(
        steps=np.arange(per_task.shape[1]),
        mean=per_task.mean(axis=0),
        sem=per_task.std(axis=0, ddof=1) / np.sqrt(T) if T > 1 else np.zeros(per_task.shape[1]),
        lower=lower,
        upper=upper,
        per_task=per_task,
    )


def _per_task_curves(learner: MetaLearner, params, tasks: TaskBatch, num_steps: int):
    model = learner.model
    problem = learner.inner_problem(params)

    def one(train_t, val_t):
        result = run_inner(problem, train_t, num_steps, lambda th: model.generalisation_loss(th, val_t))
        return result.trace, result.diverged

    return jax.vmap(one)(tasks.train, tasks.val)


_per_task_curves_jit = jax.jit(_per_task_curves, static_argnums=(0, 3))


def evaluate(learner: MetaLearner, state: MetaState, tasks: TaskBatch, num_steps: int) -> LossCurve:
    """Adapt ``state`` to each task's support for ``0..num_steps`` steps; score its query data.

    Raises:
      ValueError: malformed tasks, or an inner loop that diverged (with the count of tasks).
    """
    num_steps = check_count(num_steps, "num_steps", 0)
    T = check_task_batch(learner.model.likelihood, tasks)
    per_task, diverged = _per_task_curves_jit(learner, state.params, tasks, num_steps)
    per_task, diverged = np.asarray(per_task), np.asarray(diverged)
    if diverged.any() or not np.all(np.isfinite(per_task)):
        bad = int(np.sum(diverged | ~np.all(np.isfinite(per_task), axis=1)))
        raise ValueError(
            f"{learner.name}: the inner loop diverged on {bad} of {T} tasks within {num_steps} "
            "steps; lower the inner learning rate"
        )
    return loss_curve(per_task)
