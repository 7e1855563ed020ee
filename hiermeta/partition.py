"""Module partitions: which coordinates of a parameter pytree share a shrinkage scale.

A partition maps every scalar coordinate of the flattened parameter vector (``P`` of them,
flattened by :func:`jax.flatten_util.ravel_pytree`) to one of ``M`` modules.  A module may be a
leaf (a layer's weights), a group of leaves (a whole layer), or a single coordinate (as the
paper's M-Shrinkage does on its synthetic domains).  Everything downstream works on the flat
vector; ``unravel`` gives the pytree back to the task likelihood.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

__all__ = ["ModulePartition"]


def _leaf_names(tree) -> list[str]:
    paths, _ = jax.tree_util.tree_flatten_with_path(tree)
    return [jax.tree_util.keystr(path) or "params" for path, _ in paths]


@dataclass(frozen=True, eq=False)
class ModulePartition:
    """Assignment of the ``P`` flat parameter coordinates to ``M`` modules.

    Attributes:
      index: int array ``(P,)``; ``index[i]`` is the module of flat coordinate ``i``.
      names: ``M`` module names, in module order.
      unravel: maps a flat ``(P,)`` vector back to the parameter pytree.
      template: the example pytree the partition was built from (shapes and dtypes).
    """

    index: np.ndarray
    names: tuple[str, ...]
    unravel: Callable[[jax.Array], Any]
    template: Any

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_labels(cls, params, labels) -> "ModulePartition":
        """Build from a pytree of labels with the structure of ``params``.

        Each label is either a hashable (the whole leaf belongs to that module; leaves sharing
        a label form one module, like ``optax.partition``) or an integer array of the leaf's
        shape giving a module per coordinate (integers are module ids local to that array,
        prefixed by the leaf's path in the module name).
        """
        leaves, treedef = jax.tree_util.tree_flatten(params)
        if not leaves:
            raise ValueError("params has no array leaves: nothing to partition")
        try:
            label_leaves = treedef.flatten_up_to(labels)
        except (ValueError, TypeError) as err:
            raise ValueError(
                "module labels must have the same structure as params "
                f"(params: {treedef}); every parameter leaf needs a module: {err}"
            ) from None
        leaf_names = _leaf_names(params)
        names: list[str] = []
        lookup: dict[Any, int] = {}
        parts = []
        for leaf, label, leaf_name in zip(leaves, label_leaves, leaf_names):
            shape = np.shape(leaf)
            size = int(np.prod(shape, dtype=int))
            if label is None:
                raise ValueError(f"parameter leaf {leaf_name} has no module label (None)")
            if isinstance(label, (np.ndarray, jax.Array)):  # a module per coordinate (0-d: a scalar leaf)
                lab = np.asarray(label)
                if lab.shape != shape:
                    raise ValueError(
                        f"label array for {leaf_name} has shape {lab.shape}, "
                        f"the parameter has shape {shape}"
                    )
                if not np.issubdtype(lab.dtype, np.integer):
                    raise ValueError(f"label array for {leaf_name} must hold integers")
                ids = []
                for local in lab.ravel().tolist():
                    key = (leaf_name, local)
                    if key not in lookup:
                        lookup[key] = len(names)
                        names.append(f"{leaf_name}[{local}]")
                    ids.append(lookup[key])
                parts.append(np.asarray(ids, dtype=np.int32))
            else:
                try:
                    hash(label)
                except TypeError:
                    raise ValueError(f"label for {leaf_name} is not hashable: {label!r}") from None
                # True == 1 and hash alike in Python: keep booleans apart from numbers
                key = (isinstance(label, (bool, np.bool_)), label)
                if key not in lookup:
                    lookup[key] = len(names)
                    names.append(str(label))
                parts.append(np.full(size, lookup[key], dtype=np.int32))
        repeated = sorted(name for name, n in Counter(names).items() if n > 1)
        if repeated:
            raise ValueError(
                f"different module labels print alike as {repeated} (e.g. 1 and '1'); "
                "give each module a distinct label"
            )
        flat, unravel = ravel_pytree(params)
        index = np.concatenate(parts)  # one part per leaf, and there is at least one leaf
        if index.shape != flat.shape:  # pragma: no cover - ravel_pytree and leaves disagree
            raise ValueError("internal error: partition does not cover the flat parameters")
        return cls(index=index, names=tuple(names), unravel=unravel, template=params)

    @classmethod
    def per_leaf(cls, params) -> "ModulePartition":
        """One module per leaf of the pytree (e.g. each weight matrix and each bias)."""
        labels = jax.tree_util.tree_unflatten(
            jax.tree_util.tree_structure(params), _leaf_names(params)
        )
        return cls.from_labels(params, labels)

    @classmethod
    def shared(cls, params) -> "ModulePartition":
        """A single module holding every parameter."""
        return cls.from_labels(params, jax.tree_util.tree_map(lambda _: "all", params))

    @classmethod
    def per_coordinate(cls, params) -> "ModulePartition":
        """Every scalar coordinate its own module (the paper's M-Shrinkage on toy domains)."""
        labels = jax.tree_util.tree_map(
            lambda leaf: np.arange(int(np.size(leaf))).reshape(np.shape(leaf)), params
        )
        return cls.from_labels(params, labels)

    @classmethod
    def named(cls, names) -> "ModulePartition":
        """Named scalar coordinates, each its own module, e.g. ``named(["Intercept", "Days"])``.

        The parameters are a tuple of ``len(names)`` scalars whose flat order is the given order
        (coordinate ``i`` is module ``i``, named ``names[i]``): the layout of a regression's
        coefficients, as :func:`hiermeta.from_table` builds it.
        """
        if isinstance(names, (str, bytes)):
            raise ValueError(f"names must be a sequence of coordinate names, got the string {names!r}")
        names = list(names)
        if not names:
            raise ValueError("named() needs at least one coordinate name")
        bad = [n for n in names if not isinstance(n, str) or not n]
        if bad:
            raise ValueError(f"coordinate names must be non-empty strings, got {bad}")
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(f"coordinate names must be distinct; repeated: {repeated}")
        return cls.from_labels(tuple(0.0 for _ in names), tuple(names))

    # ------------------------------------------------------------------ sizes
    @property
    def num_params(self) -> int:
        return int(self.index.shape[0])

    @property
    def num_modules(self) -> int:
        return len(self.names)

    @property
    def module_sizes(self) -> np.ndarray:
        """``D_m``: number of coordinates in each module."""
        return np.bincount(self.index, minlength=self.num_modules)

    # ------------------------------------------------------------------ maps
    def ravel(self, params) -> jax.Array:
        """Flatten a pytree with the template's structure to ``(P,)``, checking its shapes."""
        leaves, treedef = jax.tree_util.tree_flatten(params)
        t_leaves, t_treedef = jax.tree_util.tree_flatten(self.template)
        if treedef != t_treedef:
            raise ValueError(f"params structure {treedef} differs from the partition's {t_treedef}")
        for leaf, ref, name in zip(leaves, t_leaves, _leaf_names(self.template)):
            if np.shape(leaf) != np.shape(ref):
                raise ValueError(
                    f"parameter {name} has shape {np.shape(leaf)}, expected {np.shape(ref)}"
                )
        return ravel_pytree(params)[0]

    def expand(self, per_module: jax.Array) -> jax.Array:
        """Broadcast a per-module vector ``(..., M)`` to per-coordinate ``(..., P)``."""
        return jnp.take(per_module, self.index, axis=-1)

    def module_sum(self, per_coordinate: jax.Array) -> jax.Array:
        """Sum a per-coordinate vector ``(..., P)`` within each module, giving ``(..., M)``."""
        summed = jax.ops.segment_sum(
            jnp.moveaxis(per_coordinate, -1, 0), jnp.asarray(self.index), self.num_modules
        )
        return jnp.moveaxis(summed, 0, -1)

    def check_per_module(self, values, name: str) -> np.ndarray:
        """Validate a user-supplied per-module vector (scalar or ``(M,)``), return ``(M,)``."""
        arr = np.asarray(values, dtype=float)
        if arr.ndim == 0:
            arr = np.full(self.num_modules, float(arr))
        if arr.shape != (self.num_modules,):
            raise ValueError(
                f"{name} must be a scalar or have shape ({self.num_modules},) (one per module), "
                f"got shape {arr.shape}"
            )
        return arr

    def __repr__(self) -> str:
        return f"ModulePartition(num_params={self.num_params}, modules={list(self.names)})"

