"""Meta-training loop: chunks of meta-steps compiled under ``lax.scan``, with a progress bar.

The task batch for meta-step ``s`` is ``sample_tasks(fold_in(data_key, s))``: the data stream is
a function of the step count alone, so a run resumed from a saved :class:`MetaState` sees the
same tasks as an uninterrupted one.  ``fit`` builds checkpoint-and-resume on that (the whole
state and the history so far, :mod:`hiermeta.checkpoint`), and splits each batch's tasks over a
device mesh when given one (:mod:`hiermeta.sharding`).  The compiled chunk is cached per
(learner, task sampler, mesh): calling ``fit`` again does not retrace.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .learners.base import MetaLearner, MetaState, all_finite
from .sharding import replicate, replicated, shard_tasks
from .solvers import resolved_tol, warn_unconverged
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


@functools.lru_cache(maxsize=64)
def _chunk_runner(learner: MetaLearner, sample_tasks: Callable, mesh: Optional[Mesh], chunk_size: int):
    """The compiled chunk of meta-steps, cached so that repeated ``fit`` calls never retrace.

    ``run(state, data_key, length)`` scans over ``chunk_size`` slots and takes a meta-step in the
    first ``length`` of them (``length`` is traced): one program serves every chunk, the short
    last one and the ones cut at checkpoints included.  The batch of step ``s`` is
    ``sample_tasks(fold_in(data_key, s))``, its tasks sharded over ``mesh`` if given.
    """

    def meta_step(state, data_key):
        batch = sample_tasks(jax.random.fold_in(data_key, state.step))
        if mesh is not None:
            batch = shard_tasks(batch, mesh)
        return learner.step(state, batch)

    meta_step = jax.jit(meta_step)  # traced once: eval_shape below and the scan share its trace

    def run(state, data_key, length):
        metrics_shape = jax.eval_shape(meta_step, state, data_key)[1]

        def idle(state, data_key):
            zeros = lambda s: jnp.zeros(s.shape, s.dtype)
            return state, jax.tree_util.tree_map(zeros, metrics_shape)

        def body(state, i):
            return jax.lax.cond(i < length, meta_step, idle, state, data_key)

        return jax.lax.scan(body, state, jnp.arange(chunk_size))

    if mesh is None:
        return jax.jit(run)
    rep = replicated(mesh)
    return jax.jit(run, out_shardings=(rep, rep))


def _key_data(key) -> list:
    key = jax.random.key_data(key) if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key) else key
    return np.asarray(key).tolist()


def _resume(path, state, learner, data_key, target) -> tuple[MetaState, list, dict]:
    """State, history chunks and metadata from the checkpoint at ``path``, checked against this run."""
    loaded, meta, extra = load_checkpoint(path, state)
    expected = {"learner": learner.name, "data_key": _key_data(data_key), "start_step": int(state.step)}
    for name, value in expected.items():
        if meta.get(name) != value:
            raise CheckpointError(
                f"checkpoint {path} belongs to a different run: its {name} is {meta.get(name)!r}, "
                f"this run's is {value!r}"
            )
    if int(loaded.step) > target:
        raise CheckpointError(f"checkpoint {path} is at step {int(loaded.step)}, past this run's end {target}")
    history = {name[len("history/"):]: arr for name, arr in extra.items() if name.startswith("history/")}
    if history and any(len(a) != int(loaded.step) - int(state.step) for a in history.values()):
        raise CheckpointError(f"checkpoint {path}: its history does not match its step count")
    return loaded, [history] if history else [], meta


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
    checkpoint: Optional[str | os.PathLike] = None,
    checkpoint_every: Optional[int] = None,
    resume: bool = False,
    mesh: Optional[Mesh] = None,
) -> tuple[MetaState, dict]:
    """Run ``num_steps`` meta-steps of ``learner`` from ``state``.

    Args:
      sample_tasks: ``key -> TaskBatch`` drawing a fresh batch (jittable), e.g. a domain's task
        generator or :func:`sample_from` over a fixed data set.
      data_key: PRNG key of the task stream.
      chunk_size: meta-steps per compiled chunk (the progress bar moves once per chunk); one
        program runs every chunk, shorter ones included.
      max_consecutive_skips: stop with :class:`MetaTrainingError` when this many meta-steps in a
        row were skipped because their update was not finite (or an inner loop diverged).
      checkpoint: file for checkpoints (:mod:`hiermeta.checkpoint`): the whole state and the
        history so far, written atomically every ``checkpoint_every`` steps and at the end.
      checkpoint_every: steps between checkpoints (default: only at the end).
      resume: continue from ``checkpoint`` if it exists (else start from ``state``).  The run is
        still the one started from ``state`` for ``num_steps`` steps: the result, history
        included, is bit-identical to an uninterrupted run.  A checkpoint of another run
        (learner, data key, start step, structure, shapes, dtypes) or a corrupt one raises
        :class:`~hiermeta.checkpoint.CheckpointError`.
      mesh: a device mesh (:func:`hiermeta.sharding.task_mesh`): each batch's tasks are split
        over its devices and the state is replicated.
    Returns:
      The final state and the history: each metric stacked over the steps run, as NumPy arrays.
    """
    if int(num_steps) < 0:
        raise ValueError(f"num_steps must be >= 0, got {num_steps}")
    if int(chunk_size) < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if checkpoint_every is not None and int(checkpoint_every) < 1:
        raise ValueError(f"checkpoint_every must be >= 1, got {checkpoint_every}")
    if (checkpoint_every is not None or resume) and checkpoint is None:
        raise ValueError("checkpoint_every and resume need a checkpoint path")
    if not bool(all_finite(state.params)):
        raise ValueError("the initial meta-parameters hold NaN or infinite values")
    start, target = int(state.step), int(state.step) + int(num_steps)
    chunks: list[dict] = []
    if resume and Path(checkpoint).exists():
        state, chunks, _ = _resume(checkpoint, state, learner, data_key, target)
    # check one batch eagerly, so malformed data fails here with a clear message, not in XLA
    check_task_batch(learner.model.likelihood, sample_tasks(jax.random.fold_in(data_key, state.step)))
    if mesh is not None:
        state = replicate(state, mesh)
    run_chunk = _chunk_runner(learner, sample_tasks, mesh, int(chunk_size))
    every = int(checkpoint_every) if checkpoint_every is not None else None
    metadata = {"learner": learner.name, "data_key": _key_data(data_key), "start_step": start,
                "target_step": target}

    def save(state):
        history = _concat(chunks)
        save_checkpoint(checkpoint, state, {**metadata, "step": int(state.step)},
                        extra={f"history/{name}": arr for name, arr in history.items()})

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=target - start, initial=int(state.step) - start,
                   desc=description or learner.name, leave=False)
    skip_streak = 0
    try:
        while int(state.step) < target:
            # chunk ends fall on multiples of chunk_size and checkpoint_every counted from the
            # start of the run, so a resumed run runs the very same chunks
            done = int(state.step) - start
            end = min(target - start, (done // int(chunk_size) + 1) * int(chunk_size))
            if every is not None:
                end = min(end, (done // every + 1) * every)
            length = end - done
            state, metrics = run_chunk(state, data_key, length)
            metrics = jax.tree_util.tree_map(lambda a: np.asarray(a)[:length], metrics)
            chunks.append(metrics)
            skipped = np.asarray(metrics["skipped"], bool)
            skip_streak = skip_streak + length if skipped.all() else _trailing_true(skipped)
            if checkpoint is not None and (int(state.step) == target or (every and end % every == 0)):
                save(state)
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
    if checkpoint is not None and not chunks:  # nothing to run: still leave a checkpoint
        save(state)
    history = _concat(chunks)
    if "num_unconverged" in history and np.any(history["num_unconverged"] > 0):  # once per fit
        bad, worst = history["num_unconverged"], history["inner_stationarity"]
        warn_unconverged(learner.name, f"up to {bad.max()} tasks of a batch in {np.sum(bad > 0)} of {bad.size} "
                         "meta-steps", float(worst.max()), resolved_tol(learner.inner_solver.tol, worst.dtype))
    return state, history


def _concat(chunks: list[dict]) -> dict:
    if not chunks:
        return {}
    return jax.tree_util.tree_map(lambda *xs: np.concatenate(xs, axis=0), *chunks)
