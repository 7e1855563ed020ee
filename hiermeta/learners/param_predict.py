"""Black-box parameter prediction (the lecture's model-based family) on the MetaLearner interface.

A learner of this family adapts to a task in one forward pass: a network with meta-parameters
``omega`` maps the task's support set to the task's parameters.  Two forms:

**Class-weight prediction** (:func:`class_weight_predictor`; Qiao et al. 2018, "Few-shot image
recognition by predicting parameters from activations"; Gidaris and Komodakis 2018).  For a
classifier whose last layer is a linear head on features ``f_phi(x)`` in R^E, each class's head
column is predicted from that class's mean support activation
``a_k = mean_{x in S_k} f_phi(x)`` (ProtoNet's prototype):

    w_k = exp(log_scale) a_k + r_w(a_k),      b_k = -exp(log_quad) ||a_k||^2 + r_b(a_k),

with ``r = (r_w, r_b)`` an MLP of ``a_k`` whose last layer starts at zero; at the start
``(log_scale, log_quad) = (log 2, 0)``, which is ProtoNet's head (``w = 2 c``, ``b = -||c||^2``).
Meta-training minimises the query cross-entropy over ``omega = (log_scale, log_quad, r)`` with the
feature map held fixed (``train_features=False``, the lecture's version): the query features are
then constants, so the gradient reaches the predictor only through the support activations, and
query samples do not shape the features.  ``train_features=True`` also trains phi through both.

On Gaussian classes (``x ~ N(mu_k, I)``, ``mu_k ~ N(0, tau^2 I)``, ``n`` shots) the Bayes
predictive is in this family without the MLP: with ``s = n tau^2 / (1 + n tau^2)`` and
``v = tau^2 / (1 + n tau^2)``, ``w_k = s a_k / (1 + v)`` and ``b_k = -s^2 ||a_k||^2 / (2 (1 + v))``
(the test checks that meta-training finds them).

**Set encoding** (:func:`set_encoder`): a whole task module predicted from a permutation-invariant
encoding of the support (deep sets, Zaheer et al. 2017; or attention, Lee et al. 2019):

    h_n = enc(f(x_n, y_n)),     z = mean_n h_n  (or attention pooling),
    theta_t[modules] = phi[modules] + dec(z),     the other modules at phi,

``f`` a feature map of one observation (default: its response and inputs); the decoder's last
layer starts at zero (``theta_t = phi`` at the start).  Meta-training minimises the query loss
``mean_t -log p(D_t^val | theta_t)`` over ``(phi, enc, dec)``.  On the linear-Gaussian domain
with identity activations the prediction is affine in the support mean, and the posterior mean
is affine in it too: as the encoder widens the learned predictor reaches the Bayes posterior
mean's loss (the test compares it with the best predictor of each width in closed form).

Both adapt in closed form: ``learner.adapt(state, support, 0)``; their ``inner_problem`` starts
at the predicted theta (a start that depends on the task's data) and, with ``num_steps > 0``,
fine-tunes from there by SGD at ``finetune_lr`` on the support loss, which shows how much a
prediction leaves on the table (``hm.evaluate`` draws that curve).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, NamedTuple, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
import optax

from ..hierarchy import HierarchicalModel
from ..inner import InnerProblem
from ..solvers import gradient_steps
from ..utils import check_count, check_positive
from .base import MetaLearner, MetaState, make_adapt, new_state, outer_update
from .info import ProtoNetInfo
from .protonet import prototypes
from .small_nets import activation_of, attention_pool, attention_pool_init, masked_mean, mlp_apply, mlp_init

__all__ = ["class_weight_predictor", "set_encoder", "observation_features", "class_features", "SetEncoderInfo",
           "linear_head_size"]


class SetEncoderInfo(NamedTuple):
    """A meta-step of a set encoder: ``val_log_lik``, the mean over the batch of ``log p(D_val | theta_t)``
    at the state before the step; ``skipped``, True when the update was not finite and not applied."""

    val_log_lik: jax.Array
    skipped: jax.Array


def linear_head_size(model: HierarchicalModel, head: str) -> int:
    """``E``, the feature size of the model's linear head ``params[head] = {"w": (E, C), "b": (C,)}``
    (``C``: the likelihood's ``num_classes``); ``ValueError`` naming what is wrong otherwise."""
    C = getattr(model.likelihood, "num_classes", None)
    if not isinstance(C, int):
        raise ValueError("class-weight prediction needs a classification likelihood with an integer num_classes "
                         "(hiermeta.families.CategoricalLikelihood)")
    template = model.partition.template
    layer = template.get(head) if isinstance(template, Mapping) else None
    if not isinstance(layer, Mapping) or set(layer) != {"w", "b"}:
        raise ValueError(f"the model needs a linear head params[{head!r}] = {{'w': (E, C), 'b': (C,)}}")
    E = np.shape(layer["w"])[0]
    if np.shape(layer["w"]) != (E, C) or np.shape(layer["b"]) != (C,):
        raise ValueError(f"head w must be (E, {C}) and b ({C},); got {np.shape(layer['w'])}, {np.shape(layer['b'])}")
    return int(E)


def _finetune_solver(finetune_lr: float, num_steps: int):
    """SGD from the prediction on the support loss (budget ``num_steps``, never judged: the
    prediction is the method, the steps an optional extra)."""
    return gradient_steps(optax.sgd(check_positive(finetune_lr, "finetune_lr")), num_steps, tol=float("inf"))


# ---------------------------------------------------------------------------- class weights


def class_weight_predictor(
    model: HierarchicalModel,
    *,
    embed: Callable[[Any, Any], jax.Array],
    head: str = "head",
    hidden: Optional[Sequence[int]] = (),
    activation: Union[str, Callable] = "relu",
    train_features: bool = False,
    outer_optimizer: Optional[optax.GradientTransformation] = None,
    finetune_lr: float = 1e-2,
    name: Optional[str] = None,
) -> MetaLearner:
    """Predict each class's head weights from its mean support activation (module docstring).

    Args:
      model: a classification model whose logits are ``embed(params, x) @ params[head]["w"] + params[head]["b"]``.
      embed: ``(params, inputs) -> (N, E)`` features, each input on its own (as for :func:`protonet`).
      hidden: widths of the residual MLP's hidden layers; ``()`` an affine residual, ``None`` none
        (only ``log_scale`` and ``log_quad`` are learned).
      train_features: also train the feature map phi (through support and query); default False,
        the features stay at the phi given to ``init`` (e.g. a ProtoNet-trained network).
      outer_optimizer: optax optimiser on the meta-parameters (default Adam, lr 1e-3).
      finetune_lr: SGD rate of ``adapt``'s optional steps after the prediction.

    Meta-parameters: ``{"phi": (P,), "predictor": {"log_scale", "log_quad", "residual"?}}``.
    Step info: :class:`~hiermeta.learners.info.ProtoNetInfo` (the same fields).
    """
    E = linear_head_size(model, head)
    C = model.likelihood.num_classes
    if not callable(embed):
        raise ValueError("embed must be a function (params, inputs) -> (N, E) features")
    hidden = None if hidden is None else tuple(check_count(h, "hidden width", 1) for h in hidden)
    act = activation_of(activation)
    outer = outer_optimizer if outer_optimizer is not None else optax.adam(1e-3)
    part = model.partition

    def predict_head(predictor, features, support_t):
        """``(E, C)`` weights, ``(C,)`` biases (far below every logit for an absent class), counts."""
        a, counts = prototypes(features, support_t.labels, support_t.mask, C)  # (C, E)
        w = jnp.exp(predictor["log_scale"]) * a
        b = -jnp.exp(predictor["log_quad"]) * jnp.sum(a**2, axis=-1)
        if "residual" in predictor:
            r = mlp_apply(predictor["residual"], a, act)  # (C, E + 1)
            w, b = w + r[:, :E], b + r[:, E]
        absent = jnp.finfo(a.dtype).min / 4
        return w.T, jnp.where(counts > 0, b, absent), counts

    def features_of(tree, inputs):
        """Features of every task's inputs ``(T, N, ...)`` in one call of the shared network: ``(T, N, E)``."""
        T, N = jax.tree_util.tree_leaves(inputs)[0].shape[:2]
        merged = jax.tree_util.tree_map(lambda x: x.reshape((T * N,) + x.shape[2:]), inputs)
        f = embed(tree, merged)
        if f.shape != (T * N, E):
            raise ValueError(f"embed returned features of shape {f.shape}; the head expects ({T * N}, {E})")
        return f.reshape(T, N, E)

    def network(params):
        phi = params["phi"] if train_features else jax.lax.stop_gradient(params["phi"])
        return part.unravel(phi)

    def init(key, params) -> MetaState:
        phi = part.ravel(params)
        predictor = {"log_scale": jnp.log(2.0 * jnp.ones((), phi.dtype)), "log_quad": jnp.zeros((), phi.dtype)}
        if hidden is not None:
            predictor["residual"] = mlp_init(key, (E, *hidden, E + 1), phi.dtype, zero_last=True)
        return new_state({"phi": phi, "predictor": predictor}, outer, key)

    def meta_objective(params, batch):
        tree = network(params)
        support, query = features_of(tree, batch.train.inputs), features_of(tree, batch.val.inputs)

        def episode(f_support, f_query, train_t, val_t):
            w, b, counts = predict_head(params["predictor"], f_support, train_t)
            logits = f_query @ w + b
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

    solver = _finetune_solver(finetune_lr, 0)

    def inner_problem(params) -> InnerProblem:
        tree = part.unravel(params["phi"])

        def start(support_t):
            f = embed(tree, support_t.inputs)
            w, b, _ = predict_head(params["predictor"], f, support_t)
            return part.ravel({**tree, head: {"w": w, "b": b}})

        return InnerProblem(start, lambda theta, d: -model.log_likelihood(theta, d), solver)

    return MetaLearner(name=name or "ClassWeightPredictor", model=model, init=init, step=step,
                       inner_problem=inner_problem, adapt=make_adapt(inner_problem), inner_solver=solver)


# ---------------------------------------------------------------------------- set encoder


def observation_features(tree, data_t) -> jax.Array:
    """Default features of one task's observations for :func:`set_encoder`: ``(N, F)``, each row an
    observation's response (``data_t.obs``) followed by its inputs (``data_t.inputs``, if any), flattened."""
    if not hasattr(data_t, "obs"):
        raise ValueError("observation_features reads data.obs (GaussianData); give set_encoder a features= "
                         "function for other data, e.g. class_features(embed, num_classes) for classification")
    N = data_t.obs.shape[0]
    parts = [data_t.obs.reshape(N, -1)]
    if data_t.inputs is not None:
        parts += [x.reshape(N, -1) for x in jax.tree_util.tree_leaves(data_t.inputs)]
    return jnp.concatenate(parts, axis=-1)


def class_features(embed: Callable[[Any, Any], jax.Array], num_classes: int):
    """Features for classification: ``onehot(y_n) (x) [f_phi(x_n), 1]`` flattened, ``(N, C (E + 1))``.

    Mean-pooled, these are each class's summed features and count over N: the decoder can read
    every class's prototype from the pooled set, whatever the episode's label order."""

    def features(tree, data_t):
        f = embed(tree, data_t.inputs)
        f = jnp.concatenate([f, jnp.ones(f.shape[:1] + (1,), f.dtype)], axis=-1)
        onehot = jax.nn.one_hot(data_t.labels, num_classes, dtype=f.dtype)
        return (onehot[:, :, None] * f[:, None, :]).reshape(f.shape[0], -1)

    return features


def set_encoder(
    model: HierarchicalModel,
    *,
    features: Optional[Callable[[Any, Any], jax.Array]] = None,
    modules: Optional[Sequence[str]] = None,
    width: int = 32,
    depth: int = 2,
    decoder_depth: int = 1,
    pooling: str = "mean",
    activation: Union[str, Callable] = "relu",
    learn_phi: bool = True,
    outer_optimizer: Optional[optax.GradientTransformation] = None,
    finetune_lr: float = 1e-2,
    name: Optional[str] = None,
) -> MetaLearner:
    """Predict whole task modules from a set encoding of the support (module docstring).

    Args:
      model: any hierarchical model (only its likelihood and partition are used, no prior).
      features: ``(phi_tree, data_t) -> (N, F)`` features of one task's observations (default
        :func:`observation_features`; for classification :func:`class_features`).
      modules: names of the predicted modules (default: all); the others stay at phi.
      width, depth: the encoder MLP's width and number of layers (``F -> width -> ... -> width``).
      decoder_depth: the decoder's number of layers (``width -> ... -> size of the modules``; 1: affine).
      pooling: ``"mean"`` (deep sets) or ``"attention"`` (a self-attention block, then pooling by
        attention with a learned seed).
      activation: of the encoder and decoder (``"identity"`` makes the whole map affine in the pooled features).
      learn_phi: learn phi (the base the prediction is added to, and what ``features`` reads) too.
      outer_optimizer: optax optimiser (default Adam, lr 1e-3).
      finetune_lr: SGD rate of ``adapt``'s optional steps after the prediction.

    ``init(key, params, data)`` needs ``data``, a support batch (or one task), for the feature size.
    """
    part = model.partition
    if modules is None:
        modules = tuple(part.names)
    unknown = sorted(set(modules) - set(part.names))
    if unknown or not modules:
        raise ValueError(f"modules must name modules of the model ({list(part.names)}), got {list(modules)}")
    predicted = np.flatnonzero(np.isin(part.index, [part.names.index(m) for m in modules]))
    width = check_count(width, "width", 1)
    depth = check_count(depth, "depth", 1)
    decoder_depth = check_count(decoder_depth, "decoder_depth", 1)
    if pooling not in ("mean", "attention"):
        raise ValueError(f"pooling must be 'mean' or 'attention', got {pooling!r}")
    act = activation_of(activation)
    features = features if features is not None else observation_features
    outer = outer_optimizer if outer_optimizer is not None else optax.adam(1e-3)

    def base(params):
        return params["phi"] if learn_phi else jax.lax.stop_gradient(params["phi"])

    def predict(params, phi, data_t):
        f = features(part.unravel(phi), data_t)
        h = act(mlp_apply(params["encoder"], f, act))
        z = attention_pool(params["pool"], h, data_t.mask) if pooling == "attention" else masked_mean(h, data_t.mask)
        return phi.at[predicted].add(mlp_apply(params["decoder"], z, act))

    def init(key, params, data=None) -> MetaState:
        if data is None:
            raise ValueError("set_encoder's init needs data=, a support batch (or one task), for the feature size")
        phi = part.ravel(params)
        one = data if np.ndim(data.mask) == 1 else jax.tree_util.tree_map(lambda a: a[0], data)
        F = jax.eval_shape(lambda p, d: features(part.unravel(p), d), phi, one).shape[-1]
        k_enc, k_pool, k_dec = jax.random.split(key, 3)
        meta = {"phi": phi,
                "encoder": mlp_init(k_enc, (F,) + (width,) * depth, phi.dtype),
                "decoder": mlp_init(k_dec, (width,) * decoder_depth + (predicted.size,), phi.dtype, zero_last=True)}
        if pooling == "attention":
            meta["pool"] = attention_pool_init(k_pool, width, phi.dtype)
        return new_state(meta, outer, key)

    def meta_objective(params, batch):
        phi = base(params)
        theta = jax.vmap(lambda d: predict(params, phi, d))(batch.train)
        return -jnp.mean(jax.vmap(model.log_likelihood)(theta, batch.val))

    def step(state: MetaState, batch):
        loss, grads = jax.value_and_grad(meta_objective)(state.params, batch)
        state, skipped = outer_update(state, grads, outer)
        return state, SetEncoderInfo(val_log_lik=-loss, skipped=skipped)

    solver = _finetune_solver(finetune_lr, 0)

    def inner_problem(params) -> InnerProblem:
        return InnerProblem(lambda d: predict(params, params["phi"], d), lambda theta, d: -model.log_likelihood(theta, d),
                            solver)

    default = "DeepSets" if pooling == "mean" else "SetAttention"
    return MetaLearner(name=name or default, model=model, init=init, step=step, inner_problem=inner_problem,
                       adapt=make_adapt(inner_problem), inner_solver=solver)
