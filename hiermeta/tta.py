"""Test-time adaptation: after a learner has adapted to a task's labelled support, adapt further on
the task's *unlabelled* query inputs (the lecture's last family).

A method is a :class:`TestTimeAdaptation`: a budget and a pure function

    result = method.adapt(model, theta, inputs, mask, num_steps=None, observe=None)   # an InnerResult

for one task (``theta`` flat ``(P,)``, the learner's adapted parameters; ``inputs`` and ``mask``
the query's, never its labels), vmapped over tasks by the callers: :func:`hiermeta.evaluate`
(``test_time=``: the loss curve goes on past the learner's K steps with the method's steps) and
:func:`adapt_to_query` (the adapted theta of a batch of tasks, for scores such as accuracy).
Only the coordinates the method names move (a mask over the parameter pytree's leaves); the
steps are ``num_steps`` of an optax optimiser (:func:`hiermeta.solvers.gradient_steps`), never
judged for convergence.

- :func:`tent` (Wang et al. 2021, "Tent: fully test-time adaptation by entropy minimization"):
  minimise the mean prediction entropy of the query,

      H(theta) = mean_n  -sum_c p_nc log p_nc,   p_n = softmax(logits(theta, x_n)),

  over the normalisation layers' affine parameters (default: every leaf named ``scale`` or
  ``offset``, the group norms of :func:`hiermeta.models.fewshot.convnet`).  Per observation,
  ``dH_n / dz_n = -p_n * (log p_n + H_n)`` (the test checks the update against this by hand).
- :func:`rotation_ttt` (Sun et al. 2020, "Test-time training with self-supervision"): minimise
  a self-supervised loss on the query inputs, the cross-entropy of predicting which of the four
  rotations (0, 90, 180, 270 degrees) each image was turned by,

      R(theta) = mean_n mean_{r=0..3}  -log softmax(rot_logits(theta, rot90^r(x_n)))_r,

  over the shared feature layers (default: every module but the heads).  It needs a network
  with a rotation head trained jointly with the task: :class:`RotationAuxiliaryLikelihood` adds
  ``weight * log p(rotations)`` of the same images to the task likelihood, so every learner that
  reads the model's likelihood (MAML, Reptile, the shrinkage learners) trains both heads.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import optax

from .hierarchy import HierarchicalModel
from .inner import InnerResult
from .partition import ModulePartition
from .solvers import gradient_steps
from .utils import check_count

__all__ = ["TestTimeAdaptation", "tent", "rotation_ttt", "prediction_entropy", "rotation_loss", "rotations",
           "leaf_mask", "leaf_paths", "RotationAuxiliaryLikelihood", "adapt_to_query"]


class TestTimeAdaptation(NamedTuple):
    """A test-time adaptation method (build one with :func:`tent` or :func:`rotation_ttt`).

    Attributes:
      name: what it is, for tables.
      num_steps: its budget (optimiser steps on the query's inputs).
      adapt: ``adapt(model, theta, inputs, mask, num_steps=None, observe=None) -> InnerResult`` for
        one task; ``trace`` holds ``observe`` at each of the ``num_steps + 1`` iterates.
    """

    name: str
    num_steps: int
    adapt: Callable[..., InnerResult]


def _key_name(key) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def leaf_paths(tree) -> list[str]:
    """Each leaf's path as ``"a/b/c"`` (dict keys, attribute names, sequence indices), in leaf order."""
    paths, _ = jax.tree_util.tree_flatten_with_path(tree)
    return ["/".join(_key_name(k) for k in path) for path, _ in paths]


def leaf_mask(partition: ModulePartition, leaves: Union[Sequence[str], Callable[[str], bool]]) -> np.ndarray:
    """``(P,)`` booleans: the flat coordinates of the parameter leaves selected by ``leaves``.

    ``leaves``: leaf names (the last part of a leaf's path, e.g. ``"scale"``; or a whole path such
    as ``"block0/scale"``) or a predicate on the path (``"block0/scale"``).  Raises ``ValueError``
    if nothing is selected.
    """
    template = partition.template
    paths = leaf_paths(template)
    if callable(leaves):
        chosen = [bool(leaves(p)) for p in paths]
    else:
        wanted = set(leaves)
        chosen = [p in wanted or p.rsplit("/", 1)[-1] in wanted for p in paths]
    sizes = [int(np.size(x)) for x in jax.tree_util.tree_leaves(template)]
    mask = np.concatenate([np.full(s, c) for s, c in zip(sizes, chosen)])
    if not mask.any():
        raise ValueError(f"no parameter leaf selected by {leaves!r}; the leaves are {paths}")
    return mask


def _masked_steps(name: str, loss_of: Callable, selected: np.ndarray, optimizer, num_steps: int) -> TestTimeAdaptation:
    """``num_steps`` of ``optimizer`` on ``loss_of(model, theta, inputs, mask)`` over the ``selected`` coordinates."""
    idx = np.flatnonzero(selected)
    solver = gradient_steps(optimizer, check_count(num_steps, "num_steps", 0), tol=float("inf"))

    def adapt(model, theta, inputs, mask, num_steps=None, observe=None) -> InnerResult:
        if selected.shape != theta.shape:
            raise ValueError(f"the method's mask covers {selected.shape[0]} parameters, theta has {theta.shape[0]}")
        full = lambda u: theta.at[idx].set(u)
        result = solver.solve(lambda u: loss_of(model, full(u), inputs, mask), theta[idx], num_steps,
                              None if observe is None else (lambda u: observe(full(u))))
        return result._replace(theta=full(result.theta))

    return TestTimeAdaptation(name, solver.num_steps, adapt)


def _logits_fn(model: HierarchicalModel) -> Callable:
    fn = getattr(model.likelihood, "logits_fn", None)
    if not callable(fn):
        raise ValueError("test-time adaptation by entropy needs a classification likelihood with logits_fn "
                         "(hiermeta.families.CategoricalLikelihood)")
    return fn


def prediction_entropy(logits: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean over the rows where ``mask`` holds of the entropy of ``softmax(logits)`` (nats)."""
    log_p = jax.nn.log_softmax(logits, axis=-1)
    entropy = -jnp.sum(jnp.exp(log_p) * log_p, axis=-1)
    return jnp.sum(jnp.where(mask, entropy, 0.0)) / jnp.maximum(jnp.sum(mask), 1)


def tent(
    partition: ModulePartition,
    *,
    num_steps: int = 1,
    optimizer: Optional[optax.GradientTransformation] = None,
    leaves: Union[Sequence[str], Callable[[str], bool]] = ("scale", "offset"),
    name: str = "TENT",
) -> TestTimeAdaptation:
    """TENT: ``num_steps`` of ``optimizer`` (default SGD, rate 0.1) on the query's mean prediction
    entropy over the leaves ``leaves`` (default the normalisation layers' scales and offsets) of a
    model with this ``partition``."""
    optimizer = optimizer if optimizer is not None else optax.sgd(0.1)

    def loss(model, theta, inputs, mask):
        return prediction_entropy(_logits_fn(model)(model.partition.unravel(theta), inputs), mask)

    return _masked_steps(name, loss, leaf_mask(partition, leaves), optimizer, num_steps)


def rotations(images: jax.Array) -> jax.Array:
    """``(N, H, W[, C]) -> (4, N, H, W[, C])``: the images turned by 0, 90, 180 and 270 degrees
    (``rot90`` counter-clockwise ``r`` times for entry ``r``); images must be square."""
    if images.shape[1] != images.shape[2]:
        raise ValueError(f"rotation needs square images, got {images.shape[1]} x {images.shape[2]}")
    return jnp.stack([jnp.rot90(images, r, axes=(1, 2)) for r in range(4)])


def rotation_loss(rotation_logits: Callable, tree, inputs: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean over masked images and the 4 rotations of ``-log softmax(rotation_logits(tree, rot90^r x))_r``."""
    turned = rotations(inputs)
    N = inputs.shape[0]
    logits = rotation_logits(tree, turned.reshape((4 * N,) + inputs.shape[1:])).reshape(4, N, 4)
    log_p = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(log_p, jnp.arange(4)[:, None, None], axis=-1)[..., 0]  # (4, N)
    return jnp.sum(jnp.where(mask[None, :], nll, 0.0)) / (4 * jnp.maximum(jnp.sum(mask), 1))


def rotation_ttt(
    partition: ModulePartition,
    *,
    rotation_logits: Callable[[Any, jax.Array], jax.Array],
    num_steps: int = 1,
    optimizer: Optional[optax.GradientTransformation] = None,
    leaves: Optional[Union[Sequence[str], Callable[[str], bool]]] = None,
    heads: Sequence[str] = ("head", "rot_head"),
    name: str = "TTT (rotation)",
) -> TestTimeAdaptation:
    """Test-time training: ``num_steps`` of ``optimizer`` (default SGD, rate 0.1) on the query's
    rotation-prediction loss (module docstring) over ``leaves`` (default: every leaf outside the
    top-level ``heads``: the shared feature layers).

    ``rotation_logits(tree, images) -> (N, 4)``: the network's rotation head on its features.
    """
    optimizer = optimizer if optimizer is not None else optax.sgd(0.1)
    if leaves is None:
        leaves = lambda path: path.split("/", 1)[0] not in set(heads)

    def loss(model, theta, inputs, mask):
        return rotation_loss(rotation_logits, model.partition.unravel(theta), inputs, mask)

    return _masked_steps(name, loss, leaf_mask(partition, leaves), optimizer, num_steps)


class RotationAuxiliaryLikelihood:
    """A classification likelihood with the rotation task as a second observed site (Sun et al.'s
    joint training): ``log p(D_t | theta) = log p(labels | theta) + weight * sum_n sum_r
    log softmax(rot_logits(theta, rot90^r x_n))_r``.

    ``base`` is a :class:`hiermeta.families.CategoricalLikelihood`; accuracy, checks and the count of
    observations are its own, so a generalisation loss read from this likelihood includes the
    rotation term (score the main task with ``base``).
    """

    def __init__(self, base, rotation_logits: Callable[[Any, jax.Array], jax.Array], weight: float = 1.0,
                 site: str = "rotations"):
        if not callable(getattr(base, "logits_fn", None)):
            raise ValueError("base must be a classification likelihood with logits_fn (CategoricalLikelihood)")
        if not (np.isfinite(weight) and weight >= 0):
            raise ValueError(f"weight must be finite and >= 0, got {weight}")
        self.base = base
        self.rotation_logits = rotation_logits
        self.weight = float(weight)
        self.site = site
        self.num_classes = base.num_classes
        self.logits_fn = base.logits_fn

    def __call__(self, theta, data) -> None:
        self.base(theta, data)
        T, N = data.labels.shape

        def per_task(tree, x):
            turned = rotations(x)
            return self.rotation_logits(tree, turned.reshape((4 * N,) + x.shape[1:])).reshape(4, N, 4)

        logits = jax.vmap(per_task)(theta, data.inputs)  # (T, 4, N, 4)
        labels = jnp.broadcast_to(jnp.arange(4)[None, :, None], (T, 4, N))
        mask = jnp.broadcast_to(data.mask[:, None, :], (T, 4, N))
        with numpyro.handlers.scale(scale=self.weight):
            numpyro.sample(self.site, dist.Categorical(logits=logits).mask(mask).to_event(2), obs=labels)

    def logits(self, theta, data):
        return self.base.logits(theta, data)

    def accuracy(self, theta, data):
        return self.base.accuracy(theta, data)

    def num_observations(self, data):
        return self.base.num_observations(data)

    def log_normaliser(self, data):
        return self.base.log_normaliser(data)

    def check(self, data, where: str) -> None:
        self.base.check(data, where)


def _adapt_to_query(learner, state, batch, num_steps, method):
    model = learner.model
    theta = learner.adapt(state, batch.train, num_steps).theta
    result = jax.vmap(lambda th, q: method.adapt(model, th, q.inputs, q.mask))(theta, batch.val)
    return theta, result.theta, result.diverged


_adapt_to_query_jit = jax.jit(_adapt_to_query, static_argnums=(0, 3, 4))


def adapt_to_query(learner, state, batch, num_steps: Optional[int], method: TestTimeAdaptation):
    """Adapt each task of ``batch`` to its support with the learner (``num_steps``), then with
    ``method`` to its query's inputs (not its labels).  Returns ``(theta_support, theta_test_time)``,
    each ``(T, P)``; raises ``ValueError`` if a test-time adaptation ran off (not finite)."""
    if num_steps is None:
        num_steps = learner.inner_solver.num_steps if learner.inner_solver is not None else 0
    before, after, diverged = _adapt_to_query_jit(learner, state, batch, int(num_steps), method)
    if bool(np.any(np.asarray(diverged))):
        raise ValueError(f"{method.name}: the test-time adaptation ran off on {int(np.sum(diverged))} tasks; "
                         "lower its rate or steps")
    return before, after
