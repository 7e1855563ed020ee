"""The sinusoid MAML step written by hand in plain JAX: no hiermeta, just jit + vmap + scan.

The same computation as hiermeta's MAML step on ``hiermeta.models.sinusoid`` (fixed inner rate): for each
task, K SGD steps from phi on ``1/2 sum_n (y_n - f(x_n))^2 / noise_sd^2`` (the Gaussian negative
log-likelihood up to its constant), the query loss at the adapted weights, the mean over tasks
differentiated through the unrolled steps, and one Adam step.  This is the yardstick for
hiermeta's overhead.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from jax.flatten_util import ravel_pytree


def mlp(params, x):
    h = jax.nn.relu(x @ params["layer_0"]["w"] + params["layer_0"]["b"])
    h = jax.nn.relu(h @ params["layer_1"]["w"] + params["layer_1"]["b"])
    return h @ params["layer_2"]["w"] + params["layer_2"]["b"]


def make_step(inner_steps: int, inner_lr: float, outer: optax.GradientTransformation, noise_sd: float = 1.0,
              remat: bool = False):
    """``step(params, opt_state, xs, ys, xq, yq) -> (params, opt_state, meta_loss)`` and ``meta_grad``.

    ``xs, ys``: support ``(T, N, 1)``; ``xq, yq``: query ``(T, N, 1)``.
    """

    def loss(params, x, y):
        return 0.5 * jnp.sum((mlp(params, x) - y) ** 2) / noise_sd**2

    def adapt(params, x, y):
        def body(p, _):
            g = jax.grad(loss)(p, x, y)
            return jax.tree_util.tree_map(lambda a, b: a - inner_lr * b, p, g), None

        if remat:
            body = jax.checkpoint(body)
        return jax.lax.scan(body, params, None, length=inner_steps)[0]

    def meta_loss(params, xs, ys, xq, yq):
        per_task = jax.vmap(lambda a, b, c, d: loss(adapt(params, a, b), c, d))(xs, ys, xq, yq)
        return jnp.mean(per_task)

    meta_grad = jax.value_and_grad(meta_loss)

    def step(params, opt_state, xs, ys, xq, yq):
        value, grads = meta_grad(params, xs, ys, xq, yq)
        updates, opt_state = outer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, value

    return step, meta_grad


def make_flat_step(inner_steps: int, inner_lr: float, outer: optax.GradientTransformation, params, noise_sd: float = 1.0):
    """The same step on one flat parameter vector (``ravel_pytree``): fewer, larger XLA ops.

    Not how MAML is usually written by hand, but what hiermeta does inside (it adapts flat
    ``theta``), so it is the fairest yardstick.  Takes and returns the flat vector.
    """
    _, unravel = ravel_pytree(params)

    def loss(theta, x, y):
        return 0.5 * jnp.sum((mlp(unravel(theta), x) - y) ** 2) / noise_sd**2

    def adapt(theta, x, y):
        body = lambda th, _: (th - inner_lr * jax.grad(loss)(th, x, y), None)
        return jax.lax.scan(body, theta, None, length=inner_steps)[0]

    def meta_loss(theta, xs, ys, xq, yq):
        return jnp.mean(jax.vmap(lambda a, b, c, d: loss(adapt(theta, a, b), c, d))(xs, ys, xq, yq))

    meta_grad = jax.value_and_grad(meta_loss)

    def step(theta, opt_state, xs, ys, xq, yq):
        value, grad = meta_grad(theta, xs, ys, xq, yq)
        updates, opt_state = outer.update(grad, opt_state, theta)
        return optax.apply_updates(theta, updates), opt_state, value

    return step, meta_grad
