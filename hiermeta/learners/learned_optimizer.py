"""A learned optimiser (Andrychowicz et al. 2016, "Learning to learn by gradient descent by gradient
descent"): a coordinate-wise LSTM that maps (parameter, gradient) to the update, meta-trained
through K inner steps by truncated backpropagation; an optax transformation, so it is the inner
solver of any learner (:func:`learned_solver`).

**The update rule.**  Every coordinate ``i`` of theta runs the same small LSTM cell (shared
weights, its own state ``(h_i, c_i)``) on

    x_i = [ log(|g_i|) / p  or -1,   sign(g_i)  or  e^p g_i,   theta_i - theta_{0,i},   onehot(module_i) ]

(the gradient preprocessed as in Andrychowicz et al.'s appendix, p = 10: the first pair when
``|g_i| >= e^-p``, the second otherwise; the displacement from the start; the coordinate's module),
and the step is

    theta_i <- theta_i - exp(log_lr_{m(i)}) g_i + s * (w_out . h_i + b_out),

an SGD step at a learned per-module rate (M-MAML's rule) plus the LSTM's output, scaled by
``s = output_scale`` (0.1 as in the paper).  ``w_out, b_out`` start at zero, so at the start the
rule *is* M-MAML's SGD and meta-training learns what the LSTM adds (momentum, step-size
adaptation, per-coordinate schedules: its state carries the gradient history).

**Meta-training** (:func:`learned_optimizer`) learns ``omega = (LSTM, w_out, b_out, log_lr)`` and,
with ``learn_init``, the start phi (then it is MAML with a learned inner optimiser).  The K inner
steps on the support loss ``-log p(D_t^tr | theta)`` are cut into ``K / T`` segments of
``T = truncation`` steps; segment ``j`` is scored by the query loss at its end,

    J(omega, phi) = mean_t mean_j -log p(D_t^val | theta_{t, (j+1) T}),

and differentiated by backpropagation through its own T steps only: the iterate and LSTM state
it starts from are held constant (truncated backpropagation through time).  With ``T = K`` this
is the exact gradient of the query loss after K steps (MAML's objective); the test checks it
against central finite differences, and the truncated gradient against finite differences of
each segment with its start held fixed.  ``first_order`` drops the second-order terms (the
gradient input treated as a constant, as Andrychowicz et al. do).
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ..hierarchy import HierarchicalModel
from ..inner import InnerProblem
from ..partition import ModulePartition
from ..solvers import InnerSolver, _finish, gradient_steps
from ..utils import check_count, check_positive
from .base import MetaLearner, MetaState, flat_phi, inner_metrics, make_adapt, new_state, outer_update
from .info import MAMLInfo
from .maml import maml_params, rates_of
from .small_nets import lstm_apply, lstm_init

__all__ = ["LSTMState", "lstm_optimizer", "learned_optimizer", "learned_solver", "preprocess_gradient",
           "GRADIENT_PREPROCESSING_P"]

GRADIENT_PREPROCESSING_P = 10.0


class LSTMState(NamedTuple):
    """The learned optimiser's state: the LSTM's ``(P, H)`` hidden and cell states and the start theta_0."""

    h: jax.Array
    c: jax.Array
    theta0: jax.Array


def preprocess_gradient(g: jax.Array, p: float = GRADIENT_PREPROCESSING_P) -> jax.Array:
    """``(P,) -> (P, 2)``: ``(log|g| / p, sign g)`` where ``|g| >= e^-p``, else ``(-1, e^p g)``."""
    big = jnp.abs(g) >= math.exp(-p)
    safe = jnp.where(big, jnp.abs(g), 1.0)
    first = jnp.where(big, jnp.log(safe) / p, -1.0)
    second = jnp.where(big, jnp.sign(g), math.exp(p) * g)
    return jnp.stack([first, second], axis=-1)


def _num_inputs(num_modules: int) -> int:
    return 3 + num_modules


def lstm_optimizer(params: dict, index, num_modules: int, output_scale: float = 0.1,
                   first_order: bool = False) -> optax.GradientTransformation:
    """The learned update rule (module docstring) as an optax transformation on a flat ``(P,)`` theta.

    Args:
      params: ``{"lstm": {"cell", "out"}, "log_lr": (M,) or (1,)}`` (a :func:`learned_optimizer`'s
        meta-parameters; may be traced).
      index: ``(P,)`` module of each coordinate (``ModulePartition.index``).
      num_modules: M.
      first_order: stop the gradient through the rule's gradient input (no second-order terms).
    """
    index = np.asarray(index)
    onehot = jax.nn.one_hot(jnp.asarray(index), num_modules)
    rate = jnp.take(jnp.broadcast_to(jnp.exp(params["log_lr"]), (num_modules,)), jnp.asarray(index))
    lstm = params["lstm"]
    H = lstm["out"]["w"].shape[0]

    def init(theta):
        zeros = jnp.zeros(theta.shape + (H,), theta.dtype)
        return LSTMState(zeros, zeros, theta)

    def update(grads, state, theta=None):
        if theta is None:
            raise ValueError("the learned optimiser reads the parameters: call update(grads, state, params)")
        g = jax.lax.stop_gradient(grads) if first_order else grads
        x = jnp.concatenate([preprocess_gradient(g), (theta - state.theta0)[:, None], onehot.astype(g.dtype)], -1)
        h, c = lstm_apply(lstm["cell"], x, state.h, state.c)
        step = -rate * g + output_scale * (h @ lstm["out"]["w"][:, 0] + lstm["out"]["b"][0])
        return step, LSTMState(h, c, state.theta0)

    return optax.GradientTransformation(init, update)


def learned_solver(learner: MetaLearner, state: MetaState, num_steps: Optional[int] = None,
                   tol: float = math.inf) -> InnerSolver:
    """The update rule that ``learner`` (a :func:`learned_optimizer`) has learned, at ``state``, as an
    :class:`~hiermeta.solvers.InnerSolver` of ``num_steps`` steps (default: its K) for any learner on
    a model with the same partition (``inner_solver=learned_solver(...)``); ``tol`` judges the
    relative gradient norm (default never: the steps are the method, not a solve)."""
    if not (isinstance(state.params, dict) and "lstm" in state.params):
        raise ValueError(f"{learner.name}'s state holds no learned optimiser (hiermeta.learners.learned_optimizer)")
    base = learner.inner_problem(state.params).solver
    n = base.num_steps if num_steps is None else check_count(num_steps, "num_steps", 0)
    tol = math.inf if tol is None else check_positive(tol, "tol") if math.isfinite(tol) else math.inf

    def solve(loss, theta0, num_steps=None, observe=None):
        result = base.solve(loss, theta0, n if num_steps is None else num_steps, observe)
        return result._replace(converged=~result.diverged & (result.stationarity <= tol))

    return InnerSolver(f"{n} steps of {learner.name}", n, tol, solve)


def learned_optimizer(
    model: HierarchicalModel,
    *,
    inner_steps: int,
    truncation: Optional[int] = None,
    hidden: int = 16,
    init_lr: float = 0.01,
    output_scale: float = 0.1,
    learn_init: bool = True,
    first_order: bool = False,
    remat: bool = False,
    outer_optimizer: Optional[optax.GradientTransformation] = None,
    name: Optional[str] = None,
) -> MetaLearner:
    """Meta-learn the coordinate-wise LSTM optimiser (and, with ``learn_init``, the start phi).

    Args:
      model: only its likelihood and partition are used (no prior: the inner loss is the support's
        negative log-likelihood, as MAML's).
      inner_steps: K, the inner steps during meta-training (and ``adapt``'s default budget).
      truncation: T, the steps backpropagated through per segment (must divide K; default K: the
        exact gradient).
      hidden: the LSTM's state size H.
      init_lr: the per-module SGD rate the rule starts from (learned, as M-MAML's).
      output_scale: s, the scale of the LSTM's output.
      learn_init: learn phi too (else it stays at init's value).
      first_order: no second-order terms through the gradient input.
      remat: rematerialise each segment in the backward pass (memory O(K / T + T) iterates, not O(K)).
      outer_optimizer: optax optimiser (default Adam, lr 1e-3).

    Meta-parameters ``{"phi", "log_lr" (M,), "lstm": {"cell", "out"}}``; step info
    :class:`~hiermeta.learners.info.MAMLInfo` (``lr``: the learned base rates per module).
    """
    K = check_count(inner_steps, "inner_steps", 1)
    T = K if truncation is None else check_count(truncation, "truncation", 1)
    if K % T:
        raise ValueError(f"truncation ({T}) must divide inner_steps ({K})")
    hidden = check_count(hidden, "hidden", 1)
    check_positive(init_lr, "init_lr")
    check_positive(output_scale, "output_scale")
    outer = outer_optimizer if outer_optimizer is not None else optax.adam(1e-3)
    part: ModulePartition = model.partition
    M = part.num_modules
    config = (part.index, M, float(output_scale), bool(first_order))

    def task_loss(theta, data_t):
        return -model.log_likelihood(theta, data_t)

    def rule(params):
        return lstm_optimizer(params, *config)

    def solver(params, num_steps=K):
        return gradient_steps(rule(params), num_steps, tol=math.inf)

    def start(params):
        return params["phi"] if learn_init else jax.lax.stop_gradient(params["phi"])

    def inner_problem(params) -> InnerProblem:
        return InnerProblem(params["phi"], task_loss, solver(params))

    def init(key, params, lr: Optional[float] = None) -> MetaState:
        phi = flat_phi(model, params)
        meta = maml_params(model, phi, init_lr if lr is None else lr, modular=True)
        meta["lstm"] = {"cell": lstm_init(key, _num_inputs(M), hidden, phi.dtype),
                        "out": {"w": jnp.zeros((hidden, 1), phi.dtype), "b": jnp.zeros((1,), phi.dtype)}}
        return new_state(meta, outer, key)

    def segments(params, theta0, train_t, val_t):
        """The K steps in K / T segments; returns theta_K and each segment's query loss ``(K / T,)``."""
        opt = rule(params)
        grad = jax.grad(task_loss)

        def one_step(carry, _):
            theta, s = carry
            updates, s = opt.update(grad(theta, train_t), s, theta)
            return (theta + updates, s), None

        def segment(carry, j):
            held = jax.lax.stop_gradient(carry)
            first = (j == 0).astype(theta0.dtype)  # the first segment keeps its path to phi
            carry = jax.tree_util.tree_map(lambda c, h: h + first * (c - h), carry, held)
            carry, _ = jax.lax.scan(one_step, carry, None, length=T)
            return carry, task_loss(carry[0], val_t)

        if remat:
            segment = jax.checkpoint(segment)
        (theta, _), losses = jax.lax.scan(segment, (theta0, opt.init(theta0)), jnp.arange(K // T))
        return theta, losses

    def meta_objective(params, batch):
        theta0 = start(params)

        def one(train_t, val_t):
            theta, losses = segments(params, theta0, train_t, val_t)
            theta_d = jax.lax.stop_gradient(theta)
            loss0, g0 = jax.value_and_grad(task_loss)(jax.lax.stop_gradient(theta0), train_t)
            inner = _finish(lambda th: task_loss(th, train_t), theta_d, loss0, jnp.sqrt(jnp.sum(g0**2)), math.inf,
                            None, check_rise=True)
            return jnp.mean(losses), losses[-1], inner

        objective, final, inner = jax.vmap(one)(batch.train, batch.val)
        return jnp.mean(objective), (jnp.mean(final), inner)

    def meta_gradient(params, batch):
        (_, (final, inner)), grads = jax.value_and_grad(meta_objective, has_aux=True)(params, batch)
        return grads, (final, inner)

    def step(state: MetaState, batch):
        grads, (final, inner) = meta_gradient(state.params, batch)
        num_diverged = jnp.sum(inner.diverged)
        state, skipped = outer_update(state, grads, outer, ok=num_diverged == 0)
        return state, MAMLInfo(val_log_lik=-final, inner_loss=jnp.mean(inner.final_loss), lr=rates_of(state.params, M),
                               extra={}, num_diverged=num_diverged, **inner_metrics(inner), skipped=skipped)

    if learn_init:
        default = f"LSTM-opt MAML (T={T})" if T < K else "LSTM-opt MAML"
    else:
        default = f"LSTM optimiser (T={T})" if T < K else "LSTM optimiser"
    return MetaLearner(
        name=name or default, model=model, init=init, step=step, inner_problem=inner_problem,
        adapt=make_adapt(inner_problem), inner_solver=gradient_steps(optax.sgd(init_lr), K, tol=math.inf),
        meta_gradient=meta_gradient)
