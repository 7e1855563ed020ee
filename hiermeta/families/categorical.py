"""The categorical (softmax) family: classification tasks.

Each observation ``n`` of task ``t`` is a class label in ``0..C-1`` drawn from the softmax of a
logit vector computed from the task's parameters and the observation's inputs:

    y_{t,n} ~ Categorical(softmax(f(theta_t, x_{t,n}))),
    log p(D_t | theta_t) = sum_n mask_{t,n} [f(theta_t, x_{t,n})_{y_{t,n}} - logsumexp_c f(theta_t, x_{t,n})_c].

``f = logits_fn`` sees one task at a time (``logits_fn(theta_t, inputs_t) -> (N, C)``) and is
vmapped over tasks here.  The log-density has no constant part (``log_normaliser`` is 0), so
hiermeta's generalisation loss is the cross-entropy per query observation, in nats.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist

__all__ = ["CategoricalData", "CategoricalLikelihood"]


class CategoricalData(NamedTuple):
    """Class labels of a batch of tasks.

    Attributes:
      labels: ``(T, N)`` integer class indices (anything where ``mask`` is False).
      mask: ``(T, N)`` booleans; False marks padding, so tasks may hold unequal numbers of
        observations.
      inputs: pytree with leaves of leading shape ``(T, N, ...)`` (images, covariates) passed to
        the logit function.
    """

    labels: jax.Array
    mask: jax.Array
    inputs: Any

    @classmethod
    def create(cls, labels, inputs, mask=None, num_classes: Optional[int] = None) -> "CategoricalData":
        """Validate user data (NumPy in, checked before anything is compiled).

        ``labels`` must hold integers; with ``num_classes`` they must lie in ``0..num_classes-1``
        wherever ``mask`` is True.  ``mask`` is boolean or 0/1.  Padded labels are set to 0.
        """
        labels = np.asarray(labels)
        if labels.ndim != 2:
            raise ValueError(f"labels must have shape (tasks, observations), got {labels.shape}")
        if mask is None:
            mask = np.ones(labels.shape, dtype=bool)
        mask = _as_bool_mask(mask, "mask")
        if mask.shape != labels.shape:
            raise ValueError(f"mask must have shape {labels.shape} (that of labels), got {mask.shape}")
        _check_integer_labels(labels, "data")
        data = cls(labels=np.where(mask, labels, 0), mask=mask, inputs=inputs)
        check_categorical(data, "data", num_classes)
        return cls(
            labels=jnp.asarray(data.labels, dtype=jnp.int32),
            mask=jnp.asarray(mask),
            inputs=jax.tree_util.tree_map(jnp.asarray, inputs),
        )


def _as_bool_mask(mask, where: str) -> np.ndarray:
    mask = np.asarray(mask)
    if mask.dtype == bool:
        return mask
    if not (np.issubdtype(mask.dtype, np.integer) or np.issubdtype(mask.dtype, np.floating)):
        raise ValueError(f"{where} must be boolean (or 0/1), got dtype {mask.dtype}")
    if not np.all((mask == 0) | (mask == 1)):
        raise ValueError(f"{where} must hold only 0/1 (True/False) values")
    return mask.astype(bool)


def _check_integer_labels(labels: np.ndarray, where: str) -> None:
    if labels.dtype == bool or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{where}: labels must be integer class indices, got dtype {labels.dtype}")


def check_categorical(data: CategoricalData, where: str, num_classes: Optional[int] = None) -> None:
    """Raise ``ValueError`` naming the problem if concrete ``data`` is malformed."""
    if not isinstance(data, CategoricalData):
        raise ValueError(f"{where}: expected CategoricalData, got {type(data).__name__}")
    labels = np.asarray(data.labels)
    if labels.ndim != 2:
        raise ValueError(f"{where}: labels must have shape (tasks, observations), got {labels.shape}")
    T, N = labels.shape
    if T == 0:
        raise ValueError(f"{where} is empty: it holds no tasks")
    if N == 0:
        raise ValueError(f"{where} is empty: labels have shape {labels.shape}")
    _check_integer_labels(labels, where)
    mask = _as_bool_mask(data.mask, f"{where}: mask")
    if mask.shape != (T, N):
        raise ValueError(f"{where}: mask has shape {mask.shape}, expected {(T, N)}")
    empty = np.flatnonzero(mask.sum(axis=1) == 0)
    if empty.size:
        raise ValueError(
            f"{where}: task(s) {empty[:10].tolist()} hold no observations (every task needs one)"
        )
    observed = labels[mask]
    if observed.min() < 0:
        raise ValueError(f"{where}: labels must be >= 0, got {int(observed.min())}")
    if num_classes is not None and observed.max() >= num_classes:
        raise ValueError(
            f"{where}: label {int(observed.max())} is out of range for {num_classes} classes (0..{num_classes - 1})"
        )
    leaves = jax.tree_util.tree_leaves(data.inputs)
    if not leaves:
        raise ValueError(f"{where}: inputs hold no arrays (the logits need inputs)")
    for leaf in leaves:
        shape = np.shape(leaf)
        if shape[:2] != (T, N):
            raise ValueError(f"{where}: inputs leaves must have leading shape {(T, N)}, got {shape}")
        arr = np.asarray(leaf)
        if np.iscomplexobj(arr):
            raise ValueError(f"{where}: inputs must be real, got dtype {arr.dtype}")
        if np.issubdtype(arr.dtype, np.floating) and not np.all(np.isfinite(arr)):
            raise ValueError(f"{where}: inputs hold NaN or infinite values")


class CategoricalLikelihood:
    """``y_{t,n} ~ Categorical(logits = logits_fn(theta_t, inputs_t)_n)`` over ``num_classes`` classes.

    ``logits_fn(theta_t, inputs_t)`` sees one task: ``theta_t`` the parameter pytree of that task
    and ``inputs_t`` its inputs (leading axis ``N``); it returns ``(N, num_classes)`` logits.
    """

    def __init__(self, logits_fn: Callable[[Any, Any], jax.Array], num_classes: int, site: str = "labels"):
        if int(num_classes) != num_classes or num_classes < 2:
            raise ValueError(f"num_classes must be an integer >= 2, got {num_classes}")
        self.logits_fn = logits_fn
        self.num_classes = int(num_classes)
        self.site = site

    def logits(self, theta, data: CategoricalData) -> jax.Array:
        """``(T, N, C)`` logits of every observation (theta with a leading task axis)."""
        if data.labels.shape[0] == 1:  # one task (the per-task densities): no size-1 batch axis in XLA
            one = lambda tree: jax.tree_util.tree_map(lambda a: a[0], tree)
            out = self.logits_fn(one(theta), one(data.inputs))[None]
        else:
            out = jax.vmap(self.logits_fn)(theta, data.inputs)
        expected = data.labels.shape + (self.num_classes,)
        if out.shape != expected:
            raise ValueError(f"logits_fn returned logits of shape {out.shape[1:]} per task, expected {expected[1:]}")
        return out

    def __call__(self, theta, data: CategoricalData) -> None:
        labels = jnp.where(data.mask, data.labels, 0)  # padding never reaches a density
        fn = dist.Categorical(logits=self.logits(theta, data)).mask(data.mask).to_event(1)
        numpyro.sample(self.site, fn, obs=labels)

    def accuracy(self, theta, data: CategoricalData) -> jax.Array:
        """``(T,)`` fraction of each task's observations whose most probable class is its label."""
        hit = (jnp.argmax(self.logits(theta, data), axis=-1) == data.labels) & data.mask
        return jnp.sum(hit, axis=-1) / jnp.sum(data.mask, axis=-1)

    def num_observations(self, data: CategoricalData) -> jax.Array:
        return jnp.sum(data.mask, axis=-1)

    def log_normaliser(self, data: CategoricalData) -> jax.Array:
        """0: the categorical log-probability has no part free of theta."""
        return jnp.zeros(data.labels.shape[:1])

    def check(self, data: CategoricalData, where: str) -> None:
        check_categorical(data, where, self.num_classes)
