"""Past one process: meta-training on JAX's multi-controller runtime (``jax.distributed``).

JAX runs a job over several hosts (or several processes on one host) as one program started in
every process: each process calls ``jax.distributed.initialize(...)`` first, then sees every
device of the job in ``jax.devices()`` and its own in ``jax.local_devices()``.  A ``jax.jit``
whose inputs live on a mesh spanning the processes runs as one SPMD program; XLA inserts the
collectives (all-reduce over gloo on CPU, NCCL on GPU).

hiermeta needs nothing more than that: :func:`hiermeta.fit` with ``mesh=hiermeta.sharding.task_mesh()``
splits each meta-step's tasks over every device of every process (the batch is drawn inside the
compiled step, each device its own share) and keeps the meta-state replicated, so every process
holds the same state after every chunk; the means over tasks become all-reduces.  The numbers are
those of one process up to the order of the sums (rounding).  This module holds the few pieces
that are about processes rather than devices:

* :func:`check_mesh`: a mesh must give every process a device, or the program cannot run (on CPU
  it also turns the persistent compilation cache off:
  :func:`hiermeta.utils.persistent_cache_off_for_cpu_collectives`);
* :func:`collectively`: a host-side step (writing a checkpoint, reading one) whose failure in
  one process must stop every process, instead of leaving the others waiting in a collective;
* :func:`barrier`, :func:`is_primary`: the checkpoint is written by process 0 only and read by
  every process after a barrier (the file must be on a file system that every process sees);
* :func:`global_tasks`: a task batch held in host memory, each process its own share, assembled
  into one global array sharded over the mesh (the shares differ by design; their layout, each
  leaf's trailing shape and dtype, must agree);
* :func:`disagreements`: which processes hold another value than process 0 (digests of the run's
  configuration and data before training, of the replicated state after each chunk: ``fit``
  refuses to start, or stops, when they differ).

All of them are no-ops (or plain calls) in a single process.  Launching (see
``examples/multiprocess.py`` and ``docs/distributed.md``)::

    jax.distributed.initialize()                      # Slurm / Open MPI / TPU pods: auto-detected
    jax.distributed.initialize("host0:1234", num_processes=2, process_id=i)   # anything else
"""

from __future__ import annotations

import hashlib
from typing import Any, Callable, Mapping, Optional, TypeVar

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from .errors import DistributedError
from .sharding import shard_tasks, task_sharding
from .utils import persistent_cache_off_for_cpu_collectives

__all__ = ["is_primary", "check_mesh", "barrier", "collectively", "global_tasks", "same_everywhere",
           "disagreements", "require_agreement", "tree_digest", "DistributedError"]

T = TypeVar("T")


def is_primary() -> bool:
    """True in process 0 (the one that writes checkpoints and prints), and in a single process."""
    return jax.process_index() == 0


def check_mesh(mesh: Optional[Mesh]) -> None:
    """Refuse a mesh that leaves a process without a device (before anything is compiled).

    In a job of several processes every jitted program over ``mesh`` is run by every process, and a
    process that owns none of the mesh's devices cannot take part.  ``mesh=None`` is allowed: each
    process then runs the whole computation on its own first device (duplicated work).
    """
    if mesh is None or jax.process_count() == 1:
        return
    persistent_cache_off_for_cpu_collectives()
    owners = {int(d.process_index) for d in np.ravel(mesh.devices)}
    missing = sorted(set(range(jax.process_count())) - owners)
    if missing:
        raise ValueError(
            f"the device mesh ({mesh.devices.size} devices, of processes {sorted(owners)}) leaves processes "
            f"{missing} of this {jax.process_count()}-process job without a device; build it from "
            "jax.devices() (every process's devices), e.g. hiermeta.sharding.task_mesh()"
        )


def barrier(name: str) -> None:
    """Wait until every process reaches the barrier ``name`` (nothing in a single process)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(f"hiermeta:{name}")


def collectively(what: str, fn: Callable[[], T], *, only_primary: bool = False,
                 error: Callable[[str], Exception] = DistributedError) -> Optional[T]:
    """Run ``fn`` in every process (or only in process 0), then agree on whether it failed.

    A host-side step that raises in one process would leave the others waiting forever at their
    next collective.  Here every process learns whether any failed: the one that failed re-raises
    its own error, the others raise ``error(message)`` (default :class:`DistributedError`) naming
    the failed processes.  The agreement is a collective, so it is also a barrier: when it returns,
    ``fn`` has finished everywhere (e.g. process 0 has written the checkpoint the others will read).
    Returns ``fn()`` (``None`` in the processes that did not run it).
    """
    if jax.process_count() == 1:
        return fn()
    own, result = None, None
    if not only_primary or is_primary():
        try:
            result = fn()
        except Exception as err:  # reported to every process below
            own = err
    failed = np.asarray(multihost_utils.process_allgather(np.int32(own is not None)))
    if own is not None:
        raise own
    if failed.any():
        raise error(f"{what} failed in processes {np.flatnonzero(failed).tolist()} (see their errors)")
    return result


def same_everywhere(value: tuple, what: str) -> None:
    """Raise ``ValueError`` unless every process holds the same tuple of integers ``value``."""
    if jax.process_count() == 1:
        return
    everyone = np.asarray(multihost_utils.process_allgather(np.asarray(value, np.int64)))
    if np.any(everyone != everyone[0]):
        raise ValueError(f"the processes disagree on {what}: {[tuple(v) for v in everyone.tolist()]} by process")


def tree_digest(tree) -> str:
    """SHA-256 of a pytree's structure and every leaf's dtype, shape and bytes (this process's copy)."""
    from .checkpoint import _to_numpy

    leaves, treedef = jax.tree_util.tree_flatten(tree)
    digest = hashlib.sha256(str(treedef).encode())
    for leaf in leaves:
        arr, impl = _to_numpy(leaf)
        digest.update(f"{arr.dtype.str}{arr.shape}{impl}".encode())
        digest.update(np.ascontiguousarray(arr).tobytes())
    return digest.hexdigest()


def _codes(texts) -> np.ndarray:
    """Each text as two int32 words of its SHA-256 (int32, so that a job without x64 gathers them intact)."""
    return np.asarray([np.frombuffer(hashlib.sha256(t.encode()).digest()[:8], np.int32) for t in texts],
                      np.int32).reshape(-1)


def _gather(words: np.ndarray) -> np.ndarray:
    """Every process's ``words``, ``(processes, len)``."""
    persistent_cache_off_for_cpu_collectives()
    everyone = np.asarray(multihost_utils.process_allgather(words))
    return everyone.reshape(jax.process_count(), -1)


def disagreements(values: Mapping[str, str]) -> dict:
    """For each named value (a string, e.g. a digest) the processes that hold another one than process 0.

    Every process passes its own ``values``; returns ``{name: [process, ...]}`` for the names whose
    value differs somewhere (process 0 is never listed: it is the reference), ``{}`` when all agree
    and always in a single process.  Two small collectives: the list of names first (a process with
    other names is reported under ``"the names of the values compared"`` rather than left waiting),
    then 8 bytes of SHA-256 per value.
    """
    if jax.process_count() == 1:
        return {}
    names = sorted(values)
    listed = _gather(_codes(["\n".join(names)]))
    differ = np.flatnonzero(np.any(listed != listed[0], axis=1))
    if differ.size:
        return {"the names of the values compared": differ.tolist()}
    everyone = _gather(_codes([values[name] for name in names])).reshape(jax.process_count(), len(names), 2)
    out = {}
    for i, name in enumerate(names):
        differ = np.flatnonzero(np.any(everyone[:, i] != everyone[0, i], axis=1))
        if differ.size:
            out[name] = differ.tolist()
    return out


def require_agreement(values: Mapping[str, str], what: str) -> None:
    """Raise :class:`~hiermeta.errors.ProcessDisagreementError` in every process unless every
    process holds the same ``values`` (name -> string, e.g. :func:`tree_digest`) as process 0."""
    differ = disagreements(values)
    if differ:
        from .errors import ProcessDisagreementError

        raise ProcessDisagreementError(
            f"{what} needs the same arguments in every process: " + "; ".join(
                f"{name} (in process(es) {procs})" for name, procs in sorted(differ.items()))
            + " differ(s) from process 0's")


def _local_devices(mesh: Mesh) -> int:
    return sum(1 for d in np.ravel(mesh.devices) if d.process_index == jax.process_index())


def global_tasks(local_batch: Any, mesh: Mesh) -> Any:
    """One task batch sharded over ``mesh``, from each process's own share held in host memory.

    Every process passes its share (leading task axis: its tasks, the same count in every process,
    a multiple of its number of devices in the mesh); the result is the global batch of
    ``jax.process_count()`` times as many tasks, process 0's first, whose shards already sit where
    they are used.  In a single process this is :func:`hiermeta.sharding.shard_tasks`.  Use it
    when tasks come from files rather than from a sampler run inside the meta-step (which needs
    nothing: each device draws its own tasks).
    """
    check_mesh(mesh)
    leaves = jax.tree_util.tree_leaves(local_batch)
    if not leaves or any(np.ndim(leaf) == 0 for leaf in leaves):
        raise ValueError("every leaf of a task batch needs a leading task axis")
    sizes = {int(np.shape(leaf)[0]) for leaf in leaves}
    if len(sizes) != 1:
        raise ValueError(f"the leaves of the task batch disagree on the number of tasks: {sorted(sizes)}")
    (size,) = sizes
    if jax.process_count() == 1:
        return shard_tasks(local_batch, mesh)
    per_process = np.asarray(multihost_utils.process_allgather(np.int64(size)))
    if np.any(per_process != size):
        raise ValueError(f"processes hold different numbers of tasks {per_process.tolist()}; give each the same")
    # each process's share holds other tasks by design, but the same layout: compare that
    paths, treedef = jax.tree_util.tree_flatten_with_path(local_batch)
    layout = {jax.tree_util.keystr(p) or "<root>": f"{np.shape(leaf)[1:]} {np.asarray(leaf).dtype}"
              for p, leaf in paths}
    differ = disagreements({"the batch's structure": str(treedef), **layout})
    if differ:
        raise ValueError("the processes' task batches differ in " + "; ".join(
            f"{name if name.startswith('the ') else 'leaf ' + name + ' (shape per task, dtype)'} "
            f"(processes {procs} differ from process 0: this one has {layout.get(name, treedef)})"
            for name, procs in differ.items()))
    local = _local_devices(mesh)
    if size % local:
        raise ValueError(
            f"this process's {size} tasks do not split evenly over its {local} devices of the mesh "
            f"({mesh.devices.size} devices in all); give each process a multiple of {local} tasks"
        )
    sharding = task_sharding(mesh)
    return jax.tree_util.tree_map(
        lambda leaf: jax.make_array_from_process_local_data(sharding, np.asarray(leaf)), local_batch)
