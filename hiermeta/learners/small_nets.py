"""Small networks that the black-box learners carry as meta-parameters: an MLP, attention pooling
over a set, and an LSTM cell (pure functions over dicts of arrays, explicit keys).

Used by :mod:`hiermeta.learners.param_predict` (the predictors and set encoders) and
:mod:`hiermeta.learners.learned_optimizer` (the coordinate-wise LSTM).  Not the task networks
(those are the domain's, ``models/``); these are the meta-learner's own.
"""

from __future__ import annotations

from typing import Callable, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["ACTIVATIONS", "activation_of", "mlp_init", "mlp_apply", "attention_pool_init", "attention_pool",
           "lstm_init", "lstm_apply", "masked_mean"]

ACTIVATIONS: dict[str, Callable] = {"relu": jax.nn.relu, "tanh": jnp.tanh, "gelu": jax.nn.gelu,
                                    "identity": lambda x: x}


def activation_of(activation: Union[str, Callable]) -> Callable:
    """An activation by name (``relu``, ``tanh``, ``gelu``, ``identity``) or a function."""
    if callable(activation):
        return activation
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)} or a function, got {activation!r}")
    return ACTIVATIONS[activation]


def mlp_init(key, sizes: Sequence[int], dtype, zero_last: bool = False) -> list:
    """Layers ``[{"w": (n_i, n_{i+1}), "b": (n_{i+1},)}]`` for the widths ``sizes``: weights
    ``N(0, 1 / n_i)`` (LeCun normal), zero biases; ``zero_last`` zeroes the last layer's weights,
    so that the network starts at its bias (a residual that starts at 0)."""
    layers = []
    keys = jax.random.split(key, max(len(sizes) - 1, 1))
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        w = jax.random.normal(keys[i], (n_in, n_out), dtype) / np.sqrt(n_in)
        if zero_last and i == len(sizes) - 2:
            w = jnp.zeros_like(w)
        layers.append({"w": w, "b": jnp.zeros((n_out,), dtype)})
    return layers


def mlp_apply(layers: list, x: jax.Array, activation: Callable) -> jax.Array:
    """``x (..., n_0) -> (..., n_L)``: affine layers with ``activation`` between them (none after the last)."""
    for i, layer in enumerate(layers):
        x = x @ layer["w"] + layer["b"]
        if i < len(layers) - 1:
            x = activation(x)
    return x


def masked_mean(h: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean of the rows of ``h`` ``(N, F)`` where ``mask`` ``(N,)`` holds (0 if none does)."""
    w = mask.astype(h.dtype)
    return (w @ h) / jnp.maximum(jnp.sum(w), 1.0)


def attention_pool_init(key, width: int, dtype) -> dict:
    """One self-attention block and attention pooling with one learned seed (Set Transformer's
    SAB + PMA, Lee et al. 2019), single head, on ``width`` features."""
    k = jax.random.split(key, 7)
    scale = 1.0 / np.sqrt(width)
    mat = lambda kk: jax.random.normal(kk, (width, width), dtype) * scale
    return {"self": {"q": mat(k[0]), "k": mat(k[1]), "v": mat(k[2])},
            "pool": {"seed": jax.random.normal(k[3], (width,), dtype) * scale, "k": mat(k[4]), "v": mat(k[5])}}


def _attend(q, k, v, mask):
    """Softmax attention of queries ``q`` ``(Q, F)`` over keys ``k`` / values ``v`` ``(N, F)`` where ``mask``."""
    logits = (q @ k.T) / np.sqrt(q.shape[-1])
    logits = jnp.where(mask[None, :], logits, -jnp.inf)
    weights = jax.nn.softmax(logits, axis=-1)
    weights = jnp.where(jnp.any(mask), weights, 0.0)  # an empty set pools to 0, not NaN
    return weights @ v


def attention_pool(params: dict, h: jax.Array, mask: jax.Array) -> jax.Array:
    """``(N, F) -> (F,)``: ``h + SA(h)`` (each element attends to the set), then the seed attends
    to the result.  Permutation invariant; padded rows (``mask`` False) take no part."""
    sa = params["self"]
    h = h + _attend(h @ sa["q"], h @ sa["k"], h @ sa["v"], mask)
    pool = params["pool"]
    return _attend(pool["seed"][None, :], h @ pool["k"], h @ pool["v"], mask)[0]


def lstm_init(key, num_inputs: int, hidden: int, dtype) -> dict:
    """An LSTM cell: ``{"w": (num_inputs + hidden, 4 hidden), "b": (4 hidden,)}``, LeCun-normal
    weights, forget-gate bias 1 (Jozefowicz et al. 2015)."""
    w = jax.random.normal(key, (num_inputs + hidden, 4 * hidden), dtype) / np.sqrt(num_inputs + hidden)
    b = jnp.zeros((4 * hidden,), dtype).at[hidden: 2 * hidden].set(1.0)
    return {"w": w, "b": b}


def lstm_apply(params: dict, x: jax.Array, h: jax.Array, c: jax.Array):
    """One step of the cell on a batch: ``x`` ``(B, I)``, state ``h, c`` ``(B, H)`` -> ``(h, c)``.

    ``i, f, o = sigmoid(.)``, ``g = tanh(.)`` of ``[x, h] W + b``; ``c' = f c + i g``, ``h' = o tanh(c')``.
    """
    z = jnp.concatenate([x, h], axis=-1) @ params["w"] + params["b"]
    i, f, g, o = jnp.split(z, 4, axis=-1)
    c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
    return jax.nn.sigmoid(o) * jnp.tanh(c), c
