"""Meta-training loop: chunks of meta-steps compiled under ``lax.scan``, with a progress bar.

The task batch for meta-step ``s`` is ``sample_tasks(fold_in(data_key, s))``: the data stream is
a function of the step count alone, so a run resumed from a saved :class:`MetaState` sees the
same tasks as an uninterrupted one.  ``fit`` builds checkpoint-and-resume on that (the whole
state, the history so far and the current run of skipped steps, :mod:`hiermeta.checkpoint`,
with a fingerprint of the run's configuration so that a checkpoint of another configuration is
refused), and splits each batch's tasks over a device mesh when given one
(:mod:`hiermeta.sharding`).  The compiled chunk is cached per (learner, task sampler, mesh,
chunk size): calling ``fit`` again does not retrace.

In a job of several processes (:mod:`hiermeta.distributed`) every process calls ``fit`` with the
same arguments and a mesh over every process's devices; each process holds the replicated state,
process 0 alone writes the checkpoint (the others wait for it, and all learn if it failed), and a
resumed run is read by every process from the same file (a file system that all of them see).
Nothing checks this by itself in SPMD (each process runs the program it traced, on the data it
holds), so ``fit`` does: before the first meta-step every process compares its settings and run
fingerprint (the traced meta-step and task sampler with the data they close over, the initial
state) with process 0's and refuses to start, naming what differs
(:class:`~hiermeta.errors.ProcessDisagreementError`); after each chunk it compares a digest of its
replicated state, and a divergence stops the run with the last state all processes agreed on
(:class:`~hiermeta.errors.ReplicaDivergenceError`, and the checkpoint, if any, holds that state).

An existing checkpoint file is never replaced by a new run by accident: ``resume=True`` continues
it, ``overwrite=True`` replaces it, anything else raises
:class:`~hiermeta.errors.CheckpointExistsError` naming the file and its step.
"""

from __future__ import annotations

import functools
import hashlib
import math
import os
import re
import tempfile
from pathlib import Path
from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from tqdm.auto import tqdm

from .checkpoint import load_checkpoint, read_metadata, save_checkpoint
from .distributed import check_mesh, collectively, disagreements, same_everywhere, tree_digest
from .errors import (CheckpointError, CheckpointExistsError, CheckpointWriteError, MetaTrainingError,
                     ProcessDisagreementError, ReplicaDivergenceError)
from .learners.base import MetaLearner, MetaState, all_finite
from .learners.info import step_metrics
from .learners.runoff import check_run_off
from .sharding import replicate, replicated, shard_tasks
from .solvers import resolved_tol, warn_unconverged
from .tasks import TaskBatch, check_task_batch, num_tasks
from .utils import check_count, check_memory

__all__ = ["fit", "MetaTrainingError", "CheckpointWriteError", "sample_from"]


def sample_from(tasks: TaskBatch, batch_size: int) -> Callable[[jax.Array], TaskBatch]:
    """A ``sample_tasks(key)`` that draws ``batch_size`` distinct tasks from a fixed data set."""
    T = num_tasks(tasks.train)
    batch_size = check_count(batch_size, "batch_size", 1)
    if batch_size > T:
        raise ValueError(f"batch_size must be between 1 and the {T} tasks available, got {batch_size}")

    def sample(key):
        idx = jax.random.choice(key, T, (batch_size,), replace=False)
        return jax.tree_util.tree_map(lambda a: a[idx], tasks)

    return sample


class _Runner(NamedTuple):
    run: Callable  # (state, data_key, length, streak, limit) -> ((state, streak), metrics)
    meta_step: Callable  # the jitted (state, data_key) -> (state, metrics) that run scans


@functools.lru_cache(maxsize=64)
def _chunk_runner(learner: MetaLearner, sample_tasks: Callable, mesh: Optional[Mesh], chunk_size: int) -> _Runner:
    """The compiled chunk of meta-steps, cached so that repeated ``fit`` calls never retrace.

    ``run(state, data_key, length, streak, limit)`` scans over ``chunk_size`` slots and takes a
    meta-step in each of the first ``length`` slots while ``streak`` (consecutive skipped
    meta-steps, carried and updated step by step) is below ``limit``; ``length``, ``streak`` and
    ``limit`` are traced, so one program serves every chunk, the short last one, the ones cut at
    checkpoints and the one a run of skips stops early.  The batch of step ``s`` is
    ``sample_tasks(fold_in(data_key, s))``, its tasks sharded over ``mesh`` if given.
    """

    def meta_step(state, data_key):
        batch = sample_tasks(jax.random.fold_in(data_key, state.step))
        if mesh is not None:
            batch = shard_tasks(batch, mesh)
        state, info = learner.step(state, batch)
        return state, step_metrics(info)  # the flat dict the history stacks

    meta_step = jax.jit(meta_step)  # traced once: the fingerprint, eval_shape and the scan share its trace

    def run(state, data_key, length, streak, limit):
        metrics_shape = jax.eval_shape(meta_step, state, data_key)[1]

        def idle(state, data_key):
            zeros = lambda s: jnp.zeros(s.shape, s.dtype)
            return state, jax.tree_util.tree_map(zeros, metrics_shape)

        def body(carry, i):
            state, streak = carry
            active = (i < length) & (streak < limit)
            state, metrics = jax.lax.cond(active, meta_step, idle, state, data_key)
            skipped = jnp.asarray(metrics["skipped"], bool)
            streak = jnp.where(active, jnp.where(skipped, streak + 1, 0), streak)
            return (state, streak), metrics

        return jax.lax.scan(body, (state, streak), jnp.arange(chunk_size))

    if mesh is None:
        return _Runner(jax.jit(run), meta_step)
    rep = replicated(mesh)
    return _Runner(jax.jit(run, out_shardings=(rep, rep)), meta_step)


def _key_data(key) -> list:
    key = jax.random.key_data(key) if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key) else key
    return np.asarray(key).tolist()


# ---------------------------------------------------------------------------- run fingerprint


def _jaxpr_digest(closed) -> str:
    """SHA-256 of a traced program: its text (literals such as learning rates included, object
    addresses removed) and the values of its constants (arrays a function closes over)."""
    text = re.sub(r"0x[0-9a-fA-F]+", "0x", str(closed.jaxpr))
    return hashlib.sha256((text + tree_digest(list(closed.consts))).encode()).hexdigest()


_FINGERPRINT_PARTS = {
    "meta_step": "the meta-step (learning rates and schedules, inner steps, optimisers, hypergradient, "
                 "model, batch shapes, device mesh or precision)",
    "task_sampler": "the task sampler (what it draws, the data it draws from, or how many tasks)",
}
_SETTINGS = {  # fit's settings compared between processes, in words
    "learner": "the learner's name",
    "start_step": "the initial state's step",
    "target_step": "the step to reach (initial step + num_steps)",
    "checkpoint": "whether a checkpoint path is given",
    "the names of the values compared": "the list of settings compared (another hiermeta version?)",
}


def _fingerprint(runner: _Runner, sample_tasks, state, data_key) -> dict:
    """What makes a run this run: the traced meta-step and task sampler, and the initial state.

    The same script re-run traces the same programs with the same constants and starts from the
    same state, so its fingerprint matches; a changed learning rate, schedule, inner-step count,
    optimiser, sampler or initial state changes a digest.
    """
    parts = {
        "meta_step": _jaxpr_digest(runner.meta_step.trace(state, data_key).jaxpr),
        "task_sampler": _jaxpr_digest(jax.make_jaxpr(sample_tasks)(data_key)),
    }
    fields = getattr(state, "_fields", None)
    if fields:
        parts.update({f"initial_state.{name}": tree_digest(getattr(state, name)) for name in fields})
    else:
        parts["initial_state"] = tree_digest(state)
    return parts


def _describe_parts(differ: list[str]) -> list[str]:
    """What the differing fingerprint parts (or run settings) are, in words."""
    out = []
    for name in differ:
        if name.startswith("initial_state"):
            out.append(f"the initial state ({name.partition('.')[2] or 'state'})")
        elif name == "meta_step" and "task_sampler" in differ:
            out.append("the meta-step (it draws from the sampler, so it differs too)")
        else:
            out.append(_FINGERPRINT_PARTS.get(name) or _SETTINGS.get(name) or f"fit's argument {name}")
    return out


def _differences(theirs: dict, ours: dict) -> list[str]:
    names = sorted(set(theirs) | set(ours))
    return _describe_parts([name for name in names if theirs.get(name) != ours.get(name)])


def _check_processes_agree(settings: dict, fingerprint: dict) -> None:
    """Refuse to start a multi-process run whose processes were not given the same run.

    In SPMD every process runs the program it traced on the data it holds: a process with another
    learning rate or other data would silently train something that is neither run.  Compares
    ``settings`` (fit's arguments) and ``fingerprint`` (:func:`_fingerprint`) with process 0's.
    """
    differ = disagreements({**{name: repr(value) for name, value in settings.items()}, **fingerprint})
    if not differ:
        return
    names = sorted(differ, key=lambda name: (name == "meta_step", name))  # the cause before its consequence
    said = _describe_parts(names)
    raise ProcessDisagreementError(
        f"the {jax.process_count()} processes of this run were not given the same run: "
        + "; ".join(f"{what} (in process(es) {differ[name]})" for name, what in zip(names, said))
        + " differ(s) from process 0's. Every process must call fit with the same learner, arguments, "
        "task sampler, data and initial state (data held as each process's own share go through "
        "hiermeta.distributed.global_tasks); no meta-step was run"
    )


def _resume(path, state, learner, data_key, target, fingerprint) -> tuple[MetaState, list, int]:
    """State, history chunks and skip streak from the checkpoint at ``path``, checked against this run."""
    loaded, meta, extra = load_checkpoint(path, state)
    expected = {"learner": learner.name, "data_key": _key_data(data_key), "start_step": int(state.step)}
    for name, value in expected.items():
        if meta.get(name) != value:
            raise CheckpointError(
                f"checkpoint {path} belongs to a different run: its {name} is {meta.get(name)!r}, "
                f"this run's is {value!r}"
            )
    theirs = meta.get("fingerprint")
    if not isinstance(theirs, dict):
        raise CheckpointError(
            f"checkpoint {path} records no configuration fingerprint (written by an older hiermeta), "
            "so it cannot be checked against this run; start afresh or load it with load_checkpoint"
        )
    differ = _differences(theirs, fingerprint)
    if differ:
        raise CheckpointError(
            f"checkpoint {path} was written by a run with another configuration: "
            + "; ".join(differ) + " differ(s) from this run's. Resume with the configuration that "
            "wrote it, or start afresh under another checkpoint path"
        )
    streak = meta.get("skip_streak")
    if isinstance(streak, bool) or not isinstance(streak, int) or streak < 0:
        raise CheckpointError(f"checkpoint {path} has a malformed skip_streak {streak!r}")
    if int(loaded.step) > target:
        raise CheckpointError(f"checkpoint {path} is at step {int(loaded.step)}, past this run's end {target}")
    history = {name[len("history/"):]: arr for name, arr in extra.items() if name.startswith("history/")}
    if history and any(len(a) != int(loaded.step) - int(state.step) for a in history.values()):
        raise CheckpointError(f"checkpoint {path}: its history does not match its step count")
    return loaded, [history] if history else [], streak


def _check_writable(path, resume: bool = False, overwrite: bool = False) -> Path:
    """Refuse a checkpoint path that cannot be written, or that holds a file this run would replace
    without being asked to (``resume`` continues it, ``overwrite`` replaces it), before any training."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"checkpoint {path} is a directory; give a file path such as {path / 'run.npz'}")
    if path.exists() and not (resume or overwrite):
        try:
            meta = read_metadata(path)
            what = (f"a checkpoint of {meta.get('learner', 'a run')!r} at step {meta.get('step', '?')} "
                    f"of a run to step {meta.get('target_step', '?')}")
        except CheckpointError as err:
            what = f"a file that is not a readable checkpoint ({err})"
        raise CheckpointExistsError(
            f"checkpoint {path} already exists ({what}); this run would replace it. Pass resume=True to "
            "continue it, overwrite=True to replace it, or another checkpoint path; nothing was run"
        )
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            os.write(fd, b"hiermeta write probe")
            os.fsync(fd)
        finally:
            os.close(fd)
            os.unlink(probe)
    except OSError as err:
        raise ValueError(f"checkpoint {path} cannot be written: {err}") from None
    return path


def _check_sizes(runner: _Runner, state, data_key, num_steps: int, chunk_size: int) -> None:
    """Refuse counts the run cannot hold: a step past the state's step counter, a history or a
    chunk's stacked metrics larger than this machine's memory (before anything is compiled)."""
    dtype = np.asarray(state.step).dtype
    largest = int(np.iinfo(dtype).max) if np.issubdtype(dtype, np.integer) else 2**53
    if int(state.step) + num_steps > largest:
        raise ValueError(f"num_steps={num_steps} from step {int(state.step)} would run past step {largest}, the "
                         f"largest the state's step counter ({dtype}) holds")
    metrics = jax.eval_shape(runner.meta_step, state, data_key)[1]
    per_step = sum(math.prod(m.shape) * m.dtype.itemsize for m in jax.tree_util.tree_leaves(metrics))
    check_memory(per_step * num_steps, f"the history of num_steps={num_steps} meta-steps ({per_step} bytes each)")
    check_memory(per_step * chunk_size, f"the metrics of a chunk of chunk_size={chunk_size} meta-steps")


def _check_state(learner: MetaLearner, state) -> None:
    """Refuse a state that another learner made (e.g. a MAML state given to a shrinkage learner)."""
    if not all(hasattr(state, name) for name in ("params", "opt_state", "step")):
        raise ValueError(f"state must be a MetaState from {learner.name}'s init, got {type(state).__name__}")
    try:
        expected = jax.eval_shape(lambda key: learner.init(key, learner.model.partition.template),
                                  jax.random.PRNGKey(0))
    except Exception:  # an init with other needs: nothing to compare against
        return

    def layout(tree):
        paths, treedef = jax.tree_util.tree_flatten_with_path(tree)
        return treedef, {jax.tree_util.keystr(p) or "<root>": tuple(np.shape(leaf)) for p, leaf in paths}

    for part in ("params", "opt_state"):
        (ours, our_shapes), (theirs, their_shapes) = layout(getattr(state, part)), layout(getattr(expected, part))
        if ours != theirs or our_shapes != their_shapes:
            raise ValueError(
                f"the state's {part} do not match {learner.name}'s (is it another learner's state?): "
                f"got {our_shapes if part == 'params' else ours}, {learner.name} makes "
                f"{their_shapes if part == 'params' else theirs}"
            )


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
    overwrite: bool = False,
    mesh: Optional[Mesh] = None,
) -> tuple[MetaState, dict]:
    """Run ``num_steps`` meta-steps of ``learner`` from ``state``.

    Args:
      sample_tasks: ``key -> TaskBatch`` drawing a fresh batch (jittable), e.g. a domain's task
        generator or :func:`sample_from` over a fixed data set.
      data_key: PRNG key of the task stream.
      chunk_size: meta-steps per compiled chunk (the progress bar moves once per chunk); one
        program runs every chunk, shorter ones included.
      max_consecutive_skips: stop with :class:`MetaTrainingError` at the meta-step that makes this
        many (>= 1) in a row skipped because their update was not finite (or an inner loop
        diverged); counted step by step inside the compiled chunk, and carried by checkpoints.
      checkpoint: file for checkpoints (:mod:`hiermeta.checkpoint`): the whole state, the history
        so far, the current run of skipped steps and the run's configuration fingerprint, written
        atomically every ``checkpoint_every`` steps, at the end, and where training stops.  Its
        directory must be writable (checked before training); a write that fails later raises
        :class:`CheckpointWriteError`, which carries the state and history.
      checkpoint_every: steps between checkpoints (default: only at the end).
      resume: continue from ``checkpoint`` if it exists (else start from ``state``).  The run is
        still the one started from ``state`` for ``num_steps`` steps: the result, history
        included, is bit-identical to an uninterrupted run.  A checkpoint of another run (learner
        name, data key, start step, structure, shapes, dtypes, or the fingerprint: the traced
        meta-step with its learning rates, inner steps and optimisers, the task sampler, the
        initial state) or a corrupt one raises :class:`~hiermeta.checkpoint.CheckpointError`
        saying what differs.
      overwrite: replace an existing file at ``checkpoint`` (at the first checkpoint write; until
        then it is left as it is).  Without ``resume`` or ``overwrite`` an existing file raises
        :class:`~hiermeta.errors.CheckpointExistsError` naming it and its step, before training.
      mesh: a device mesh (:func:`hiermeta.sharding.task_mesh`): each batch's tasks are split
        over its devices and the state is replicated.  In a job of several processes
        (``jax.distributed``) it must give every process a device; checkpoints are then written
        by process 0 and read by all.  Every process must be given the same run (checked, see the
        module docstring).
    Returns:
      The final state and the history: each metric stacked over the steps run, as NumPy arrays.
    Raises:
      ValueError: before any meta-step, for a non-integer or out-of-range count (one past the
        state's step counter, or whose history or chunk would not fit in memory), a state made by
        another learner, non-finite initial meta-parameters, malformed task data, or a
        checkpoint path that cannot be written.
      MetaTrainingError: ``max_consecutive_skips`` meta-steps in a row were skipped.
      CheckpointWriteError: a checkpoint write failed (a ``MetaTrainingError``).
      CheckpointError: ``resume=True`` found a corrupt checkpoint or one of another run.
      CheckpointExistsError: ``checkpoint`` exists and neither ``resume`` nor ``overwrite`` is set.
      ProcessDisagreementError: (several processes) the processes were given different runs.
      ReplicaDivergenceError: (a MetaTrainingError; several processes) the replicated states diverged;
        it carries the last agreed state (also saved to ``checkpoint``) and the history up to it.
    """
    num_steps = check_count(num_steps, "num_steps", 0)
    chunk_size = check_count(chunk_size, "chunk_size", 1)
    max_skips = check_count(max_consecutive_skips, "max_consecutive_skips", 1)
    every = None if checkpoint_every is None else check_count(checkpoint_every, "checkpoint_every", 1)
    if (checkpoint_every is not None or resume or overwrite) and checkpoint is None:
        raise ValueError("checkpoint_every, resume and overwrite need a checkpoint path")
    if resume and overwrite:
        raise ValueError("resume=True continues the checkpoint and overwrite=True replaces it: give one of them")
    check_mesh(mesh)

    def check_arguments():
        _check_state(learner, state)
        if not bool(all_finite(state.params)):
            raise ValueError("the initial meta-parameters hold NaN or infinite values")
        # check one batch eagerly, so malformed data fails here with a clear message, not in XLA
        check_task_batch(learner.model.likelihood, sample_tasks(jax.random.fold_in(data_key, state.step)))

    collectively("checking fit's arguments", check_arguments)  # a failure in one process stops all
    if checkpoint is not None:  # written by process 0 alone in a job of several processes
        collectively("checking the checkpoint path", lambda: _check_writable(checkpoint, resume, overwrite),
                     only_primary=True)
        checkpoint = Path(checkpoint)
    runner = _chunk_runner(learner, sample_tasks, mesh, chunk_size)
    start, target = int(state.step), int(state.step) + num_steps
    _check_sizes(runner, state, data_key, num_steps, chunk_size)
    chunks: list[dict] = []
    streak = 0
    metadata = {"learner": learner.name, "data_key": _key_data(data_key), "start_step": start,
                "target_step": target}
    several = jax.process_count() > 1
    if checkpoint is not None or several:
        metadata["fingerprint"] = _fingerprint(runner, sample_tasks, state, data_key)
    if several:
        settings = {**metadata, "chunk_size": chunk_size, "checkpoint_every": every, "max_consecutive_skips": max_skips,
                    "checkpoint": checkpoint is not None, "resume": resume, "overwrite": overwrite}
        _check_processes_agree({k: v for k, v in settings.items() if k != "fingerprint"}, metadata["fingerprint"])
    if checkpoint is not None:
        if resume:
            found = collectively(f"resuming from checkpoint {checkpoint}", lambda: checkpoint.exists() and _resume(
                checkpoint, state, learner, data_key, target, metadata["fingerprint"]))
            same_everywhere((bool(found), int(found[0].step) if found else -1),
                            f"the checkpoint {checkpoint} (found, step): is it on a file system every process sees?")
            if found:
                state, chunks, streak = found
    if mesh is not None:
        state = replicate(state, mesh)

    def save(state, streak):
        history = _concat(chunks)

        def write():
            try:
                save_checkpoint(checkpoint, state, {**metadata, "step": int(state.step), "skip_streak": streak},
                                extra={f"history/{name}": arr for name, arr in history.items()})
            except OSError as err:
                raise CheckpointWriteError(
                    f"could not write checkpoint {checkpoint}: {err}. The error carries the state and "
                    f"history at step {int(state.step)} (err.state, err.history)",
                    state,
                    history,
                ) from err

        # process 0 writes; every process waits for it and learns if it failed
        collectively(f"writing checkpoint {checkpoint}", write, only_primary=True,
                     error=lambda message: CheckpointWriteError(message, state, history))

    def stop(state):
        history = _concat(chunks)
        raise MetaTrainingError(
            f"{learner.name}: meta-steps {int(state.step) - streak} to {int(state.step) - 1} (the last "
            f"{streak}) were skipped because their update was not finite or an inner loop diverged "
            "(inner learning rate too large, or sigma too small for it?). The state returned is "
            "the last good one.",
            state,
            history,
        )

    def diverged(agreed, differ, step):
        """Stop a multi-process run whose replicated states differ: save and carry the last agreed one."""
        state, streak, count = agreed
        del chunks[count:]
        if checkpoint is not None:
            save(state, streak)
        raise ReplicaDivergenceError(
            f"{learner.name}: the processes' replicated meta-states differ after meta-steps {int(state.step)} "
            f"to {step - 1}: "
            f"process(es) {differ} hold another state than process 0 (a non-deterministic operation, a "
            "process whose code or data changed during the run, or a hardware fault). Training stopped at "
            f"the last state they all agreed on, step {int(state.step)}"
            + (f", saved to {checkpoint}" if checkpoint is not None else "")
            + " and carried by this error (err.state, err.history)",
            state,
            _concat(chunks),
        )

    if streak >= max_skips:  # a resumed run that had already stopped
        stop(state)
    bar = None
    if progress:
        bar = tqdm(total=target - start, initial=int(state.step) - start,
                   desc=description or learner.name, leave=False)
    limit = jnp.asarray(max_skips, jnp.int32)
    agreed = (state, streak, len(chunks))  # the last state every process holds (checked after each chunk)
    try:
        while int(state.step) < target:
            # chunk ends fall on multiples of chunk_size and checkpoint_every counted from the
            # start of the run, so a resumed run runs the very same chunks
            done = int(state.step) - start
            end = min(target - start, (done // chunk_size + 1) * chunk_size)
            if every is not None:
                end = min(end, (done // every + 1) * every)
            before = int(state.step)
            (state, streak_out), metrics = runner.run(state, data_key, end - done,
                                                      jnp.asarray(streak, jnp.int32), limit)
            streak, ran = int(streak_out), int(state.step) - before
            metrics = jax.tree_util.tree_map(lambda a: np.asarray(a)[:ran], metrics)
            chunks.append(metrics)
            if several:  # a cheap digest of the replicated state, compared with process 0's
                differ = disagreements({"state": tree_digest(state)})
                if differ:
                    diverged(agreed, differ["state"], int(state.step))
                agreed = (state, streak, len(chunks))
            stopped = streak >= max_skips
            if checkpoint is not None and (stopped or int(state.step) == target or (every and end % every == 0)):
                save(state, streak)
            if bar is not None:
                postfix = {"skipped": int(state.num_skipped)}
                if "val_log_lik" in metrics and ran:
                    postfix["val_log_lik"] = f"{float(np.mean(metrics['val_log_lik'])):.3f}"
                bar.set_postfix(postfix, refresh=False)
                bar.update(ran)
            if stopped:
                stop(state)
    finally:
        if bar is not None:
            bar.close()
    if checkpoint is not None and not chunks:  # nothing to run: still leave a checkpoint
        save(state, streak)
    history = _concat(chunks)
    if "num_unconverged" in history and np.any(history["num_unconverged"] > 0):  # once per fit
        bad, worst = history["num_unconverged"], history["inner_stationarity"]
        warn_unconverged(learner.name, f"up to {bad.max()} tasks of a batch in {np.sum(bad > 0)} of {bad.size} "
                         "meta-steps", float(worst.max()), resolved_tol(learner.inner_solver.tol, worst.dtype))
    if "sigma_growth" in history:  # a learned sigma: warn if it is running off (hiermeta.learners.runoff)
        check_run_off(history, names=learner.model.partition.names, who=learner.name, stacklevel=3)
    return state, history


def _concat(chunks: list[dict]) -> dict:
    if not chunks:
        return {}
    return jax.tree_util.tree_map(lambda *xs: np.concatenate(xs, axis=0), *chunks)
