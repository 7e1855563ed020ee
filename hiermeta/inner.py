"""The inner problem of a task and how it is solved (:mod:`hiermeta.solvers`).

Every learner adapts to a task the same way: start at ``init`` (usually phi) and minimise a
per-task loss with an inner solver.  A learner describes that with an :class:`InnerProblem`;
:func:`run_inner` solves it for one task and is vmapped over the task batch by the callers, so
a batch compiles once per shape.  :class:`Adaptation` is what ``learner.adapt`` returns for a
batch of tasks.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional, Union

import jax
import optax

from .solvers import DIVERGENCE_FACTOR, InnerResult, InnerSolver, gradient_steps

__all__ = ["InnerProblem", "InnerResult", "Adaptation", "run_inner", "DIVERGENCE_FACTOR"]


class InnerProblem(NamedTuple):
    """One task's adaptation problem.

    Attributes:
      init: flat ``(P,)`` starting point (phi for every method in the paper), or a function
        ``data_t -> (P,)`` for a start that depends on the task (its prior mean
        ``phi + z_t gamma`` in a model with task covariates).
      loss: ``loss(theta, data_t) -> scalar`` to minimise (e.g. ``L_t`` of Eq. 2).
      solver: an :class:`~hiermeta.solvers.InnerSolver`; an optax ``GradientTransformation``
        is shorthand for :func:`~hiermeta.solvers.gradient_steps` with it (then
        :func:`run_inner` needs ``num_steps``).
    """

    init: Union[jax.Array, Callable[[Any], jax.Array]]
    loss: Callable[[jax.Array, Any], jax.Array]
    solver: Union[InnerSolver, optax.GradientTransformation]


class Adaptation(NamedTuple):
    """A batch of tasks adapted by a learner's inner solver (``learner.adapt``, :func:`hiermeta.adapt`).

    Attributes (leading task axis T):
      theta: ``(T, P)`` adapted task parameters.
      loss: ``(T,)`` inner loss at theta.
      stationarity: ``(T,)`` relative gradient norm ``||g(theta)|| / ||g(theta_0)||``
        (:mod:`hiermeta.solvers`).
      converged: ``(T,)`` stationarity within the solver's tolerance, not diverged.
      diverged: ``(T,)`` the solve ran off (non-finite, or the loss rose a hundredfold).
    """

    theta: jax.Array
    loss: jax.Array
    stationarity: jax.Array
    converged: jax.Array
    diverged: jax.Array


def run_inner(
    problem: InnerProblem,
    data_t: Any,
    num_steps: Optional[int] = None,
    observe: Optional[Callable[[jax.Array], Any]] = None,
    unroll: int = 1,
    remat: bool = False,
) -> InnerResult:
    """Solve ``problem.loss(., data_t)`` from ``problem.init`` with ``problem.solver``.

    ``num_steps`` (static) overrides the solver's budget: K optimiser steps, or the most Newton
    / L-BFGS iterations; ``observe`` (if given) is evaluated at every iterate ``theta_0 ..
    theta_K`` (for Newton and L-BFGS the iterates of their outer loop, frozen once converged).
    With gradient steps this function is differentiable (MAML backpropagates through it);
    implicit methods differentiate its fixed point instead.  ``unroll`` and ``remat`` apply to
    an optax optimiser given as the solver (:func:`~hiermeta.solvers.gradient_steps` takes them
    otherwise).
    """
    solver = problem.solver
    if not isinstance(solver, InnerSolver):
        if num_steps is None:
            raise ValueError("run_inner with an optax optimiser as the solver needs num_steps")
        solver = gradient_steps(solver, num_steps, unroll=unroll, remat=remat)
    elif unroll != 1 or remat:
        raise ValueError("unroll and remat are options of hiermeta.solvers.gradient_steps, not of run_inner")
    init = problem.init(data_t) if callable(problem.init) else problem.init
    return solver.solve(lambda theta: problem.loss(theta, data_t), init, num_steps, observe)
