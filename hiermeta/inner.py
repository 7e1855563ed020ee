"""The inner loop: K steps of an optax optimiser on one task's objective, under ``lax.scan``.

Every learner adapts to a task the same way: start at ``init`` (usually phi) and take
``num_steps`` optimiser steps on a per-task loss.  A learner describes that with an
:class:`InnerProblem`; :func:`run_inner` runs it for one task and is vmapped over the task batch
by the callers, so a batch compiles once for a given number of steps.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

__all__ = ["InnerProblem", "InnerResult", "run_inner", "DIVERGENCE_FACTOR"]

# The loss rising by more than this many times (1 + |initial loss|) counts as divergence.
DIVERGENCE_FACTOR = 100.0


class InnerProblem(NamedTuple):
    """One task's adaptation problem.

    Attributes:
      init: flat ``(P,)`` starting point (phi for every method in the paper).
      loss: ``loss(theta, data_t) -> scalar`` to minimise (e.g. ``L_t`` of Eq. 2).
      optimizer: the optax transformation taking the steps.
    """

    init: jax.Array
    loss: Callable[[jax.Array, Any], jax.Array]
    optimizer: optax.GradientTransformation


class InnerResult(NamedTuple):
    """Outcome of :func:`run_inner` for one task.

    Attributes:
      theta: final parameters ``(P,)``.
      initial_loss, final_loss: the inner loss at the start and at the end.
      diverged: True when the final loss is not finite or rose by more than
        ``DIVERGENCE_FACTOR * (1 + |initial_loss|)``.
      trace: ``observe(theta_k)`` stacked for k = 0..num_steps, or None.
    """

    theta: jax.Array
    initial_loss: jax.Array
    final_loss: jax.Array
    diverged: jax.Array
    trace: Any


def run_inner(
    problem: InnerProblem,
    data_t: Any,
    num_steps: int,
    observe: Optional[Callable[[jax.Array], Any]] = None,
    unroll: int = 1,
    remat: bool = False,
) -> InnerResult:
    """Take ``num_steps`` optimiser steps on ``problem.loss(., data_t)`` from ``problem.init``.

    The loop is a ``lax.scan`` (compiled once, whatever ``num_steps``), and ``observe`` (if given)
    is evaluated at every iterate ``theta_0 .. theta_K``.  This function is differentiable
    (MAML backpropagates through it); implicit methods differentiate its fixed point instead.
    ``remat=True`` wraps each step in ``jax.checkpoint``: reverse-mode differentiation then stores
    only the ``(theta, optimiser state)`` carries and recomputes each step's internals, which cuts
    the memory of backpropagating through long unrolled loops (same values and gradients).
    """
    value_and_grad = jax.value_and_grad(problem.loss)

    def body(carry, _):
        theta, opt_state = carry
        _, grad = value_and_grad(theta, data_t)
        updates, opt_state = problem.optimizer.update(grad, opt_state, theta)
        theta = optax.apply_updates(theta, updates)
        return (theta, opt_state), (observe(theta) if observe is not None else None)

    if remat:
        body = jax.checkpoint(body)
    theta0 = problem.init
    carry = (theta0, problem.optimizer.init(theta0))
    (theta, _), records = jax.lax.scan(body, carry, None, length=num_steps, unroll=unroll)
    trace = None
    if observe is not None:
        first = observe(theta0)
        trace = jax.tree_util.tree_map(lambda a, b: jnp.concatenate([a[None], b]), first, records)
    initial_loss = problem.loss(theta0, data_t)
    final_loss = problem.loss(theta, data_t)
    diverged = ~jnp.isfinite(final_loss) | ~jnp.all(jnp.isfinite(theta))
    diverged |= final_loss - initial_loss > DIVERGENCE_FACTOR * (1.0 + jnp.abs(initial_loss))
    return InnerResult(theta, initial_loss, final_loss, diverged, trace)
