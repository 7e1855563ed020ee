"""Data parallelism over tasks: the task axis of a batch sharded over a device mesh.

A meta-step is a mean over independent tasks, so hiermeta parallelises it the simplest way that
keeps one code path: the batch's leading task axis is split over a 1-D mesh of devices (axis
``"tasks"``) and the meta-state is replicated.  Inside ``jax.jit`` the XLA SPMD partitioner then
runs each device's share of the vmapped inner loops locally and turns the means over tasks into
all-reduces; no learner knows about devices.  The same program runs on one CPU (a mesh of one
device, or no mesh), several GPUs, or several hosts.

Several hosts: start the same program on every host and call ``jax.distributed.initialize()``
(coordinator address, number of processes and process id, or auto-detected on Slurm / TPU pods /
Open MPI) before any other JAX call; :func:`task_mesh` then spans the devices of every host
(``jax.devices()`` is global).  Task batches drawn inside the compiled step from a PRNG key (a
domain's ``sample_tasks``) need nothing more: each device draws its own tasks.  A batch that
lives in host memory must be assembled from each host's share with
``jax.make_array_from_process_local_data(task_sharding(mesh), local_batch)``.

Batch sizes need not divide the number of devices inside ``jit`` (XLA pads the last shard);
:func:`shard_tasks` on concrete arrays outside ``jit`` needs an exact multiple.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

__all__ = ["TASK_AXIS", "task_mesh", "task_sharding", "replicated", "shard_tasks", "replicate", "sharded_step"]

TASK_AXIS = "tasks"


def task_mesh(devices: Optional[Sequence[jax.Device]] = None, num_devices: Optional[int] = None) -> Mesh:
    """A 1-D mesh (axis ``"tasks"``) over ``devices`` (default: every device of every host).

    ``num_devices`` takes the first few devices (e.g. to measure scaling).
    """
    devices = list(jax.devices() if devices is None else devices)
    if num_devices is not None:
        if not 1 <= num_devices <= len(devices):
            raise ValueError(f"num_devices must be between 1 and {len(devices)}, got {num_devices}")
        devices = devices[:num_devices]
    if not devices:
        raise ValueError("a task mesh needs at least one device")
    return Mesh(np.array(devices), (TASK_AXIS,))


def task_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (task) axis split over the mesh, other axes whole."""
    return NamedSharding(mesh, PartitionSpec(TASK_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
    """Every device holds the whole array (the meta-state)."""
    return NamedSharding(mesh, PartitionSpec())


def _is_traced(tree) -> bool:
    return any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree_util.tree_leaves(tree))


def shard_tasks(batch: Any, mesh: Mesh) -> Any:
    """Split the leading task axis of every leaf of ``batch`` over ``mesh``.

    Inside ``jit`` this is a sharding constraint (any batch size); outside it places concrete
    arrays on the devices, which needs a task count divisible by the number of devices.
    """
    sharding = task_sharding(mesh)
    leaves = jax.tree_util.tree_leaves(batch)
    if any(np.ndim(leaf) == 0 for leaf in leaves):
        raise ValueError("every leaf of a task batch needs a leading task axis to shard")
    if _is_traced(batch):
        return jax.lax.with_sharding_constraint(batch, sharding)
    n = mesh.devices.size
    sizes = {int(np.shape(leaf)[0]) for leaf in leaves}
    bad = sorted(s for s in sizes if s % n)
    if bad:
        raise ValueError(
            f"a batch of {bad[0]} tasks does not split evenly over {n} devices outside jit; "
            f"use a multiple of {n} tasks, or shard inside jit (hiermeta.fit(..., mesh=mesh))"
        )
    return jax.device_put(batch, sharding)


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Place a copy of ``tree`` (e.g. a :class:`~hiermeta.MetaState`) on every device of ``mesh``."""
    if _is_traced(tree):
        return jax.lax.with_sharding_constraint(tree, replicated(mesh))
    return jax.device_put(tree, replicated(mesh))


def sharded_step(step: Callable, mesh: Mesh) -> Callable:
    """Jit ``step(state, batch) -> (state, metrics)`` with the batch's tasks over ``mesh``.

    The state and the metrics come back replicated.  ``hiermeta.fit(..., mesh=mesh)`` does the
    same for whole chunks of meta-steps.
    """
    rep = replicated(mesh)

    def run(state, batch):
        return step(replicate(state, mesh), shard_tasks(batch, mesh))

    return jax.jit(run, out_shardings=(rep, rep))
