"""The one interface every meta-learner shares.

A learner is a :class:`MetaLearner`, a NamedTuple of pure functions closed over its
configuration (like an optax ``GradientTransformation``):

    state            = learner.init(key, params)               # params: a pytree like the model's
    state, metrics   = learner.step(state, batch)               # one meta-iteration on a TaskBatch
    problem          = learner.inner_problem(state.params)      # how a task is adapted
    adaptation       = learner.adapt(state, support)            # theta (T, P), stationarity, converged...

``step`` and ``adapt`` are jittable and vmap over the task axis inside; ``state`` is a
:class:`MetaState` NamedTuple, so it can be checkpointed, sharded and passed through ``lax.scan``.
``learner.inner_solver`` is the :class:`~hiermeta.solvers.InnerSolver` the learner adapts with
(its budget and tolerance, for host-side checks such as :func:`hiermeta.adapt`).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from ..hierarchy import HierarchicalModel
from ..inner import Adaptation, InnerProblem, InnerResult, run_inner
from ..solvers import InnerSolver

__all__ = ["MetaState", "MetaLearner", "make_adapt", "inner_metrics", "outer_update", "all_finite"]


class MetaState(NamedTuple):
    """Meta-training state.

    Attributes:
      params: meta-parameters (a dict of arrays, e.g. ``phi`` and ``log_sigma2``).
      opt_state: the outer optimiser's state.
      step: number of meta-steps taken (skipped ones included).
      num_skipped: meta-steps whose update was not finite and so left the state unchanged.
      key: PRNG key for learners that draw random numbers.
    """

    params: Any
    opt_state: Any
    step: jax.Array
    num_skipped: jax.Array
    key: jax.Array


class MetaLearner(NamedTuple):
    """A meta-learning algorithm as pure functions (see the module docstring)."""

    name: str
    model: HierarchicalModel
    init: Callable[..., MetaState]
    step: Callable[[MetaState, Any], tuple[MetaState, dict]]
    inner_problem: Callable[[Any], InnerProblem]
    adapt: Callable[..., Adaptation]
    inner_solver: Optional[InnerSolver] = None


def all_finite(tree) -> jax.Array:
    leaves = jax.tree_util.tree_leaves(tree)
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(leaf)) for leaf in leaves]))


def make_adapt(inner_problem: Callable[[Any], InnerProblem]):
    """``adapt(state, support, num_steps=None) -> Adaptation`` from a learner's ``inner_problem``.

    ``num_steps`` (static) overrides the inner solver's budget (K steps, or the most Newton /
    L-BFGS iterations).  Jittable; :func:`hiermeta.adapt` is the checked host-side call.
    """

    def adapt(state: MetaState, support, num_steps: Optional[int] = None) -> Adaptation:
        problem = inner_problem(state.params)
        r = jax.vmap(lambda d: run_inner(problem, d, num_steps))(support)
        return Adaptation(r.theta, r.final_loss, r.stationarity, r.converged, r.diverged)

    return adapt


def inner_metrics(inner: InnerResult) -> dict:
    """Step metrics of a batch's inner solves: ``inner_stationarity`` (the worst relative gradient
    norm over the batch, inf if one is not finite) and ``num_unconverged`` (diverged included)."""
    return {
        "inner_stationarity": jnp.max(inner.stationarity),
        "num_unconverged": jnp.sum(~inner.converged),
    }


def new_state(params, optimizer: optax.GradientTransformation, key) -> MetaState:
    return MetaState(
        params=params,
        opt_state=optimizer.init(params),
        step=jnp.zeros((), jnp.int32),
        num_skipped=jnp.zeros((), jnp.int32),
        key=key,
    )


def outer_update(
    state: MetaState, grads, optimizer: optax.GradientTransformation, ok=True
) -> tuple[MetaState, jax.Array]:
    """Apply one outer optimiser step on ``grads`` (to minimise), unless it is not finite.

    Like NumPyro's ``stable_update``: when the gradient or the updated parameters hold NaN/inf,
    or ``ok`` is False (e.g. an inner loop diverged), params and optimiser state stay as they
    were and ``num_skipped`` grows.  Returns the new state and the ``skipped`` flag.
    """
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    accept = jnp.asarray(ok) & all_finite(grads) & all_finite(params)

    def choose(new, old):
        return jax.tree_util.tree_map(lambda n, o: jnp.where(accept, n, o), new, old)

    new = state._replace(
        params=choose(params, state.params),
        opt_state=choose(opt_state, state.opt_state),
        step=state.step + 1,
        num_skipped=state.num_skipped + (~accept).astype(jnp.int32),
    )
    return new, ~accept
