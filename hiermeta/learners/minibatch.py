"""K minibatch steps on a task's inner loss: the long, stochastic inner loop of the NeurIPS protocol.

The inner loss of a Gaussian-prior learner is ``L_t(theta) = -log N(theta | m_t, Sigma) - log p(D_t^tr | theta)``
(Eq. 2).  A minibatch step draws ``b`` of the task's ``n`` observed rows uniformly without
replacement and descends

    L_t^B(theta) = -log N(theta | m_t, Sigma) - (n / b) log p(B | theta),

whose expectation over the draw is ``L_t`` (the likelihood is a sum over rows, so each row
enters with probability ``b / n`` and weight ``n / b``): an unbiased stochastic gradient of Eq. 2.
Rows are drawn afresh at every step (a key per task and per meta-step); ``b >= n`` is the full
batch, every step the same.  Padding (``mask`` False) is never drawn.

The K steps are the algorithm (Reptile's and sigma-Reptile's), not a solve: their stationarity
on the full ``L_t`` is reported (``inner_stationarity``), judged only against ``tol`` when one is
given.  ``optimizer`` is an optax transformation or :func:`~hiermeta.learners.proximal_sgd`
``(rate)`` (a fixed rate: its proximal step is rebuilt from the current sigma at every meta-step).
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from ..solvers import InnerResult, _finish
from ..utils import check_count

__all__ = ["MinibatchSteps", "minibatch_steps", "task_rows"]


def task_rows(data_t, rows: jax.Array):
    """One task's data restricted to ``rows`` (indices into its observation axis).

    Every field of the data NamedTuple has a leading observation axis except ``task_covariates``
    (per task) and fields that are None; ``inputs`` may be a pytree.
    """
    fields = {}
    for name in data_t._fields:
        value = getattr(data_t, name)
        if value is None or name == "task_covariates":
            fields[name] = value
        else:
            fields[name] = jax.tree_util.tree_map(lambda a: a[rows], value)
    return type(data_t)(**fields)


class MinibatchSteps(NamedTuple):
    """K minibatch steps (build with :func:`minibatch_steps`)."""

    optimizer: Any  # an optax GradientTransformation, or a ProximalSGD with a fixed rate
    num_steps: int
    batch_size: int
    tol: float = math.inf

    @property
    def name(self) -> str:
        return f"{self.num_steps} minibatch steps of {self.batch_size} rows"

    def transformation(self, prior_var) -> optax.GradientTransformation:
        """The optax step for prior variances ``prior_var`` (per coordinate)."""
        for_prior = getattr(self.optimizer, "for_prior", None)
        return for_prior(prior_var) if for_prior is not None else self.optimizer

    def solve(self, weighted_loss: Callable, theta0: jax.Array, data_t, key: jax.Array, prior_var,
              num_steps: Optional[int] = None) -> InnerResult:
        """Run the K steps for one task.

        ``weighted_loss(theta, rows_data, weight)`` is ``-log prior - weight * log p(rows_data | theta)``;
        the full loss is ``weighted_loss(theta, data_t, 1)``.  ``num_steps`` (static) overrides K.
        """
        K = self.num_steps if num_steps is None else check_count(num_steps, "num_steps", 0)
        mask = jnp.asarray(data_t.mask)
        n_rows = mask.shape[0]
        b = min(self.batch_size, n_rows)
        n_observed = jnp.sum(mask)
        opt = self.transformation(prior_var)
        full_loss = lambda theta: weighted_loss(theta, data_t, 1.0)

        def body(carry, step_key):
            theta, opt_state = carry
            # b distinct observed rows, uniformly: the b smallest of uniform draws, padding pushed last
            u = jnp.where(mask, jax.random.uniform(step_key, (n_rows,)), 2.0)
            rows = jnp.argsort(u)[:b]
            part = task_rows(data_t, rows)
            weight = n_observed / jnp.maximum(jnp.sum(part.mask), 1)
            grad = jax.grad(weighted_loss)(theta, part, weight)
            updates, opt_state = opt.update(grad, opt_state, theta)
            return (optax.apply_updates(theta, updates), opt_state), None

        (theta, _), _ = jax.lax.scan(body, (theta0, opt.init(theta0)), jax.random.split(key, K))
        loss0, g0 = jax.value_and_grad(full_loss)(jax.lax.stop_gradient(theta0))
        return _finish(full_loss, theta, loss0, jnp.sqrt(jnp.sum(g0 * g0)), self.tol, None, check_rise=True)


def minibatch_steps(optimizer, num_steps: int, batch_size: int, *, tol: float = math.inf) -> MinibatchSteps:
    """K steps of ``optimizer`` on minibatches of ``batch_size`` rows of each task's support (module
    docstring), for ``inner_optimizer=`` of the Gaussian-prior learners (no ``inner_steps=``).

    ``optimizer``: an optax transformation (e.g. ``optax.sgd(0.1)``, Reptile's inner SGD) or
    :func:`~hiermeta.learners.proximal_sgd` ``(rate)`` with a fixed rate (stable however small sigma
    gets).  ``tol``: relative gradient norm of the full ``L_t`` at which a task counts as converged
    (default ``inf``: never judged, as Reptile's K steps).
    """
    if isinstance(optimizer, optax.GradientTransformation):
        pass
    elif callable(getattr(optimizer, "for_prior", None)):
        if getattr(optimizer, "learning_rate", None) is None:
            raise ValueError("minibatch_steps needs proximal_sgd(rate) with a fixed rate (the curvature rate "
                             "needs the full support's Hessian at every step)")
    else:
        raise ValueError(f"optimizer must be an optax transformation or proximal_sgd(rate), got {type(optimizer).__name__}")
    if isinstance(tol, bool) or not tol > 0:
        raise ValueError(f"tol must be > 0 (math.inf: never judged), got {tol!r}")
    return MinibatchSteps(optimizer, check_count(num_steps, "num_steps", 1), check_count(batch_size, "batch_size", 1),
                          float(tol))
