"""A MAML learner on hiermeta's pieces, for the benchmarks while ``hiermeta.maml`` is not on main.

Used only when ``hiermeta`` has no ``maml``: the benchmark tables say which one ran.  Same
interface as every learner (``MetaLearner``): no prior; the inner loop is ``hiermeta.run_inner``
with fixed-rate SGD on the task's negative log-likelihood read off the NumPyro model; the meta-
gradient backpropagates through the K unrolled steps (``remat=True`` wraps each step in
``jax.checkpoint``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

import hiermeta as hm
from hiermeta.inner import InnerProblem, run_inner
from hiermeta.learners.base import MetaLearner, make_adapt, new_state, outer_update


def _run_inner(problem, data_t, num_steps, remat):
    if not remat:
        return run_inner(problem, data_t, num_steps)
    try:
        return run_inner(problem, data_t, num_steps, remat=True)
    except TypeError:  # run_inner without the remat option: checkpoint the whole inner loop per task
        return jax.checkpoint(lambda p: run_inner(problem._replace(init=p), data_t, num_steps))(problem.init)


def maml(model: hm.HierarchicalModel, *, inner_steps: int, init_lr: float, outer_optimizer=None,
         remat: bool = False, name: str | None = None, **_) -> MetaLearner:
    outer = outer_optimizer or optax.adam(1e-3)
    task_loss = lambda theta, data_t: -model.log_likelihood(theta, data_t)

    def inner_problem(params):
        return InnerProblem(params["phi"], task_loss, optax.sgd(init_lr))

    def init(key, params):
        return new_state({"phi": model.partition.ravel(params)}, outer, key)

    def meta_objective(params, batch):
        problem = inner_problem(params)

        def one(train_t, val_t):
            result = _run_inner(problem, train_t, inner_steps, remat)
            return task_loss(result.theta, val_t), result

        losses, result = jax.vmap(one)(batch.train, batch.val)
        return jnp.mean(losses), result

    def step(state, batch):
        (loss, inner), grads = jax.value_and_grad(meta_objective, has_aux=True)(state.params, batch)
        num_diverged = jnp.sum(inner.diverged)
        state, skipped = outer_update(state, grads, outer, ok=num_diverged == 0)
        return state, {"val_log_lik": -loss, "num_diverged": num_diverged, "skipped": skipped}

    return MetaLearner(name or ("MAML (remat, provisional)" if remat else "MAML (provisional)"), model, init, step,
                       inner_problem, make_adapt(inner_problem))


def get_maml():
    """``(factory, provisional?)``: hiermeta's MAML if it exists, else this one."""
    real = getattr(hm, "maml", None)
    return (real, False) if real is not None else (maml, True)
