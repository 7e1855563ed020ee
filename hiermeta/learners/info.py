"""What one meta-step reports: a typed NamedTuple per learner family (as BlackJAX's ``*Info``).

``state, info = learner.step(state, batch)``: ``info`` is one of the tuples below, each field an
array (a scalar unless said otherwise), so it passes through ``jit``, ``lax.scan`` and
``tree_map`` like any pytree.  ``extra`` holds the constrained value of every extra
hyperparameter site the learner learns, by site name (``noise_sd``, ``corr_chol_0``, ``gamma``;
``{}`` on a model without them).

:func:`hiermeta.fit` records every step as a flat dict, :func:`step_metrics` (each field by its
name, each extra site by its own name), so ``history["sigma"]`` and ``history["noise_sd"]`` read
as before.
"""

from __future__ import annotations

from typing import Mapping, NamedTuple, Union

import jax

__all__ = ["BilevelInfo", "ShrinkageMAPInfo", "MAMLInfo", "ReptileInfo", "ProtoNetInfo", "StepInfo", "step_metrics"]


class BilevelInfo(NamedTuple):
    """A meta-step of a Gaussian-prior learner (:func:`~hiermeta.learners.bilevel.gaussian_prior_learner`:
    Shrinkage, sigma-iMAML, iMAML, sigma-Reptile and their M- versions).

    Attributes:
      val_log_lik: mean over the batch of ``log p(D_val | theta_hat_t)`` (at the state before the step).
      inner_loss: mean final inner loss ``L_t(theta_hat_t)``.
      sigma: ``(M,)`` sigma after the step (iMAML: its fixed prior scale).
      extra: the learned extra sites after the step, by name.
      num_diverged: tasks whose inner solve diverged (the step is then skipped).
      inner_stationarity: the worst relative gradient norm of the inner solves (inf if one is not finite).
      num_unconverged: tasks whose inner solve did not reach its tolerance (diverged ones included).
      skipped: True when the update was not applied (not finite, or an inner solve diverged).
      cg_iterations: the most conjugate-gradient iterations a task took, over the step's solves
        (0 for Eq. 4, or when the step solves nothing).
      cg_residual: the worst relative residual ``||H v - g|| / ||g||`` over the step's solves
        (0 when it solves nothing).
      sigma_residual: that of the sigma step's solve alone (for Eq. 4, ``||H Sigma g - g|| / ||g||``:
        how far the prior is from the inner Hessian; 0 when sigma is fixed).
      sigma_growth: ``(M,)`` ``log(sigma_after / sigma_before)`` of this step (0 when fixed); what
        the run-off check (:mod:`hiermeta.learners.runoff`) reads.
    """

    val_log_lik: jax.Array
    inner_loss: jax.Array
    sigma: jax.Array
    extra: dict
    num_diverged: jax.Array
    inner_stationarity: jax.Array
    num_unconverged: jax.Array
    skipped: jax.Array
    cg_iterations: jax.Array
    cg_residual: jax.Array
    sigma_residual: jax.Array
    sigma_growth: jax.Array


class ShrinkageMAPInfo(NamedTuple):
    """A meta-step of (M-)Shrinkage MAP: :class:`BilevelInfo` without the hypergradient solve's fields."""

    val_log_lik: jax.Array
    inner_loss: jax.Array
    sigma: jax.Array
    extra: dict
    num_diverged: jax.Array
    inner_stationarity: jax.Array
    num_unconverged: jax.Array
    skipped: jax.Array


class MAMLInfo(NamedTuple):
    """A meta-step of MAML, M-MAML, FOMAML and FO-M-MAML.

    ``val_log_lik`` is minus the meta-objective (the mean query log-likelihood after the K
    steps); ``lr`` the ``(M,)`` inner learning rates after the step; the rest as :class:`BilevelInfo`.
    """

    val_log_lik: jax.Array
    inner_loss: jax.Array
    lr: jax.Array
    extra: dict
    num_diverged: jax.Array
    inner_stationarity: jax.Array
    num_unconverged: jax.Array
    skipped: jax.Array


class ReptileInfo(NamedTuple):
    """A meta-step of Reptile; fields as :class:`BilevelInfo`."""

    val_log_lik: jax.Array
    inner_loss: jax.Array
    extra: dict
    num_diverged: jax.Array
    inner_stationarity: jax.Array
    num_unconverged: jax.Array
    skipped: jax.Array


class ProtoNetInfo(NamedTuple):
    """A meta-step of ProtoNet.

    Attributes:
      val_log_lik: mean over episodes of the query log-likelihood at the prototypes.
      val_accuracy: mean over episodes of the query accuracy.
      num_missing: query observations whose class has no support example (the step is then skipped).
      skipped: True when the update was not applied.
    """

    val_log_lik: jax.Array
    val_accuracy: jax.Array
    num_missing: jax.Array
    skipped: jax.Array


StepInfo = Union[BilevelInfo, ShrinkageMAPInfo, MAMLInfo, ReptileInfo, ProtoNetInfo]


def step_metrics(info: Union[StepInfo, Mapping]) -> dict:
    """``info`` as a flat dict: each field by its name, the extra sites (``info.extra``) by theirs,
    in field order; what :func:`hiermeta.fit` stacks into its history.  A learner of one's own may
    return a plain dict of arrays instead of a NamedTuple: it is taken as it is."""
    if isinstance(info, Mapping):
        return dict(info)
    out = {}
    for name, value in info._asdict().items():
        if name == "extra":
            out.update(value)
        else:
            out[name] = value
    return out
