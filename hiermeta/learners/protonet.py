"""ProtoNet (Snell et al. 2017): metric-based few-shot classification on the MetaLearner interface.

Meta-parameters: phi (flat ``(P,)``), the parameters of a network (any pytree) whose last layer
is a linear head ``x -> f w + b`` (its weight stored ``(E, C)`` or ``(C, E)``, :func:`locate_head`)
on an embedding ``f_phi(x) = embed(params, x)`` in R^E (``C`` = the likelihood's ``num_classes``).  ProtoNet does not learn the head.  For a task
whose support holds the examples S_k of class k:

    c_k = (1 / |S_k|) sum_{x in S_k} f_phi(x)                        (class prototypes)
    p(y = k | x) = softmax_k(-||f_phi(x) - c_k||^2)                  (squared Euclidean distance)

Because ``-||f - c_k||^2 = 2 c_k . f - ||c_k||^2 - ||f||^2`` and the last term is the same for
every class, this is the network's own linear head with ``w_k = 2 c_k``, ``b_k = -||c_k||^2``
(Snell et al., Sec. 2.4).  ``adapt`` writes those into the head, so an adapted task is a
``theta`` of the same model, scored by the model's own likelihood like any other learner's.

Episodic training: each meta-step takes one outer step on

    J(phi) = mean_t -log p(D_t^val | theta_t(phi, D_t^tr)),

the query cross-entropy, differentiated through the prototypes and the query embeddings alike.
The tasks share phi, so the step embeds every image of the batch in one call of the network
(no per-task copies of its weights) and applies each task's prototype head to the features:
``embed`` must treat examples independently (no batch statistics), as the likelihood's
factorisation over observations already requires.
A class with no support example has no prototype: its logit is set far below the others, and a
meta-step whose query holds such a class is skipped (``num_missing`` in the metrics).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
import optax

from ..hierarchy import HierarchicalModel
from ..inner import Adaptation
from .base import MetaLearner, MetaState, new_state, outer_update
from .info import ProtoNetInfo

__all__ = ["protonet", "prototypes", "locate_head", "HeadLeaves"]


def prototypes(features: jax.Array, labels: jax.Array, mask: jax.Array, num_classes: int):
    """Mean feature of each class: ``(C, E)`` prototypes and ``(C,)`` support counts.

    ``features`` ``(N, E)``, ``labels`` ``(N,)``, ``mask`` ``(N,)``; a class without support
    examples gets a zero prototype and count 0.
    """
    onehot = (labels[:, None] == jnp.arange(num_classes)) & mask[:, None]
    onehot = onehot.astype(features.dtype)
    counts = jnp.sum(onehot, axis=0)
    return (onehot.T @ features) / jnp.maximum(counts, 1.0)[:, None], counts


_WEIGHTS = {"w": False, "kernel": False, "weight": True}  # leaf name -> stored as (C, E) (Equinox, PyTorch)
_BIASES = ("b", "bias")


class HeadLeaves(NamedTuple):
    """Where the linear head sits in the flat parameter vector (:func:`locate_head`)."""

    weight: slice  # its (E, C) or (C, E) weight, raveled in C order
    bias: slice  # its (C,) bias
    transposed: bool  # the weight is stored (C, E)
    embedding_size: int


def _path_names(path) -> tuple:
    """A leaf's key path as names: dict keys, attribute names, sequence indices (a Flax NNX
    Variable's trailing ``value`` dropped)."""
    names = []
    for entry in path:
        for attr in ("key", "name", "idx"):
            if hasattr(entry, attr):
                names.append(str(getattr(entry, attr)))
                break
    if len(names) > 1 and names[-1] in ("value", "raw_value"):
        names = names[:-1]
    return tuple(names)


def locate_head(template, head, num_classes: int) -> HeadLeaves:
    """Find the linear head ``head`` (a name, a ``"/"``-separated path such as ``"params/head"``, or
    a tuple of names) in any parameter pytree: a weight leaf named ``w`` or ``kernel`` of shape
    ``(E, C)`` (haiku, Flax) or ``weight`` of shape ``(C, E)`` (Equinox, PyTorch), and a bias ``b``
    or ``bias`` of shape ``(C,)``.  Raises ``ValueError`` saying what it found instead."""
    prefix = tuple(head.split("/")) if isinstance(head, str) else tuple(str(h) for h in head)
    paths, _ = jax.tree_util.tree_flatten_with_path(template)
    offset, found, under = 0, {}, []
    for path, leaf in paths:
        names, size = _path_names(path), int(np.size(leaf))
        if names[: len(prefix)] == prefix:
            under.append((names[len(prefix):], np.shape(leaf)))
            if len(names) == len(prefix) + 1 and (names[-1] in _WEIGHTS or names[-1] in _BIASES):
                found["weight" if names[-1] in _WEIGHTS else "bias"] = (names[-1], np.shape(leaf), slice(offset, offset + size))
        offset += size
    if set(found) != {"weight", "bias"}:
        raise ValueError(f"ProtoNet needs a linear head at {'/'.join(prefix)!r}: a weight leaf (w or kernel (E, C), "
                         f"or weight (C, E)) and a bias (b or bias (C,)); under that path the parameters hold "
                         f"{under or 'nothing'}")
    (w_name, w_shape, w_slice), (_, b_shape, b_slice) = found["weight"], found["bias"]
    transposed = _WEIGHTS[w_name]
    C = num_classes
    E = w_shape[1] if transposed else w_shape[0] if len(w_shape) == 2 else -1
    want = (C, E) if transposed else (E, C)
    if len(w_shape) != 2 or tuple(w_shape) != want or tuple(b_shape) != (C,):
        raise ValueError(f"head {w_name} must be {'(C, E)' if transposed else '(E, C)'} and its bias ({C},) for "
                         f"{C} classes; got {tuple(w_shape)}, {tuple(b_shape)}")
    return HeadLeaves(w_slice, b_slice, transposed, int(E))


def protonet(
    model: HierarchicalModel,
    *,
    embed: Callable[[Any, Any], jax.Array],
    head: str = "head",
    outer_optimizer: Optional[optax.GradientTransformation] = None,
    name: Optional[str] = None,
) -> MetaLearner:
    """Build ProtoNet on ``model``'s network.

    Args:
      model: the hierarchical model; its likelihood must be a classification likelihood with
        ``num_classes`` (:class:`hiermeta.families.CategoricalLikelihood`) whose logits are
        ``embed(params, x) @ params[head]["w"] + params[head]["b"]``.  Only the likelihood and
        the partition are used (no prior).
      embed: ``(params, inputs) -> (N, E)`` features of ``N`` inputs, each on its own.
      head: where the linear head sits in the parameter pytree (any pytree: dicts, Flax linen's
        and NNX's states, Equinox modules): a name, a ``"/"``-separated path (``"params/head"``) or a
        tuple of names, holding a weight ``w`` / ``kernel`` ``(E, C)`` or ``weight`` ``(C, E)`` and a
        bias ``b`` / ``bias`` ``(C,)`` (:func:`locate_head`).
      outer_optimizer: optax optimiser on ``{"phi"}`` (default Adam, lr 1e-3).

    ``adapt(state, support, 0)`` returns each task's ``theta`` with the prototype head (an
    :class:`~hiermeta.inner.Adaptation`, every task converged);
    ProtoNet takes no adaptation steps, so ``num_steps`` must be 0 and ``inner_problem`` raises.
    """
    C = getattr(model.likelihood, "num_classes", None)
    if not isinstance(C, int):
        raise ValueError("ProtoNet needs a classification likelihood with an integer num_classes "
                         "(hiermeta.families.CategoricalLikelihood)")
    if not callable(embed):
        raise ValueError("embed must be a function (params, inputs) -> (N, E) features")
    where = locate_head(model.partition.template, head, C)
    E = where.embedding_size
    outer = outer_optimizer if outer_optimizer is not None else optax.adam(1e-3)
    part = model.partition

    def head_from(features, support_t):
        """The prototype head ``(w (E, C), b (C,))`` and the support count of each class."""
        c, counts = prototypes(features, support_t.labels, support_t.mask, C)
        absent = jnp.finfo(c.dtype).min / 4  # far below every real logit, still finite
        return 2.0 * c.T, jnp.where(counts > 0, -jnp.sum(c**2, axis=-1), absent), counts

    def features_of(params, inputs):
        """Embeddings of every task's inputs ``(T, N, ...)`` in one call of the shared network: ``(T, N, E)``."""
        T, N = jax.tree_util.tree_leaves(inputs)[0].shape[:2]
        merged = jax.tree_util.tree_map(lambda a: a.reshape((T * N,) + a.shape[2:]), inputs)
        features = embed(params, merged)
        if features.ndim != 2 or features.shape != (T * N, E):
            raise ValueError(f"embed returned features of shape {features.shape}; the head expects ({T * N}, {E})")
        return features.reshape(T, N, E)

    def init(key, params) -> MetaState:
        return new_state({"phi": part.ravel(params)}, outer, key)

    def meta_objective(params, batch):
        tree = part.unravel(params["phi"])
        support, query = features_of(tree, batch.train.inputs), features_of(tree, batch.val.inputs)

        def episode(f_support, f_query, train_t, val_t):
            w, b, counts = head_from(f_support, train_t)
            logits = f_query @ w + b  # the network's head at the prototypes: theta_t's own logits
            labels = jnp.where(val_t.mask, val_t.labels, 0)
            log_lik = jnp.sum(jnp.where(val_t.mask, dist.Categorical(logits=logits).log_prob(labels), 0.0))
            hits = jnp.sum(val_t.mask & (jnp.argmax(logits, -1) == labels)) / jnp.sum(val_t.mask)
            return log_lik, hits, jnp.sum(val_t.mask & (counts[labels] == 0))

        log_lik, hits, missing = jax.vmap(episode)(support, query, batch.train, batch.val)
        return -jnp.mean(log_lik), (jnp.mean(hits), jnp.sum(missing))

    def step(state: MetaState, batch):
        (loss, (accuracy, missing)), grads = jax.value_and_grad(meta_objective, has_aux=True)(state.params, batch)
        state, skipped = outer_update(state, grads, outer, ok=missing == 0)
        return state, ProtoNetInfo(val_log_lik=-loss, val_accuracy=accuracy, num_missing=missing, skipped=skipped)

    def adapt(state: MetaState, support, num_steps: Optional[int] = 0) -> Adaptation:
        if num_steps not in (0, None):
            raise ValueError(f"ProtoNet adapts in closed form (the prototypes); num_steps must be 0, got {num_steps}")
        tree = part.unravel(state.params["phi"])
        w, b, _ = jax.vmap(head_from)(features_of(tree, support.inputs), support)
        phi = state.params["phi"]

        def with_head(w_t, b_t):  # phi with the prototype head written into its coordinates
            w_t = w_t.T if where.transposed else w_t
            return phi.at[where.weight].set(w_t.ravel().astype(phi.dtype)).at[where.bias].set(b_t.astype(phi.dtype))

        theta = jax.vmap(with_head)(w, b)
        # no solve: the loss is the support's negative log-likelihood at the prototype head
        loss = jax.vmap(lambda th, d: -model.log_likelihood(th, d))(theta, support)
        finite = jnp.all(jnp.isfinite(theta), axis=-1) & jnp.isfinite(loss)
        return Adaptation(theta, loss, jnp.zeros_like(loss), finite, ~finite)

    def inner_problem(params):
        raise ValueError("ProtoNet has no inner optimisation: a task's parameters are its prototypes, "
                         "computed by learner.adapt(state, support, 0) (hiermeta.evaluate's loss curves "
                         "over adaptation steps do not apply)")

    return MetaLearner(
        name=name or "ProtoNet",
        model=model,
        init=init,
        step=step,
        inner_problem=inner_problem,
        adapt=adapt,
    )
