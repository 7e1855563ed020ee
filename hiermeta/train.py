"""Meta-training loop: chunks of meta-steps compiled under ``lax.scan``, with a progress bar.

The task batch for meta-step ``s`` is ``sample_tasks(fold_in(data_key, s))``: the data stream is
a function of the step count alone, so a run resumed from a saved :class:`MetaState` sees the
same tasks as an uninterrupted one.
"""

from __future__ import annotations

from typing import Callable, Optional

import jax
import numpy as np

from .learners.base import MetaLearner, MetaState, all_finite
from .tasks import TaskBatch, check_task_batch, num_tasks

__all__ = ["fit", "MetaTrainingError", "sample_from"]


class MetaTrainingError(RuntimeError):
    """Meta-training stopped; ``state`` is the last good state and ``history`` the metrics so far."""

    def __init__(self, message: str, state: MetaState, history: dict):
        super().__init__(message)
        self.state = state
        self.history = history


def sample_from(tasks: TaskBatch, batch_size: int) -> Callable[[jax.Array], TaskBatch]:
    """A ``sample_tasks(key)`` that draws ``batch_size`` distinct tasks from a fixed data set."""
    T = num_tasks(tasks.train)
    if not 1 <= batch_size <= T:
        raise ValueError(f"batch_size must be between 1 and the {T} tasks available, got {batch_size}")

    def sample(key):
        idx = jax.random.choice(key, T, (batch_size,), replace=False)
        return jax.tree_util.tree_map(lambda a: a[idx], tasks)

    return sample


def _trailing_true(flags: np.ndarray) -> int:
    """Length of the run of True at the end of ``flags``."""
    false = np.flatnonzero(~flags)
    return int(flags.size if false.size == 0 else flags.size - 1 - false[-1])


def fit(
    learner: MetaLearner,
    state: MetaState,
    sample_tasks: Callable[[jax.Array], TaskBatch],
    num_steps: int,
    *,
    data_key: jax.Array,
    chunk_size: int = 100,
    max_consecutive_skips: int = 20,
    progress: bool = True,
    description: Optional[str] = None,
) -> tuple[MetaState, dict]:
    """Run ``num_steps`` meta-steps of ``learner`` from ``state``.

    Args:
      sample_tasks: ``key -> TaskBatch`` drawing a fresh batch (jittable), e.g. a domain's task
        generator or :func:`sample_from` over a fixed data set.
      data_key: PRNG key of the task stream.
      chunk_size: meta-steps per compiled chunk (the progress bar moves once per chunk).
      max_consecutive_skips: stop with :class:`MetaTrainingError` when this many meta-steps in a
        row were skipped because their update was not finite (or an inner loop diverged).
    Returns:
      The final state and the history: each metric stacked over the steps run, as NumPy arrays.
    """
    if int(num_steps) < 0:
        raise ValueError(f"num_steps must be >= 0, got {num_steps}")
    if int(chunk_size) < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if not bool(all_finite(state.params)):
        raise ValueError("the initial meta-parameters hold NaN or infinite values")
    # check one batch eagerly, so malformed data fails here with a clear message, not in XLA
    check_task_batch(learner.model.likelihood, sample_tasks(jax.random.fold_in(data_key, state.step)))

    def run_chunk(state, length):
        def body(state, _):
            batch = sample_tasks(jax.random.fold_in(data_key, state.step))
            return learner.step(state, batch)

        return jax.lax.scan(body, state, None, length=length)

    run_chunk = jax.jit(run_chunk, static_argnums=1)
    chunks: list[dict] = []
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=int(num_steps), desc=description or learner.name, leave=False)
    done = 0
    skip_streak = 0
    try:
        while done < num_steps:
            length = min(int(chunk_size), int(num_steps) - done)
            state, metrics = run_chunk(state, length)
            metrics = jax.tree_util.tree_map(np.asarray, metrics)
            chunks.append(metrics)
            done += length
            skipped = np.asarray(metrics["skipped"], bool)
            skip_streak = skip_streak + length if skipped.all() else _trailing_true(skipped)
            if bar is not None:
                postfix = {"skipped": int(state.num_skipped)}
                if "val_log_lik" in metrics:
                    postfix["val_log_lik"] = f"{float(np.mean(metrics['val_log_lik'])):.3f}"
                bar.set_postfix(postfix, refresh=False)
                bar.update(length)
            if skip_streak >= max_consecutive_skips:
                history = _concat(chunks)
                raise MetaTrainingError(
                    f"{learner.name}: the last {skip_streak} meta-steps were skipped because their "
                    "update was not finite or an inner loop diverged (inner learning rate too "
                    "large, or sigma too small for it?). The state returned is the last good one.",
                    state,
                    history,
                )
    finally:
        if bar is not None:
            bar.close()
    return state, _concat(chunks)


def _concat(chunks: list[dict]) -> dict:
    if not chunks:
        return {}
    return jax.tree_util.tree_map(lambda *xs: np.concatenate(xs, axis=0), *chunks)
