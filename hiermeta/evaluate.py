"""Adapting to new tasks, checked (:func:`adapt`), and held-out evaluation (:func:`evaluate`): the
query loss at every adaptation step.

The generalisation loss of task t after k steps is the negative log-likelihood per observation of
its query data up to the likelihood's constant (for Gaussian noise: 1/2 sum_d (x_d - mu_d)^2 /
xi_d^2), evaluated at theta_{t,k}, the k-th iterate of the learner's own inner solver from its
meta-state.  Reported: the mean over tasks, its standard error, and the central 68% interval of
the per-task losses (16th to 84th percentile).

Both raise if an inner solve diverged and warn (:class:`hiermeta.errors.ConvergenceWarning`) if one did
not converge within its tolerance.
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Optional

import jax
import numpy as np
from jax.sharding import Mesh

from .distributed import check_mesh, require_agreement, tree_digest
from .inner import Adaptation, run_inner
from .learners.base import MetaLearner, MetaState
from .sharding import replicate, replicated, shard_tasks
from .solvers import resolved_tol, warn_unconverged
from .tasks import TaskBatch, check_task_batch, num_tasks
from .utils import check_count, check_memory

__all__ = ["LossCurve", "evaluate", "loss_curve", "adapt"]


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


def _num_steps(learner: MetaLearner, num_steps: Optional[int]) -> int:
    if num_steps is None:
        if learner.inner_solver is None:
            raise ValueError(f"{learner.name} names no inner solver: give num_steps")
        return int(learner.inner_solver.num_steps)
    return check_count(num_steps, "num_steps", 0)


def _check_solves(learner: MetaLearner, num_steps: int, diverged, converged, stationarity, dtype) -> None:
    """Raise if a solve diverged; warn once if some did not converge."""
    diverged, converged, stationarity = np.asarray(diverged), np.asarray(converged), np.asarray(stationarity)
    T = diverged.shape[0]
    if diverged.any():
        raise ValueError(
            f"{learner.name}: the inner solve diverged on {int(diverged.sum())} of {T} tasks within {num_steps} "
            "steps; lower the inner learning rate, or use inner_solver=hiermeta.solvers.newton() (or lbfgs())"
        )
    bad = int(np.sum(~converged))
    if bad:
        tol = resolved_tol(getattr(learner.inner_solver, "tol", None), dtype)
        warn_unconverged(f"{learner.name}, {num_steps} steps", f"{bad} of {T} tasks", float(np.max(stationarity)),
                         tol, stacklevel=4)


def _adapt(learner: MetaLearner, state: MetaState, support, num_steps: int) -> Adaptation:
    return learner.adapt(state, support, num_steps)


_adapt_jit = jax.jit(_adapt, static_argnums=(0, 3))


def adapt(learner: MetaLearner, state: MetaState, support, num_steps: Optional[int] = None) -> Adaptation:
    """Adapt ``state`` to each task of ``support`` with the learner's inner solver, checked.

    The host-side ``learner.adapt``: validates ``support`` (a ``ValueError`` naming the problem,
    before anything is compiled), runs one compiled program per (learner, shape, ``num_steps``),
    raises ``ValueError`` if a solve diverged and warns (:class:`hiermeta.errors.ConvergenceWarning`,
    naming how many tasks and the worst stationarity) if one did not converge.

    Args:
      support: the tasks' support data, leading task axis T.
      num_steps: the solver's budget (default: the learner's): K optimiser steps, or the most
        Newton / L-BFGS iterations.
    Returns:
      :class:`~hiermeta.inner.Adaptation`: theta ``(T, P)``, loss, stationarity, converged, diverged.
    """
    learner.model.likelihood.check(support, "support")
    num_tasks(support)
    n = _num_steps(learner, num_steps)
    result = _adapt_jit(learner, state, support, n)
    _check_solves(learner, n, result.diverged, result.converged, result.stationarity, result.theta.dtype)
    return result


def _per_task_curves(learner: MetaLearner, params, tasks: TaskBatch, num_steps: int, test_time=None):
    model = learner.model
    problem = learner.inner_problem(params)

    def one(train_t, val_t):
        score = lambda th: model.generalisation_loss(th, val_t)
        result = run_inner(problem, train_t, num_steps, score)
        if test_time is None:
            return result.trace, result.diverged, result.converged, result.stationarity
        # then the test-time method on the query's inputs (never its labels), from theta_K
        after = test_time.adapt(model, result.theta, val_t.inputs, val_t.mask, observe=score)
        trace = jax.numpy.concatenate([result.trace, after.trace[1:]])
        return trace, result.diverged | after.diverged, result.converged, result.stationarity

    return jax.vmap(one)(tasks.train, tasks.val)


_per_task_curves_jit = jax.jit(_per_task_curves, static_argnums=(0, 3, 4))


@functools.lru_cache(maxsize=32)
def _sharded_curves(learner: MetaLearner, num_steps: int, mesh: Mesh):
    """The per-task curves with the tasks split over ``mesh`` (any count) and the results gathered."""
    def run(params, tasks):
        return _per_task_curves(learner, replicate(params, mesh), shard_tasks(tasks, mesh), num_steps)

    return jax.jit(run, out_shardings=replicated(mesh))


def evaluate(learner: MetaLearner, state: MetaState, tasks: TaskBatch, num_steps: Optional[int] = None,
             *, mesh: Optional[Mesh] = None, test_time=None) -> LossCurve:
    """Adapt ``state`` to each task's support with the learner's inner solver; score its query data
    after every iterate ``0..num_steps``.

    ``num_steps`` (default: the solver's budget) is K for gradient steps: the curve is the query
    loss after k = 0..K optimiser steps.  For Newton and L-BFGS it is the most iterations: entry
    k is the loss after k iterations, frozen once the solve converged, so the last entry
    (``curve.mean[-1]``) is the loss at the solution (the MAP).

    ``test_time`` (a :class:`hiermeta.tta.TestTimeAdaptation`, e.g. TENT) adapts each task further
    from its iterate ``num_steps``, on the query's inputs alone: the curve then goes on with the
    query loss after each of the method's J steps (entries ``num_steps + 1 .. num_steps + J``).

    ``mesh`` (:func:`hiermeta.sharding.task_mesh`) splits the tasks over its devices, across
    processes in a ``jax.distributed`` job (every process passes the same ``tasks`` and state:
    checked, :class:`~hiermeta.errors.ProcessDisagreementError` otherwise), and gathers the
    per-task losses back to every process.

    Raises:
      ValueError: malformed tasks, or an inner solve that diverged (with the count of tasks).
    Warns:
      hiermeta.errors.ConvergenceWarning: an inner solve did not reach the solver's tolerance within
      ``num_steps`` (with the count of tasks and the worst stationarity).
    """
    n = _num_steps(learner, num_steps)
    check_task_batch(learner.model.likelihood, tasks)
    check_memory(8.0 * num_tasks(tasks.val) * (n + 1), f"the loss curves of {num_tasks(tasks.val)} tasks over "
                                                      f"num_steps={n} steps")
    if mesh is None:
        per_task, diverged, converged, stationarity = _per_task_curves_jit(learner, state.params, tasks, n, test_time)
    else:
        if test_time is not None:
            raise ValueError("evaluate: test_time with a mesh is not supported; evaluate on one device")
        check_mesh(mesh)
        if jax.process_count() > 1:  # each process passes its own copy: they must be the same
            require_agreement({"the tasks": tree_digest(tasks), "the meta-parameters": tree_digest(state.params),
                               "num_steps": str(n)}, "evaluate over several processes")
        per_task, diverged, converged, stationarity = _sharded_curves(learner, n, mesh)(state.params, tasks)
    per_task, diverged = np.asarray(per_task), np.asarray(diverged)
    diverged = diverged | ~np.all(np.isfinite(per_task), axis=1)
    _check_solves(learner, n, diverged, converged, stationarity, per_task.dtype)
    return loss_curve(per_task)
