"""The one interface every meta-learner shares.

A learner is a :class:`MetaLearner`, a NamedTuple of pure functions closed over its
configuration (like an optax ``GradientTransformation``):

    state            = learner.init(key, params)               # params: a pytree like the model's
    state, info      = learner.step(state, batch)               # one meta-iteration on a TaskBatch
    problem          = learner.inner_problem(state.params)      # how a task is adapted
    adaptation       = learner.adapt(state, support)            # theta (T, P), stationarity, converged...

``info`` is the learner family's step-info NamedTuple (:mod:`hiermeta.learners.info`: the
validation log-likelihood, sigma or the learned rates, the inner solves' diagnostics, whether the
step was skipped).  ``step`` and ``adapt`` are jittable and vmap over the task axis inside; ``state`` is a
:class:`MetaState` NamedTuple, so it can be checkpointed, sharded and passed through ``lax.scan``.
``learner.inner_solver`` is the :class:`~hiermeta.solvers.InnerSolver` the learner adapts with
(its budget and tolerance, for host-side checks such as :func:`hiermeta.adapt`);
``learner.meta_gradient(params, batch)`` (where a learner has it) is the gradient, to minimise,
that one meta-step hands to the outer optimiser.

**Extra hyperparameter sites.**  On a model with sites besides phi and sigma
(:meth:`~hiermeta.HierarchicalModel.hyper_sites`: the likelihood's globals such as ``noise_sd``
and ``beta``, correlation factors ``corr_chol_k``, group coefficients ``gamma``), the
meta-parameters gain ``params["extra"]``: the *unconstrained* value ``u`` of each site the learner
learns, the site being ``biject_to(constraint)(u)`` (:mod:`hiermeta.sites`).  ``init`` takes their
constrained starting values as ``extra={name: value}`` (a correlation site also as the
correlation matrix itself), or ``data=`` to start every site on the data's own scale where the
likelihood can say (its ``initial_values``), else at the site's default.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ..hierarchy import HierarchicalModel, task_covariates_of
from ..inner import Adaptation, InnerProblem, InnerResult, run_inner
from ..sites import HyperSite, constrain
from ..starts import check_values, data_start, unconstrained
from ..solvers import InnerSolver

__all__ = ["MetaState", "MetaLearner", "make_adapt", "inner_metrics", "outer_update", "all_finite",
           "learned_sites", "flat_phi", "extra_params", "extra_values", "task_start", "starting_values", "extra_metrics"]


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
    step: Callable[[MetaState, Any], tuple[MetaState, Any]]  # (state, batch) -> (state, a StepInfo NamedTuple)
    inner_problem: Callable[[Any], InnerProblem]
    adapt: Callable[..., Adaptation]
    inner_solver: Optional[InnerSolver] = None
    meta_gradient: Optional[Callable[[Any, Any], tuple]] = None


# ---------------------------------------------------------------------------- extra sites


def learned_sites(model: HierarchicalModel, kinds=("global", "correlation", "group_coefficients")) -> dict:
    """The model's extra hyperparameter sites of the given kinds (name -> HyperSite), in model order."""
    return {name: site for name, site in model.hyper_sites().items() if site.kind in kinds}


def flat_phi(model: HierarchicalModel, params) -> jax.Array:
    """phi as a flat ``(P,)`` array from a pytree like the model's template or a flat array."""
    P = model.partition.num_params
    if isinstance(params, (np.ndarray, jax.Array)) and np.shape(params) == (P,):
        return jnp.asarray(params, dtype=jnp.result_type(float))
    return model.partition.ravel(params)


starting_values = data_start  # the likelihood's data-scaled starts (hiermeta.starts)


def extra_params(model: HierarchicalModel, sites: dict, extra=None, defaults=None, learner: str = "") -> dict:
    """Unconstrained ``params["extra"]`` for ``sites`` from constrained values ``extra`` (checked by
    :func:`hiermeta.starts.check_values`), else ``defaults`` (e.g. :func:`starting_values`), else each
    site's default start.

    Raises ``ValueError`` naming a site the model does not have (or the learner does not learn), a
    wrong shape, a value outside the site's support, a correlation start that is not positive definite.
    """
    given = check_values(model, extra, allowed=sites, where="extra", learner=learner or "this learner")
    defaults = check_values(model, {n: v for n, v in dict(defaults or {}).items() if n in sites}, allowed=sites,
                            where="the data's start")
    values = {name: given.get(name, defaults.get(name, site.init)) for name, site in sites.items()}
    return {name: jnp.asarray(u, dtype=jnp.zeros(()).dtype) for name, u in unconstrained(model, values).items()}


def extra_values(model: HierarchicalModel, params) -> Optional[dict]:
    """Constrained values of every extra site (None for a model without): the learned ones from
    ``params["extra"]``, the others at their default start (e.g. iMAML's identity correlation)."""
    sites = model.hyper_sites()
    if not sites:
        return None
    learned = params.get("extra", {}) if isinstance(params, dict) else {}
    dtype = params["phi"].dtype
    values = constrain({n: s for n, s in sites.items() if n in learned}, learned)
    for name, site in sites.items():
        if name not in values:
            values[name] = jnp.asarray(site.init, dtype=dtype)
    return values


def task_start(model: HierarchicalModel, phi, extra):
    """The inner solve's start: ``phi`` (an array), or with task covariates the function
    ``data_t -> phi + z_t gamma`` (the task's prior mean)."""
    if not model.num_task_covariates:
        return phi

    def start(data_t):
        z = task_covariates_of(data_t)
        if z is None:
            raise ValueError("the model has task covariates: the task data needs task_covariates")
        return model.prior_mean(phi, extra, z)

    return start


def extra_metrics(model: HierarchicalModel, params) -> dict:
    """A step info's ``extra``: the constrained value of every extra site the learner learns, by site name."""
    learned = params.get("extra", {}) if isinstance(params, dict) else {}
    values = extra_values(model, params) or {}
    return {name: values[name] for name in learned}


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
    """A step info's fields for a batch's inner solves: ``inner_stationarity`` (the worst relative gradient
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
